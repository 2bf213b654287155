"""The paper's stability experiments (section 5) as commands (a tool, not part of the paper).

    # lr/wd stability (section 5.3, Figures 4-5): 64 runs of 50 epochs, (lr, wd) log-uniform
    python tools/sweep.py sample --model vitc_1gf --optimizer adamw --runs 64 --epochs 50 \\
        --out runs/sweep-c1 --data /imagenet [--launch local|slurm] [-- more train.py flags]
    # training length and optimizer stability (sections 5.1-5.2, Figures 2-3): a grid at the
    # per-model lr/wd of Table 4 (left)
    python tools/sweep.py grid --models vitp_1gf vitc_1gf --optimizers adamw sgd \\
        --epochs 50 100 200 400 --out runs/length-1gf --data /imagenet [--launch ...]
    # errors, EDFs, the paper's tables; runs/sweep-c1+sweep-p1-edf.png and -curves.png
    python tools/sweep.py report runs/sweep-c1 runs/sweep-p1

`sample` and `grid` write SWEEP/sweep.json (every run: name, model, optimizer, epochs, lr, wd and
its train.py arguments) and SWEEP/commands.txt, print one train.py command per run and, with
--launch, run them: `local` one after another, each in SWEEP/NAME with its output in
SWEEP/NAME/output.log (run the same command again to go on: finished and diverged runs are
skipped, an interrupted one resumes from its checkpoint); `slurm` writes SWEEP/sweep.sbatch, a
job array with one task per run still to do, and runs nothing (each task records its outcome in
SWEEP/slurm.jsonl; see write_slurm). Learning rates are quoted at batch 2048 and
train.py scales them to the batch it runs. `report` reads each run's log.jsonl: the error of a
run is 100 - its final EMA top-1 (the model's top-1 with --no-ema). Runs that diverged (non-finite
loss), failed or have not finished are counted and shown, never dropped: the EDF of a sweep is the
fraction of *all* its runs whose error is within x of the best run's.
"""

import argparse
import datetime
import getpass
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the repository and tools/, wherever run from
from plot import (  # noqa: E402
    data_note, plot_runs, pyplot, read_args, read_jsonl, read_run, save_figure, warn)

import train  # noqa: E402
from runsafe.errors import FolderInUse, HelpFormatter, Parser, RunError, run_cli  # noqa: E402
from runsafe.folder import append_line  # noqa: E402
import vitc  # noqa: E402
from bench import PAPER_EPOCH_MINUTES  # noqa: E402  (Table 1's minutes per epoch, 8 V100s)

TRAIN_PY = os.path.join(os.path.dirname(HERE), "train.py")

# Table 4 (right): the intervals (lr, wd) are drawn from for ViT models, lr at batch 2048.
RANGES = {"adamw": {"lr": (2.5e-4, 8e-3), "wd": (0.02, 0.8)},
          "sgd": {"lr": (0.1, 3.2), "wd": (4e-6, 1.2e-4)}}
# Table 4 (left): per-model lr/wd tuned at 50 epochs, used in sections 5.1-5.2 (none for 36GF).
STABILITY = {"adamw": {"vitp_1gf": (2.0e-3, 0.20), "vitp_4gf": (2.0e-3, 0.20),
                       "vitp_18gf": (1.0e-3, 0.24), "vitc_1gf": (2.5e-3, 0.19),
                       "vitc_4gf": (1.0e-3, 0.24), "vitc_18gf": (1.0e-3, 0.24)},
             "sgd": train.SGD}
SET_BY_SWEEP = ("--model", "--stem", "--size", "--optimizer", "--lr", "--wd", "--epochs",
                "--out", "--resume", "--data")
THRESHOLDS = (0.5, 1, 2, 4, 8)  # top-1 error points, for the printed EDF


# ------------------------------------------------------------------------------------------------
# sample / grid: the runs of a sweep, their train.py commands, launching them
# ------------------------------------------------------------------------------------------------


def log_uniform(rng, low, high):
    """A draw whose logarithm is uniform in [log low, log high], rounded to 4 significant digits
    (the value the command carries); the rounding never leaves the interval."""
    return float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.4g}")


def sample_settings(optimizer, runs, seed, lr_range=None, wd_range=None):
    """`runs` (lr, wd) pairs drawn log-uniformly from Table 4's ranges (or those given), the
    same for a seed."""
    rng = random.Random(seed)
    lr_range, wd_range = lr_range or RANGES[optimizer]["lr"], wd_range or RANGES[optimizer]["wd"]
    return [(log_uniform(rng, *lr_range), log_uniform(rng, *wd_range)) for _ in range(runs)]


def grid_settings(which, model, optimizer):
    """(lr, wd) of a grid run: Table 4 (left), or the peak runs' of section 6 (AdamW only)."""
    if which == "peak":
        if optimizer != "adamw":
            raise RunError("the peak runs (section 6) train every ViT with AdamW only")
        return train.paper_lr_wd(model, "adamw")
    if model not in STABILITY[optimizer]:
        raise RunError(f"Table 4 gives no {optimizer} lr/wd for {model} (only for the 1, 4 and "
                        f"18GF models; --settings peak has 36GF's AdamW lr/wd)")
    return STABILITY[optimizer][model]


