"""Train ViT_P / ViT_C with the recipe of "Early Convolutions Help Transformers See Better".

    python train.py --stem conv --size 4gf --data /imagenet                        # one GPU
    torchrun --nproc_per_node=8 train.py --stem conv --size 4gf --data /imagenet   # 8 GPUs
    python train.py --data fake --img-size 64 --batch-size 64 --epochs 2 --warmup-epochs 1  # CPU

The defaults are the paper's peak runs (section 6) with the official trainer's details (pycls,
branch vitconfigs); the README's recipe table says where each setting comes from, and the conv
stem itself is vitc.ConvStem. Read top-down: RECIPE (every constant), the arguments, main() (the
run in outline), train_one_epoch() (the step), then the recipe's pieces: the run's state and how
it is built, AutoAugment v0, data, lighting, mixup/CutMix, EMA, precise BN, evaluation. What keeps
a long run safe (checkpoints and exact resume, the run folder, signals, ranks agreeing, unreadable
files, one-line errors) is the package runsafe/ beside this file; nothing in it changes what is
learned. A run writes runs/MODEL-DATE-TIME-XXXXXXXX (or --out DIR): args.jsonl, log.jsonl,
checkpoint.pt, best.pt; --out DIR --resume auto continues it. No ImageNet run has been made with it yet.
"""

if __name__ == "__main__":  # stop signals are caught from the first moment, also while torch loads
    from runsafe import signals
    signals.catch()

import argparse
import contextlib
import copy
import functools
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import vitc
from runsafe import dist, signals
from runsafe import run as runfolder
from runsafe.errors import HelpFormatter, Parser, QuietStream, RunError, number, run_cli
from runsafe.images import FakeImages, ImageFiles, warn_unreadable
from runsafe.monitor import Monitor, epoch_figures, new_progress

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

