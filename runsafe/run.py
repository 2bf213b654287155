"""A run's life in its folder: checked and resumed, started (folder made and locked, the
invocation recorded), checkpointed at each epoch's end with its log, and ended with a report."""

import contextlib
import datetime
import os
import platform

import torch
import torchvision

from . import checkpoint, folder, signals
from .dist import agreed, all_gather, any_rank, check_same_data, on_rank_0, sync_buffers
from .errors import RunError, Stopped


def path(run_or_args, name="checkpoint.pt"):
    args = getattr(run_or_args, "args", run_or_args)
    return os.path.join(args.out, name)


def inputs(args, build_datasets):
    """(train set, val set, checkpoint or None), each rank's own (nodes read their own disks),
    checked on every rank and agreed: one rank's error stops them all, and every rank must see
    the same data and the same checkpoint."""
    with agreed():
        train_set, val_set, args.num_classes = build_datasets(args)
        ckpt = resumable(args, train_set)
    check_same_data(train_set, val_set)
    if len(set(all_gather(ckpt and ckpt["sha256"]))) > 1:
        raise RunError(f"the ranks found different checkpoints in {args.out} (or none): --out "
                       f"must be on a filesystem that every node sees")
    return train_set, val_set, ckpt


def resumable(args, train_set):
    """The checkpoint this run continues, or None for a new run; each rank checks its own files.
    A folder is never trained over: a new run refuses a folder that holds one, and a finished
    run (its checkpoint kept or not) has nothing to resume."""
    if not args.out:  # a new runs/MODEL-DATE-TIME
        return None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise RunError(f"--out {args.out}: exists and is not a folder")
    ckpt_path = args.resume if args.resume not in (None, "auto") else path(args)
    log = folder.read_lines(path(args, "log.jsonl"))
    if os.path.isdir(args.resume or ""):
        raise RunError(f"--resume {args.resume}: a folder; --resume takes a checkpoint file, or "
                       f"'auto' with --out RUN_FOLDER")
    if not args.resume and (os.path.exists(path(args)) or log):
        raise RunError(f"{args.out} already holds a run: pass --resume auto to continue it, or "
                       f"choose another --out")
    if log and "diverged" in log[-1]:
        raise RunError(f"the run in {args.out} diverged (loss {log[-1]['diverged']} at step "
                       f"{log[-1].get('step')}): resuming it would repeat that; to retry anyway, "
                       f"delete the last line of {path(args, 'log.jsonl')}")
    if args.resume == "auto" and not os.path.exists(ckpt_path):
        if log and log[-1].get("epoch") == args.epochs:  # finished, --no-keep-checkpoint
            raise Stopped(f"the run in {args.out} is complete ({args.epochs} epochs): nothing "
                          f"to train")
        if log:
            raise RunError(f"{args.out} holds a run's log.jsonl but no checkpoint.pt: there is "
                           f"nothing to resume; choose another --out")
        return None
    if not args.resume:
        return None
    ckpt = checkpoint.load_resumable(ckpt_path, args)
    old, new = ckpt["classes"], getattr(train_set, "classes", None)
    if old is not None and new is not None and old != new:
        label, was, now = next(((i, a, b) for i, (a, b) in enumerate(zip(old, new)) if a != b),
                               (min(len(old), len(new)), None, None))
        change = (f"label {label} was class {was!r} and is now {now!r}" if was and now else
                  f"it had {len(old)} classes, the data has {len(new)}")
        raise RunError(f"--resume {ckpt_path}: the class folders of {train_set.root} are not "
                       f"those the checkpoint was trained on ({change}); renamed or reordered "
                       f"folders would permute the labels")
    ckpt["path"] = ckpt_path
    return ckpt


def save(run):
    """Rank 0 writes checkpoint.pt; every rank contributes its RNG state."""
    states = all_gather(checkpoint.rng_state(run.device))
    sync_buffers(run.model)
    on_rank_0(lambda: checkpoint.save({
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "epoch": run.epoch, "step": run.step, "steps_per_epoch": run.steps_per_epoch,
        "best": list(run.best), "args": vars(run.args), "progress": run.progress,
        "history": run.history, "classes": getattr(run.train_set, "classes", None),
        "rng": states}, path(run)))


def restore(run, ckpt):
    """Weights, EMA, optimizer, schedule, position, best top-1, the epochs' log and the epoch's
    figures so far and (on as many ranks as wrote it) this rank's RNG state."""
    if ckpt["steps_per_epoch"] != run.steps_per_epoch:
        raise RunError(f"{ckpt['path']}: written with {ckpt['steps_per_epoch']} steps per epoch, "
                       f"this run has {run.steps_per_epoch} (different train set or world size)")
    with agreed(), _as_run_error(ckpt["path"]):
        run.model.load_state_dict(ckpt["model"])
        if run.ema is not None:  # a run that had no EMA starts one from the weights
            run.ema.load_state_dict(ckpt["ema"] if ckpt["ema"] is not None else ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        if run.scaler is not None and ckpt["scaler"]:  # fp16 then and now: the same loss scale
            run.scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["rng"]) == run.world_size:  # an exact continuation needs the same ranks
            checkpoint.set_rng_state(ckpt["rng"][run.rank], run.device)
        elif run.rank == 0:
            print(f"note: checkpoint written by {len(ckpt['rng'])} ranks, resuming on "
                  f"{run.world_size}: the run continues but is not bit-identical")
    run.epoch, run.step, run.best = ckpt["epoch"], ckpt["step"], tuple(ckpt["best"])
    run.progress, run.history = ckpt["progress"], ckpt["history"]
    run.resumed = {"path": ckpt["path"], "args": ckpt["args"], "world_size": len(ckpt["rng"])}


