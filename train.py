"""Train ViT_P / ViT_C with the recipe of "Early Convolutions Help Transformers See Better".

    python train.py --stem conv --size 4gf --data /imagenet                        # one GPU
    torchrun --nproc_per_node=8 train.py --stem conv --size 4gf --data /imagenet   # 8 GPUs
    python train.py --data fake --img-size 64 --batch-size 64 --epochs 2 --warmup-epochs 1  # CPU

The defaults are the paper's peak runs (section 6) with the official trainer's details (pycls,
branch vitconfigs); the README's recipe table says where each setting comes from, and the conv
stem itself is vitc.ConvStem. Read top-down: RECIPE (every constant), the arguments, main() (the
run in outline), train_one_epoch() (the step), then the recipe's pieces: model and optimizer,
AutoAugment v0, data, lighting, mixup/CutMix, EMA, precise BN, evaluation. Below the "Machinery"
banner is what keeps a long run safe and changes nothing that is learned: checkpoints and exact
resume, ranks agreeing, run folders, signals, unreadable files, one-line errors. A run writes
runs/MODEL-DATE-TIME (or --out DIR): args.jsonl, log.jsonl, checkpoint.pt, best.pt; --out DIR
--resume auto continues it. Run so far on CPUs only: no ImageNet run has been made with it yet.
"""

import argparse
import contextlib
import copy
import datetime
import errno
import functools
import hashlib
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
from itertools import islice

# A stop signal is caught from the first moment, also while torch loads (seconds): the run then
# stops cleanly before training (see "Signals", near the end of this file).
EARLY_SIGNALS = []
if __name__ == "__main__":
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, lambda signum, frame: EARLY_SIGNALS.append(signum))

import torch  # noqa: E402  (after the signal handlers above)
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
from torch.distributed.elastic.multiprocessing.errors import record as record_errors
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import vitc

# ================================================================================================
# RECIPE: every constant of the paper's training (section 6 and the appendix), with the official
# trainer's details (pycls, branch vitconfigs). The flags below default to these.
# ================================================================================================

# Optimisation: global batch 2048 (the learning rates are quoted at it and scale linearly with
# the batch, section 5.4), 400 epochs, 5 of linear warmup from 0.1 x lr, then a half-period cosine
# ending at 0.005 x lr (official WARMUP_FACTOR and MIN_LR), stepped every iteration here.
BATCH_SIZE, EPOCHS, WARMUP_EPOCHS = 2048, 400, 5
WARMUP_START, COSINE_FLOOR = 0.1, 0.005  # fractions of the peak lr
# AdamW: the peak runs of section 6, "1.0e-3/0.24 ... except for the 36GF models", for which the
# paper found 6.0e-4/0.28 "to be more effective" (the official configs/vitconv_baselines/vit/
# ViT-{P,C}-36GF_adamw_32gpus.yaml say 7e-4 / 0.24). SGD (Nesterov momentum 0.9): the per-model
# values tuned at 50 epochs (Table 4); the paper gives none for 36GF.
ADAMW = {"1gf": (1e-3, 0.24), "4gf": (1e-3, 0.24), "18gf": (1e-3, 0.24), "36gf": (6e-4, 0.28)}
SGD = {"vitp_1gf": (1.9, 1.3e-5), "vitp_4gf": (1.9, 1.3e-5), "vitp_18gf": (1.1, 1.2e-5),
       "vitc_1gf": (1.9, 1.3e-5), "vitc_4gf": (1.3, 2.2e-5), "vitc_18gf": (1.1, 2.7e-5)}

# Data: random resized crop and flip, then AutoAugment (the "v0" policy, below); test images are
# resized to 256 and centre-cropped to 224 (both scaled with --img-size).
CROP_SCALE = (0.08, 1.0)
EVAL_RESIZE = 256 / 224
AUTOAUGMENT = "v0"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# PCA lighting (AlexNet), added in [0, 1] RGB space before normalisation: eigenvalues and
# eigenvectors (columns) of ImageNet's pixel covariance, as the official pycls/datasets/imagenet.py.
LIGHTING_STD = 0.1
EIGVAL = (0.2175, 0.0188, 0.0045)
EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))

# Regularisation: one of mixup (alpha 0.8) or CutMix (alpha 1.0) per batch, mixup with
# probability MIXUP_CHOICE (each rank draws for its share of the batch: a deviation, see the
# README); label smoothing 0.1 on the mixed targets.
MIXUP_ALPHA, CUTMIX_ALPHA, MIXUP_CHOICE = 0.8, 1.0, 0.5
LABEL_SMOOTHING = 0.1

# EMA of the weights and BatchNorm buffers, evaluated instead of the weights: every EMA_PERIOD
# steps, ema <- (1 - a) ema + a w with a = EMA_ALPHA x global batch x EMA_PERIOD / epochs (so its
# horizon is about fixed in epochs); during warmup it copies the weights (official code).
EMA_PERIOD, EMA_ALPHA = 32, 1e-5

# Precise BatchNorm: before every evaluation, BN statistics recomputed from this many train
# images (train transforms, no mixup/CutMix), averaged over ranks. Only ViT_C has BatchNorm.
PRECISE_BN_IMAGES = 8192


# ------------------------------------------------------------------------------------------------
# Arguments: the recipe (defaults above), then the run (data, folders, precision, resuming)
# ------------------------------------------------------------------------------------------------


def parse_args(argv):
    """The arguments, with the model's paper lr/wd filled in and every number checked."""
    p = Parser(description="Train the paper's ViT_P / ViT_C (see the module docstring).",
               formatter_class=HelpFormatter)
    r = p.add_argument_group("recipe", "the paper's training; the defaults are its peak runs")
    r.add_argument("--stem", choices=["patch", "conv"], default="conv",
                   help="patch: ViT_P, conv: ViT_C")
    r.add_argument("--size", choices=["1gf", "4gf", "18gf", "36gf"], default="1gf",
                   help="model complexity (Table 1)")
    r.add_argument("--model", help="a paper variant by name, e.g. vitc_4gf (overrides stem/size)")
    r.add_argument("--img-size", type=int, default=224, help="train/test resolution")
    r.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="global batch, all ranks")
    r.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs")
    r.add_argument("--warmup-epochs", type=float, default=WARMUP_EPOCHS, help="lr warmup epochs")
    r.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="AdamW, or SGD with Nesterov momentum 0.9")
    r.add_argument("--lr", type=float, help="peak lr at batch 2048 (default: the paper's)")
    r.add_argument("--wd", type=float, help="weight decay (default: the paper's)")
    r.add_argument("--autoaugment", choices=["v0", "imagenet", "none"], default=AUTOAUGMENT,
                   help="v0: the official code's policy; imagenet: torchvision's ImageNet policy")
    r.add_argument("--lighting", type=float, default=LIGHTING_STD, help="PCA lighting std, 0: off")
    r.add_argument("--mixup", type=float, default=MIXUP_ALPHA, help="mixup alpha, 0 = off")
    r.add_argument("--cutmix", type=float, default=CUTMIX_ALPHA, help="CutMix alpha, 0 = off")
    r.add_argument("--label-smoothing", type=float, default=LABEL_SMOOTHING, help="its epsilon")
    r.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="keep and evaluate an EMA of the weights")
    r.add_argument("--ema-period", type=int, default=EMA_PERIOD, help="EMA update every N steps")
    r.add_argument("--ema-alpha", type=float, default=EMA_ALPHA, help="official EMA_ALPHA")
    r.add_argument("--precise-bn", type=int, default=PRECISE_BN_IMAGES, metavar="N",
                   help="recompute BatchNorm statistics from N train images before every "
                        "evaluation, 0 = off (no effect on ViT_P, which has no BatchNorm)")
    r.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    g = p.add_argument_group("run", "where and how this run runs")
    g.add_argument("--data", default=os.environ.get("IMAGENET"),
                   help="folder with train/ and val/ (default: $IMAGENET), or 'fake' for random "
                        "images that learn nothing (a smoke test of the pipeline)")
    g.add_argument("--out", help="run folder (default: a new runs/MODEL-DATE-TIME)")
    g.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs")
    g.add_argument("--train-precision", choices=["bf16", "fp16", "fp32"],
                   help="bf16 autocast (A100, H100), fp16 autocast with loss scaling (V100, "
                        "which has no bf16; the official trainer's) or fp32 (default: bf16 on "
                        "CUDA, fp32 on the CPU)")
    g.add_argument("--eval-precision", choices=["bf16", "fp32"], default="fp32",
                   help="fp32 as the official code, or bf16 autocast (faster on GPUs)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--workers", type=int, help="data loader processes per rank "
                   "(default: the CPU cores per local rank, at most 8)")
    g.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="stop when more than this fraction of a global batch or of an epoch's "
                        "images is unreadable (unreadable train images are replaced)")
    g.add_argument("--resume", help="checkpoint to continue from, or 'auto': "
                   "OUT/checkpoint.pt if there is one (needs --out)")
    g.add_argument("--stop-after", type=int, help="train at most N epochs in this invocation, "
                   "then checkpoint and exit (for job time limits; continue with --resume auto)")
    g.add_argument("--keep-checkpoint", action=argparse.BooleanOptionalAction, default=True,
                   help="keep checkpoint.pt once the run has finished; --no-keep-checkpoint "
                        "deletes it then, keeping best.pt, log.jsonl and args.jsonl (all that "
                        "a sweep's report needs); a run stopped before its end keeps it")
    g.add_argument("--fake-size", type=int, default=2048, help="--data fake: train images")
    args = p.parse_args(argv)
    args.model = args.model or f"vit{args.stem[0]}_{args.size}"
    if args.model not in vitc.VARIANTS:
        raise RunError(f"unknown model {args.model!r}; valid: {', '.join(vitc.VARIANTS)}")
    default = paper_lr_wd(args.model, args.optimizer)
    if default is None and (args.lr is None or args.wd is None):
        raise RunError(f"the paper gives no SGD settings for {args.model}: pass --lr and --wd")
    args.lr = default[0] if args.lr is None else args.lr
    args.wd = default[1] if args.wd is None else args.wd
    if args.resume == "auto" and not args.out:
        raise RunError("--resume auto continues the run in --out: pass --out RUN_FOLDER")
    if args.resume and args.resume != "auto" and not args.out:
        args.out = os.path.dirname(args.resume) or "."  # continue in the checkpoint's folder
    check_numbers(args)
    return args