AT_LEAST_1 = number(int, lambda v: v >= 1, "at least 1")
AT_LEAST_0 = number(int, lambda v: v >= 0, "at least 0")
NON_NEGATIVE = number(float, lambda v: v >= 0, ">= 0 (0 = off)")


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
    r.add_argument("--img-size", type=number(int, lambda v: v >= 16, "at least 16"), default=224,
                   help="train/test resolution, a multiple of 16")
    r.add_argument("--batch-size", type=AT_LEAST_1, default=BATCH_SIZE,
                   help="global batch, all ranks")
    r.add_argument("--epochs", type=AT_LEAST_1, default=EPOCHS, help="training epochs")
    r.add_argument("--warmup-epochs", type=NON_NEGATIVE, default=WARMUP_EPOCHS,
                   help="lr warmup epochs")
    r.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="AdamW, or SGD with Nesterov momentum 0.9")
    r.add_argument("--lr", type=number(float, lambda v: v > 0, "> 0"),
                   help="peak lr at batch 2048 (default: the paper's)")
    r.add_argument("--wd", type=NON_NEGATIVE, help="weight decay (default: the paper's)")
    r.add_argument("--autoaugment", choices=["v0", "imagenet", "none"], default=AUTOAUGMENT,
                   help="v0: the official code's policy; imagenet: torchvision's ImageNet policy")
    r.add_argument("--lighting", type=NON_NEGATIVE, default=LIGHTING_STD, help="PCA lighting std")
    r.add_argument("--mixup", type=NON_NEGATIVE, default=MIXUP_ALPHA, help="mixup alpha")
    r.add_argument("--cutmix", type=NON_NEGATIVE, default=CUTMIX_ALPHA, help="CutMix alpha")
    r.add_argument("--label-smoothing", type=number(float, lambda v: 0 <= v < 1, "in [0, 1)"),
                   default=LABEL_SMOOTHING, help="its epsilon")
    r.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="keep and evaluate an EMA of the weights")
    r.add_argument("--ema-period", type=AT_LEAST_1, default=EMA_PERIOD,
                   help="EMA update every N steps")
    r.add_argument("--ema-alpha", type=number(float, lambda v: v > 0, "> 0"), default=EMA_ALPHA,
                   help="official EMA_ALPHA")
    r.add_argument("--precise-bn", type=AT_LEAST_0, default=PRECISE_BN_IMAGES, metavar="N",
                   help="recompute BatchNorm statistics from N train images before every "
                        "evaluation, 0 = off (no effect on ViT_P, which has no BatchNorm)")
    r.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    g = p.add_argument_group("run", "where and how this run runs")
    g.add_argument("--data", default=os.environ.get("IMAGENET"),
                   help="folder with train/ and val/ (default: $IMAGENET), or 'fake' for random "
                        "images that learn nothing (a smoke test of the pipeline)")
    g.add_argument("--out", help="run folder (default: a new runs/MODEL-DATE-TIME-XXXXXXXX)")
    g.add_argument("--accum-steps", type=AT_LEAST_1, default=1,
                   help="gradient accumulation steps")
    g.add_argument("--eval-every", type=AT_LEAST_1, default=1, help="evaluate every N epochs")
    g.add_argument("--train-precision", choices=["bf16", "fp16", "fp32"],
                   help="bf16 autocast (A100, H100), fp16 autocast with loss scaling (V100, "
                        "which has no bf16; the official trainer's) or fp32 (default: bf16 on "
                        "GPUs that have it, fp16 on older GPUs, fp32 on the CPU)")
    g.add_argument("--eval-precision", choices=["bf16", "fp32"], default="fp32",
                   help="fp32 as the official code, or bf16 autocast (much faster on GPUs)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--workers", type=AT_LEAST_0, help="data loader processes per rank "
                   "(default: the CPU cores this process may use, per local rank)")
    g.add_argument("--max-bad-fraction", type=number(float, lambda v: 0 <= v <= 1, "in [0, 1]"),
                   default=0.01, help="stop when more than this fraction of a global batch or of "
                   "an epoch's images is unreadable (unreadable train images are replaced)")
    g.add_argument("--resume", help="checkpoint to continue from, or 'auto': "
                   "OUT/checkpoint.pt if there is one (needs --out)")
    g.add_argument("--stop-after", type=AT_LEAST_1, help="train at most N epochs in this "
                   "invocation, then checkpoint and exit (for job time limits; continue with "
                   "--resume auto)")
    g.add_argument("--keep-checkpoint", action=argparse.BooleanOptionalAction, default=True,
                   help="keep checkpoint.pt once the run has finished; --no-keep-checkpoint "
                        "deletes it then, keeping best.pt, log.jsonl and args.jsonl (all that "
                        "a sweep's report needs); a run stopped before its end keeps it")
    g.add_argument("--dist-timeout", type=AT_LEAST_1, default=30, metavar="MINUTES",
                   help="how long ranks wait for each other (NCCL's own default is 10 minutes, "
                        "less than rank 0 may take to write a 36GF checkpoint)")
    g.add_argument("--fake-size", type=AT_LEAST_1, default=2048, help="--data fake: train images")
    args = p.parse_args(argv)
    args.model = args.model or f"vit{args.stem[0]}_{args.size}"
    if args.model not in vitc.VARIANTS:
        raise RunError(f"unknown model {args.model!r}; valid: {', '.join(vitc.VARIANTS)}")
    default = paper_lr_wd(args.model, args.optimizer)
    if default is None and (args.lr is None or args.wd is None):
        raise RunError(f"the paper gives no SGD settings for {args.model}: pass --lr and --wd")
    args.lr = default[0] if args.lr is None else args.lr
    args.wd = default[1] if args.wd is None else args.wd
    if args.warmup_epochs >= args.epochs:
        raise RunError(f"--warmup-epochs {args.warmup_epochs} must be less than --epochs "
                       f"{args.epochs}")
    if args.img_size % 16:
        low = args.img_size // 16 * 16
        raise RunError(f"--img-size {args.img_size} is not a multiple of 16 (the stems' stride): "
                       f"the nearest are {low} and {low + 16}")
    if args.resume == "auto" and not args.out:
        raise RunError("--resume auto continues the run in --out: pass --out RUN_FOLDER")
    if args.resume and args.resume != "auto" and not args.out:
        args.out = os.path.dirname(args.resume) or "."  # continue in the checkpoint's folder
    return args


