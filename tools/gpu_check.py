"""The GPU path in one go, for the day a GPU is lent: under 10 minutes on one or more GPUs.

    python tools/gpu_check.py          # refuses, exit status 2, without a CUDA GPU

It runs these checks, then prints one summary table (check, result, figure) and the folder of
their logs; its exit status is 0 when all passed, 1 otherwise.
  nccl    train.py under torchrun on 2 GPUs (1 if there is one), --data fake, 3 small epochs,
          fp16 and --compile, stopped by SIGTERM once epoch 1 is logged, then resumed
          (--resume auto) in bf16 to the end: the stop leaves a checkpoint, the resume exits
          0, and log.jsonl holds epochs 1, 2, 3.
  syncs   the host syncs in train.py's training epochs (not its setup or evaluation), counted with
          torch.cuda.set_sync_debug_mode("warn"), in epochs of 2 and CHECK_EVERY - 1 steps:
          the same count, so no step waits for the GPU (the check every CHECK_EVERY steps aside).
  pytest  the test suite, run alongside nccl and syncs, which time nothing.
  bench   tools/bench.py's model bench, then (loader) its --loader bench on generated JPEGs,
          run alone, after the others; their output is printed before the table.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from runsafe.errors import Parser, RunError, run_cli  # noqa: E402
from runsafe.monitor import CHECK_EVERY  # noqa: E402

# Seconds each check may take. pytest starts first and must end within its limit, while nccl and
# syncs run (300 + 100 s at most); bench and loader run after it: 420 + 60 + 90 = 570 s at most.
LIMITS = {"nccl": 300, "syncs": 100, "pytest": 420, "bench": 60, "loader": 90}

# `python -c SYNCS TRAIN_ARGS`: train.py, its training epochs under the sync debug mode; prints
# the syncs it warned of, and where each was called from.
SYNCS = """
import collections, sys, warnings, torch, train
epoch = train.train_one_epoch
def counted(run, n):
    torch.cuda.set_sync_debug_mode("warn")
    try:
        epoch(run, n)
    finally:
        torch.cuda.set_sync_debug_mode("default")
train.train_one_epoch = counted
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    status = train.cli(sys.argv[1:])
syncs = [(w.filename, w.lineno) for w in caught if "synchronizing CUDA" in str(w.message)]
for (name, line), n in collections.Counter(syncs).items():
    print(f"{n} x {name}:{line}")
print("syncs:", len(syncs))
sys.exit(status)
"""


class Failed(Exception):
    """A check that failed: its message is the summary's figure."""


STARTED = []  # every process started, each in its own process group: killed whole at the end


def start(cmd, log):
    """cmd started in its own process group, its output into `log`."""
    with open(log, "a") as f:
        STARTED.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                        start_new_session=True))
    return STARTED[-1]


