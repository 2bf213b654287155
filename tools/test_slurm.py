"""Tests of tools/sweep.py's Slurm scripts against a real Slurm: a single-node cluster on this
machine, brought up for the session by tools/localslurm.py and stopped by PID at its end. They
need root and Debian's packages (apt-get install slurm-wlm munge; .ci/run installs them) and are
skipped without them, unless VITC_REQUIRE_SLURM=1 (as in CI) makes that a failure.

Each test plans a sweep of tiny CPU runs with `--gpus 0`, submits its sweep.sbatch with sbatch,
and follows the jobs with squeue and the cluster's record of finished jobs (jobcomp.txt).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
from test_tools import run_tool, sweep  # noqa: E402
from test_vitc import data, load_tool, no_leftovers, read_jsonl, read_log, slow  # noqa: E402, F401

pytestmark = slow  # a real Slurm: VITC_SLOW=1

localslurm = load_tool("localslurm")
TIMEOUT = 300  # seconds for any one job to start or end: generous, for a loaded machine


@pytest.fixture(scope="session")
def slurm():
    """The cluster's folder (slurm.conf, jobcomp.txt) while the session runs."""
    missing = [p for p in localslurm.NEEDED if not (shutil.which(p) or shutil.which(
        p, path="/usr/sbin:/sbin"))]
    why = (f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)" if missing
           else "needs root, to run Slurm's daemons" if os.geteuid() != 0 else None)
    if why and os.environ.get("VITC_REQUIRE_SLURM") == "1":
        pytest.fail(f"VITC_REQUIRE_SLURM=1, but {why}")
    if why:
        pytest.skip(why)
    folder = os.path.join(tempfile.mkdtemp(prefix="localslurm-"), "cluster")
    os.chmod(os.path.dirname(folder), 0o755)  # munged, as user munge, must pass through it
    try:
        localslurm.start(folder)
        yield Path(folder)
    finally:
        if os.path.exists(os.path.join(folder, "pids.json")):
            localslurm.stop(folder)
        shutil.rmtree(os.path.dirname(folder), ignore_errors=True)


@pytest.fixture
def cluster(slurm, monkeypatch, tmp_path):
    """The cluster for one test: its slurm.conf in the environment (also of sweep.py, run
    in-process, which asks squeue), and the test's folder as the working directory."""
    monkeypatch.setenv("SLURM_CONF", str(slurm / "slurm.conf"))
    monkeypatch.chdir(tmp_path)
    return slurm


def slurm_run(*command):
    """A Slurm command's stdout; its failure fails the test with its stderr."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done.stdout


def submit(script):
    return slurm_run("sbatch", "--parsable", str(script)).strip().split(";")[0]


def states(job):
    """{array task: state} of a job's tasks that Slurm still lists as queued or running."""
    listing = subprocess.run(["squeue", "--noheader", "--array", f"--jobs={job}",
                              "--format=%K %T"], capture_output=True, text=True, timeout=60)
    if listing.returncode != 0:  # a job ended long ago is unknown to squeue
        assert "Invalid job id" in listing.stderr, listing.stderr
        return {}
    return dict(line.split() for line in listing.stdout.splitlines())


def wait_until(what, check, timeout=TIMEOUT):
    """Polls check() every half second until it returns something true, which it returns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def wait_ended(job):
    wait_until(f"job {job} to end", lambda: not states(job))


def finished_jobs(cluster, array_job):
    """{array task: (state, exit code)} of a job array's ended tasks, from jobcomp.txt."""
    path = cluster / "jobcomp.txt"
    ended = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("ArrayJobId") == array_job:
            ended[int(fields["ArrayTaskId"])] = (fields["JobState"], fields["ExitCode"])
    return ended


def at_step(out_file, step):
    """True once the task's progress bar (in its .out) has passed `step` of the first epoch."""
    text = out_file.read_text(errors="replace") if out_file.exists() else ""
    return any(int(n) >= step for n in re.findall(r"epoch 1/\d+: .*?\| *(\d+)/\d+ ", text))


