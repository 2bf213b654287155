"""Train ViT_P / ViT_C with the recipe of "Early Convolutions Help Transformers See Better".

One file runs on one device or under torchrun (DDP: NCCL on GPUs, gloo on the CPU):

    python train.py --data fake --img-size 64 --batch-size 64 --epochs 2 --warmup-epochs 1  # CPU
    python train.py --stem conv --size 4gf --data /imagenet                        # one GPU
    torchrun --nproc_per_node=8 train.py --stem conv --size 4gf --data /imagenet   # 8 GPUs
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --rdzv-id=vitc train.py --stem conv --size 18gf --data /imagenet            # on each node

DIR holds train/ and val/ in ImageFolder layout (or set IMAGENET=DIR). --data fake uses random
images and learns nothing: it only exercises the pipeline. Defaults are the paper's peak runs
(section 6): 400 epochs at global batch 2048, AdamW lr 1e-3 wd 0.24, 5 warmup epochs, cosine,
AutoAugment + mixup/CutMix + label smoothing, EMA of the weights for evaluation.
Writes OUT/args.json, OUT/log.jsonl (a line per epoch), OUT/checkpoint.pt and OUT/best.pt;
--resume auto continues a run, SIGTERM/SIGINT checkpoints and exits cleanly.

Measured so far: the README's smoke test (ViT_C-1GF at 224 px, two epochs of 640 fake images)
takes about 2 minutes on a 2-core CPU. No ImageNet run has been made with this script yet, so it
does not yet claim the paper's accuracies.
"""

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import random
import signal
import sys
import time
from itertools import islice

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms import v2
from tqdm import tqdm

import vitc

# Paper settings (PAPER.md): peak runs (section 6) for AdamW; the per-model SGD settings tuned at
# 50 epochs (section 5). Learning rates are for global batch 2048 and scale linearly with it.
ADAMW = {"1gf": (1e-3, 0.24), "4gf": (1e-3, 0.24), "18gf": (1e-3, 0.24), "36gf": (6e-4, 0.28)}
SGD = {"vitp_1gf": (1.9, 1.3e-5), "vitp_4gf": (1.9, 1.3e-5), "vitp_18gf": (1.1, 1.2e-5),
       "vitc_1gf": (1.9, 1.3e-5), "vitc_4gf": (1.3, 2.2e-5), "vitc_18gf": (1.1, 2.7e-5)}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class RunError(Exception):
    """Bad input: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise RunError(message)


def parse_args(argv):
    p = Parser(description="Train the paper's ViT_P / ViT_C (see the module docstring).")
    p.add_argument("--data", default=os.environ.get("IMAGENET"),
                   help="folder with train/ and val/ (default: $IMAGENET), or 'fake' for random "
                        "images that learn nothing (a smoke test of the pipeline)")
    p.add_argument("--out", help="output folder (default: runs/MODEL)")
    p.add_argument("--stem", choices=["patch", "conv"], default="conv")
    p.add_argument("--size", choices=["1gf", "4gf", "18gf", "36gf"], default="1gf")
    p.add_argument("--model", help="a paper variant by name, e.g. vitc_4gf (overrides stem/size)")
    p.add_argument("--img-size", type=int, default=224, help="train/test resolution")
    p.add_argument("--batch-size", type=int, default=2048, help="global batch, all ranks")
    p.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--warmup-epochs", type=float, default=5)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--lr", type=float, help="peak lr at batch 2048 (default: the paper's)")
    p.add_argument("--wd", type=float, help="weight decay (default: the paper's)")
    p.add_argument("--autoaugment", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--mixup", type=float, default=0.8, help="mixup alpha, 0 = off")
    p.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha, 0 = off")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ema-period", type=int, default=32, help="update the EMA every N steps")
    p.add_argument("--ema-alpha", type=float, default=1e-5, help="official EMA_ALPHA")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (the CPU always runs fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--workers", type=int, help="data loader processes per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume",
                   help="checkpoint to resume from, or 'auto': OUT/checkpoint.pt if there is one")
    p.add_argument("--stop-after", type=int, help="train at most N epochs in this invocation, "
                   "then checkpoint and exit (for job time limits; continue with --resume auto)")
    p.add_argument("--fake-size", type=int, default=2048, help="--data fake: train images")
    args = p.parse_args(argv)
    args.model = args.model or f"vit{args.stem[0]}_{args.size}"
    if args.model not in vitc.VARIANTS:
        raise RunError(f"unknown model {args.model!r}; valid: {', '.join(vitc.VARIANTS)}")
    size = args.model.split("_")[1]
    default = ADAMW[size] if args.optimizer == "adamw" else SGD.get(args.model)
    if default is None and (args.lr is None or args.wd is None):
        raise RunError(f"the paper gives no SGD settings for {args.model}: pass --lr and --wd")
    args.lr = default[0] if args.lr is None else args.lr
    args.wd = default[1] if args.wd is None else args.wd
    args.out = args.out or os.path.join("runs", args.model)
    checks = {  # every number the run depends on, checked before anything starts
        "--img-size must be a positive multiple of 16":
            args.img_size >= 16 and args.img_size % 16 == 0,
        "--epochs, --batch-size and --accum-steps must be at least 1":
            min(args.epochs, args.batch_size, args.accum_steps) >= 1,
        "need 0 <= --warmup-epochs < --epochs": 0 <= args.warmup_epochs < args.epochs,
        "need a finite --lr > 0 and --wd >= 0":
            args.lr > 0 and args.wd >= 0 and math.isfinite(args.lr * args.wd),
        "--mixup and --cutmix must be finite and >= 0 (0 = off)":
            all(math.isfinite(a) and a >= 0 for a in (args.mixup, args.cutmix)),
        "--ema-alpha must be finite and > 0": math.isfinite(args.ema_alpha) and args.ema_alpha > 0,
        "--label-smoothing must be in [0, 1)": 0 <= args.label_smoothing < 1,
        "--ema-period, --eval-every and --fake-size must be at least 1":
            min(args.ema_period, args.eval_every, args.fake_size) >= 1,
        "--workers must be >= 0": args.workers is None or args.workers >= 0,
        "--stop-after must be at least 1": args.stop_after is None or args.stop_after >= 1,
    }
    for message, ok in checks.items():
        if not ok:
            raise RunError(message)
    return args


# ------------------------------------------------------------------------------------------------
# Distributed set-up
# ------------------------------------------------------------------------------------------------


def setup_distributed():
    """(rank, world_size, device). Under torchrun one process per GPU (NCCL) or CPU rank (gloo)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def all_sum(tensor, world_size):
    if world_size > 1:
        dist.all_reduce(tensor)
    return tensor