def finish(proc, seconds):
    """proc's exit status once it ends, within `seconds` (or TimeoutExpired, its group killed)."""
    try:
        return proc.wait(max(seconds, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def train_flags(out, steps, gpus, *extra):
    """A small train.py run on fake data: `steps` steps an epoch of 32 images per GPU at 64 px."""
    return ["--data", "fake", "--model", "vitc_1gf", "--img-size", "64", "--batch-size",
            str(32 * gpus), "--fake-size", str(32 * gpus * steps), "--precise-bn", "64",
            "--workers", "2", "--no-keep-checkpoint", "--out", out, *extra]


def check_nccl(logs, gpus):
    out, log, deadline = os.path.join(logs, "nccl"), os.path.join(logs, "nccl.log"), \
        time.time() + LIMITS["nccl"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={gpus}", os.path.join(ROOT, "train.py"),
           *train_flags(out, 100, gpus, "--epochs", "3", "--warmup-epochs", "1", "--compile")]
    first = start([*cmd, "--train-precision", "fp16"], log)
    while not read_jsonl(os.path.join(out, "log.jsonl")) and first.poll() is None \
            and time.time() < deadline:
        time.sleep(0.5)
    first.send_signal(signal.SIGTERM)  # torchrun forwards it to the ranks
    stopped = finish(first, deadline - time.time())
    kept = os.path.exists(os.path.join(out, "checkpoint.pt"))  # a clean stop leaves one
    resumed = finish(start([*cmd, "--train-precision", "bf16", "--resume", "auto"], log),
                     deadline - time.time())
    epochs = [r.get("epoch") for r in read_jsonl(os.path.join(out, "log.jsonl"))]
    if not kept or resumed or epochs != [1, 2, 3]:
        raise Failed(f"checkpoint after the stop: {kept}, resume exit {resumed}, log.jsonl "
                     f"epochs {epochs}; see {log}")
    return (f"GPUs: {gpus}; fp16 stopped (torchrun exit {stopped}), bf16 resumed (exit 0), "
            f"log.jsonl epochs {epochs}")


def read_jsonl(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f]
    except OSError:
        return []


def check_syncs(logs):
    counts = {}
    for steps in (2, CHECK_EVERY - 1):
        log = os.path.join(logs, f"syncs-{steps}.log")
        flags = train_flags(os.path.join(logs, f"syncs-{steps}"), steps, 1, "--epochs", "1",
                            "--warmup-epochs", "0", "--ema-period", "1")  # the EMA every step
        status = finish(start([sys.executable, "-c", SYNCS, *flags], log), LIMITS["syncs"] / 2)
        with open(log) as f:
            found = re.findall(r"^syncs: (\d+)$", f.read(), re.M)
        if status or not found:
            raise Failed(f"train.py exit {status}; see {log}")
        counts[steps] = int(found[0])
    figure = ", ".join(f"{n} in {steps} steps" for steps, n in counts.items())
    if len(set(counts.values())) > 1 or 0 in counts.values():  # the epoch end's read syncs
        raise Failed(f"{figure}, not the same count > 0; {logs}/syncs-*.log say where")
    return figure


def check_pytest(log, proc, seconds):
    status = finish(proc, seconds)
    with open(log) as f:
        last = (f.read().strip().splitlines() or ["no output"])[-1]
    if status:
        raise Failed(last)
    return last


def check_bench(logs, name, argv, row, figure):
    """tools/bench.py ARGV, its output printed; the figure from each `row` match in it."""
    log = os.path.join(logs, f"{name}.log")
    status = finish(start([sys.executable, os.path.join(ROOT, "tools", "bench.py"), *argv], log),
                    LIMITS[name])
    with open(log) as f:
        text = f.read()
    print(f"\n$ tools/bench.py {' '.join(argv)}\n{text}")
    if status:
        raise Failed(f"exit {status}: {text.strip().splitlines()[-1:]}")
    return "; ".join(figure.format(*m) for m in re.findall(row, text, re.M))


def attempt(name, check, *args):
    """(name, pass or FAIL, figure) of check(*args)."""
    print(f"gpu_check.py: {name} (at most {LIMITS[name]} s)", flush=True)
    try:
        return name, "pass", check(*args)
    except Failed as e:
        return name, "FAIL", str(e)
    except subprocess.TimeoutExpired:
        return name, "FAIL", f"not done in {LIMITS[name]} s; see its log"


def main(argv=None):
    Parser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    if not torch.cuda.is_available():
        raise RunError("no CUDA GPU here (torch.cuda.is_available() is False): nothing to check")
    logs, began = tempfile.mkdtemp(prefix="gpu_check-"), time.time()
    pytest_log = os.path.join(logs, "pytest.log")
    pytest = start([sys.executable, "-m", "pytest", "-q"], pytest_log)  # alongside nccl, syncs
    try:
        rows = [attempt("nccl", check_nccl, logs, min(2, torch.cuda.device_count())),
                attempt("syncs", check_syncs, logs),
                attempt("pytest", check_pytest, pytest_log, pytest,
                        LIMITS["pytest"] - (time.time() - began)),
                attempt("bench", check_bench, logs, "bench", ["--models", "vitp_1gf",
                        "vitc_1gf"], r"^(vit\w+) +([\d.]+) +[\d.]+ +(\S+) +(\S+)$",
                        "{0} {1} img/s, MFU {2} matmul, {3} datasheet"),
                attempt("loader", check_bench, logs, "loader", [
                    "--loader", os.path.join(logs, "jpegs"), "--make-jpegs", "300", "--images",
                    "512", "--models", "vitp_1gf", "vitc_1gf"],
                    r"^(vit\w+) +([\d.]+) +([\d.]+) +(\d+%)", "{0} {1} img/s: {2} cores/GPU")]
    finally:
        for proc in STARTED:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    print(f"\n{'check':<7} {'result':<6} figure")
    for row in rows:
        print("{:<7} {:<6} {}".format(*row))
    print(f"{time.time() - began:.0f} s; logs in {logs}")
    return 0 if all(result == "pass" for _, result, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main, "gpu_check.py"))
