"""The epoch's progress bar and checks. Reading a figure of the step (the loss, say) makes the
host wait until the GPU has run every step queued so far, so the step's figures stay on the
device and are read, for all ranks in one all-reduce, every CHECK_EVERY steps and at the end of
each epoch: a non-finite loss or too many unreadable images then stop the run, named with the
step they happened at, and a stop signal on any rank stops every rank at the same step."""

import os
import sys
import time

import torch
from tqdm import tqdm

from . import signals
from .dist import all_sum, on_rank_0
from .errors import RunError
from .folder import write_lines
from .images import MAX_UNREADABLE_IN_A_ROW, warn_unreadable

CHECK_EVERY = 20
tqdm.monitor_interval = 0  # no monitor thread of tqdm's alive when DataLoaders fork their workers


def new_progress():
    """The running figures of the epoch under way (checkpointed: an epoch interrupted and
    resumed is logged whole)."""
    return {"loss_sum": 0.0, "steps": 0, "seconds": 0.0, "unreadable": 0, "skipped_steps": 0}


def epoch_figures(run):
    """The figures of the epoch just trained, for its record; run.progress starts afresh."""
    progress, run.progress = run.progress, new_progress()
    figures = {"train_loss": progress["loss_sum"] / progress["steps"],
               "images_per_sec": progress["steps"] * run.args.batch_size / progress["seconds"],
               "epoch_time": progress["seconds"], "unreadable": progress["unreadable"]}
    if run.scaler is not None:  # fp16: updates skipped because the gradients overflowed
        figures["skipped_steps"] = progress["skipped_steps"]
    if progress.get("resumed_mid_epoch"):  # the figures still cover the whole epoch
        figures["resumed_mid_epoch"] = True
    if run.device.type == "cuda":
        figures["peak_mem_gb"] = torch.cuda.max_memory_allocated(run.device) / 2 ** 30
    return figures


class Monitor:
    def __init__(self, run, epoch, first):
        self.run, self.epoch = run, epoch
        if first:
            run.progress["resumed_mid_epoch"] = True
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        self.window = []  # per step since the last read: (loss, skipped, unreadable, blanks)
        self.unreadable = self.blanks = 0  # of the step under way
        self.gone = False  # blanks seen: files are no longer named one by one
        self.window_start = time.perf_counter()
        self.prefix = f"[rank {run.rank}] " if run.world_size > 1 else ""
        self.bar = tqdm(total=run.steps_per_epoch, initial=first, disable=run.rank != 0,
                        desc=f"epoch {epoch + 1}/{run.args.epochs}", dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()  # also before an error, so that its message starts a line of its own

    def batches(self, loader):
        """The loader's (images, labels): unreadable files named now and counted. Blanks (the
        data gone) are labelled 0 so that mixup and the loss take them: the run stops at the next
        read, on every rank, before anything is checkpointed."""
        for images, labels, bad in loader:
            blanks = int((labels < 0).sum())  # a CPU tensor: no device sync
            if blanks and not self.gone:
                self.gone = True
                tqdm.write(f"train.py: warning: {self.prefix}{self.data_gone()}; stopping at the "
                           f"next check", file=sys.stderr)
            labels.clamp_(min=0)
            self.unreadable += sum(map(bool, bad)) if self.gone else warn_unreadable(bad, self.prefix)
            self.blanks += blanks
            yield images, labels

    def after_step(self, loss, skipped=None):
        """Keeps the step's figures (`skipped`: fp16 skipped the update); every CHECK_EVERY steps
        and at the epoch's end, reads and checks them. True when any rank was asked to stop."""
        run = self.run
        skipped = torch.zeros_like(loss) if skipped is None else skipped.to(loss.dtype)
        self.window.append((loss, skipped, self.unreadable, self.blanks))
        self.unreadable = self.blanks = 0
        self.bar.update()
        epoch_end = run.step == (self.epoch + 1) * run.steps_per_epoch
        return bool(run.step % CHECK_EVERY == 0 or epoch_end) and self.read()

    def read(self):
        """The one wait for the device: the window's figures summed over ranks, then checked and
        added to run.progress step by step."""
        run, progress = self.run, self.run.progress
        on_device = torch.stack([torch.stack(step[:2]) for step in self.window]).float()
        on_host = torch.tensor([[unreadable, blanks, 0.0] for *_, unreadable, blanks in self.window])
        on_host[-1, 2] = signals.requested() is not None
        table = all_sum(torch.cat([on_device, on_host.to(on_device.device)], 1)).tolist()
        for step, (loss, skipped, unreadable, blanks, stop) in enumerate(
                table, run.step - len(table) + 1):
            if blanks:
                raise RunError(f"{self.data_gone()} (at step {step}, epoch {self.epoch + 1}); the "
                               f"last checkpoint stays in {run.args.out}")
            progress["unreadable"] += int(unreadable)
            self.check_unreadable(unreadable, step)
            loss /= run.world_size
            if not torch.isfinite(torch.tensor(loss)):
                marker = {"epoch": self.epoch + 1, "step": step, "diverged": str(loss)}
                on_rank_0(lambda: write_lines(os.path.join(run.args.out, "log.jsonl"),
                                              run.history + [marker]))  # for sweep reports
                raise RunError(f"loss is {loss} at step {step} (epoch {self.epoch + 1}); "
                               f"stopped, the last good checkpoint stays in {run.args.out}")
            progress["loss_sum"] += loss
            progress["steps"] += 1
            progress["skipped_steps"] += round(skipped / run.world_size)
        now = time.perf_counter()
        progress["seconds"] += now - self.window_start
        self.window, self.window_start = [], now
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.lr:.3g}",
                             img_s=f"{progress['steps'] * run.args.batch_size / progress['seconds']:.0f}")
        return stop > 0

    def check_unreadable(self, in_step, step):
        """Too many unreadable train images in a step's global batch, or so far in the epoch?"""
        run, limit = self.run, self.run.args.max_bad_fraction
        in_epoch = run.progress["unreadable"]
        if in_step > limit * run.args.batch_size or (
                in_step and in_epoch > limit * run.steps_per_epoch * run.args.batch_size):
            raise RunError(f"{in_epoch} unreadable train images in epoch {self.epoch + 1} "
                           f"({int(in_step)} in step {step}), more than --max-bad-fraction "
                           f"{limit} allows; the files are named above, the last checkpoint "
                           f"stays in {run.args.out}")

    def data_gone(self):
        """What a blank means: MAX_UNREADABLE_IN_A_ROW train files in a row cannot be read."""
        root = getattr(self.run.train_set, "root", self.run.args.data)
        classes = getattr(self.run.train_set, "classes", [])
        gone = [c for c in classes if not os.path.isdir(os.path.join(root, c))]
        why = ("the folder is gone (an unmounted filesystem?)" if not os.path.isdir(root) else
               f"class folders gone since the run began: {', '.join(gone[:5])}" if gone else
               "is the filesystem still there?")
        return f"{root}: {MAX_UNREADABLE_IN_A_ROW} files in a row cannot be read: {why}"