def train_argv(model, optimizer, epochs, lr, wd, out, data, extra, keep_checkpoint=False):
    argv = ["--model", model, "--optimizer", optimizer, "--epochs", str(epochs), "--lr", f"{lr:g}",
            "--wd", f"{wd:g}", "--out", out, "--resume", "auto"]
    if not keep_checkpoint:  # a finished run's report and plots need only its logs
        argv.append("--no-keep-checkpoint")
    return argv + (["--data", data] if data else []) + list(extra)


def check_extra(extra):
    for token in extra:
        if token.split("=")[0] in SET_BY_SWEEP:
            raise RunError(f"{token.split('=')[0]} is set by sweep.py for each run (through its "
                            f"own option, if it has one); pass only other train.py flags after --")


def plan_runs(args):
    """[{name, model, optimizer, epochs, lr, wd, argv}] of a `sample` or `grid` command."""
    check_extra(args.extra)
    plan = []
    if args.command == "sample":
        width = max(3, len(str(args.runs - 1)))
        draws = sample_settings(args.optimizer, args.runs, args.seed, args.lr_range,
                                args.wd_range)
        for i, (lr, wd) in enumerate(draws):
            plan.append({"name": f"run-{i:0{width}d}", "model": args.model,
                         "optimizer": args.optimizer, "epochs": args.epochs, "lr": lr, "wd": wd})
    else:
        for model in dict.fromkeys(args.models):  # each once, in the order given
            for optimizer in dict.fromkeys(args.optimizers):
                settings = grid_settings(args.settings, model, optimizer)
                for epochs in dict.fromkeys(args.epochs):
                    plan.append({"name": f"{model}-{optimizer}-{epochs:03d}ep", "model": model,
                                 "optimizer": optimizer, "epochs": epochs, "lr": settings[0],
                                 "wd": settings[1]})
    for run in plan:
        run["argv"] = train_argv(run["model"], run["optimizer"], run["epochs"], run["lr"],
                                 run["wd"], os.path.join(args.out, run["name"]), args.data,
                                 args.extra, args.keep_checkpoints)
        try:  # every command must be one train.py accepts, before any of them runs
            parsed = vars(train.parse_args(run["argv"]))
        except RunError as e:
            raise RunError(f"train.py refuses the arguments of {run['name']}: {e}") from None
        planned = {"model": run["model"], "optimizer": run["optimizer"], "epochs": run["epochs"],
                   "lr": run["lr"], "wd": run["wd"], "resume": "auto",
                   "out": os.path.join(args.out, run["name"])}
        changed = [k for k, v in planned.items() if parsed[k] != v]
        if changed:  # e.g. an abbreviated --ep or --mod after --, which argparse accepts
            raise RunError(f"the flags after -- change what the sweep sets: "
                            f"{', '.join('--' + k for k in changed)}")
    return plan


def launcher(ranks, here=False):
    """The command prefix that starts train.py as `ranks` processes of one machine (one per GPU,
    or gloo processes on its CPUs): as printed (python or torchrun), or `here`, with this
    interpreter."""
    script = TRAIN_PY if here else os.path.relpath(TRAIN_PY)
    python = sys.executable if here else "python"
    if ranks == 1:
        return [python, script]
    torchrun = [python, "-m", "torch.distributed.run"] if here else ["torchrun"]
    return [*torchrun, "--standalone", f"--nproc_per_node={ranks}", script]


def load_plan(folder):
    """The runs listed in FOLDER/sweep.json."""
    path = os.path.join(folder, "sweep.json")
    try:
        with open(path) as f:
            runs = json.load(f)["runs"]
        keys = {"name", "model", "optimizer", "epochs", "lr", "wd", "argv"}
        if not all(keys <= run.keys() for run in runs):
            raise ValueError("a run misses a setting")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RunError(f"{path}: not a sweep written by tools/sweep.py ({e})") from None
    return runs