# ------------------------------------------------------------------------------------------------
# Data: ImageFolder (or FakeData) -> uint8 tensors; normalisation and mixup/CutMix on the device.
# ------------------------------------------------------------------------------------------------


def build_datasets(args):
    """(train set, val set, number of classes); FakeData mimics ImageNet's 1000 classes."""
    size, resize = args.img_size, round(args.img_size * 256 / 224)  # test: resize 256, crop 224
    train_tf = [T.RandomResizedCrop(size, scale=(0.08, 1.0)), T.RandomHorizontalFlip()]
    if args.autoaugment:
        train_tf.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
    train_tf = T.Compose(train_tf + [T.PILToTensor()])
    val_tf = T.Compose([T.Resize(resize), T.CenterCrop(size), T.PILToTensor()])
    if args.data == "fake":
        shape, val_size = (3, resize, resize), max(1, args.fake_size // 4)
        val_set = datasets.FakeData(val_size, shape, 1000, val_tf, random_offset=args.fake_size)
        return datasets.FakeData(args.fake_size, shape, 1000, train_tf), val_set, 1000
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
            sets.append(datasets.ImageFolder(folder, tf))
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


class SkipSampler(torch.utils.data.Sampler):
    """The wrapped sampler without its first `skip` indices."""

    def __init__(self, sampler, skip):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return len(self.sampler) - self.skip


@functools.cache
def normalisation(device):  # made once per device: a fresh host-to-GPU copy would block the host
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    return mean, torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255


def to_device(images, labels, device):
    """uint8 images from the loader (4x less traffic than floats), normalised on the device."""
    mean, std = normalisation(device)
    images = images.to(device, non_blocking=True).float().sub_(mean).div_(std)
    return images, labels.to(device, non_blocking=True)


def build_mix(args, num_classes):
    """One of mixup / CutMix per batch, each with p 0.5 as in the official code; soft targets."""
    mixes = [mix(alpha=alpha, num_classes=num_classes)
             for mix, alpha in ((v2.MixUp, args.mixup), (v2.CutMix, args.cutmix)) if alpha > 0]
    return v2.RandomChoice(mixes) if mixes else None


# ------------------------------------------------------------------------------------------------
# EMA, evaluation, checkpoints
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def update_ema(ema, model, alpha):
    """ema <- (1 - alpha) ema + alpha w over all weights and BatchNorm buffers (official code)."""
    for e, w in zip(ema.state_dict().values(), model.state_dict().values()):
        e.lerp_(w, alpha) if e.is_floating_point() else e.copy_(w)


@torch.no_grad()
def evaluate(model, loader, device, amp, world_size):
    """(top-1 %, top-5 %, images) over the whole validation set, each image counted once."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    for images, labels in loader:
        images, labels = to_device(images, labels, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = model(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        sums[0] += hits[:, 0].sum()
        sums[1] += hits.any(1).sum()
        sums[2] += len(labels)
    model.train(was_training)
    top1, top5, count = all_sum(sums, world_size).tolist()
    return 100 * top1 / max(count, 1), 100 * top5 / max(count, 1), int(count)


def sync_buffers(module, world_size):
    """BatchNorm statistics drift apart across ranks; evaluate and save rank 0's everywhere."""
    if world_size > 1:
        for b in module.buffers():
            dist.broadcast(b, 0)


def rng_state(device):
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a torn checkpoint."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# What a resumed run must share with the run that wrote the checkpoint: the model and everything
# the optimizer state and the schedule position depend on. Data path, workers, accumulation,
# evaluation and compilation may change.
RESUME_KEYS = ("model", "img_size", "num_classes", "optimizer", "batch_size", "epochs",
               "warmup_epochs", "lr", "wd")
CHECKPOINT_KEYS = {"model", "ema", "optimizer", "scheduler", "epoch", "step", "steps_per_epoch",
                   "best", "args", "rng"}


def checkpoint_file(args):
    return os.path.join(args.out, "checkpoint.pt")


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


def check_resume(run, ckpt, path):
    """Every rank must see the same checkpoint, and the epoch must have the same steps."""
    found = all_sum(torch.tensor([float(ckpt is not None)], device=run.device), run.world_size)
    if 0 < found.item() < run.world_size:
        raise RunError(f"{path} is visible to {int(found.item())} of {run.world_size} ranks: "
                       f"--out must be on a filesystem shared by all nodes")
    if ckpt is not None and ckpt["steps_per_epoch"] != run.steps_per_epoch:
        raise RunError(f"{path}: written with {ckpt['steps_per_epoch']} steps per epoch, this run "
                       f"has {run.steps_per_epoch} (different train set or world size)")


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def train_one_epoch(run, epoch, skip):
    """One pass over this rank's shard from step `skip` on; returns (mean loss, images/s)."""
    args = run.args
    bar = tqdm(total=run.steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=run.rank != 0, dynamic_ncols=True)
    try:
        return run_steps(run, epoch, skip, bar)
    finally:
        bar.close()  # also before an error, so that its message starts a line of its own


def run_steps(run, epoch, skip, bar):
    args, device = run.args, run.device
    batches = train_batches(run, epoch, skip * args.accum_steps)
    amp = args.amp and device.type == "cuda"
    loss_sum, count, start = 0.0, 0, time.perf_counter()
    for _ in range(skip, run.steps_per_epoch):
        stats = torch.zeros(2, device=device)  # (loss, stop requested), summed over ranks
        for micro_step in range(args.accum_steps):
            images, labels = to_device(*next(batches), device)
            images, targets = run.mix(images, labels) if run.mix else (images, labels)
            sync = micro_step == args.accum_steps - 1 or run.world_size == 1
            with contextlib.nullcontext() if sync else run.ddp.no_sync():
                with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                    logits = run.ddp(images)
                # Label smoothing is applied here and only here, also to mixed (soft) targets.
                loss = F.cross_entropy(logits.float(), targets,
                                       label_smoothing=args.label_smoothing) / args.accum_steps
                loss.backward()
            stats[0] += loss.detach()
        stats[1] = float(run.stop_signal is not None)
        loss_value, stop = all_sum(stats, run.world_size).tolist()
        loss_value /= run.world_size
        if not math.isfinite(loss_value):  # checked before the update can spread it
            raise RunError(f"loss is {loss_value} at step {run.step + 1} (epoch {epoch + 1}); "
                           f"stopped, the last good checkpoint stays in {args.out}")
        run.optimizer.step()
        run.lr = run.scheduler.get_last_lr()[0]  # the lr this step used
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        if run.ema is not None and run.step % args.ema_period == 0:
            warm = epoch < args.warmup_epochs  # during warmup the EMA copies the weights
            update_ema(run.ema, run.model, 1.0 if warm else run.ema_alpha)
        loss_sum, count = loss_sum + loss_value, count + 1
        images_per_sec = count * args.batch_size / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{run.lr:.3g}",
                        img_s=f"{images_per_sec:.0f}", refresh=False)
        bar.update()
        if stop:
            run.stopped = True
            break
    return loss_sum / max(count, 1), (images_per_sec if count else 0.0)