# ------------------------------------------------------------------------------------------------
# The run, in outline
# ------------------------------------------------------------------------------------------------


def main(argv=None):
    """The whole run: set up, build (or resume), then per epoch train, evaluate, checkpoint, log.
    Returns the exit status: 0 when the run finished, or stopped cleanly to be continued."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    with distributed() as (rank, world_size, device):  # torchrun's ranks, or one process
        with run_folder(args, rank, world_size):  # args.out: a new folder unless one was given
            run = build_run(args, rank, world_size, device)  # data, model, optimizer; resumed
        with started(run, argv):  # signals caught, folder locked, invocation in args.jsonl
            first_epoch = run.epoch
            for epoch in range(run.epoch, args.epochs):
                train_one_epoch(run, epoch)
                if run.stopped and run.step < (epoch + 1) * run.steps_per_epoch:  # mid-epoch
                    save_checkpoint(run)  # with the epoch's figures so far
                    return report_stop(run)
                run.epoch = epoch + 1
                record = {"epoch": run.epoch, "step": run.step, "lr": run.lr,
                          "train_loss": run.progress["loss_sum"] / run.progress["steps"]}
                if run.epoch % args.eval_every == 0 or run.epoch == args.epochs:
                    evaluate_epoch(run, record)  # precise BN, then the model and its EMA
                end_epoch(run, record)  # checkpoint, then the record into log.jsonl
                if any_rank(run.stop_signal is not None, run):  # on the last step, or in eval
                    return report_stop(run)
                if args.stop_after and run.epoch - first_epoch >= args.stop_after \
                        and run.epoch < args.epochs:
                    return report_stop(run, f"stopped after {args.stop_after} epochs as asked "
                                            f"(--stop-after)")
            if not args.keep_checkpoint:
                drop_checkpoint(run)  # the run is finished: its logs and best.pt remain
            report_done(run, nothing_to_do=first_epoch == args.epochs)
    return 0


# ------------------------------------------------------------------------------------------------
# The training step
# ------------------------------------------------------------------------------------------------


def train_one_epoch(run, epoch):
    """One pass over this rank's shard of the train set (from where a resumed run left off):
    the step, written out. The Monitor reads the loss, the unreadable images and the stop
    signals of all ranks every CHECK_EVERY steps and at the epoch's end, not at every step."""
    args, device = run.args, run.device
    first = min(max(run.step - epoch * run.steps_per_epoch, 0), run.steps_per_epoch)
    batches = train_batches(run, epoch, skip=first * args.accum_steps)
    amp = args.train_precision in ("bf16", "fp16")  # autocast to the dtype of that name
    dtype = torch.float16 if args.train_precision == "fp16" else torch.bfloat16
    with Monitor(run, epoch, first) as monitor:  # progress bar, checks, the epoch's figures
        for _ in range(first, run.steps_per_epoch):
            step_loss = torch.zeros((), device=device)
            for micro_step in range(args.accum_steps):  # --accum-steps micro-batches a step
                images, labels, bad = next(batches)  # uint8; unreadable files named in `bad`
                monitor.count_unreadable(bad, labels)
                images, labels = to_device(images, labels, device, args.lighting)  # lighting
                images, targets = run.mix(images, labels) if run.mix else (images, labels)
                sync = micro_step == args.accum_steps - 1 or run.world_size == 1
                with contextlib.nullcontext() if sync else run.train_model.no_sync():
                    with torch.autocast(device.type, dtype, enabled=amp):
                        logits = run.train_model(images)
                    # Label smoothing here and only here, also on mixed (soft) targets.
                    loss = F.cross_entropy(logits.float(), targets,
                                           label_smoothing=args.label_smoothing) / args.accum_steps
                    # DDP averages the gradients over ranks on the last micro-step; fp16 scales
                    # the loss up first, so that small gradients do not underflow.
                    (loss if run.scaler is None else run.scaler.scale(loss)).backward()
                step_loss += loss.detach()  # stays on the device: no wait for the GPU here
            if run.scaler is None:
                run.optimizer.step()
                skipped = None
            else:  # fp16: an update whose scaled gradients overflowed is skipped
                skipped = scaled_step(run)
            run.lr = run.scheduler.get_last_lr()[0]  # the lr this step used
            run.scheduler.step()  # per step: linear warmup, then cosine
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            update_ema(run, epoch)
            if monitor.after_step(step_loss, skipped):  # any rank asked to stop (every N steps)
                run.stopped = True
                break


# ------------------------------------------------------------------------------------------------
# The run's parts: data, model, EMA, optimizer and schedule
# ------------------------------------------------------------------------------------------------


def build_run(args, rank, world_size, device):
    """Data, model, EMA, optimizer and schedule, restored from a checkpoint when resuming. The
    data and the checkpoint are checked here, on every rank, before any training."""
    if args.batch_size % (world_size * args.accum_steps):
        raise RunError(f"--batch-size {args.batch_size} is not divisible by world size "
                       f"{world_size} x --accum-steps {args.accum_steps}")
    if args.train_precision is None:  # bf16 autocast on CUDA, fp32 on the CPU
        args.train_precision = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda":  # TF32 matmuls and convolutions (fp32 evaluation turns them off)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    run = argparse.Namespace(args=args, rank=rank, world_size=world_size, device=device,
                             stop_signal=None, stopped=False, lr=None, progress=new_progress(),
                             lock=None)
    run.train_set, val_set, ckpt, path = checked_inputs(args, world_size)
    run.micro_batch = args.batch_size // (world_size * args.accum_steps)
    # Train: equal shards per rank, no padding, the last partial batch dropped (BN and mixup need
    # full batches). Workers restart every epoch, seeded from the checkpointed RNG.
    run.sampler = DistributedSampler(run.train_set, world_size, rank, seed=args.seed,
                                     drop_last=True)
    run.steps_per_epoch = len(run.sampler) // (run.micro_batch * args.accum_steps)
    if run.steps_per_epoch == 0:
        raise RunError(f"the train set has {len(run.train_set)} images, fewer than one global "
                       f"batch of {args.batch_size}")
    run.workers = args.workers if args.workers is not None else min(
        8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    # Val: rank r takes images r, r + W, ...: each image exactly once, shards may differ by one.
    run.val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world_size)),
                                min(run.micro_batch, 256), num_workers=run.workers,
                                pin_memory=device.type == "cuda",
                                generator=torch.Generator())  # not the training's RNG
    check_resume(run, ckpt, path)

    torch.manual_seed(args.seed)  # identical initialisation on every rank
    run.model = vitc.create_model(args.model, args.num_classes, args.img_size).to(device)
    run.ema = copy.deepcopy(run.model).eval().requires_grad_(False) if args.ema else None
    run.peak_lr = vitc.scale_lr(args.lr, args.batch_size)  # lrs are quoted at batch 2048
    run.optimizer = vitc.make_optimizer(run.model, args.optimizer, run.peak_lr, args.wd)
    total = args.epochs * run.steps_per_epoch
    warmup = min(round(args.warmup_epochs * run.steps_per_epoch), total - 1)
    run.scheduler = vitc.make_scheduler(run.optimizer, total, warmup, WARMUP_START, COSINE_FLOOR)
    # fp16 autocast needs loss scaling (as the official trainer, and torchvision's --amp)
    run.scaler = torch.amp.GradScaler(device.type) if args.train_precision == "fp16" else None
    run.mix = build_mix(args, args.num_classes)
    run.epoch, run.step, run.best = 0, 0, (-1.0, 0)
    torch.manual_seed(args.seed + 1 + rank)  # augmentation differs across ranks
    random.seed(args.seed + 1 + rank)
    if ckpt is not None:
        restore(run, ckpt)
    # What the step calls: run.model itself, or run.model compiled and/or wrapped in DDP (which
    # averages the gradients over ranks). Checkpoints, the EMA and evaluation use run.model.
    # DDP(compile(model)), as PyTorch's "Where to apply torch.compile?" advises: compile the
    # module DDP wraps. Dynamo's DDPOptimizer still splits the compiled graph at DDP's buckets
    # so that their all-reduces overlap the backward (it finds the DDP module around the compiled
    # code), while compiling DDP itself would break the graph in DDP's forward. run.model stays
    # uncompiled for the EMA, precise BN, evaluation and checkpoints (no "_orig_mod." keys).
    run.train_model = torch.compile(run.model) if args.compile else run.model
    if world_size > 1:
        run.train_model = DistributedDataParallel(
            run.train_model, device_ids=[device] if device.type == "cuda" else None)
    return run