def write_plan(args, plan):
    """SWEEP/sweep.json and commands.txt; a folder that holds another sweep is refused."""
    manifest = {"kind": args.command, "settings": {
        k: getattr(args, k) for k in ("model", "optimizer", "models", "optimizers", "settings",
                                      "runs", "epochs", "seed", "lr_range", "wd_range", "data",
                                      "extra")
        if hasattr(args, k)},
        "runs": plan}
    path = os.path.join(args.out, "sweep.json")
    keys = ("name", "model", "optimizer", "epochs", "lr", "wd")
    if os.path.exists(path) and [[r[k] for k in keys] for r in load_plan(args.out)] != \
            [[r[k] for k in keys] for r in plan]:
        raise RunError(f"{args.out} holds another sweep (its sweep.json plans other runs or "
                        f"settings): choose another --out, or repeat that sweep's own command")
    try:
        os.makedirs(args.out, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(path + ".tmp", path)
        with open(os.path.join(args.out, "commands.txt"), "w") as f:
            f.writelines(shlex.join(launcher(args.ranks) + run["argv"]) + "\n" for run in plan)
    except OSError as e:
        raise RunError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None


def gpu_hours(plan):
    """V100 GPU-hours of a plan at the paper's epoch times (Table 1, 8 V100s)."""
    return sum(PAPER_EPOCH_MINUTES[r["model"]] * r["epochs"] * 8 / 60 for r in plan)


def read_status(run, folder, launches):
    """(status, error %, detail, the run's files as read_run() reads them or None) of one run of
    a sweep; see run_status(). A run whose files cannot be read is `unreadable`, with a warning,
    and the others are still read."""
    try:
        record = read_run(folder, need_log=False) if os.path.isdir(folder) else None
    except RunError as e:
        warn(f"{run['name']}: {e}")
        return "unreadable", None, str(e), None
    return (*run_status(run, record, launches.get(run["name"], {})), record)


def run_status(run, record, launch):
    """(status, error %, detail) of a run: finished (with its error), diverged, failed (its
    launch ended with a non-zero exit), unfinished (started, not ended) or not started."""
    log = (record or {}).get("log") or []
    epochs = [r for r in log if "train_loss" in r]
    if log and "diverged" in log[-1]:
        return "diverged", None, f"loss {log[-1]['diverged']} at step {log[-1].get('step')}"
    if epochs and epochs[-1]["epoch"] == run["epochs"]:
        final = epochs[-1]
        top1 = final.get("ema_top1", final.get("val_top1"))
        if top1 is not None:
            return "finished", 100 - top1, ""
    if launch.get("exit", 0) != 0 and not launch.get("signalled"):
        return "failed", None, f"exit {launch['exit']}" + (f": {launch['detail']}"
                                                            if launch.get("detail") else "")
    if record is None or (record["log"] is None and not record["args"]):
        return "not started", None, ""
    return "unfinished", None, f"{len(epochs)} of {run['epochs']} epochs"


def read_launches(out):
    """The last launch record of each run: SWEEP/launch.jsonl (--launch local) and
    SWEEP/slurm.jsonl (each Slurm task's end, written by its script through `task-end`)."""
    records = []
    for name in ("launch.jsonl", "slurm.jsonl"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            records += read_jsonl(path, lambda r: isinstance(r.get("run"), str) and "exit" in r,
                                  "a launch record")
    return {r["run"]: r for r in sorted(records, key=lambda r: str(r.get("ended")))}


def launch_local(args, plan):
    """Runs the sweep's commands one after another; a signal stops the run under way (it
    checkpoints) and the sweep. Returns the exit status: 1 if a run failed, 128 + N after
    signal N."""
    stop, child = [], None

    def forward(signum, frame):
        stop.append(signum)
        if child is not None and child.poll() is None:  # train.py checkpoints on the first
            child.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
    # SIGHUP too (a closed terminal): the runs live in their own session, so must be told.
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    failed = []
    try:
        for i, run in enumerate(plan):
            if stop:
                break
            folder = os.path.join(args.out, run["name"])
            status, error, detail, _ = read_status(run, folder, read_launches(args.out))
            head = f"[{i + 1}/{len(plan)}] {run['name']} (lr {run['lr']:g}, wd {run['wd']:g})"
            if status in ("finished", "diverged"):
                print(f"{head}: {status}{'' if error is None else f' earlier, error {error:.2f}%'}"
                      f", skipped", flush=True)
                continue
            print(f"{head}: running, output in {os.path.join(folder, 'output.log')}", flush=True)
            os.makedirs(folder, exist_ok=True)
            start = time.time()
            with open(os.path.join(folder, "output.log"), "ab") as output:
                # its own session: a Ctrl-C reaches train.py once, through forward()
                child = subprocess.Popen(launcher(args.ranks, here=True) + run["argv"],
                                         stdout=output, stderr=subprocess.STDOUT,
                                         start_new_session=True)
                code = child.wait()
            seconds = time.time() - start
            with open(os.path.join(args.out, "launch.jsonl"), "a") as f:
                f.write(json.dumps({"run": run["name"], "exit": code, "seconds": round(seconds, 1),
                                    "signalled": bool(stop), "ended": datetime.datetime.now()
                                    .isoformat(timespec="seconds")}) + "\n")
            status, error, detail, _ = read_status(run, folder, read_launches(args.out))
            if status == "failed":
                failed.append(run["name"])
                detail += f": {last_line(os.path.join(folder, 'output.log'))}"
                if code == FolderInUse.status:  # an earlier sweep's run still lives
                    raise RunError(f"{run['name']}: {detail}")
            result = f", error {error:.2f}%" if error is not None else f" ({detail})"
            print(f"{head}: {status}{result} in {seconds:.0f} s", flush=True)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if stop:  # 128 + signal, as a process killed by it: a shell loop of sweeps stops too
        print(f"stopped by {signal.Signals(stop[0]).name}: the run under way saved a checkpoint "
              f"if it had begun training; the same command goes on from there")
        return 128 + stop[0]
    if failed:
        print(f"sweep.py: {len(failed)} runs failed ({', '.join(failed)}): see their output.log; "
              f"the same command runs them again", file=sys.stderr)
        return 1
    print(f"done: python tools/sweep.py report {args.out}")
    return 0


def last_line(path):
    with open(path, errors="replace") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


# Slurm sends SIGTERM this long before a task's time limit (--signal), so that train.py can
# checkpoint; it comes up to about a minute earlier still (Slurm checks every 30-60 s).
SIGNAL_LEAD = 120


def slurm_seconds(text):
    """Seconds of a Slurm time ("MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS"), or
    None for what is not one (e.g. UNLIMITED)."""
    days, _, clock = text.rpartition("-") if "-" in text else ("0", "", text)
    try:
        parts = [int(p) for p in clock.split(":")]
        days = int(days)
    except ValueError:
        return None
    if "-" in text:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
    elif len(parts) < 3:  # MM or MM:SS
        parts = [0, *parts, *[0] * (2 - len(parts))]
    hours, minutes, seconds = parts[:3]
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def signal_lead(sbatch):
    """The lead of a --signal among the extra #SBATCH options, or SIGNAL_LEAD."""
    leads = [re.match(r"--signal[= ]\S*@(\d+)", o.strip()) for o in sbatch]
    return next((int(m[1]) for m in reversed(leads) if m), SIGNAL_LEAD)


def check_time_limit(sbatch):
    """Warns when a --time limit among the extra #SBATCH options leaves a task little time to
    train before Slurm's stop signal, which comes up to a minute before its lead."""
    lead = signal_lead(sbatch)
    for option in sbatch:
        match = re.match(r"(?:--time[= ]|-t ?)(\S+)$", option.strip())
        limit = match and slurm_seconds(match[1])
        if limit is not None and limit < lead + 60 + 300:
            warn(f"{option.strip()}: Slurm sends the stop signal {lead}-{lead + 60} s before the "
                 f"time limit (at once if the limit is shorter), so each task would train "
                 f"{max(0, limit - lead - 60)} s or less before it checkpoints and stops: give a "
                 f"--time comfortably longer than {lead + 60} s")


def slurm_path(path, pattern=""):
    """`path` + `pattern` for an #SBATCH line: quoted (Slurm splits its values on spaces), with
    the path's `%` doubled (Slurm expands %j, %A, ... in file names, as it should the pattern's);
    refused if it cannot be quoted."""
    if any(c in path for c in '"\\\n'):
        raise RunError(f"{path}: a path with a double quote, backslash or newline cannot be "
                       f"written into a Slurm script: choose another --out")
    return '"' + path.replace("%", "%%") + pattern + '"'


def queued_tasks(script):
    """{array task: 'JOB_TASK STATE'} of the tasks of `script` that Slurm still has queued or
    running (a job requeued, or submitted twice), as squeue shows them; None when squeue
    cannot tell (not installed, or no controller answers)."""
    if shutil.which("squeue") is None:
        return None
    try:
        listing = subprocess.run(["squeue", "--noheader", "--array", f"--user={getpass.getuser()}",
                                  "--format=%F|%K|%T|%o"], capture_output=True, text=True,
                                 timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        warn(f"squeue failed ({e}): tasks of an earlier submission still queued would run twice")
        return None
    if listing.returncode != 0:
        why = (listing.stderr.strip().splitlines() or [f"exit {listing.returncode}"])[-1]
        warn(f"squeue failed ({why}): tasks of an earlier submission still queued would run "
             f"twice")
        return None
    tasks, mine = {}, os.path.realpath(script)
    for line in listing.stdout.splitlines():
        job, task, state, command = (line.split("|", 3) + ["", "", ""])[:4]
        if task.isdigit() and os.path.realpath(command) == mine:
            tasks[int(task)] = f"{job}_{task} {state}"
    return tasks


def write_slurm(args, plan):
    """SWEEP/sweep.sbatch: a job array with a task for each run that still needs work (neither
    finished nor diverged, nor queued or running in Slurm), its command written into the script
    itself. With nothing left to do, an earlier script is removed (submitted again, it would
    start its tasks again). Returns its path, or None."""
    launches = read_launches(args.out)
    path = os.path.join(args.out, "sweep.sbatch")
    queued = queued_tasks(path) or {}
    todo = []
    for i, run in enumerate(plan):
        if read_status(run, os.path.join(args.out, run["name"]), launches)[0] in (
                "finished", "diverged"):
            continue
        if i in queued:
            print(f"# {run['name']}: left out, still in Slurm as job {queued[i]}")
            continue
        todo.append(i)
    if not todo:
        gone = os.path.exists(path)
        if gone:
            os.remove(path)
        print(f"# every run is finished, diverged or still in Slurm: {path} "
              f"{'removed' if gone else 'not written'}")
        return None
    check_time_limit(args.sbatch)
    out = os.path.abspath(args.out)
    job_name = re.sub(r"[^\w.+-]", "_", os.path.basename(out))  # a name, not a path: no quotes
    commands = [shlex.quote(shlex.join(launcher(args.ranks, here=True) + run["argv"]))
                for run in plan]
    if args.gpus:  # as many GPUs as ranks, and --cpus-per-gpu cores for each
        resources = [f"#SBATCH --gpus-per-node={args.gpus}",
                     f"#SBATCH --cpus-per-task={args.gpus * args.cpus_per_gpu}"]
    else:  # CPUs only: no GRES, which a cluster without GPUs refuses
        resources = [f"#SBATCH --cpus-per-task={args.cpus or args.ranks}"]
    # The signal goes to train.py, not to torchrun: torchrun, once signalled itself, exits 1
    # with a traceback however cleanly its ranks stopped.
    forward = ('pkill -"$1" -P "$child" 2>/dev/null || kill -"$1" "$child" 2>/dev/null'
               if args.ranks > 1 else 'kill -"$1" "$child" 2>/dev/null')
    lines = [
        "#!/bin/bash",
        "# Written by tools/sweep.py: one array task per run that still needed work when it was",
        "# written (neither finished nor diverged, nor queued or running in Slurm as squeue",
        "# showed). Submit with `sbatch` (add --partition, --time, ... there or below).",
        "# To go on after a time limit or a failure, run the same sweep.py command again: it",
        "# writes this script anew for the runs still to do, which resume from their",
        "# checkpoints. Do not submit a script while tasks of an earlier submission of it are",
        "# queued or running (squeue --me): a run started twice fails on its folder's lock.",
        "# Stopping: train.py checkpoints on SIGTERM, which this script passes on to it, and",
        f"# --signal asks Slurm for one {signal_lead(args.sbatch)} s before the time limit. By "
        "hand:",
        "# `scancel --signal=TERM --batch JOB` (a plain `scancel -s TERM JOB` signals job steps",
        "# only, and this script runs none); a plain `scancel JOB` stops it too, but kills what",
        "# still runs after KillWait (30 s by default).",
        "# Each task appends its exit status and its outcome (finished, stopped, diverged,",
        "# failed) to slurm.jsonl in the sweep's folder, which `sweep.py report` reads.",
        f"#SBATCH --job-name=sweep-{job_name}",
        f"#SBATCH --array={','.join(map(str, todo))}",
        "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", *resources,
        f"#SBATCH --output={slurm_path(out, '/slurm-%A_%a.out')}",
        "#SBATCH --open-mode=append",
        *([] if any(o.strip().startswith("--signal") for o in args.sbatch)  # the user's wins
          else [f"#SBATCH --signal=B:TERM@{SIGNAL_LEAD}"]),
        *(f"#SBATCH {a}" for a in args.sbatch),
        "set -uo pipefail", f"cd {shlex.quote(os.getcwd())} || exit 1",
        "commands=(", *commands, ")",
        "# torch's threads, per rank, from the CPUs Slurm gave the task (not all the node's)",
        f"ranks={args.ranks}",
        "threads=$(( ${SLURM_CPUS_PER_TASK:-$ranks} / ranks ))",
        "export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))",
        "started=$(date +%s) signalled=",
        'eval "${commands[$SLURM_ARRAY_TASK_ID]} &"',
        "child=$!",
        f'forward() {{ signalled=$1; {forward}; }}',
        "trap 'forward TERM' TERM",
        "trap 'forward INT' INT",
        "# a signal interrupts `wait` while train.py still runs: wait again, then take its status",
        'while wait "$child"; status=$?; kill -0 "$child" 2>/dev/null; do :; done',
        'wait "$child" 2>/dev/null; last=$?',
        '[ "$last" -ne 127 ] && status=$last',
        f'exec {shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(__file__))} task-end '
        f'{shlex.quote(out)} "$SLURM_ARRAY_TASK_ID" --exit "$status" --since "$started" '
        '${signalled:+--signalled "$signalled"}',
        ""]
    try:
        with open(path, "w") as f:
            f.write("\n".join(lines))
    except OSError as e:
        raise RunError(f"cannot write {path} ({e.strerror or e})") from None
    return path


def task_outcome(run, folder, code, since, signalled):
    """(outcome, detail) of a Slurm task whose train.py ended with status `code`: the run's log
    says finished or diverged; otherwise a status of 0 is a clean stop, and so is a signal
    after which the run wrote its checkpoint (torchrun, signalled too by a plain scancel, exits
    1 however cleanly its ranks stopped) or before train.py began the run; anything else
    failed."""
    status, _, detail, _ = read_status(run, folder, {})
    if status in ("finished", "diverged", "unreadable"):
        return ("failed" if status == "unreadable" else status), detail
    checkpoint = os.path.join(folder, "checkpoint.pt")
    if signalled and os.path.exists(checkpoint) and os.path.getmtime(checkpoint) >= since - 1:
        return "stopped", f"by {signalled}, with a checkpoint"
    if code == 0:
        return "stopped", ""
    if code == FolderInUse.status:
        return "failed", "its folder is in use by another train.py (a task submitted twice?)"
    began = [a for a in (read_jsonl(os.path.join(folder, "args.jsonl"))
                         if os.path.exists(os.path.join(folder, "args.jsonl")) else [])
             if a.get("started", "") >= time.strftime("%Y-%m-%dT%H:%M:%S",
                                                      time.localtime(since - 1))]
    if signalled and not began:
        return "stopped", f"by {signalled} before train.py began the run"
    return "failed", "no word from train.py: killed, out of memory, or a crash (see its output)"


def task_end_command(args):
    """Run by sweep.sbatch when a task's train.py has ended: appends the task's outcome to
    SWEEP/slurm.jsonl, says it in the task's output, and exits 0 for a finished or cleanly
    stopped run (also under torchrun), or with train.py's status otherwise."""
    plan = load_plan(args.folder)
    if not 0 <= args.task < len(plan):
        raise RunError(f"{args.folder} plans {len(plan)} runs: no task {args.task}")
    run = plan[args.task]
    outcome, detail = task_outcome(run, os.path.join(args.folder, run["name"]), args.exit,
                                   args.since, args.signalled)
    status = 0 if outcome in ("finished", "stopped") else (args.exit or 1)
    entry = {"run": run["name"], "task": args.task, "job": os.environ.get("SLURM_JOB_ID"),
             "array_job": os.environ.get("SLURM_ARRAY_JOB_ID"), "exit": status,
             "train_exit": args.exit, "outcome": outcome, "signalled": outcome == "stopped",
             "detail": detail, "seconds": round(time.time() - args.since),
             "ended": datetime.datetime.now().isoformat(timespec="seconds")}
    append_line(os.path.join(args.folder, "slurm.jsonl"), entry)
    print(f"sweep.py: {run['name']} (array task {args.task}): {outcome}"
          f"{f' ({detail})' if detail else ''}; exit status {status}", flush=True)
    return status


def plan_command(args):
    if args.launch == "local" and args.data not in (None, "fake") and not os.path.isdir(args.data):
        raise RunError(f"--data {args.data}: no such folder")
    plan = plan_runs(args)
    write_plan(args, plan)
    for run in plan:
        print(shlex.join(launcher(args.ranks) + run["argv"]))
    hours = gpu_hours(plan)
    print(f"# {len(plan)} runs, {sum(r['epochs'] for r in plan)} epochs in all; the same plan "
          f"on ImageNet-1k would take about {hours:,.0f} V100 GPU-hours (Table 1's epoch times, "
          f"8 V100s); plan in {os.path.join(args.out, 'sweep.json')}", flush=True)
    if args.launch == "local":
        return launch_local(args, plan)
    if args.launch == "slurm":
        script = write_slurm(args, plan)
        if script:
            print(f"# submit with: sbatch {shlex.quote(script)}")
    return 0


# ------------------------------------------------------------------------------------------------
# report: errors, EDFs, the tables of Figures 2-5
# ------------------------------------------------------------------------------------------------


def edf(errors, total, x):
    """Fraction of all `total` runs whose error is within x of the best (finished) one's."""
    best = min(errors)
    return sum(e - best <= x for e in errors) / total


def is_run(folder):
    return any(os.path.exists(os.path.join(folder, f)) for f in ("args.jsonl", "log.jsonl"))


def planned(folder):
    """The settings of a run folder outside a sweep, from its args.jsonl."""
    args = read_args(folder)
    if not args:
        raise RunError(f"{folder}: no readable args.jsonl, so its model and settings are "
                       f"unknown")
    return {"name": os.path.basename(os.path.normpath(folder)),
            **{k: args[k] for k in ("model", "optimizer", "epochs", "lr", "wd")}}


def find_runs(folder):
    """[(settings, run folder)] under a folder argument of `report`: a sweep's planned runs
    (sweep.json), the run folders inside a folder, or the folder itself if it is a run (which
    then needs its log.jsonl)."""
    if not os.path.isdir(folder):
        raise RunError(f"{folder}: no such folder")
    if os.path.exists(os.path.join(folder, "sweep.json")):
        return [(r, os.path.join(folder, r["name"])) for r in load_plan(folder)]
    if is_run(folder):
        if not os.path.exists(os.path.join(folder, "log.jsonl")):  # given alone: needs its log
            raise RunError(f"{folder}: no log.jsonl (not a train.py run folder, or its first "
                           f"epoch has not ended)")
        return [(planned(folder), folder)]
    runs = []
    for sub in sorted(os.path.join(folder, d) for d in os.listdir(folder)):
        if is_run(sub):
            try:
                runs.append((planned(sub), sub))
            except RunError as e:  # one run that cannot be read must not hide the others
                warn(f"{e}; left out")
    if not runs:
        raise RunError(f"{folder}: no runs (no sweep.json, and no train.py run folders in it)")
    return runs


def collect(folder):
    """[{name, folder, model, optimizer, epochs, lr, wd, status, error, detail, log, args}] of a
    report argument."""
    launches = read_launches(folder)
    runs = []
    for plan, path in find_runs(folder):
        status, error, detail, record = read_status(plan, path, launches)
        record = record or {}
        runs.append(dict(plan, folder=path, status=status, error=error, detail=detail,
                         log=record.get("log") or [], args=record.get("args") or {}))
    return runs


def count_line(runs):
    counts = {s: sum(r["status"] == s for r in runs) for s in
              ("finished", "diverged", "failed", "unfinished", "unreadable", "not started")}
    return f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)


def print_sweep(folder, runs, thresholds):
    """The summary of one folder argument, and an EDF per (model, optimizer, epochs) group."""
    print(f"{folder}: {count_line(runs)}")
    for r in runs:
        if r["status"] not in ("finished", "not started"):
            print(f"  {r['name']}: {r['status']}" + (f" ({r['detail']})" if r["detail"] else ""))
    curves = []
    for key, group in groups(runs).items():
        errors = [r["error"] for r in group if r["error"] is not None]
        if len(group) < 2 or not errors:
            continue
        best = min((r for r in group if r["error"] is not None), key=lambda r: r["error"])
        print(f"  {' '.join(map(str, key))} ep: best error {best['error']:.2f}% ({best['name']}:"
              f" lr {best['lr']:g}, wd {best['wd']:g}); EDF, fraction of all {len(group)} runs "
              f"within x of it: " + "  ".join(f"x<={x:g}: {edf(errors, len(group), x):.2f}"
                                              for x in thresholds))
        curves.append((f"{' '.join(map(str, key))} ep ({folder})", errors, len(group)))
    return curves


def groups(runs):
    out = {}
    for r in runs:
        out.setdefault((r["model"], r["optimizer"], r["epochs"]), []).append(r)
    return out


def print_tables(runs):
    """Errors by (model, optimizer, epochs), then the gaps Figures 2 and 3 plot."""
    table = groups(runs)
    print(f"\n{'model':<10} {'optimizer':<9} {'epochs':>6} {'runs':>5} {'finished':>8} "
          f"{'best err':>8} {'median':>7}")
    best = {}
    for key in sorted(table):
        errors = [r["error"] for r in table[key] if r["error"] is not None]
        if errors:
            best[key] = min(errors)
        cells = f"{min(errors):>8.2f} {statistics.median(errors):>7.2f}" if errors else \
            f"{'-':>8} {'-':>7}"
        print(f"{key[0]:<10} {key[1]:<9} {key[2]:>6} {len(table[key]):>5} {len(errors):>8} "
              + cells)
    pairs = sorted({(m, o) for m, o, _ in table})
    lengths = {p: sorted(e for m, o, e in table if (m, o) == p) for p in pairs}
    rows = [(p, e) for p, e in lengths.items() if len(e) > 1]
    if rows:
        print("\ntraining length (section 5.1, Figure 2): best error minus that of the longest "
              "schedule")
        for (m, o), epochs in rows:
            ref = best.get((m, o, epochs[-1]))
            cells = [f"{e} ep: {best[m, o, e] - ref:+.2f}" if ref is not None and (m, o, e) in best
                     else f"{e} ep: -" for e in epochs[:-1]]
            print(f"  {m:<10} {o:<6} " + "  ".join(cells) + (
                "" if ref is not None else f"  (no finished {epochs[-1]}-epoch run to compare)"))
    gaps = sorted((m, e) for m, o, e in best if o == "sgd" and (m, "adamw", e) in best)
    if gaps:
        print("\noptimizer (section 5.2, Figure 3): SGD error minus AdamW error")
        for m, e in gaps:
            print(f"  {m:<10} {e:>4} ep: {best[m, 'sgd', e] - best[m, 'adamw', e]:+.2f}")


def plot_edfs(curves, path, xmax=10, note=None):
    """Figure 4's style: for each sweep, the fraction of its runs with error - best <= x."""
    fig, ax = pyplot().subplots(figsize=(7, 5))
    for label, errors, total in curves:
        deltas = sorted(e - min(errors) for e in errors)
        ys = [(i + 1) / total for i in range(len(deltas))]  # runs within each delta
        ax.step([0.0, *deltas, xmax], [0.0, *ys, ys[-1]], where="post",
                label=f"{label}, {len(errors)}/{total} finished")
    ax.set(xlim=(-0.02 * xmax, xmax), ylim=(0, 1.03),
           ylabel="fraction of runs with error − best error ≤ x",
           xlabel="x: top-1 error minus the best run's (points)",
           title="lr/wd stability: the empirical distribution (EDF) of each sweep's errors")
    ax.legend(fontsize="small")
    if note:
        fig.suptitle(note, fontsize="small")
    save_figure(fig, path)


def figure_paths(args):
    """Where report's two PNGs go: --out, or beside the first folder compared, named after the
    folders (runs/a+runs/b -> runs/a+b-edf.png and runs/a+b-curves.png)."""
    names = [os.path.basename(os.path.abspath(f)) for f in args.folders]
    where = args.out or os.path.dirname(os.path.normpath(args.folders[0])) or "."
    stem = os.path.join(where, "+".join(dict.fromkeys(names)))
    return f"{stem}-edf.png", f"{stem}-curves.png"


def report_command(args):
    every, curves = [], []
    for folder in args.folders:
        runs = collect(folder)
        curves += print_sweep(folder, runs, args.thresholds)
        every += runs
    print_tables(every)
    started = [r for r in every if r["log"]]
    edf_path, curves_path = figure_paths(args)
    written = []
    try:
        note = data_note(started)
        if curves:
            plot_edfs(curves, edf_path, args.edf_xmax, note)
            written.append(edf_path)
        if started:
            plot_runs(started, [f"{r['model']} {r['name']}: lr {r['lr']:.4g} wd {r['wd']:.4g}"
                                for r in started], curves_path,
                      groups=[(r["model"], r["optimizer"], r["epochs"]) for r in started],
                      note=note)
            written.append(curves_path)
    except RunError as e:  # the tables above stand without the plots
        print(f"sweep.py: warning: no plots: {e}", file=sys.stderr)
    if written:
        print(f"\nwrote {' and '.join(written)}")
    return 0


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def count(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def model_name(text):
    if text not in vitc.VARIANTS:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; valid: "
                                         f"{', '.join(vitc.VARIANTS)}")
    return text


def parse_args(argv):
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = Parser(description=__doc__.split("\n\n")[0],
               formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    sample = sub.add_parser("sample", help="lr/wd drawn log-uniformly from Table 4's ranges")
    sample.add_argument("--model", type=model_name, required=True)
    sample.add_argument("--optimizer", choices=list(RANGES), required=True)
    sample.add_argument("--runs", type=positive, default=64)
    sample.add_argument("--epochs", type=positive, default=50)
    sample.add_argument("--seed", type=int, default=0, help="seed of the (lr, wd) draws")
    for name in ("lr", "wd"):
        sample.add_argument(f"--{name}-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                            help=f"draw the {name} from here instead of Table 4's range (e.g. "
                                 f"for another dataset; lr at batch 2048)")
    grid = sub.add_parser("grid", help="models x optimizers x epochs at Table 4's lr/wd")
    grid.add_argument("--models", type=model_name, nargs="+", required=True)
    grid.add_argument("--optimizers", choices=list(RANGES), nargs="+", default=["adamw"])
    grid.add_argument("--epochs", type=positive, nargs="+", default=[50, 100, 200, 400])
    grid.add_argument("--settings", choices=["table4", "peak"], default="table4",
                      help="lr/wd: table4, each model's tuned at 50 epochs (Table 4, left; "
                           "sections 5.1-5.2), or peak, section 6's (train.py's defaults)")
    for s in (sample, grid):
        s.add_argument("--out", required=True, help="the sweep's folder")
        s.add_argument("--data", help="train.py's --data (default: train.py's, $IMAGENET)")
        s.add_argument("--keep-checkpoints", action="store_true",
                       help="keep each finished run's checkpoint.pt (by default train.py deletes "
                            "it when the run finishes: report and plot need only the logs, and "
                            "best.pt stays; a run stopped before its end keeps its checkpoint)")
        s.add_argument("--launch", choices=["local", "slurm"],
                       help="local: run the commands one after another; slurm: write a job "
                            "array script (default: only print the commands)")
        s.add_argument("--gpus", type=count, default=1,
                       help="GPUs per run (torchrun if > 1); 0: CPUs only")
        s.add_argument("--ranks", type=positive,
                       help="processes per run (default: one per GPU, or 1 with --gpus 0)")
        s.add_argument("--cpus-per-gpu", type=positive, default=10, help="for --launch slurm")
        s.add_argument("--cpus", type=positive,
                       help="for --launch slurm --gpus 0: CPUs per task (default: one per rank)")
        s.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                       help="an extra #SBATCH line for --launch slurm, e.g. "
                            "--sbatch=--time=72:00:00 (repeatable)")
    end = sub.add_parser("task-end", help="run by sweep.sbatch as each task ends: its outcome "
                         "into SWEEP/slurm.jsonl")
    end.add_argument("folder", metavar="SWEEP")
    end.add_argument("task", type=count, help="the array task (the run's place in the plan)")
    end.add_argument("--exit", type=int, required=True, help="the launcher's exit status")
    end.add_argument("--since", type=float, required=True, help="when the task began (time())")
    end.add_argument("--signalled", help="the signal the task's script passed on, if any")
    report = sub.add_parser("report", help="errors, EDFs and curves of finished sweeps")
    report.add_argument("folders", nargs="+", metavar="FOLDER",
                        help="sweep folders, folders of run folders, or run folders")
    report.add_argument("--out", help="the folder for the two PNGs, named after the FOLDERs "
                                      "compared (default: the folder the first FOLDER is in)")
    report.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS),
                        help="the x (top-1 error points) at which the EDF is printed")
    report.add_argument("--edf-xmax", type=float, default=10,
                        help="x range of edf.png, as Figures 4-5 (points of top-1 error)")
    args = p.parse_args(argv)
    if extra and args.command in ("report", "task-end"):
        raise RunError(f"{args.command} takes no train.py flags")
    if args.command in ("sample", "grid"):
        args.ranks = args.ranks or max(args.gpus, 1)
        if args.gpus and args.ranks != args.gpus:
            raise RunError(f"--ranks {args.ranks} with --gpus {args.gpus}: train.py runs one "
                           f"rank per GPU")
    if args.command == "report" and not (all(0 <= x < math.inf for x in args.thresholds)
                                         and 0 < args.edf_xmax < math.inf):
        raise RunError("--thresholds must be >= 0 and --edf-xmax > 0, all finite")
    for name in ("lr_range", "wd_range"):
        low, high = getattr(args, name, None) or (1, 1)
        if not 0 < low <= high:
            raise RunError(f"--{name.replace('_', '-')} needs 0 < LOW <= HIGH, got {low} {high}")
    args.extra = extra
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    commands = {"report": report_command, "task-end": task_end_command}
    return commands.get(args.command, plan_command)(args)


if __name__ == "__main__":
    sys.exit(run_cli(main, "sweep.py"))