TINY_FAKE = ["--fake-size", "320", "--img-size", "32", "--batch-size", "8",
             "--warmup-epochs", "0", "--workers", "0", "--autoaugment", "none", "--no-ema",
             "--precise-bn", "0"]  # ViT_P-1GF, 40 steps an epoch of a fraction of a second each


def plan(capsys, out, runs, epochs, *options, data="fake", extra=TINY_FAKE):
    """sweep.py sample ... --launch slurm --gpus 0 of ViT_P-1GF runs: (stdout, stderr lines)."""
    argv = ["sample", "--model", "vitp_1gf", "--optimizer", "adamw", "--runs", str(runs),
            "--epochs", str(epochs), "--out", str(out), "--launch", "slurm", "--gpus", "0",
            "--data", data, *options, "--", *extra]
    code, text, err = run_tool(sweep.main, argv, capsys)
    assert code == 0, err
    return text, err


def test_a_cpu_array_in_a_path_with_a_space_finishes_and_is_reported(cluster, data, tmp_path,
                                                                    capsys):
    out = tmp_path / "my sweep %x"  # a space (quoted in #SBATCH) and a % (not expanded)
    tiny = ["--img-size", "32", "--batch-size", "8", "--warmup-epochs", "1", "--workers", "0",
            "--precise-bn", "8"]  # ViT_P-1GF on the generated ImageFolder: 3 steps an epoch
    plan(capsys, out, 2, 2, "--cpus", "1", data=str(data), extra=tiny)
    script = (out / "sweep.sbatch").read_text()
    assert "--gres" not in script and "--gpus" not in script  # item 6: no GRES on a CPU node
    assert '#SBATCH --output="' in script and "%%x" in script
    job = submit(out / "sweep.sbatch")
    wait_ended(job)
    outputs = "".join(p.read_text()[-1500:] for p in sorted(out.glob(f"slurm-{job}_*.out")))
    assert finished_jobs(cluster, job) == {0: ("COMPLETED", "0:0"), 1: ("COMPLETED", "0:0")}, \
        outputs
    ends = read_jsonl(out / "slurm.jsonl")
    assert sorted((e["run"], e["outcome"], e["exit"]) for e in ends) == [
        ("run-000", "finished", 0), ("run-001", "finished", 0)]
    for run in ("run-000", "run-001"):
        assert (out / f"slurm-{job}_{int(run[-1])}.out").exists()  # in the folder with the space
        assert [r["epoch"] for r in read_log(out / run)] == [1, 2]
        (entry,) = read_jsonl(out / run / "args.jsonl")
        assert entry["resolved"]["device"].endswith(", 1 threads)")  # item 10: --cpus 1
    code, text, _ = run_tool(sweep.main, ["report", str(out)], capsys)
    assert code == 0 and f"{out}: 2 runs: 2 finished" in text
    text, _ = plan(capsys, out, 2, 2, "--cpus", "1", data=str(data), extra=tiny)
    assert "every run is finished, diverged or still in Slurm" in text  # item 9
    assert not (out / "sweep.sbatch").exists()