def paper_lr_wd(model, optimizer):
    """The paper's (lr at batch 2048, weight decay) for a model and optimizer, or None."""
    if optimizer == "adamw":
        return ADAMW[model.split("_")[1]]  # by size: 36GF's differ, not the stems'
    return SGD.get(model)


# ------------------------------------------------------------------------------------------------
# The run, in outline
# ------------------------------------------------------------------------------------------------


def main(argv=None):
    """The whole run: build (or resume), then per epoch train, evaluate, checkpoint and log.
    Returns the exit status: 0 when the run finished, or stopped cleanly to be continued."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    with dist.distributed(args.dist_timeout) as (rank, world_size, device):  # torchrun's ranks
        run = build_run(args, rank, world_size, device)  # data, model, optimizer; resumed
        with runfolder.started(run, argv):  # the run folder made and locked, args.jsonl
            first_epoch = run.epoch
            for epoch in range(run.epoch, args.epochs):
                if not train_one_epoch(run, epoch):  # a stop signal, mid-epoch
                    runfolder.save(run)  # with the epoch's figures so far
                    return runfolder.stop(run)
                run.epoch = epoch + 1
                record = {"epoch": run.epoch, "step": run.step, "lr": run.lr,
                          **epoch_figures(run)}  # loss, images/s, unreadable files
                if run.epoch % args.eval_every == 0 or run.epoch == args.epochs:
                    evaluate_epoch(run, record)  # precise BN, then the model and its EMA
                runfolder.end_epoch(run, record)  # the checkpoint, then log.jsonl
                check_val_unreadable(run, record)
                if run.epoch == args.epochs:
                    break
                if dist.any_rank(signals.requested() is not None, device):  # in evaluation
                    return runfolder.stop(run)
                if args.stop_after and run.epoch - first_epoch >= args.stop_after:
                    return runfolder.stop(run, f"stopped after {args.stop_after} epochs as "
                                               f"asked (--stop-after)")
            return runfolder.finish(run, trained=run.epoch > first_epoch)


# ------------------------------------------------------------------------------------------------
# The training step
# ------------------------------------------------------------------------------------------------


def train_one_epoch(run, epoch):
    """One pass over this rank's shard of the train set (from where a resumed run left off):
    the step, written out. The Monitor reads the loss and the stop signals of all ranks every
    20 steps and at the epoch's end, not at every step. False if stopped by a signal mid-epoch."""
    args, device = run.args, run.device
    first = run.step - epoch * run.steps_per_epoch  # > 0 when resumed mid-epoch
    amp = args.train_precision in ("bf16", "fp16")  # autocast to the dtype of that name
    dtype = torch.float16 if args.train_precision == "fp16" else torch.bfloat16
    with Monitor(run, epoch, first) as monitor:  # progress bar, checks, the epoch's figures
        batches = monitor.batches(train_batches(run, epoch, skip=first * args.accum_steps))
        for _ in range(first, run.steps_per_epoch):
            step_loss = torch.zeros((), device=device)
            for micro_step in range(args.accum_steps):  # --accum-steps micro-batches a step
                images, labels = next(batches)  # uint8 images, from this rank's shard
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
            if monitor.after_step(step_loss, skipped):  # any rank asked to stop (every 20 steps)
                return run.step == (epoch + 1) * run.steps_per_epoch  # stopped on its last step?
    return True


def scaled_step(run):
    """fp16's update: GradScaler skips an update whose scaled gradients overflowed, and halves
    its scale; loss scaling does that by design, so such a step is counted (in the epoch's
    skipped_steps), not taken for a divergence, and the schedule moves on. Returns whether it
    skipped, as a device tensor (get_scale() would make the host wait for the device)."""
    scale = run.scaler._scale.clone()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return run.scaler._scale < scale