def check_out(args):
    """The output folder must not hold a run that this one would overwrite."""
    if os.path.exists(checkpoint_file(args)) and not args.resume:
        raise RunError(f"{args.out} already holds a run: pass --resume auto to continue it, or "
                       f"choose another --out")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise RunError(f"--out {args.out}: exists and is not a folder")


def build_run(args, rank, world_size, device):
    """Data, model, EMA, optimizer and schedule, restored from a checkpoint when resuming. Every
    check of the user's input happens here, before any training."""
    if args.batch_size % (world_size * args.accum_steps):
        raise RunError(f"--batch-size {args.batch_size} is not divisible by world size "
                       f"{world_size} x --accum-steps {args.accum_steps}")
    check_out(args)
    run = argparse.Namespace(args=args, rank=rank, world_size=world_size, device=device,
                             stop_signal=None, stopped=False, lr=None)
    run.train_set, val_set, args.num_classes = build_datasets(args)
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
                                pin_memory=device.type == "cuda")
    ckpt, path = load_checkpoint(args) if args.resume else (None, None)
    check_resume(run, ckpt, path)

    torch.manual_seed(args.seed)  # identical initialisation on every rank
    run.model = vitc.create_model(args.model, args.num_classes, args.img_size).to(device)
    run.ema = copy.deepcopy(run.model).eval().requires_grad_(False) if args.ema else None
    # Official EMA: alpha scaled with batch, period and epochs so its horizon is ~fixed in epochs.
    run.ema_alpha = min(1.0, args.ema_alpha * args.batch_size * args.ema_period / args.epochs)
    lr = vitc.scale_lr(args.lr, args.batch_size)  # lrs are quoted at batch 2048
    run.optimizer = vitc.make_optimizer(run.model, args.optimizer, lr, args.wd)
    total = args.epochs * run.steps_per_epoch
    warmup = min(round(args.warmup_epochs * run.steps_per_epoch), total - 1)
    run.scheduler = vitc.make_scheduler(run.optimizer, total, warmup)
    run.mix = build_mix(args, args.num_classes)
    run.epoch, run.step, run.best = 0, 0, (-1.0, 0)
    torch.manual_seed(args.seed + 1 + rank)  # augmentation differs across ranks
    random.seed(args.seed + 1 + rank)
    if ckpt is not None:
        restore(run, ckpt)
    compiled = torch.compile(run.model) if args.compile else run.model
    run.ddp = compiled
    if world_size > 1:
        run.ddp = DistributedDataParallel(
            compiled, device_ids=[device] if device.type == "cuda" else None)
    return run