@contextlib.contextmanager
def _as_run_error(path):
    try:
        yield
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise RunError(f"{path}: its contents do not fit this train.py ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0][:200]})") from None


def end_epoch(run, record):
    """The epoch's record into the run's history, the checkpoint (which carries the history),
    then log.jsonl rewritten from it: a kill between the two loses nothing (resume rewrites it)."""
    run.history.append(record)
    save(run)
    on_rank_0(lambda: folder.write_lines(path(run, "log.jsonl"), run.history))
    if run.rank == 0:
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in record.items()))


@contextlib.contextmanager
def started(run, argv):
    """Ends the run cleanly if a stop signal came during the set-up; then the run folder made
    and locked, log.jsonl made whole from the checkpoint, the invocation in args.jsonl, the run's
    summary printed (and, when resuming, where it continues and what changed). Unlocked after."""
    args = run.args
    if any_rank(signals.requested() is not None, run.device):
        raise Stopped(f"{stopped_by()} before "
                      f"training began, nothing written; run the same command again to train")
    with agreed():
        if run.rank == 0:
            try:
                args.out = args.out or folder.new_folder(args.model)
                os.makedirs(args.out, exist_ok=True)
                folder.lock(args.out)
                if run.history:
                    folder.write_lines(path(run, "log.jsonl"), run.history)
                args_jsonl = path(run, "args.jsonl")  # rewritten whole, as every file here
                folder.write_lines(args_jsonl, folder.read_lines(args_jsonl) + [invocation(run, argv)])
            except OSError as e:
                raise RunError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
    args.out = all_gather(args.out)[0]
    try:
        if run.rank == 0:
            summary(run)
        yield
    finally:
        folder.unlock()


def invocation(run, argv):
    """What this invocation was asked, what it resolved that to, and the code that ran."""
    args, device = run.args, run.device
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{os.cpu_count()} cores, {torch.get_num_threads()} threads")
    return {"started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": ["train.py", *argv], "args": vars(args),
            "resolved": {"peak_lr": run.peak_lr, "world_size": run.world_size,
                         "micro_batch": run.micro_batch, "accum_steps": args.accum_steps,
                         "workers": run.workers, "train_precision": args.train_precision,
                         "eval_precision": args.eval_precision, "ema_alpha": run.ema_alpha,
                         "device": f"{device.type} ({name})",
                         "steps_per_epoch": run.steps_per_epoch, "start_step": run.step,
                         "torch": torch.__version__, "torchvision": torchvision.__version__,
                         "python": platform.python_version()},
            "code": folder.provenance()}


PER_INVOCATION = ("resume", "stop_after")  # flags that are news to no one when they change


def summary(run):
    """The run's first lines: model, ranks, batch, output; where a resumed run continues, and
    which of its flags changed since the checkpoint (with the BatchNorm batch they change)."""
    from vitc import complexity
    args, cx = run.args, complexity(run.model)
    print(f"{args.model}: {cx['flops'] / 1e9:.2f} GF, {cx['params'] / 1e6:.2f} M params | "
          f"{run.world_size} x {run.device.type}, global batch {args.batch_size}, "
          f"{run.steps_per_epoch} steps/epoch | torch {torch.__version__} | out {args.out}")
    if run.resumed is None or run.epoch == args.epochs:
        return
    old, total = run.resumed["args"], args.epochs * run.steps_per_epoch
    within = run.step - run.epoch * run.steps_per_epoch
    print(f"resuming from {run.resumed['path']}: step {run.step} of {total} (epoch "
          f"{run.epoch + 1}{f', {within} steps into it' if within else ''})")
    changed = [f"--{key.replace('_', '-')} {old[key]} -> {value}"
               for key, value in vars(args).items()
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


def stopped_by():
    return f"stopped by {signals.requested() or 'a signal to another rank'}"


def stop(run, why=None):
    """Says how to continue a run that stops before its end; its exit status is 0."""
    if run.rank == 0:
        why = why or stopped_by()
        print(f"{why} at step {run.step}; checkpoint {path(run)}. To continue, re-run the same "
              f"command with --out {run.args.out} --resume auto")
    return 0


def finish(run, trained):
    """A finished run: its checkpoint dropped if asked, then its last line."""
    args = run.args
    if not args.keep_checkpoint:
        on_rank_0(lambda: os.path.exists(path(run)) and os.remove(path(run)))
    if run.rank == 0:
        if not trained:
            print(f"the run in {args.out} is complete ({args.epochs} epochs): nothing to train")
        kept = f"checkpoint {path(run)}, " if args.keep_checkpoint else ""
        print(f"done: best {'EMA ' if run.ema is not None else ''}top-1 {run.best[0]:.2f}% "
              f"(epoch {run.best[1]}); {kept}best weights {path(run, 'best.pt')}")
    return 0