def test_a_batch_signal_mid_epoch_checkpoints_then_resubmitted_the_run_finishes(cluster,
                                                                               tmp_path, capsys):
    out = tmp_path / "s"
    plan(capsys, out, 1, 2)
    job = submit(out / "sweep.sbatch")
    wait_until("step 3 of the first epoch", lambda: at_step(out / f"slurm-{job}_0.out", 3))
    slurm_run("scancel", "--signal=TERM", "--batch", job)  # the README's way to stop a task
    wait_ended(job)
    assert finished_jobs(cluster, job) == {0: ("COMPLETED", "0:0")}
    (end,) = read_jsonl(out / "slurm.jsonl")
    assert (end["outcome"], end["exit"], end["train_exit"]) == ("stopped", 0, 0)
    assert not (out / "run-000" / "log.jsonl").exists()  # mid-epoch: no line yet
    stopped = torch.load(out / "run-000" / "checkpoint.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"]) == (0, 20)  # at the check after the signal
    code, text, _ = run_tool(sweep.main, ["report", str(out)], capsys)
    assert "1 runs: 1 unfinished" in text
    plan(capsys, out, 1, 2)  # the same command writes the script anew, then resubmit it
    assert "#SBATCH --array=0\n" in (out / "sweep.sbatch").read_text()
    again = submit(out / "sweep.sbatch")
    wait_ended(again)
    assert finished_jobs(cluster, again) == {0: ("COMPLETED", "0:0")}
    log = (out / "run-000" / "log.jsonl").read_text()
    assert log.endswith("\n") and [json.loads(line)["epoch"] for line in log.splitlines()] == [
        1, 2]  # whole: every line a record, the first epoch's over both jobs
    assert json.loads(log.splitlines()[0])["resumed_mid_epoch"]
    assert read_jsonl(out / "slurm.jsonl")[-1]["outcome"] == "finished"
    assert "1 runs: 1 finished" in run_tool(sweep.main, ["report", str(out)], capsys)[1]


def test_two_torchrun_ranks_stopped_by_a_plain_scancel_checkpoint_and_exit_0(cluster, tmp_path,
                                                                            capsys):
    out = tmp_path / "s"
    plan(capsys, out, 1, 1, "--ranks", "2")
    assert "torch.distributed.run --standalone --nproc_per_node=2" in (
        out / "sweep.sbatch").read_text()
    job = submit(out / "sweep.sbatch")
    output = out / f"slurm-{job}_0.out"
    wait_until("step 3", lambda: at_step(output, 3))
    slurm_run("scancel", job)  # SIGTERM to every process: each rank gets it twice or more
    wait_ended(job)
    (end,) = read_jsonl(out / "slurm.jsonl")
    assert (end["outcome"], end["exit"]) == ("stopped", 0), output.read_text()[-3000:]
    assert end["train_exit"] != 0  # torchrun's own status, after it was signalled too
    assert finished_jobs(cluster, job) == {0: ("CANCELLED", "0:0")}
    text = output.read_text()
    # Slurm's, torchrun's and this script's SIGTERM reach each rank (at once they merge into
    # one): none aborts the stop
    assert "stopped by SIGTERM at step 20" in text and "KeyboardInterrupt" not in text
    ckpt = torch.load(out / "run-000" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 20 and len(ckpt["rng"]) == 2


def test_regenerating_leaves_out_queued_tasks_and_gpus_need_gres(cluster, tmp_path, capsys):
    out = tmp_path / "s"
    plan(capsys, out, 2, 1)
    job = slurm_run("sbatch", "--parsable", "--hold", str(out / "sweep.sbatch")).strip()
    assert states(job) == {"0": "PENDING", "1": "PENDING"}
    text, err = plan(capsys, out, 2, 1)  # e.g. after a requeue: both still queued
    assert f"run-000: left out, still in Slurm as job {job}_0 PENDING" in text
    assert "every run is finished, diverged or still in Slurm" in text
    assert not (out / "sweep.sbatch").exists() and not err
    slurm_run("scancel", job)
    wait_ended(job)
    plan(capsys, out, 2, 1)
    assert "#SBATCH --array=0,1\n" in (out / "sweep.sbatch").read_text()
    # the GPU form, on this node without GRES: refused at submission, as on a CPU-only cluster
    assert run_tool(sweep.main, ["sample", "--model", "vitp_1gf", "--optimizer", "adamw",
                                 "--runs", "1", "--out", str(tmp_path / "g"), "--launch",
                                 "slurm", "--gpus", "1"], capsys)[0] == 0
    refused = subprocess.run(["sbatch", str(tmp_path / "g" / "sweep.sbatch")],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Invalid generic resource" in refused.stderr