def restore(run, ckpt):
    run.model.load_state_dict(ckpt["model"])
    if run.ema is not None:  # a run that had no EMA starts one from the weights
        run.ema.load_state_dict(ckpt["ema"] if ckpt["ema"] is not None else ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.epoch, run.step, run.best = ckpt["epoch"], ckpt["step"], tuple(ckpt["best"])
    if len(ckpt["rng"]) == run.world_size:  # exact continuation needs the same world size
        set_rng_state(ckpt["rng"][run.rank], run.device)
    elif run.rank == 0:
        print(f"note: checkpoint written by {len(ckpt['rng'])} ranks, resuming on "
              f"{run.world_size}: the run continues but is not bit-identical")


def save_checkpoint(run):
    """Rank 0 writes OUT/checkpoint.pt atomically; every rank contributes its RNG state."""
    states = [rng_state(run.device)]
    if run.world_size > 1:
        states = [None] * run.world_size
        dist.all_gather_object(states, rng_state(run.device))
    sync_buffers(run.model, run.world_size)
    if run.rank == 0:
        save_atomic({"model": run.model.state_dict(),
                     "ema": run.ema.state_dict() if run.ema is not None else None,
                     "optimizer": run.optimizer.state_dict(),
                     "scheduler": run.scheduler.state_dict(), "epoch": run.epoch,
                     "step": run.step, "steps_per_epoch": run.steps_per_epoch,
                     "best": list(run.best), "args": vars(run.args),
                     "rng": states}, checkpoint_file(run.args))


def evaluate_epoch(run, record):
    """Adds val top-1/top-5 of the model and of the EMA to the epoch's log record."""
    amp = run.args.amp and run.device.type == "cuda"
    for key, model in (("val", run.model), ("ema", run.ema)):
        if model is None:
            continue
        sync_buffers(model, run.world_size)
        top1, top5, count = evaluate(model, run.val_loader, run.device, amp, run.world_size)
        record.update({f"{key}_top1": top1, f"{key}_top5": top5, "val_images": count})
    top1 = record.get("ema_top1", record.get("val_top1"))
    if top1 is not None and top1 > run.best[0]:
        run.best = (top1, run.epoch)
        if run.rank == 0:
            best = run.ema if run.ema is not None else run.model
            save_atomic({"model": best.state_dict(), "args": vars(run.args), "epoch": run.epoch,
                         "top1": top1}, os.path.join(run.args.out, "best.pt"))


def on_signal(run):
    def handler(signum, frame):
        if run.stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        run.stop_signal = signal.Signals(signum).name
        if run.rank == 0:
            print(f"\n{run.stop_signal}: finishing the current step, then saving a checkpoint "
                  f"(send it again to abort)", file=sys.stderr)
    return handler


def stopped_by_signal(run):
    if run.rank == 0:
        print(f"stopped by {run.stop_signal} at step {run.step}; checkpoint "
              f"{checkpoint_file(run.args)}. To continue, re-run the same command with "
              f"--resume auto")
    return 0


def train(args, rank, world_size, device):
    run = build_run(args, rank, world_size, device)
    if rank == 0:
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            raise RunError(f"--out {args.out}: cannot create it ({e.strerror})") from None
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        cx = vitc.complexity(run.model)
        print(f"{args.model}: {cx['flops'] / 1e9:.2f} GF, {cx['params'] / 1e6:.2f} M params | "
              f"{world_size} x {device.type}, global batch {args.batch_size}, "
              f"{run.steps_per_epoch} steps/epoch | torch {torch.__version__} | out {args.out}")
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal(run))
    first_epoch = run.epoch
    for epoch in range(run.epoch, args.epochs):
        start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        skip = min(max(run.step - epoch * run.steps_per_epoch, 0), run.steps_per_epoch)
        loss, images_per_sec = train_one_epoch(run, epoch, skip)
        if run.stopped and run.step < (epoch + 1) * run.steps_per_epoch:  # mid-epoch
            save_checkpoint(run)
            return stopped_by_signal(run)
        run.epoch = epoch + 1
        record = {"epoch": run.epoch, "step": run.step, "lr": run.lr,
                  "train_loss": loss}
        if run.epoch % args.eval_every == 0 or run.epoch == args.epochs:
            evaluate_epoch(run, record)
        record.update(epoch_time=time.perf_counter() - start, images_per_sec=images_per_sec)
        if device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        save_checkpoint(run)
        if rank == 0:
            with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in record.items()))
        if run.stopped:  # the signal came on the epoch's last step: the epoch is complete
            return stopped_by_signal(run)
        asked_stop = args.stop_after and run.epoch - first_epoch >= args.stop_after
        if asked_stop and run.epoch < args.epochs:
            if rank == 0:
                print(f"stopped after {args.stop_after} epochs as asked (--stop-after); "
                      f"continue with --resume auto")
            return 0
    if rank == 0:
        which = "EMA " if run.ema is not None else ""
        print(f"done: best {which}top-1 {run.best[0]:.2f}% (epoch {run.best[1]}); checkpoint "
              f"{checkpoint_file(args)}, best weights {args.out}/best.pt")
    return 0


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = setup_distributed()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        return train(args, rank, world_size, device)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if dist.is_initialized():
            dist.destroy_process_group()


def cli(argv=None):
    """main() with bad input reported as one line and exit status 2, never a traceback."""
    try:
        return main(argv)
    except RunError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