# ------------------------------------------------------------------------------------------------
# AutoAugment "v0" (the policy the official trainer uses) on uint8 image tensors
# ------------------------------------------------------------------------------------------------

# The v0 policy of the TF EfficientNet code (tensorflow/tpu, models/official/efficientnet/
# autoaugment.py, policy_v0), used by the official pycls/datasets/augment.py and known as timm's
# "v0": one of 25 sub-policies per image, each two (op, probability, level) steps, a step running
# with its probability. Levels are the published 0-10; AUTOAUGMENT_OPS maps them to magnitudes.
AUTOAUGMENT_V0 = (
    (("equalize", 0.8, 1), ("shear_y", 0.8, 4)),
    (("color", 0.4, 9), ("equalize", 0.6, 3)),
    (("color", 0.4, 1), ("rotate", 0.6, 8)),
    (("solarize", 0.8, 3), ("equalize", 0.4, 7)),
    (("solarize", 0.4, 2), ("solarize", 0.6, 2)),
    (("color", 0.2, 0), ("equalize", 0.8, 8)),
    (("equalize", 0.4, 8), ("solarize_add", 0.8, 3)),
    (("shear_x", 0.2, 9), ("rotate", 0.6, 8)),
    (("color", 0.6, 1), ("equalize", 1.0, 2)),
    (("invert", 0.4, 9), ("rotate", 0.6, 0)),
    (("equalize", 1.0, 9), ("shear_y", 0.6, 3)),
    (("color", 0.4, 7), ("equalize", 0.6, 0)),
    (("posterize", 0.4, 6), ("auto_contrast", 0.4, 7)),
    (("solarize", 0.6, 8), ("color", 0.6, 9)),
    (("solarize", 0.2, 4), ("rotate", 0.8, 9)),
    (("rotate", 1.0, 7), ("translate_y", 0.8, 9)),
    (("shear_x", 0.0, 0), ("solarize", 0.8, 4)),
    (("shear_y", 0.8, 0), ("color", 0.6, 4)),
    (("color", 1.0, 0), ("rotate", 0.6, 2)),
    (("equalize", 0.8, 4), ("equalize", 0.0, 8)),
    (("equalize", 1.0, 4), ("auto_contrast", 0.6, 2)),
    (("shear_y", 0.4, 7), ("solarize_add", 0.6, 7)),
    (("posterize", 0.8, 2), ("solarize", 0.6, 10)),
    (("solarize", 0.6, 8), ("equalize", 0.6, 1)),
    (("color", 0.8, 6), ("rotate", 0.4, 5)),
)
GREY = [128.0, 128.0, 128.0]  # fill of the geometric ops, which interpolate bilinearly
BILINEAR = T.InterpolationMode.BILINEAR


def _shear(image, factor, axis):  # about the top-left corner, like PIL's affine transform
    angle = [0.0, 0.0]
    angle[axis] = math.degrees(math.atan(factor))
    return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=angle,
                     interpolation=BILINEAR, fill=GREY, center=[0, 0])


def _translate_y(image, fraction):  # as PIL's affine, content moves up by fraction * height
    shift = [0, -round(fraction * image.shape[-2])]  # whole pixels
    return TF.affine(image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0],
                     interpolation=BILINEAR, fill=GREY)


def _solarize_add(image, amount):  # add `amount` to pixels below 128, saturating at 255
    return torch.where(image < 128, (image.int() + amount).clamp_(max=255).to(image.dtype), image)


# op: (function of (uint8 image, magnitude), magnitude at level 0 and at level 10, random sign?).
# The magnitudes of the official code: rotate 30 degrees, shear 0.3, translate 45% of the height,
# posterize to int(4 m) bits but at least 1, solarize above int(256 m), solarize-add int(110 m),
# colour (saturation) factor 0.1 + 1.8 m, for m = level / 10.
AUTOAUGMENT_OPS = {
    "auto_contrast": (lambda x, _: TF.autocontrast(x), (0, 0), False),
    "equalize": (lambda x, _: TF.equalize(x), (0, 0), False),
    "invert": (lambda x, _: TF.invert(x), (0, 0), False),
    "rotate": (lambda x, v: TF.rotate(x, v, BILINEAR, fill=GREY), (0, 30), True),
    "shear_x": (lambda x, v: _shear(x, v, 0), (0, 0.3), True),
    "shear_y": (lambda x, v: _shear(x, v, 1), (0, 0.3), True),
    "translate_y": (_translate_y, (0, 0.45), True),
    "posterize": (lambda x, v: TF.posterize(x, max(1, int(v))), (0, 4), False),
    "solarize": (lambda x, v: x if v >= 256 else TF.solarize(x, int(v)), (0, 256), False),
    "solarize_add": (lambda x, v: _solarize_add(x, int(v)), (0, 110), False),
    "color": (lambda x, v: TF.adjust_saturation(x, v), (0.1, 1.9), False),
}


def autoaugment_magnitude(op, level):
    low, high = AUTOAUGMENT_OPS[op][1]
    return low + (high - low) * level / 10


class AutoAugmentV0(nn.Module):
    """AutoAugment with the v0 policy on (3, H, W) uint8 tensors; draws from torch's RNG."""

    def forward(self, image):
        policy = AUTOAUGMENT_V0[int(torch.randint(len(AUTOAUGMENT_V0), ()))]
        for op, probability, level in policy:
            if torch.rand(()) < probability:
                function, _, signed = AUTOAUGMENT_OPS[op]
                magnitude = autoaugment_magnitude(op, level)
                if signed and torch.rand(()) < 0.5:
                    magnitude = -magnitude
                image = function(image, magnitude)
        return image


# ------------------------------------------------------------------------------------------------
# Data: ImageFolder (or FakeData) -> uint8 tensors; lighting, normalisation, mixup on the device
# ------------------------------------------------------------------------------------------------


def eval_resize(img_size):
    return round(img_size * EVAL_RESIZE)  # test: resize 256, centre crop 224, scaled


def paper_lr_wd(model, optimizer):
    """The paper's (lr at batch 2048, weight decay) for a model and optimizer, or None."""
    if optimizer == "adamw":
        return ADAMW[model.split("_")[1]]  # by size: 36GF's differ, not the stems'
    return SGD.get(model)


def scaled_step(run):
    """fp16's update: GradScaler skips an update whose scaled gradients overflowed, and halves
    its scale; loss scaling does that by design, so such a step is counted (in the epoch's
    skipped_steps), not taken for a divergence, and the schedule moves on. Returns whether it
    skipped, as a device tensor (get_scale() would make the host wait for the device)."""
    scale = run.scaler._scale.clone()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return run.scaler._scale < scale


def build_transforms(args):
    """Train: random resized crop, flip, AutoAugment; test: resize 256, centre crop 224 (scaled
    with --img-size). Both end in uint8 tensors."""
    size, resize = args.img_size, eval_resize(args.img_size)
    train = [T.RandomResizedCrop(size, scale=CROP_SCALE), T.RandomHorizontalFlip(),
             T.PILToTensor()]
    if args.autoaugment == "v0":
        train.append(AutoAugmentV0())
    elif args.autoaugment == "imagenet":
        train.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
    return T.Compose(train), T.Compose([T.Resize(resize), T.CenterCrop(size), T.PILToTensor()])