# ------------------------------------------------------------------------------------------------
# The run's state: data, model, EMA, optimizer and schedule
# ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything a run holds. runsafe.run saves and restores the parts that change."""
    args: argparse.Namespace
    rank: int
    world_size: int
    device: torch.device
    train_set: torch.utils.data.Dataset
    val_loader: DataLoader
    sampler: DistributedSampler  # this rank's shard of the train set, reshuffled every epoch
    micro_batch: int  # images per rank and micro-step: the BatchNorm batch
    steps_per_epoch: int
    workers: int  # DataLoader processes per rank
    model: nn.Module
    ema: nn.Module | None
    peak_lr: float  # --lr scaled to --batch-size
    ema_alpha: float
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None  # fp16 only
    mix: nn.Module | None  # mixup / CutMix
    train_model: nn.Module  # what the step calls: model, compiled and/or wrapped in DDP
    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps done
    lr: float = 0.0  # the last step's
    best: tuple = (-1.0, 0)  # (top-1, epoch) of the best evaluation
    progress: dict = field(default_factory=new_progress)  # the epoch under way, so far
    history: list = field(default_factory=list)  # a record per epoch: log.jsonl
    resumed: dict | None = None  # what the checkpoint said, when resuming


def default_precision(device):
    """bf16 autocast on GPUs that have it (compute capability 8.0: A100 and later), fp16 with
    loss scaling on older ones (V100, whose bf16 has no tensor cores), fp32 on the CPU."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


def build_run(args, rank, world_size, device):
    """Data, model, EMA, optimizer and schedule, restored from a checkpoint when resuming. The
    data and the checkpoint are checked here, on every rank, before any training."""
    if args.batch_size % (world_size * args.accum_steps):
        raise RunError(f"--batch-size {args.batch_size} is not divisible by world size "
                       f"{world_size} x --accum-steps {args.accum_steps}")
    args.train_precision = args.train_precision or default_precision(device)
    if device.type == "cuda":  # TF32 matmuls and convolutions (fp32 evaluation turns them off)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    # Each rank reads its own filesystem; the ranks must agree (runsafe.run.inputs)
    train_set, val_set, ckpt = runfolder.inputs(args, build_datasets)  # ckpt: None for a new run
    micro_batch = args.batch_size // (world_size * args.accum_steps)
    # Train: equal shards per rank, no padding, the last partial batch dropped (BN and mixup need
    # full batches). Workers restart every epoch, seeded from the checkpointed RNG.
    sampler = DistributedSampler(train_set, world_size, rank, seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // (micro_batch * args.accum_steps)
    if steps_per_epoch == 0:
        raise RunError(f"the train set has {len(train_set)} images, fewer than one global batch "
                       f"of {args.batch_size}")
    workers = args.workers if args.workers is not None else max(
        1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    # Val: rank r takes images r, r + W, ...: each image exactly once, shards may differ by one.
    # Its transforms draw no random numbers, so its workers can live as long as the run.
    val_loader = loader(Subset(val_set, range(rank, len(val_set), world_size)),
                        min(micro_batch, 256), workers, device, persistent_workers=workers > 0,
                        generator=torch.Generator())  # not the training's RNG

    torch.manual_seed(args.seed)  # identical initialisation on every rank
    model = vitc.create_model(args.model, args.num_classes, args.img_size).to(device)
    peak_lr = vitc.scale_lr(args.lr, args.batch_size)  # lrs are quoted at batch 2048
    optimizer = vitc.make_optimizer(model, args.optimizer, peak_lr, args.wd)
    total = args.epochs * steps_per_epoch
    warmup = min(round(args.warmup_epochs * steps_per_epoch), total - 1)
    # fp16 autocast needs loss scaling (as the official trainer, and torchvision's --amp)
    run = Run(args, rank, world_size, device, train_set, val_loader, sampler, micro_batch,
              steps_per_epoch, workers, model,
              ema=copy.deepcopy(model).eval().requires_grad_(False) if args.ema else None,
              peak_lr=peak_lr, ema_alpha=ema_alpha(args), optimizer=optimizer,
              scheduler=vitc.make_scheduler(optimizer, total, warmup, WARMUP_START, COSINE_FLOOR),
              scaler=torch.amp.GradScaler(device.type) if args.train_precision == "fp16" else None,
              mix=build_mix(args, args.num_classes), train_model=model)
    torch.manual_seed(args.seed + 1 + rank)  # augmentation differs across ranks
    random.seed(args.seed + 1 + rank)
    if ckpt is not None:
        runfolder.restore(run, ckpt)
    # DDP(compile(model)), as PyTorch's "Where to apply torch.compile?" advises: compile the
    # module DDP wraps. Dynamo's DDPOptimizer still splits the compiled graph at DDP's buckets
    # so that their all-reduces overlap the backward (it finds the DDP module around the compiled
    # code), while compiling DDP itself would break the graph in DDP's forward. run.model stays
    # uncompiled for the EMA, precise BN, evaluation and checkpoints (no "_orig_mod." keys).
    if args.compile:
        run.train_model = torch.compile(model)
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
    folders are read by runsafe's ImageFiles, which survives unreadable files."""
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
    """This rank's micro-batches of one epoch, without the first `skip` (mid-epoch resume).
    Workers start afresh each epoch, seeded from the main process's (checkpointed) RNG: resumed
    at an epoch's start, a run sees the same augmentations as an uninterrupted one (mid-epoch,
    with workers, new ones for the rest of that epoch). Persistent workers would carry their RNG
    from epoch to epoch, where no checkpoint holds it, and lose that."""
    run.sampler.set_epoch(epoch)
    indices = list(run.sampler)[skip * run.micro_batch:]  # a list of indices is a sampler too
    return iter(loader(run.train_set, run.micro_batch, run.workers, run.device,
                       sampler=indices, drop_last=True))