def build_datasets(args):
    """(train set, val set, number of classes); FakeData mimics ImageNet's 1000 classes. Image
    folders are read by ImageFiles, which survives unreadable files (below the banner)."""
    train_tf, val_tf = build_transforms(args)
    if args.data == "fake":
        resize = eval_resize(args.img_size)
        shape, val_size = (3, resize, resize), max(1, args.fake_size // 4)
        val_set = FakeImages(val_size, shape, 1000, val_tf, random_offset=args.fake_size)
        return FakeImages(args.fake_size, shape, 1000, train_tf), val_set, 1000
    if not args.data:
        raise RunError("no data: pass --data /path/to/imagenet (with train/ and val/), set "
                       "IMAGENET=/path/to/imagenet, or use --data fake for a smoke test")
    if not os.path.isdir(args.data):
        raise RunError(f"--data {args.data}: no such folder")
    sets = []
    for split, tf in (("train", train_tf), ("val", val_tf)):
        folder = os.path.join(args.data, split)
        if not os.path.isdir(folder):
            raise RunError(f"{folder}: missing (expected {args.data}/train and {args.data}/val "
                           f"with one sub-folder of images per class)")
        try:
            sets.append(ImageFiles(folder, tf, replace=split == "train",
                                   blank_size=args.img_size))
        except OSError as e:  # e.g. FileNotFoundError for an empty class folder
            raise RunError(f"{folder}: {str(e).splitlines()[0]}") from None
    if sets[0].classes != sets[1].classes:
        raise RunError(f"{args.data}: train/ and val/ have different class folders")
    return sets[0], sets[1], len(sets[0].classes)


def train_batches(run, epoch, skip):
    """This rank's micro-batches of one epoch, without the first `skip` (mid-epoch resume)."""
    run.sampler.set_epoch(epoch)
    sampler = SkipSampler(run.sampler, skip * run.micro_batch)
    loader = DataLoader(run.train_set, run.micro_batch, sampler=sampler, drop_last=True,
                        num_workers=run.workers, pin_memory=run.device.type == "cuda")
    return iter(loader)


@functools.cache
def device_constants(device):
    """Normalisation and PCA-lighting constants in 0-255 units, made once per device (a fresh
    host-to-GPU copy every step would block the host)."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    pca = torch.tensor(EIGVEC, device=device) * torch.tensor(EIGVAL, device=device) * 255
    return mean, std, pca  # pca[i, j] = eigvec_i[j] * eigval[j]


def to_device(images, labels, device, lighting=0.0):
    """uint8 images from the loader (4x less traffic than floats), with PCA lighting noise of std
    `lighting` added per image in pixel space (as the official code, before normalisation), then
    normalised, all on the device."""
    mean, std, pca = device_constants(device)
    images = images.to(device, non_blocking=True).float()
    if lighting > 0:  # AlexNet: offset = eigvec @ (alpha * eigval), alpha ~ N(0, lighting)
        alpha = torch.randn(len(images), 3, device=device) * lighting
        images += (alpha @ pca.T).view(-1, 3, 1, 1)
    return images.sub_(mean).div_(std), labels.to(device, non_blocking=True)


def build_mix(args, num_classes):
    """One of mixup / CutMix per batch (mixup with probability MIXUP_CHOICE); soft targets."""
    mixes = [mix(alpha=alpha, num_classes=num_classes)
             for mix, alpha in ((v2.MixUp, args.mixup), (v2.CutMix, args.cutmix)) if alpha > 0]
    if not mixes:
        return None
    return v2.RandomChoice(mixes, p=[MIXUP_CHOICE, 1 - MIXUP_CHOICE] if len(mixes) == 2 else None)


# ------------------------------------------------------------------------------------------------
# EMA, precise BatchNorm statistics, evaluation
# ------------------------------------------------------------------------------------------------


def ema_alpha(args):
    """The official EMA's blend per update: scaled with batch, period and epochs."""
    return min(1.0, args.ema_alpha * args.batch_size * args.ema_period / args.epochs)


@torch.no_grad()
def update_ema(run, epoch):
    """Every --ema-period steps: ema <- (1 - a) ema + a w over all weights and BatchNorm buffers,
    with a = ema_alpha(), or a copy of the weights during warmup (official code)."""
    args = run.args
    if run.ema is None or run.step % args.ema_period:
        return
    alpha = 1.0 if epoch < args.warmup_epochs else ema_alpha(args)
    for e, w in zip(run.ema.state_dict().values(), run.model.state_dict().values()):
        e.lerp_(w, alpha) if e.is_floating_point() else e.copy_(w)


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def precise_bn(models, batches, world_size):
    """Sets the running mean and variance of every BatchNorm in `models` to the equal-weight
    average of its batch statistics over `batches` (normalised image tensors) and over all ranks,
    which then hold the same statistics (official pycls/core/net.py: compute_precise_bn_stats).
    Returns the number of batches; models without BatchNorm are left untouched."""
    models = [m for m in models if batch_norms(m)]
    if not models:
        return 0
    saved = [(m.training, [(bn.momentum, bn.num_batches_tracked.clone()) for bn in batch_norms(m)])
             for m in models]
    for model in models:
        model.train()
        for bn in batch_norms(model):
            bn.reset_running_stats()
            bn.momentum = None  # running stats become the cumulative average of batch stats
    # A ViT's BatchNorms all sit in its conv stem, which sees only the image: run just the stem.
    forwards = [m.stem if isinstance(m, vitc.ViT) else m for m in models]
    count = 0
    for images in batches:
        for forward in forwards:
            forward(images)
        count += 1
    for model, (training, bn_state) in zip(models, saved):
        for bn, (momentum, tracked) in zip(batch_norms(model), bn_state):
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)
            for stat in (bn.running_mean, bn.running_var):  # every rank saw as many batches
                all_sum(stat, world_size).div_(world_size)
        model.train(training)
    return count


def precise_bn_batches(run, seed):
    """This rank's share of --precise-bn training images, with the train transforms and lighting
    but no mixup/CutMix, in micro-batches, drawn with `seed`. Lazy: nothing loads until used."""
    per_rank = max(1, run.args.precise_bn // (run.micro_batch * run.world_size))
    per_rank = min(per_rank, len(run.train_set) // (run.micro_batch * run.world_size))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(run.train_set), generator=generator)
    mine = order[run.rank::run.world_size][:per_rank * run.micro_batch].tolist()
    loader = DataLoader(Subset(run.train_set, mine), run.micro_batch, num_workers=run.workers,
                        generator=generator, pin_memory=run.device.type == "cuda")
    for images, labels, _ in loader:  # unreadable files are replaced; training names them
        if (labels < 0).any():  # blanks: the data folder is gone (see Monitor)
            raise RunError(f"{data_gone(run)} (in precise BN after epoch {run.epoch}); the last "
                           f"checkpoint stays in {run.args.out}")
        yield to_device(images, labels, run.device, run.args.lighting)[0]


def recompute_bn_statistics(run, epoch):
    """Precise BN for the model and its EMA, on one pass over the same images. Runs under its
    own RNG state, so that the training's random streams (and exact resume) are untouched."""
    if run.args.precise_bn == 0:
        return
    models = [m for m in (run.model, run.ema) if m is not None]  # ViT_P: loads no image
    seed = run.args.seed * 100_003 + epoch
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(seed)
        precise_bn(models, precise_bn_batches(run, seed), run.world_size)


@torch.no_grad()
def evaluate(run, model):
    """(top-1 %, top-5 %, images, unreadable images) over the whole validation set, each image
    counted once over all ranks; unreadable images are warned about, counted and left out."""
    was_training = model.training
    model.eval()
    device = run.device
    amp = run.args.eval_precision == "bf16"
    sums = torch.zeros(4, device=device, dtype=torch.float64)
    with no_tf32(device.type == "cuda" and not amp):  # fp32 evaluation, as the official code
        for images, labels, bad in run.val_loader:
            sums[3] += warn_unreadable(run, bad)
            images, labels = to_device(images, labels, device)
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                logits = model(images)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == labels[:, None]  # a blank (label -1) never hits
            sums[0] += hits[:, 0].sum()
            sums[1] += hits.any(1).sum()
            sums[2] += (labels >= 0).sum()
    model.train(was_training)
    top1, top5, count, bad = all_sum(sums, run.world_size).tolist()
    return 100 * top1 / max(count, 1), 100 * top5 / max(count, 1), int(count), int(bad)


def evaluate_epoch(run, record):
    """Precise BN, then val top-1/top-5 of the model and of the EMA into the epoch's record;
    the best EMA (or model) so far goes to best.pt."""
    recompute_bn_statistics(run, run.epoch)
    for key, model in (("val", run.model), ("ema", run.ema)):
        if model is None:
            continue
        sync_buffers(model, run.world_size)  # BN statistics: rank 0's, as in the checkpoint
        top1, top5, count, bad = evaluate(run, model)
        record.update({f"{key}_top1": top1, f"{key}_top5": top5, "val_images": count})
        if bad:
            record["val_unreadable"] = bad
    top1 = record.get("ema_top1", record.get("val_top1"))
    if top1 is not None and top1 > run.best[0]:
        run.best = (top1, run.epoch)
        save_best(run, run.ema if run.ema is not None else run.model, top1)


# ================ Machinery: nothing below this line changes what is learned ================
# Argument checks, ranks agreeing, run folders and their lock, the epoch's checks and figures,
# checkpoints and exact resume, signals, unreadable files, one-line errors.


def check_numbers(args):
    """Every number the run depends on, checked before anything starts."""
    checks = {
        "--img-size must be a multiple of 16, at least 16": args.img_size >= 16,
        "--epochs, --batch-size and --accum-steps must be at least 1":
            min(args.epochs, args.batch_size, args.accum_steps) >= 1,
        "need 0 <= --warmup-epochs < --epochs": 0 <= args.warmup_epochs < args.epochs,
        "need a finite --lr > 0 and --wd >= 0":
            args.lr > 0 and args.wd >= 0 and math.isfinite(args.lr * args.wd),
        "--mixup, --cutmix and --lighting must be finite and >= 0 (0 = off)":
            all(math.isfinite(a) and a >= 0 for a in (args.mixup, args.cutmix, args.lighting)),
        "--ema-alpha must be finite and > 0": math.isfinite(args.ema_alpha) and args.ema_alpha > 0,
        "--label-smoothing must be in [0, 1)": 0 <= args.label_smoothing < 1,
        "--max-bad-fraction must be in [0, 1]": 0 <= args.max_bad_fraction <= 1,
        "--ema-period, --eval-every and --fake-size must be at least 1":
            min(args.ema_period, args.eval_every, args.fake_size) >= 1,
        "--workers and --precise-bn must be >= 0":
            (args.workers is None or args.workers >= 0) and args.precise_bn >= 0,
        "--stop-after must be at least 1": args.stop_after is None or args.stop_after >= 1,
    }
    for message, ok in checks.items():
        if not ok:
            raise RunError(message)
    if args.img_size % 16:  # >= 16 by now
        low = args.img_size // 16 * 16
        raise RunError(f"--img-size {args.img_size} is not a multiple of 16 (the stems' stride): "
                       f"the nearest are {low} and {low + 16}")


# ------------------------------------------------------------------------------------------------
# Distributed: one process per GPU (NCCL) or CPU rank (gloo) under torchrun; ranks agree on errors
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def distributed():
    """(rank, world_size, device) for the run inside; the process group is torn down after."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        rank, world_size, device = 0, 1, torch.device("cuda" if cuda else "cpu")
    else:
        local_rank = int(os.environ["LOCAL_RANK"])
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        yield rank, world_size, device
        if dist.is_initialized():  # a clean end: without it, gloo's teardown can hang on torch 2.4
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def all_sum(tensor, world_size):
    if world_size > 1:
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag, run):
    """True on every rank if `flag` is true on any rank."""
    return bool(all_sum(torch.tensor([float(flag)], device=run.device), run.world_size).item())


def all_gather(obj, world_size):
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
    if world_size == 1:
        return [obj]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def agree(error, world_size):
    """Raises on every rank the RunError that any rank had (`error`: this rank's, or None), so
    that a problem seen by one rank (a file missing on one node, a full disk on rank 0) stops all
    of them with the same line instead of leaving the others blocked in a collective."""
    for rank, e in enumerate(all_gather(error, world_size)):
        if e is not None:
            raise type(e)(str(e) if rank == 0 else f"[rank {rank}] {e}")


def on_rank_0(run, write):
    """Runs write() on rank 0 only; a RunError there (e.g. a full disk) stops every rank."""
    error = None
    if run.rank == 0:
        try:
            write()
        except RunError as e:
            error = e
    agree(error, run.world_size)


def sync_buffers(module, world_size):
    """BatchNorm statistics drift apart across ranks; evaluate and save rank 0's everywhere."""
    if world_size > 1:
        for b in module.buffers():
            dist.broadcast(b, 0)


def checked_inputs(args, world_size):
    """(train set, val set, checkpoint or None, its path), checked by each rank on its own (its
    filesystem may differ from the others'), then agreed: one rank's error stops them all."""
    error, train_set, val_set, ckpt, path = None, None, None, None, None
    try:
        check_out(args)
        train_set, val_set, args.num_classes = build_datasets(args)
        if args.resume:
            check_not_diverged(args)
            ckpt, path = load_checkpoint(args)
            check_classes(ckpt, path, train_set)
    except RunError as e:
        error = e
    agree(error, world_size)
    return train_set, val_set, ckpt, path


# ------------------------------------------------------------------------------------------------
# The run folder: created, locked, the invocation recorded; the run's summary and its end
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def run_folder(args, rank, world_size):
    """Sets args.out: a new runs/MODEL-DATE-TIME unless --out was given, picked by rank 0 for all
    ranks. Inside, the run is set up (data, model, checkpoint); a stop signal that came meanwhile,
    to any rank, ends it after that, cleanly. A folder made here is removed again if the run
    fails or stops before it writes anything."""
    made = not args.out
    if made:
        out, error = None, None
        if rank == 0:  # claimed by creating it: two runs started in the same second get two
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            base = os.path.join("runs", f"{args.model}-{stamp}")
            for out in [base] + [f"{base}-{n}" for n in range(2, 1000)]:
                try:
                    os.makedirs(out)
                    break
                except FileExistsError:
                    continue
                except OSError as e:
                    error = RunError(f"cannot create the run folder {out} ({e.strerror})")
                    break
        agree(error, world_size)
        args.out = all_gather(out, world_size)[0]
    try:
        yield
        stop_if_signalled(world_size)
    except RunError:
        if rank == 0 and made:  # the folder made for this run is still empty
            with contextlib.suppress(OSError):
                os.rmdir(args.out)
        raise


def check_out(args):
    """The output folder must not hold a run that this one would overwrite."""
    if os.path.exists(checkpoint_file(args)) and not args.resume:
        raise RunError(f"{args.out} already holds a run: pass --resume auto to continue it, or "
                       f"choose another --out")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise RunError(f"--out {args.out}: exists and is not a folder")
    if not os.path.exists(checkpoint_file(args)) and logged_epochs(args.out):
        raise RunError(f"{args.out} holds a run's log.jsonl but no checkpoint.pt (dropped when "
                       f"the run finished, with --no-keep-checkpoint): there is nothing to "
                       f"resume; choose another --out")


@contextlib.contextmanager
def started(run, argv):
    """The run folder created and locked, log.jsonl made whole from the checkpoint, the invocation
    recorded in args.jsonl, the run's summary printed (and, when resuming, where it continues and
    what changed); the first SIGINT/SIGTERM stops the run at the next check, with a checkpoint.
    After: how the invocation ended goes to exits.jsonl, and the lock is released."""
    args = run.args

    def write():
        try:
            os.makedirs(args.out, exist_ok=True)
            run.lock = lock(args.out)
            reconcile_log(run)
            record_invocation(run, argv)
        except OSError as e:
            raise RunError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
    ending = ("failed", 1, "an exception (traceback above)")
    with stop_signals(run):
        try:
            on_rank_0(run, write)
            if run.rank == 0:
                cx = vitc.complexity(run.model)
                print(f"{args.model}: {cx['flops'] / 1e9:.2f} GF, {cx['params'] / 1e6:.2f} M "
                      f"params | {run.world_size} x {run.device.type}, global batch "
                      f"{args.batch_size}, {run.steps_per_epoch} steps/epoch | torch "
                      f"{torch.__version__} | out {args.out}")
                report_resume(run)
            yield
            ending = ("finished" if run.epoch == args.epochs else "stopped", 0, None)
        except BaseException as e:
            ending = how_it_ended(e)
            raise
        finally:
            if run.lock is not None:  # rank 0, once it holds the folder
                record_exit(run, *ending)
                run.lock.close()


def lock(folder):
    """An advisory lock on the run folder, held while the process lives: a second train.py on
    the same folder (a job resubmitted while the first still runs) is refused."""
    try:
        import fcntl
    except ImportError:  # not on Windows
        return None
    handle = open(os.path.join(folder, ".lock"), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise FolderInUse(f"{folder} is in use by another train.py: wait for it to end, or "
                          f"choose another --out") from None
    return handle


def code_provenance():
    """sha256 of train.py and vitc.py, and the git commit (with uncommitted changes or not) when
    they run from a git checkout: which code produced the run."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = {}
    for name in ("train.py", "vitc.py"):
        with open(os.path.join(here, name), "rb") as f:
            code[f"{name}_sha256"] = hashlib.sha256(f.read()).hexdigest()
    try:
        def git(*command):
            return subprocess.run(["git", "-C", here, *command], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        code["git_commit"] = git("rev-parse", "HEAD")
        code["git_changed"] = bool(git("status", "--porcelain", "--", "train.py", "vitc.py"))
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
        code["git_commit"] = None
    return code


def record_invocation(run, argv):
    """Appends to OUT/args.jsonl what this invocation was asked, what it resolved that to, and
    the code that ran."""
    args, device = run.args, run.device
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{os.cpu_count()} cores, {torch.get_num_threads()} threads")
    entry = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
             "command": ["train.py", *argv], "args": vars(args),
             "resolved": {"peak_lr": run.peak_lr, "world_size": run.world_size,
                          "micro_batch": run.micro_batch, "accum_steps": args.accum_steps,
                          "workers": run.workers, "train_precision": args.train_precision,
                          "eval_precision": args.eval_precision, "ema_alpha": ema_alpha(args),
                          "device": f"{device.type} ({name})",
                          "steps_per_epoch": run.steps_per_epoch, "start_step": run.step,
                          "torch": torch.__version__, "torchvision": torchvision.__version__,
                          "python": platform.python_version()},
             "code": code_provenance()}
    append_line(os.path.join(args.out, "args.jsonl"), entry)


def reconcile_log(run):
    """Makes log.jsonl hold the line of the checkpoint's last epoch: the checkpoint is written
    first and carries that line (run.record), so a full disk or a kill between the two writes
    cannot lose it for good."""
    record = run.record
    if record is None:  # a new run, or a checkpoint of a train.py that carried no record
        return
    path = os.path.join(run.args.out, "log.jsonl")
    logged = [r.get("epoch") for r in read_records(path) if "train_loss" in r]
    if record["epoch"] not in logged:
        append_line(path, record)
        print(f"{path}: the line of epoch {record['epoch']} was missing (the run ended between "
              f"its checkpoint and its line); written from the checkpoint")


def read_records(path):
    """The JSON records of a .jsonl file, without the lines that are not (a torn last line)."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return [r for r in records if isinstance(r, dict)]


# The flags a resumed run may change that are not news: they are per invocation.
PER_INVOCATION = ("resume", "stop_after")


def report_resume(run):
    """Says where a resumed run continues, and which of its flags changed since the checkpoint,
    with what that changes in the BatchNorm batch (the images per rank and micro-step)."""
    if run.resumed is None:
        return
    old, total = run.resumed["args"], run.args.epochs * run.steps_per_epoch
    within = run.step - run.epoch * run.steps_per_epoch
    print(f"resuming from {run.resumed['path']}: step {run.step} of {total} (epoch "
          f"{run.epoch + 1}{f', {within} steps into it' if within else ''})")
    changed = [f"--{key.replace('_', '-')} {old[key]} -> {value}"
               for key, value in vars(run.args).items()
               if key in old and key not in PER_INVOCATION and old[key] != value]
    old_ranks = run.resumed["world_size"]
    if old_ranks != run.world_size:
        changed.append(f"world size {old_ranks} -> {run.world_size}")
    old_micro = old["batch_size"] // (old_ranks * old.get("accum_steps", 1))
    if old_micro != run.micro_batch:
        changed.append(f"so the BatchNorm batch (images per rank and micro-step) "
                       f"{old_micro} -> {run.micro_batch}")
    if changed:
        print(f"changed since the checkpoint: {', '.join(changed)}")


def how_it_ended(error):
    """(outcome, exit status, message) of an invocation ended by `error`."""
    if isinstance(error, Diverged):
        return "diverged", error.status, str(error)
    if isinstance(error, RunError):
        return "failed", error.status, str(error)
    if isinstance(error, KeyboardInterrupt):
        return "failed", 130, "aborted by a second Ctrl-C"
    first_line = (str(error).splitlines() or [""])[0]
    return "failed", 1, f"{type(error).__name__}: {first_line}"


def record_exit(run, outcome, status, message):
    """Appends how this invocation ended to OUT/exits.jsonl (rank 0): finished, stopped, diverged
    or failed, its exit status, step and error line, and the Slurm job it ran in. torchrun's own
    exit status cannot tell a clean stop from a failure, and a sweep's Slurm script reads this."""
    entry = {"ended": datetime.datetime.now().isoformat(timespec="seconds"), "time": time.time(),
             "outcome": outcome, "status": status, "epoch": run.epoch, "step": run.step,
             "error": message, "slurm_job": os.environ.get("SLURM_JOB_ID")}
    try:
        append_line(os.path.join(run.args.out, "exits.jsonl"), entry)
    except RunError as e:  # the run's own outcome stands
        print(f"train.py: warning: {e}", file=sys.stderr)


def report_stop(run, why=None):
    """Says how to continue a run that stops before its end; returns its exit status, 0."""
    why = why or f"stopped by {run.stop_signal or 'a signal to another rank'}"
    if run.rank == 0:
        print(f"{why} at step {run.step}; checkpoint {checkpoint_file(run.args)}. To continue, "
              f"re-run the same command with --out {run.args.out} --resume auto")
    return 0


def report_done(run, nothing_to_do):
    """The run's last line: its best top-1 and where its files are."""
    args = run.args
    if run.rank != 0:
        return
    if nothing_to_do:
        print(f"the run in {args.out} is complete ({args.epochs} epochs): nothing to train")
    which = "EMA " if run.ema is not None else ""
    print(f"done: best {which}top-1 {run.best[0]:.2f}% (epoch {run.best[1]}); checkpoint "
          f"{checkpoint_file(args)}, best weights {args.out}/best.pt")


# ------------------------------------------------------------------------------------------------
# The epoch's figures and checks, read every CHECK_EVERY steps; the end of an epoch
# ------------------------------------------------------------------------------------------------

# Reading a figure of the step (the loss, say) makes the host wait until the GPU has run every
# step queued so far: read at every step, the host could never queue the next step ahead. So the
# figures stay on the device and are read, for all ranks in one all-reduce, every CHECK_EVERY
# steps and at the end of each epoch (before any evaluation or checkpoint).
CHECK_EVERY = 20


def new_progress():
    """Running figures of the epoch under way; checkpointed, so that an epoch interrupted and
    resumed is still logged whole."""
    return {"loss_sum": 0.0, "steps": 0, "seconds": 0.0, "epoch_time": 0.0, "unreadable": 0,
            "skipped_steps": 0}


class Monitor:
    """The epoch's progress bar and its checks. Per step it keeps the loss (on the device), the
    unreadable train files and the blanks (files given up on); every CHECK_EVERY steps it reads
    them for all ranks at once, step by step in order: a non-finite loss or too many unreadable
    files stop the run with the step they happened at, and a stop signal on any rank stops all
    ranks at the same step. The figures go into run.progress."""

    def __init__(self, run, epoch, first):
        self.run, self.epoch = run, epoch
        self.losses, self.skipped, self.unreadable, self.blanks = [], [], [], []
        self.step_unreadable = self.step_blanks = 0
        self.data_gone = False  # blanks seen on this rank: the run stops at the next check
        self.window_step, self.window_start = run.step, time.perf_counter()
        run.epoch_start, run.resumed_mid_epoch = self.window_start, first > 0
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        self.bar = tqdm(total=run.steps_per_epoch, initial=first, disable=run.rank != 0,
                        desc=f"epoch {epoch + 1}/{run.args.epochs}", dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()  # also before an error, so that its message starts a line of its own

    def count_unreadable(self, bad, labels):
        """A micro-batch's unreadable files (named now, on this rank) and blanks (label -1: the
        data folder is likely gone). Blanks are counted, then labelled 0 in place so that mixup
        and the loss accept them: the run stops at the next check, on every rank, before
        anything is checkpointed, so no weight trained on them is kept."""
        blanks = int((labels < 0).sum())  # a CPU tensor: no device sync
        if blanks:
            labels.clamp_(min=0)
            if not self.data_gone:
                self.data_gone = True
                tqdm.write(f"train.py: warning: {rank_prefix(self.run)}{data_gone(self.run)}; "
                           f"stopping at the next check", file=sys.stderr)
        # once the folder seems gone, its files are counted but no longer named one by one
        self.step_unreadable += (sum(map(bool, bad)) if self.data_gone
                                 else warn_unreadable(self.run, bad))
        self.step_blanks += blanks

    def after_step(self, loss, skipped=None):
        """Keeps the step's figures (`skipped`: fp16 skipped the update); every CHECK_EVERY steps
        and at the epoch's end, reads and checks them. Returns True when any rank was asked to
        stop."""
        run = self.run
        self.losses.append(loss)
        if skipped is not None:
            self.skipped.append(skipped)
        self.unreadable.append(self.step_unreadable)
        self.blanks.append(self.step_blanks)
        self.step_unreadable = self.step_blanks = 0
        self.bar.update()
        epoch_end = run.step == (self.epoch + 1) * run.steps_per_epoch
        return (run.step % CHECK_EVERY == 0 or epoch_end) and self.read(epoch_end)

    def read(self, epoch_end):
        """The one read of the figures kept since the last: all-reduced over ranks, then checked
        step by step (files given up on, unreadable images, a non-finite loss) and added to
        run.progress. Returns True when any rank was asked to stop."""
        run, progress, n = self.run, self.run.progress, len(self.losses)
        counts = torch.tensor([*self.unreadable, *self.blanks, float(run.stop_signal is not None)])
        skipped = torch.stack(self.skipped).sum(0, keepdim=True).float() if self.skipped else \
            torch.zeros(1)  # fp16's skipped updates, the same on every rank
        stats = torch.cat([torch.stack(self.losses).float(), counts.to(run.device),
                           skipped.to(run.device)])
        stats = all_sum(stats, run.world_size).tolist()  # the one wait for the device
        progress["skipped_steps"] += round(stats.pop() / run.world_size)
        for i in range(n):
            step, unreadable, blanks = self.window_step + i + 1, stats[n + i], stats[2 * n + i]
            progress["unreadable"] += int(unreadable)
            if blanks:
                raise RunError(f"{data_gone(run)} (at step {step}, epoch {self.epoch + 1}); "
                               f"the last checkpoint stays in {run.args.out}")
            check_unreadable(run, unreadable, self.epoch, step)
            loss = stats[i] / run.world_size
            if not math.isfinite(loss):
                stop_diverged(run, loss, self.epoch, step)
            progress["loss_sum"] += loss
            progress["steps"] += 1
        now = time.perf_counter()
        progress["seconds"] += now - self.window_start
        images_per_sec = progress["steps"] * run.args.batch_size / progress["seconds"]
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.lr:.3g}", img_s=f"{images_per_sec:.0f}")
        self.losses, self.skipped, self.unreadable, self.blanks = [], [], [], []
        self.window_step, self.window_start = run.step, now
        stop = stats[-1] > 0
        if stop and not epoch_end:  # the epoch goes on after a resume: keep its time so far
            progress["epoch_time"] += now - run.epoch_start
        return stop


def data_gone(run):
    """What a blank (MAX_UNREADABLE_IN_A_ROW unreadable train files in a row) means."""
    return (f"{getattr(run.train_set, 'root', run.args.data)}: {MAX_UNREADABLE_IN_A_ROW} files "
            f"in a row cannot be read: is the data folder still there (an unmounted filesystem?)")


def rank_prefix(run):
    return f"[rank {run.rank}] " if run.world_size > 1 else ""


def stop_diverged(run, loss, epoch, step):
    """A non-finite loss: marked in the log (a sweep's report counts the run as diverged), then
    the run stops before anything is checkpointed; the last good checkpoint stays."""
    marker = {"epoch": epoch + 1, "step": step, "diverged": str(loss)}
    on_rank_0(run, functools.partial(append_line, os.path.join(run.args.out, "log.jsonl"), marker))
    raise Diverged(f"loss is {loss} at step {step} (epoch {epoch + 1}); stopped, the last good "
                   f"checkpoint stays in {run.args.out}")


def end_epoch(run, record):
    """The epoch's figures into its record, the checkpoint (which carries the record), then the
    record into log.jsonl; should that line not get written, the next resume writes it."""
    args, progress = run.args, run.progress
    record.update(epoch_time=time.perf_counter() - run.epoch_start + progress["epoch_time"],
                  images_per_sec=progress["steps"] * args.batch_size / progress["seconds"],
                  unreadable=progress["unreadable"])
    if run.scaler is not None:  # fp16: updates skipped because the scaled gradients overflowed
        record["skipped_steps"] = progress["skipped_steps"]
    if run.resumed_mid_epoch:  # the figures still cover the whole epoch, over two invocations
        record["resumed_mid_epoch"] = True
    if run.device.type == "cuda":
        record["peak_mem_gb"] = torch.cuda.max_memory_allocated(run.device) / 2 ** 30
    run.progress = new_progress()
    run.record = record
    save_checkpoint(run)
    on_rank_0(run, lambda: append_line(os.path.join(args.out, "log.jsonl"), record))
    if run.rank == 0:
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in record.items()))
    bad, total = record.get("val_unreadable", 0), record.get("val_images", 0)
    if too_many(bad, bad + total, args.max_bad_fraction):  # after the checkpoint: nothing lost
        raise RunError(f"{bad} of {bad + total} val images are unreadable (named above), more "
                       f"than --max-bad-fraction {args.max_bad_fraction} allows")


# ------------------------------------------------------------------------------------------------
# Unreadable files: replaced in the train set, left out of the val set, named and counted
# ------------------------------------------------------------------------------------------------

MAX_UNREADABLE_IN_A_ROW = 64  # then a train item is a blank, and the run stops (data gone?)


class ImageFiles(datasets.ImageFolder):
    """ImageFolder whose items are (image, label, unreadable) and that survives bad files.

    `unreadable` names the item's own file with the reason if it could not be decoded ("" if it
    could). In the train set such a file is replaced by the next readable one (a file skipped on
    the way is reported when its own index comes); in the val set, and after
    MAX_UNREADABLE_IN_A_ROW unreadable files in a row, the item is a blank image with label -1."""

    def __init__(self, root, transform, replace, blank_size):
        check_reached_once(root)
        super().__init__(root, transform)
        self.replace, self.blank_size = replace, blank_size

    def __getitem__(self, index):
        own = ""  # this item's file, if unreadable, with the reason
        for i in range(index, index + (MAX_UNREADABLE_IN_A_ROW if self.replace else 1)):
            path, label = self.samples[i % len(self.samples)]
            try:
                image = self.loader(path)  # PIL: decode and convert to RGB
            except Exception as e:  # truncated, empty, not an image, unreadable...
                reason = str(e).splitlines()[0] if str(e) else ""
                own = own or f"{path} ({type(e).__name__}: {reason})"
                continue
            return self.transform(image), label, own
        blank = Image.new("RGB", (self.blank_size, self.blank_size))
        return self.transform(blank), -1, own


def check_reached_once(root):
    """ImageFolder follows symbolic links: a link to a folder above it (a loop) repeats its files
    until the path is too long (40 files became 1,640), and a second link to a folder or file
    counts those images twice, under two labels if in two classes. Refused, with the first such
    path. One walk of the folders; only linked files are looked up one by one."""
    folders, linked = {}, []  # (device, inode) of each folder reached -> its path; linked files
    pending = [root]
    while pending:
        folder = pending.pop()
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in folders:
            raise RunError(f"{folder} is {folders[info.st_dev, info.st_ino]} again (a symbolic "
                           f"link loop, or a second link to a folder): its images would count "
                           f"more than once; remove the link")
        folders[info.st_dev, info.st_ino] = folder
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():  # follows links, as ImageFolder does
                    pending.append(entry.path)
                elif entry.is_symlink():
                    linked.append(entry.path)
    files = {}  # (device, inode) of each linked image -> the first link to it
    for path in linked:
        if not datasets.folder.has_file_allowed_extension(path, datasets.folder.IMG_EXTENSIONS):
            continue  # not an image: ImageFolder leaves it out
        try:
            real = os.path.realpath(path)
            info, parent = os.stat(real), os.stat(os.path.dirname(real))
        except OSError:  # a dangling link: an unreadable file, named when read
            continue
        if (parent.st_dev, parent.st_ino) in folders:  # the image is also reached where it is
            first = os.path.join(folders[parent.st_dev, parent.st_ino], os.path.basename(real))
        else:
            first = files.setdefault((info.st_dev, info.st_ino), path)
        if first != path:
            raise RunError(f"{path} is {first} again (a second link to an image): it would "
                           f"count twice; remove the link")


class FakeImages(datasets.FakeData):
    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return image, label, ""


class SkipSampler(torch.utils.data.Sampler):
    """The wrapped sampler without its first `skip` indices."""

    def __init__(self, sampler, skip):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return len(self.sampler) - self.skip


def warn_unreadable(run, bad):
    """Warns about each unreadable file in a batch's `bad` strings; returns how many there were."""
    files = [entry for entry in bad if entry]
    for line in files:
        tqdm.write(f"train.py: warning: {rank_prefix(run)}unreadable image {line}",
                   file=sys.stderr)
    return len(files)


def too_many(bad, total, fraction):
    """More than --max-bad-fraction of `total` images unreadable?"""
    return bad > fraction * total


def check_unreadable(run, in_step, epoch, step):
    """Stops the run when too many train images are unreadable in a step's global batch or so far
    in the epoch (counts summed over ranks)."""
    limit, batch = run.args.max_bad_fraction, run.args.batch_size
    in_epoch, epoch_images = run.progress["unreadable"], run.steps_per_epoch * batch
    if too_many(in_step, batch, limit) or (in_step and too_many(in_epoch, epoch_images, limit)):
        raise RunError(f"{in_epoch} unreadable train images in epoch {epoch + 1} ({int(in_step)} "
                       f"in step {step}), more than --max-bad-fraction {limit} allows; the files "
                       f"are named above, the last checkpoint stays in {run.args.out}")


@contextlib.contextmanager
def no_tf32(active):
    """Full fp32 matmuls and convolutions inside (TF32 is on for training on CUDA)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if active:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------------------------------------
# Checkpoints: atomic, with every rank's RNG state, for an exact resume
# ------------------------------------------------------------------------------------------------

# What a resumed run must share with the run that wrote the checkpoint: the model and everything
# the optimizer state and the schedule position depend on. Data path, workers, accumulation,
# augmentation, evaluation, precision and compilation may change (fp16's loss scale carries on
# from an fp16 checkpoint, and starts afresh, as in a new run, from a bf16 or fp32 one).
RESUME_KEYS = ("model", "img_size", "num_classes", "optimizer", "batch_size", "epochs",
               "warmup_epochs", "lr", "wd")
CHECKPOINT_KEYS = {"model", "ema", "optimizer", "scheduler", "scaler", "epoch", "step",
                   "steps_per_epoch", "best", "args", "progress", "rng"}


def checkpoint_file(args):
    return os.path.join(args.out, "checkpoint.pt")


def rng_state(device):
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(run):
    """Rank 0 writes OUT/checkpoint.pt atomically; every rank contributes its RNG state."""
    states = all_gather(rng_state(run.device), run.world_size)
    sync_buffers(run.model, run.world_size)
    on_rank_0(run, lambda: save_atomic({
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "epoch": run.epoch, "step": run.step, "steps_per_epoch": run.steps_per_epoch,
        "best": list(run.best), "args": vars(run.args), "progress": run.progress,
        "record": run.record, "classes": getattr(run.train_set, "classes", None),
        "rng": states}, checkpoint_file(run.args)))


def drop_checkpoint(run):
    """Deletes OUT/checkpoint.pt of a finished run (--no-keep-checkpoint)."""
    def drop():
        with contextlib.suppress(FileNotFoundError):
            os.remove(checkpoint_file(run.args))
    on_rank_0(run, drop)


def logged_epochs(folder):
    """The number of whole epochs in FOLDER/log.jsonl (0 if it has none, or no such file)."""
    try:
        with open(os.path.join(folder, "log.jsonl")) as f:
            return sum('"train_loss"' in line for line in f)
    except OSError:
        return 0


def save_best(run, model, top1):
    """OUT/best.pt: the weights (the EMA's, if any) of the best evaluation so far."""
    on_rank_0(run, lambda: save_atomic({"model": model.state_dict(), "args": vars(run.args),
                                        "epoch": run.epoch, "top1": top1},
                                       os.path.join(run.args.out, "best.pt")))


def load_checkpoint(args):
    """(checkpoint or None, its path), the checkpoint checked against this run's settings."""
    path = checkpoint_file(args) if args.resume == "auto" else args.resume
    if args.resume == "auto" and not os.path.exists(path):
        return None, path
    if not os.path.isfile(path):
        raise RunError(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"--resume {path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
        raise RunError(f"--resume {path}: not a train.py checkpoint (best.pt holds weights only)")
    for key in RESUME_KEYS:
        if ckpt["args"].get(key) != getattr(args, key):
            raise RunError(f"--resume {path}: checkpoint has {key}={ckpt['args'].get(key)}, this "
                           f"run has {key}={getattr(args, key)}; a resumed run keeps its settings")
    return ckpt, path


def check_classes(ckpt, path, train_set):
    """The class folders must be those the checkpoint was trained on, in the same order: a label
    is a class folder's place in the sorted list, so a folder renamed, added or removed would
    silently permute the labels of a resumed run."""
    old, new = (ckpt or {}).get("classes"), getattr(train_set, "classes", None)
    if old is None or new is None or old == new:  # a checkpoint that holds none: not checkable
        return
    label, was, now = next(((i, a, b) for i, (a, b) in enumerate(zip(old, new)) if a != b),
                           (min(len(old), len(new)), None, None))
    change = (f"label {label} was class {was!r} and is now {now!r}" if was and now else
              f"it had {len(old)} classes, the data has {len(new)}")
    raise RunError(f"--resume {path}: the class folders of {train_set.root} are not those the "
                   f"checkpoint was trained on ({change}); renamed or reordered folders would "
                   f"permute the labels")


def check_not_diverged(args):
    """A run whose loss went non-finite (its log's last line says so) is not resumed: on the same
    settings it repeats the divergence, or on a GPU's non-deterministic kernels sometimes not,
    which would hide an unstable setting from a sweep's report."""
    path = os.path.join(args.out, "log.jsonl")
    try:
        with open(path) as f:
            marker = json.loads(f.read().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return
    if isinstance(marker, dict) and "diverged" in marker:
        raise RunError(f"the run in {args.out} diverged (loss {marker['diverged']} at step "
                       f"{marker.get('step')}): resuming it would repeat that; to retry anyway, "
                       f"delete the last line of {path}")


def check_resume(run, ckpt, path):
    """Every rank must see the same checkpoint, and the epoch must have the same steps. Keeps
    what the run reports of its resume, and the log line of the checkpoint's last epoch."""
    run.record = None if ckpt is None else ckpt.get("record")
    run.resumed = None if ckpt is None else {"path": path, "args": ckpt["args"],
                                             "world_size": len(ckpt["rng"])}
    steps = all_gather(None if ckpt is None else ckpt["step"], run.world_size)
    if len(set(steps)) > 1:
        raise RunError(f"the ranks found different checkpoints at {path} (steps {steps}): --out "
                       f"must be on a filesystem shared by all nodes")
    if ckpt is not None and ckpt["steps_per_epoch"] != run.steps_per_epoch:
        raise RunError(f"{path}: written with {ckpt['steps_per_epoch']} steps per epoch, this run "
                       f"has {run.steps_per_epoch} (different train set or world size)")


def restore(run, ckpt):
    """Weights, EMA, optimizer, schedule, position, best top-1, the epoch's figures so far and
    (on as many ranks as wrote it) this rank's RNG state, from a checked checkpoint."""
    run.model.load_state_dict(ckpt["model"])
    if run.ema is not None:  # a run that had no EMA starts one from the weights
        run.ema.load_state_dict(ckpt["ema"] if ckpt["ema"] is not None else ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.scaler is not None and ckpt["scaler"]:  # fp16 then and now: the same loss scale
        run.scaler.load_state_dict(ckpt["scaler"])
    run.epoch, run.step, run.best = ckpt["epoch"], ckpt["step"], tuple(ckpt["best"])
    run.progress = ckpt["progress"]
    if len(ckpt["rng"]) == run.world_size:  # exact continuation needs the same world size
        set_rng_state(ckpt["rng"][run.rank], run.device)
    elif run.rank == 0:
        print(f"note: checkpoint written by {len(ckpt['rng'])} ranks, resuming on "
              f"{run.world_size}: the run continues but is not bit-identical")


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash or a full disk never leaves a torn file,
    and the previous version stays as it was."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:  # torch.save reports a failed write as a RuntimeError from an OSError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise RunError(f"cannot write {path} ({cause.strerror or cause}); the previous version, "
                       f"if any, is intact") from None


def append_line(path, record):
    """Appends `record` as one JSON line, never onto a torn one: a line left without its newline
    (a write cut short by a full disk, a kill) is cut off first, with a warning; a write that
    fails is undone the same way. Synced, as the checkpoints are."""
    line = (json.dumps(record) + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        raise RunError(f"cannot write {path} ({e.strerror or e})") from None
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            whole = os.pread(fd, size, 0).rfind(b"\n") + 1
            torn = os.pread(fd, size - whole, whole)
            print(f"train.py: warning: {path} ended in a torn line, cut off: "
                  f"{torn[:60].decode(errors='replace')!r}", file=sys.stderr)
            os.ftruncate(fd, whole)
            size = whole
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"wrote {written} of {len(line)} bytes")
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # no torn line left behind
            raise
    except OSError as e:
        raise RunError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------


class Stop:
    """This process's stop signals, caught from its start (cli), before the run exists: the first
    SIGINT or SIGTERM asks the run to stop; the run takes it over once set up (run.stop_signal)."""
    signal = None  # the first signal's name
    run = None  # the run it stops, once there is one
    pid = None  # the process that caught it (DataLoader workers inherit the handler)


@contextlib.contextmanager
def stop_signals(run=None):
    """SIGINT and SIGTERM go to on_signal inside (the previous handlers come back after); with
    `run`, the run is told of a signal, also of one that came before."""
    previous = None
    if Stop.pid != os.getpid():  # not yet caught (by an enclosing stop_signals)
        Stop.signal, Stop.run, Stop.pid = None, None, os.getpid()
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        for signum in EARLY_SIGNALS:  # caught while train.py started
            on_signal(signum, None)
        EARLY_SIGNALS.clear()
    if run is not None:
        Stop.run, run.stop_signal = run, Stop.signal
    try:
        yield
    finally:
        if run is not None:
            Stop.run = None
        if previous is not None:
            for s, handler in previous.items():
                signal.signal(s, handler)
            Stop.pid = None


def on_signal(signum, frame):
    """The first SIGINT or SIGTERM stops the run at its next check, with a checkpoint (before
    training: at its start, with nothing written). SIGTERM again changes nothing: Slurm and
    torchrun may each send one, and a scheduler's stop must not become an abort; a SIGINT after
    the first signal (Ctrl-C again) aborts."""
    if os.getpid() != Stop.pid:  # a DataLoader worker: the main process decides
        return
    name = signal.Signals(signum).name
    rank_0 = int(os.environ.get("RANK", 0)) == 0
    if Stop.signal is not None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        if rank_0:
            print(f"\n{name} again: the stop is under way (Ctrl-C aborts it)", file=sys.stderr)
        return
    Stop.signal = name
    if Stop.run is not None:
        Stop.run.stop_signal = name
    if rank_0 and Stop.run is None:
        print(f"\n{name}: the run stops once set up, before training begins (Ctrl-C aborts)",
              file=sys.stderr)
    elif rank_0:
        print(f"\n{name}: finishing the current step and those up to the next check (at most "
              f"{CHECK_EVERY} steps), then saving a checkpoint (Ctrl-C aborts)", file=sys.stderr)


def stop_if_signalled(world_size):
    """Ends the run cleanly, before it writes anything, if a rank was signalled during the setup."""
    signals = [s for s in all_gather(Stop.signal, world_size) if s]
    if signals:
        raise StoppedEarly(f"stopped by {signals[0]} before training began, nothing written; "
                           f"run the same command again to train")


# ------------------------------------------------------------------------------------------------
# Errors: one line `NAME.py: error: ...` and exit status 2 for bad input, in train.py and tools/
# ------------------------------------------------------------------------------------------------


class RunError(Exception):
    """Bad input or a run that cannot go on: reported as one line, exit status `status`."""
    status = 2


class FolderInUse(RunError):
    """The run folder is locked by a live train.py: exit status 3, so that a sweep can tell."""
    status = 3


class Diverged(RunError):
    """The loss went non-finite: bad input's status, and "diverged" in exits.jsonl."""


class StoppedEarly(RunError):
    """A stop signal came before training began: a clean end, exit status 0."""
    status = 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": such helps say the default
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise RunError(message)


def run_cli(main, name, argv=None):
    """main(argv), with a RunError reported as one line `NAME: error: ...` (by rank 0 only under
    torchrun) and its exit status, never a traceback. Used by train.py and every tool. Output
    piped to a reader that stops early (`sweep.py report | head`) ends quietly, with the status
    of a process killed by SIGPIPE."""
    try:
        status = main(argv)
        sys.stdout.flush()  # a reader gone shows here, not as a traceback at the exit
        return status
    except RunError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            if e.status == 0:  # not an error: a clean end, said as such
                print(f"{name}: {e}", flush=True)
            else:
                print(f"{name}: error: {e}", file=sys.stderr)
        return e.status
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flushes
        return 128 + signal.SIGPIPE


class OneLineErrors(ErrorHandler):
    """Under torchrun: a RunError goes into the error file as our one line, which torchrun then
    shows as the root cause in its failure summary; other exceptions keep their traceback."""

    def record_exception(self, e):
        file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if isinstance(e, RunError) and e.status == 0:  # a clean end: no error to report
            return
        if not isinstance(e, RunError) or not file:
            return super().record_exception(e)
        line = f"train.py: error: {e}"
        with open(file, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {
                "py_callstack": line, "timestamp": str(int(time.time()))}}}, f)


def cli(argv=None):
    """train.py's entry point: main() with stop signals caught first thing, and one-line errors,
    also as torchrun's root cause."""
    with stop_signals():
        under_torchrun = "TORCHELASTIC_ERROR_FILE" in os.environ
        entry = record_errors(main, OneLineErrors()) if under_torchrun else main
        return run_cli(entry, "train.py", argv)


if __name__ == "__main__":
    sys.exit(cli())