def loader(dataset, batch_size, workers, device, **kwargs):
    """A DataLoader with `workers` processes, which leave stop signals to this process."""
    return DataLoader(dataset, batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                      worker_init_fn=signals.ignore_in_worker, **kwargs)


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
    alpha = 1.0 if epoch < args.warmup_epochs else run.ema_alpha
    for e, w in zip(run.ema.state_dict().values(), run.model.state_dict().values()):
        e.lerp_(w, alpha) if e.is_floating_point() else e.copy_(w)


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def precise_bn(models, batches):
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
                dist.all_sum(stat).div_(dist.world_size())
        model.train(training)
    return count


def precise_bn_batches(run, seed, gone):
    """This rank's share of --precise-bn training images, with the train transforms and lighting
    but no mixup/CutMix, in micro-batches, drawn with `seed`. Blanks (the data gone) are counted
    in gone[0]. Lazy: nothing loads until used."""
    per_rank = max(1, run.args.precise_bn // (run.micro_batch * run.world_size))
    per_rank = min(per_rank, len(run.train_set) // (run.micro_batch * run.world_size))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(run.train_set), generator=generator)
    mine = order[run.rank::run.world_size][:per_rank * run.micro_batch].tolist()
    for images, labels, _ in loader(Subset(run.train_set, mine), run.micro_batch, run.workers,
                                    run.device, generator=generator):  # unreadable files are replaced; training names them
        gone[0] += int((labels < 0).sum())
        yield to_device(images, labels, run.device, run.args.lighting)[0]


def recompute_bn_statistics(run, epoch):
    """Precise BN for the model and its EMA, on one pass over the same images. Runs under its
    own RNG state, so that the training's random streams (and exact resume) are untouched."""
    if run.args.precise_bn == 0:
        return
    models = [m for m in (run.model, run.ema) if m is not None]  # ViT_P: loads no image
    seed, gone = run.args.seed * 100_003 + epoch, [0]
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(seed)
        precise_bn(models, precise_bn_batches(run, seed, gone))
    dist.agree(RunError(f"{run.train_set.root}: {gone[0]} images could not be read (in precise "
                        f"BN after epoch {run.epoch}): is the data folder still there? The last "
                        f"checkpoint stays in {run.args.out}") if gone[0] else None)


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


@torch.no_grad()
def evaluate(run, models):
    """Top-1 and top-5 % of each model over the whole validation set, in one pass (each image
    decoded once for all of them, and counted once over all ranks): [(top1, top5), ...], images,
    unreadable images (named, counted and left out)."""
    training = [model.training for model in models]
    for model in models:
        model.eval()
    device, amp = run.device, run.args.eval_precision == "bf16"
    hits = torch.zeros(len(models), 2, device=device, dtype=torch.float64)
    counts = torch.zeros(2, device=device, dtype=torch.float64)  # images, unreadable
    with no_tf32(device.type == "cuda" and not amp):  # fp32 evaluation, as the official code
        for images, labels, bad in run.val_loader:
            counts[1] += warn_unreadable(bad, f"[rank {run.rank}] " if run.world_size > 1 else "")
            images, labels = to_device(images, labels, device)
            counts[0] += (labels >= 0).sum()
            for i, model in enumerate(models):
                with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                    logits = model(images)
                top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
                correct = top5 == labels[:, None]  # a blank (label -1) never hits
                hits[i, 0] += correct[:, 0].sum()
                hits[i, 1] += correct.any(1).sum()
    for model, was_training in zip(models, training):
        model.train(was_training)
    count, bad = dist.all_sum(counts).tolist()
    accuracy = (100 * dist.all_sum(hits) / max(count, 1)).tolist()
    return accuracy, int(count), int(bad)


def evaluate_epoch(run, record):
    """Precise BN, then val top-1/top-5 of the model and of the EMA into the epoch's record;
    the best EMA (or model) so far goes to best.pt."""
    start = time.perf_counter()
    recompute_bn_statistics(run, run.epoch)
    models = {key: m for key, m in (("val", run.model), ("ema", run.ema)) if m is not None}
    for model in models.values():
        dist.sync_buffers(model)  # BatchNorm statistics: rank 0's, as in the checkpoint
    accuracy, count, bad = evaluate(run, list(models.values()))
    for key, (top1, top5) in zip(models, accuracy):
        record.update({f"{key}_top1": top1, f"{key}_top5": top5})
    record["val_images"] = count
    if bad:
        record["val_unreadable"] = bad
    record["eval_time"] = time.perf_counter() - start
    record["epoch_time"] += record["eval_time"]
    top1 = record.get("ema_top1", record["val_top1"])
    if top1 > run.best[0]:
        run.best = (top1, run.epoch)
        best = run.ema if run.ema is not None else run.model
        dist.on_rank_0(lambda: runfolder.checkpoint.save({
            "model": best.state_dict(), "args": vars(run.args), "epoch": run.epoch,
            "top1": top1}, runfolder.path(run, "best.pt")))


def check_val_unreadable(run, record):
    """Stops the run (after the epoch's checkpoint: nothing lost) when more than
    --max-bad-fraction of the val images were unreadable."""
    bad, total = record.get("val_unreadable", 0), record.get("val_images", 0)
    if bad > run.args.max_bad_fraction * (bad + total):
        raise RunError(f"{bad} of {bad + total} val images are unreadable (named above), more "
                       f"than --max-bad-fraction {run.args.max_bad_fraction} allows")


def cli(argv=None):
    """train.py's entry point: main() with stop signals caught (from the first line when run as
    a script), output that never stops the run, and one-line errors."""
    sys.stdout, sys.stderr = QuietStream(sys.stdout), QuietStream(sys.stderr)
    try:
        with signals.caught():  # under torchrun, another error's traceback is its root cause
            return run_cli(record(main) if "RANK" in os.environ else main, "train.py", argv)
    finally:
        sys.stdout, sys.stderr = sys.stdout.stream, sys.stderr.stream


if __name__ == "__main__":
    sys.exit(cli())
