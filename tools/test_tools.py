"""Tests of the tools (tools/*.py), which are not the paper: the benchmarks, and the paper's
stability experiments as commands (sweep.py, plot.py). CPU only; `python -m pytest -q` from the
repository root runs them with test_vitc.py.

Sections: the benchmarks (bench.py, its --loader) and gpu_check.py's refusal without a GPU;
sweep.py sample/grid/report/--launch and plot.py; export.py and the README's torchvision and timm
sections; runsafe/decode.py's image modes.
"""

import contextlib
import fcntl
import json
import math
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]  # the repository and tools/
import export  # noqa: E402
import runsafe.checkpoint  # noqa: E402
from runsafe.errors import FolderInUse, run_cli  # noqa: E402
import train  # noqa: E402
import vitc  # noqa: E402
from test_vitc import (  # noqa: E402, F401  (fixtures: a tiny ImageFolder, no files left behind)
    HERE, assert_same_logits, data, load, load_tool, no_leftovers, read_jsonl, read_log,
    readme_python_blocks, slow, write_images)


# ------------------------------------------------------------------------------------------------
# tools/bench.py: the training step and the input pipeline (--loader); tools/gpu_check.py
# ------------------------------------------------------------------------------------------------

bench = load_tool("bench")
NO_GPU = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU path, also on a machine with GPUs


@slow  # launches whole runs or benchmarks: VITC_SLOW=1
def test_model_benchmark_runs_on_the_cpu_and_prints_its_table():
    run = subprocess.run([sys.executable, str(HERE / "tools" / "bench.py"), "--models",
                          "vitp_1gf", "vitc_1gf", "--batch-size", "2", "--img-size", "32",
                          "--rounds", "2", "--steps", "2"], capture_output=True, text=True,
                         timeout=120, env=NO_GPU)
    assert run.returncode == 0, run.stderr
    head, columns, *rows, ratio = run.stdout.splitlines()
    assert re.fullmatch(r"torch \S+, cpu \(fp32\), \d+ threads, batch 2, 32 px, compile False, "
                        r"2 rounds x 2 steps", head), head
    assert columns.split() == ["model", "img/s", "ms/step"]  # no MFU without a GPU
    assert [row.split()[0] for row in rows] == ["vitp_1gf", "vitc_1gf"]
    assert all(float(value) > 0 for row in rows for value in row.split()[1:]), rows
    assert ratio.startswith("step time vitc_1gf / vitp_1gf: ")


def test_bench_takes_the_datasheet_peak_by_the_gpu_name(monkeypatch):
    expected = {  # (name as torch.cuda.get_device_name() says it, precision): TFLOP/s or why not
        ("NVIDIA H100 80GB HBM3", "bf16"): 989, ("NVIDIA H100 PCIe", "fp32"): 378,
        ("NVIDIA H200", "bf16"): 989, ("NVIDIA H200 NVL", "fp16"): 835,
        ("NVIDIA A100-SXM4-80GB", "fp32"): 156, ("NVIDIA A100 80GB PCIe", "bf16"): 312,
        ("Tesla V100-SXM2-16GB", "fp16"): 125, ("Tesla V100-PCIE-32GB", "fp16"): 112,
        ("Tesla V100S-PCIE-32GB", "fp16"): 130, ("NVIDIA L4", "bf16"): 121,
        ("NVIDIA A10", "fp32"): 62.5,
        ("NVIDIA L40S", "bf16"): "n/a (unknown GPU NVIDIA L40S)",  # not the L4
        ("NVIDIA A10G", "bf16"): "n/a (unknown GPU NVIDIA A10G)",  # not the A10
        ("Tesla V100-SXM2-16GB", "bf16"): "n/a (no bf16 figure for Tesla V100-SXM2-16GB)"}
    for (name, precision), want in expected.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, name=name: name)
        peak, text = bench.datasheet_peak(precision)
        assert (text if peak is None else peak / 1e12) == want, (name, precision)


def test_bench_precision_is_fp16_before_compute_capability_8_and_bf16_from_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, precision in [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                  ((9, 0), "bf16")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert bench.default_precision() == precision, capability
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.default_precision() == "fp32"
    model = vitc.create_model("vitc_1gf", num_classes=10, img_size=32)  # fp16's loss scaling runs
    assert bench.make_train_step(model, 2, 32, "fp16", steps=2, num_classes=10)() > 0


def test_gpu_check_refuses_without_a_gpu():
    run = subprocess.run([sys.executable, str(HERE / "tools" / "gpu_check.py")],
                         capture_output=True, text=True, timeout=60, env=NO_GPU)
    assert (run.returncode, run.stdout) == (2, "") and run.stderr.splitlines() == [
        "gpu_check.py: error: no CUDA GPU here (torch.cuda.is_available() is False): nothing "
        "to check"]


@slow  # launches whole runs or benchmarks: VITC_SLOW=1
def test_loader_benchmark_times_each_stage_and_the_cores_a_gpu_needs(tmp_path):
    bench = [sys.executable, str(HERE / "tools" / "bench.py"), "--loader"]
    run = subprocess.run([*bench, str(tmp_path / "jpegs"), "--make-jpegs", "6", "--images", "4",
                          "--rounds", "2", "--workers", "1", "--batch-size", "2", "--models",
                          "vitp_1gf", "vitc_36gf"], capture_output=True, text=True, timeout=120,
                         env=NO_GPU)
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "jpegs" / "train").glob("class_*/*.jpg"))) == 6
    rates = dict(re.findall(r"^(read file bytes|PIL decode \+ convert RGB|torchvision.io."
                            r"decode_jpeg|train pipeline \(ImageFiles\)) +([\d.]+)", run.stdout,
                            re.M))
    assert len(rates) == 4 and all(float(v) > 0 for v in rates.values()), run.stdout
    # without CUDA the GPU's rate is the paper's: 1,281,167 images / (18.6 min x 60) / 8 V100s
    cores = re.search(r"^vitc_36gf +143\.5 +([\d.]+) +(\d+)%", run.stdout, re.M)
    assert cores and float(cores[1]) > 0, run.stdout
    missing = subprocess.run([*bench, str(tmp_path / "missing")], capture_output=True, text=True)
    assert missing.returncode != 0 and missing.stderr.strip().splitlines() == [
        f"bench.py: error: --loader {tmp_path / 'missing'}: no such folder (--make-jpegs N "
        f"generates one)"]



# ------------------------------------------------------------------------------------------------
# tools/sweep.py and tools/plot.py: the paper's stability experiments as commands
# ------------------------------------------------------------------------------------------------

plot = load_tool("plot")
sweep = load_tool("sweep")
try:
    import matplotlib  # noqa: F401  (optional: only the PNGs need it)
    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False


def run_tool(main, argv, capsys):
    """(exit status, stdout, stderr lines) of a tool's main() run in-process, as its command
    line runs it (runsafe.errors.run_cli, the one-line errors of every script)."""
    capsys.readouterr()
    code = run_cli(main, "tool.py", argv)
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def planned_argv(line):
    """train.py's arguments in a printed command 'python .../train.py ARGS'."""
    words = shlex.split(line)
    assert words[0] == "python" and words[1].endswith("train.py"), line
    return words[2:]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_sweep_draws_lr_and_wd_log_uniformly_within_table_4(optimizer):
    draws = sweep.sample_settings(optimizer, 5000, seed=1)
    for i, name in enumerate(("lr", "wd")):
        low, high = sweep.RANGES[optimizer][name]
        values = [d[i] for d in draws]
        assert low <= min(values) and max(values) <= high
        # the position of log(value) in [log low, log high] is uniform: mean 1/2, variance 1/12,
        # a tenth of the draws in each tenth (a linear-uniform draw puts ~70% in the top tenth)
        u = [(math.log(v) - math.log(low)) / (math.log(high) - math.log(low)) for v in values]
        assert abs(np.mean(u) - 0.5) < 0.015 and abs(np.var(u) - 1 / 12) < 0.005
        tenths = np.histogram(u, bins=10, range=(0, 1))[0] / len(u)
        assert np.all(abs(tenths - 0.1) < 0.02), tenths
    assert sweep.RANGES == {"adamw": {"lr": (2.5e-4, 8e-3), "wd": (0.02, 0.8)},
                            "sgd": {"lr": (0.1, 3.2), "wd": (4e-6, 1.2e-4)}}


def test_sweep_sample_prints_commands_train_py_accepts_the_same_for_a_seed(tmp_path, capsys):
    argv = ["sample", "--model", "vitp_4gf", "--optimizer", "sgd", "--runs", "5", "--epochs",
            "50", "--out", str(tmp_path / "s"), "--", "--batch-size", "1024"]
    code, out, _ = run_tool(sweep.main, argv, capsys)
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    assert code == 0 and len(lines) == 5 and len(set(lines)) == 5
    assert "about 127 V100 GPU-hours" in out  # 5 runs x 50 epochs x 3.8 min x 8 GPUs / 60
    manifest = json.loads((tmp_path / "s" / "sweep.json").read_text())
    for line, run in zip(lines, manifest["runs"]):
        args = train.parse_args(planned_argv(line))
        assert (args.model, args.optimizer, args.epochs, args.batch_size) == \
            ("vitp_4gf", "sgd", 50, 1024)
        assert (args.lr, args.wd) == (run["lr"], run["wd"]) and args.resume == "auto"
        assert args.out == str(tmp_path / "s" / run["name"])
    assert (tmp_path / "s" / "commands.txt").read_text().splitlines() == lines
    assert run_tool(sweep.main, argv, capsys)[1] == out  # the same seed: the same sweep
    code, _, err = run_tool(sweep.main, [*argv[:9], "--seed", "1", *argv[9:]], capsys)
    assert code == 2 and "holds another sweep" in err[0]
    other = run_tool(sweep.main, [*argv[:10], str(tmp_path / "t"), "--seed", "1"], capsys)[1]
    assert other.count("--lr") == 5 and not set(re.findall(r"--lr \S+", other)) & \
        set(re.findall(r"--lr \S+", out))


def test_sweep_grid_runs_every_model_optimizer_and_length_at_table_4_settings(tmp_path, capsys):
    argv = ["grid", "--models", "vitp_1gf", "vitc_18gf", "--optimizers", "adamw", "sgd",
            "--epochs", "50", "400", "--out", str(tmp_path / "g")]
    code, out, _ = run_tool(sweep.main, argv, capsys)
    runs = {(a.model, a.optimizer, a.epochs): (a.lr, a.wd) for a in
            (train.parse_args(planned_argv(line)) for line in out.splitlines()
             if not line.startswith("#"))}
    assert code == 0 and len(runs) == 8
    assert runs["vitp_1gf", "adamw", 50] == runs["vitp_1gf", "adamw", 400] == (2e-3, 0.2)
    assert runs["vitc_18gf", "sgd", 400] == (1.1, 2.7e-5)
    code, _, err = run_tool(sweep.main, [*argv[:2], "vitc_36gf", *argv[3:]], capsys)
    assert code == 2 and "no adamw lr/wd for vitc_36gf" in err[0]


def write_run(folder, errors, settings=None, diverged=False):
    """A run folder as train.py leaves it: log.jsonl with one record per epoch whose EMA top-1
    error is errors[i], the last being epoch settings["epochs"] if given (and args.jsonl with
    `settings`); a divergence marker at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    first = (settings or {}).get("epochs", len(errors)) - len(errors) + 1
    records = [{"epoch": first + e, "step": 10 * (first + e), "lr": 1e-3, "train_loss": 5.0 - e,
                "val_top1": 99.0 - err, "ema_top1": 100.0 - err} for e, err in enumerate(errors)]
    if diverged:
        records.append({"epoch": len(errors) + 1, "step": 10 * len(errors) + 3, "diverged": "nan"})
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if settings:
        (folder / "args.jsonl").write_text(json.dumps({"args": settings}) + "\n")


def test_sweep_report_counts_every_run_and_its_edf_is_exact(tmp_path, capsys):
    out = tmp_path / "s"
    run_tool(sweep.main, ["sample", "--model", "vitc_1gf", "--optimizer", "adamw", "--runs", "7",
                          "--epochs", "2", "--out", str(out), "--", "--warmup-epochs", "0"],
             capsys)
    for i, errors in enumerate([[40, 30], [40, 31], [40, 33], [45, 37.5]]):
        write_run(out / f"run-00{i}", errors)
    write_run(out / "run-004", [60], diverged=True)  # loss went to NaN in epoch 2
    write_run(out / "run-005", [70])  # crashed during epoch 2:
    (out / "launch.jsonl").write_text(json.dumps({"run": "run-005", "exit": 1}) + "\n")
    # run-006 never started
    code, text, err = run_tool(sweep.main, ["report", str(out)], capsys)
    assert code == 0, err
    assert f"{out}: 7 runs: 4 finished, 1 diverged, 1 failed, 1 not started" in text
    assert "run-004: diverged (loss nan at step 13)" in text and "run-005: failed (exit 1)" in text
    # errors 30, 31, 33, 37.5 -> deltas 0, 1, 3, 7.5, over all 7 runs
    assert "best error 30.00% (run-000: lr " in text
    assert "x<=0.5: 0.14  x<=1: 0.29  x<=2: 0.29  x<=4: 0.43  x<=8: 0.57" in text
    assert sweep.edf([30, 31, 33, 37.5], 7, 3) == 3 / 7
    assert re.search(r"vitc_1gf +adamw +2 +7 +4 +30.00 +32.00", text)
    if HAS_MATPLOTLIB:  # beside the sweep, named after it
        for png in ("s-edf.png", "s-curves.png"):
            assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert err == ["sweep.py: warning: no plots: plots need matplotlib, which is optional: "
                       "pip install -r tools/requirements.txt"]


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is optional")
def test_report_figures_go_beside_the_sweeps_and_explain_themselves(tmp_path, capsys,
                                                                    monkeypatch):
    toy = tmp_path / "toy"
    load_tool("toydata").make(toy, train=2, val=1, size=8)
    settings = {"optimizer": "adamw", "epochs": 1, "wd": 0.1, "data": str(toy), "img_size": 32}
    for model, errors in (("vitp_1gf", [30, 35, 50]), ("vitc_1gf", [40, 41, 60])):
        for i, error in enumerate(errors):
            write_run(tmp_path / "runs" / model / f"run-00{i}", [error],
                      dict(settings, model=model, lr=1e-3 * (i + 1)))
    figures = {}
    real_save = plot.save_figure

    def save_figure(fig, path):  # keep what each figure says, then write it
        texts = [t.get_text() for ax in fig.axes for t in (ax.title, ax.xaxis.label,
                                                           ax.yaxis.label)]
        legends = [t.get_text() for ax in fig.axes if ax.get_legend()
                   for t in [ax.get_legend().get_title(), *ax.get_legend().get_texts()]]
        colours = {str(line.get_color()) for ax in fig.axes[:1] for line in ax.get_lines()}
        figures[os.path.basename(path)] = (texts, legends, fig._suptitle.get_text(), colours)
        real_save(fig, path)
    monkeypatch.setattr(plot, "save_figure", save_figure)
    monkeypatch.setattr(sweep, "save_figure", save_figure)
    folders = [str(tmp_path / "runs" / m) for m in ("vitp_1gf", "vitc_1gf")]
    code, text, _ = run_tool(sweep.main, ["report", *folders], capsys)
    edf_png, curves_png = (tmp_path / "runs" / f"vitp_1gf+vitc_1gf-{k}.png" for k in
                           ("edf", "curves"))
    assert code == 0 and text.endswith(f"wrote {edf_png} and {curves_png}\n")
    assert edf_png.exists() and curves_png.exists()
    texts, _, title, _ = figures[edf_png.name]
    assert "fraction of runs with error − best error ≤ x" in texts
    assert title == ("toy data (tools/toydata.py), not ImageNet: 8 train / 4 val images of 8x8 "
                     "px, 4 classes, trained at 32x32\nthe machinery at toy scale, not the "
                     "paper's result (the README says why ViT_C can trail here)")
    _, legends, title, colours = figures[curves_png.name]
    assert legends[0] == "lr quoted at batch 2048" and len(colours) == 6  # a colour per run
    assert "vitc_1gf run-002: lr 0.003 wd 0.1" in legends and title.startswith("toy data")
    code, text, _ = run_tool(sweep.main, ["report", *folders, "--out", str(tmp_path)], capsys)
    assert text.endswith(f"wrote {tmp_path / 'vitp_1gf+vitc_1gf-edf.png'} and "
                         f"{tmp_path / 'vitp_1gf+vitc_1gf-curves.png'}\n")


def test_sweep_report_tables_the_length_and_optimizer_gaps(tmp_path, capsys):
    settings = {"model": "vitp_1gf", "lr": 2e-3, "wd": 0.2}
    for optimizer, epochs, error in [("adamw", 50, 37.0), ("adamw", 100, 33.5),
                                     ("adamw", 400, 27.7), ("sgd", 50, 40.0)]:
        write_run(tmp_path / "runs" / f"{optimizer}-{epochs}", [error] * 2,
                  dict(settings, optimizer=optimizer, epochs=epochs))
    code, text, _ = run_tool(sweep.main, ["report", str(tmp_path / "runs")], capsys)
    assert code == 0 and "4 runs: 4 finished" in text
    assert re.search(r"vitp_1gf +adamw +50 ep: \+9\.30  100 ep: \+5\.80\n", text)  # Figure 2
    assert re.search(r"vitp_1gf +50 ep: \+3\.00\n", text)  # Figure 3: SGD - AdamW
    write_run(tmp_path / "runs" / "sgd-400", [50.0], dict(settings, optimizer="sgd", epochs=400),
              diverged=True)  # as ViT_P often does with SGD at long schedules (Figure 3)
    text = run_tool(sweep.main, ["report", str(tmp_path / "runs")], capsys)[1]
    assert "sgd-400: diverged" in text
    assert re.search(r"vitp_1gf +sgd +50 ep: -  \(no finished 400-epoch run to compare\)", text)


def test_sweep_and_plot_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "sweep.json").write_text('{"runs": [{"name": "a"}]}')
    write_run(tmp_path / "no_log", [])
    (tmp_path / "no_log" / "log.jsonl").unlink()
    (tmp_path / "no_log" / "args.jsonl").write_text(json.dumps({"args": {
        "model": "vitc_1gf", "optimizer": "adamw", "epochs": 2, "lr": 1e-3, "wd": 0.2}}) + "\n")
    write_run(tmp_path / "no_epoch", [])
    sample = ["sample", "--optimizer", "adamw", "--out", str(tmp_path / "s")]
    for main, argv, message in [
        (sweep.main, ["report", str(tmp_path / "empty")], "no runs"),
        (sweep.main, ["report", str(tmp_path / "other")], "not a sweep written by"),
        (sweep.main, ["report", str(tmp_path / "no_log")], "no log.jsonl"),
        (plot.main, [str(tmp_path / "no_log")], "no log.jsonl"),
        (plot.main, [str(tmp_path / "missing")], "no such folder"),
        (sweep.main, ["report", str(tmp_path / "no_epoch"), "--thresholds", "-1"], ">= 0"),
        (sweep.main, [*sample, "--model", "vitc_2gf"], "unknown model 'vitc_2gf'"),
        (sweep.main, [*sample[:2], "adam", *sample[3:], "--model", "vitc_1gf"],
         "invalid choice: 'adam'"),
        (sweep.main, [*sample, "--model", "vitc_1gf", "--runs", "0"], "must be at least 1"),
        (sweep.main, [*sample, "--model", "vitc_1gf", "--", "--lr", "1"], "--lr is set by"),
        (sweep.main, [*sample, "--model", "vitc_1gf", "--", "--ep", "9", "--mod", "vitp_1gf"],
         "the flags after -- change what the sweep sets: --model, --epochs"),
        (sweep.main, [*sample, "--model", "vitc_1gf", "--", "--batch-size", "0"],
         "train.py refuses the arguments of run-000"),
    ]:
        code, _, err = run_tool(main, argv, capsys)
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
        assert err[0].startswith("tool.py: error: ")


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is optional")
def test_plot_draws_the_curves_of_runs(tmp_path, capsys):
    settings = {"model": "vitc_1gf", "optimizer": "adamw", "epochs": 3, "lr": 1e-3, "wd": 0.24}
    write_run(tmp_path / "a", [50, 40, 35], settings)
    write_run(tmp_path / "b", [50, 45], dict(settings, lr=8e-3), diverged=True)
    code, out, _ = run_tool(plot.main, [str(tmp_path / "a"), str(tmp_path / "b"),
                                        "--out", str(tmp_path / "c.png")], capsys)
    assert code == 0 and out == f"wrote {tmp_path / 'c.png'}: 2 runs\n"
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert plot.unique_labels([plot.read_run(tmp_path / f) for f in "ab"]) == [
        "vitc_1gf adamw lr 0.001 wd 0.24 3 ep", "vitc_1gf adamw lr 0.008 wd 0.24 3 ep"]


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is optional")
def test_plot_out_is_a_format_matplotlib_writes_or_a_folder_to_write_in(tmp_path, capsys,
                                                                       monkeypatch):
    """--out x.txt was matplotlib's ValueError traceback; --out FOLDER said "wrote FOLDER" and
    wrote FOLDER.png beside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "a", [50, 40], {"model": "vitc_1gf", "optimizer": "adamw",
                                         "epochs": 2, "lr": 1e-3, "wd": 0.24})
    (tmp_path / "figures").mkdir()
    formats = sorted(FigureCanvasAgg.get_supported_filetypes())
    assert {"png", "pdf", "svg"} <= set(formats) and "txt" not in formats
    for out, written, magic in [("figures", "figures/curves.png", b"\x89PNG"),
                                ("c.SVG", "c.SVG", b"<?xml"), ("c.pdf", "c.pdf", b"%PDF"),
                                ("c", "c.png", b"\x89PNG")]:
        code, printed, err = run_tool(plot.main, ["a", "--out", out], capsys)
        assert (code, printed, err) == (0, f"wrote {written}: 1 runs\n", []), (out, err)
        assert (tmp_path / written).read_bytes().startswith(magic), out
    assert not (tmp_path / "figures.png").exists()
    cases = [("c.txt", f"--out c.txt: matplotlib writes no .txt files; name a folder or a file "
                       f"ending in .{', .'.join(formats)}"),
             ("missing/", "--out missing/: no such folder")]
    if shutil.which("xelatex") is None:  # matplotlib lists .pgf, but cannot write it without
        cases.append(("c.pgf", Start("cannot write c.pgf (matplotlib: 'xelatex' not found")))
    for out, message in cases:
        code, printed, err = run_tool(plot.main, ["a", "--out", out], capsys)
        assert (code, printed, len(err)) == (2, "", 1), (out, err)
        line = err[0].removeprefix("tool.py: error: ")
        assert line.startswith(message) if isinstance(message, Start) else line == message, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c.SVG", "c.pdf", "c.png",
                                                          "figures"]


def test_plots_without_matplotlib_say_how_to_get_it(tmp_path, capsys, monkeypatch):
    write_run(tmp_path / "a", [50, 40], {"model": "vitc_1gf", "optimizer": "adamw",
                                         "epochs": 2, "lr": 1e-3, "wd": 0.24})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    code, _, err = run_tool(plot.main, [str(tmp_path / "a")], capsys)
    assert code == 2 and err == ["tool.py: error: plots need matplotlib, which is optional: "
                                 "pip install -r tools/requirements.txt"]
    code, text, err = run_tool(sweep.main, ["report", str(tmp_path / "a")], capsys)
    assert code == 0 and "vitc_1gf" in text and "no plots: plots need matplotlib" in err[0]


@slow  # launches whole runs or benchmarks: VITC_SLOW=1
def test_sweep_launches_locally_resumes_and_reports(data, tmp_path, capsys):
    """3 tiny runs of 2 epochs with --stop-after 1: the first launch ends each after one epoch,
    the second resumes each to its end, the third finds them finished; then the report."""
    out = tmp_path / "s"
    argv = ["sample", "--model", "vitc_1gf", "--optimizer", "adamw", "--runs", "3", "--epochs",
            "2", "--out", str(out), "--data", str(data), "--launch", "local", "--",
            "--img-size", "32", "--batch-size", "8", "--warmup-epochs", "0", "--workers", "0",
            "--precise-bn", "8", "--stop-after", "1"]
    code, text, _ = run_tool(sweep.main, argv, capsys)
    assert code == 0 and text.count("unfinished (1 of 2 epochs)") == 3, text
    code, text, _ = run_tool(sweep.main, argv, capsys)
    assert code == 0 and text.count(": finished, error ") == 3, text
    for run in ("run-000", "run-001", "run-002"):
        assert [r["epoch"] for r in read_log(out / run)] == [1, 2]
        starts = [e["resolved"]["start_step"] for e in read_jsonl(out / run / "args.jsonl")]
        assert starts == [0, 3]  # the second launch resumed where the first stopped
    for run in ("run-000", "run-001", "run-002"):  # finished: only what a report needs is kept
        assert not (out / run / "checkpoint.pt").exists() and (out / run / "best.pt").exists()
    code, text, _ = run_tool(sweep.main, argv, capsys)
    assert code == 0 and text.count("finished earlier, error ") == 3, text
    assert len(read_jsonl(out / "launch.jsonl")) == 6
    code, text, _ = run_tool(sweep.main, ["report", str(out)], capsys)
    assert code == 0 and f"{out}: 3 runs: 3 finished" in text and "EDF" in text


@slow  # launches whole runs or benchmarks: VITC_SLOW=1
def test_a_signal_stops_the_local_sweep_after_its_run_checkpoints(tmp_path):
    out = tmp_path / "s"
    cmd = [sys.executable, str(HERE / "tools" / "sweep.py"), "sample", "--model", "vitc_1gf",
           "--optimizer", "adamw", "--runs", "2", "--epochs", "1", "--out", str(out), "--data",
           "fake", "--launch", "local", "--", "--img-size", "32", "--batch-size", "8",
           "--fake-size", "4000", "--warmup-epochs", "0", "--workers", "0"]
    sweep_process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    started = out / "run-000" / "args.jsonl"  # written once the run has started
    for _ in range(600):
        if started.exists() or sweep_process.poll() is not None:
            break
        time.sleep(0.1)
    sweep_process.send_signal(signal.SIGTERM)  # as a scheduler would: to the sweep alone
    text, _ = sweep_process.communicate(timeout=120)
    assert sweep_process.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in text
    assert (out / "run-000" / "checkpoint.pt").exists() and not (out / "run-000" / "log.jsonl"
                                                                  ).exists()  # mid-epoch
    assert "SIGTERM: stopping at the next check" in (out / "run-000" / "output.log").read_text()
    assert not (out / "run-001").exists()  # the sweep went no further


def test_sweep_grid_plans_each_run_once_and_refuses_nothing_it_should_not(tmp_path, capsys):
    argv = ["grid", "--models", "vitp_1gf", "vitp_1gf", "--epochs", "50", "50", "100", "--out",
            str(tmp_path / "g")]
    code, out, _ = run_tool(sweep.main, argv, capsys)
    assert code == 0 and out.count("train.py") == 2  # duplicates given once
    again = [*argv, "--", "--workers", "4"]  # a flag train.py lets a resumed run change
    assert run_tool(sweep.main, again, capsys)[0] == 0
    assert "--workers 4" in (tmp_path / "g" / "commands.txt").read_text()
    launch = {"exit": 1, "signalled": True}  # stopped by the user: not a failure
    assert sweep.run_status({"epochs": 50}, {"args": {}, "log": []}, launch)[0] == "unfinished"
    assert sweep.run_status({"epochs": 50}, {"args": {}, "log": []}, {"exit": 1})[0] == "failed"


def test_sweep_slurm_script_holds_a_task_per_run_still_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["sample", "--model", "vitc_1gf", "--optimizer", "adamw", "--runs", "3", "--out",
            "my sweep", "--data", "/nowhere/imagenet", "--gpus", "8", "--launch", "slurm",
            "--sbatch=--time=2:00:00"]
    code, out, _ = run_tool(sweep.main, argv, capsys)
    assert code == 0 and "# submit with: sbatch 'my sweep/sweep.sbatch'" in out
    write_run(tmp_path / "my sweep" / "run-001", [30.0] * 50)  # finished since
    run_tool(sweep.main, argv, capsys)
    script = (tmp_path / "my sweep" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0,2\n" in script and "#SBATCH --gpus-per-node=8\n" in script
    assert "#SBATCH --time=2:00:00\n" in script
    assert "#SBATCH --cpus-per-task=80\n" in script  # the GPU form: 10 cores per GPU
    dry = script.replace('eval "${commands[$SLURM_ARRAY_TASK_ID]} &"',  # print the argv only
                         'eval "printf \'%s\\n\' ${commands[$SLURM_ARRAY_TASK_ID]}"; exit')
    assert dry != script
    words = subprocess.run(["bash", "-c", dry], env=dict(os.environ, SLURM_ARRAY_TASK_ID="2"),
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert words[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert words[words.index("--out") + 1] == "my sweep/run-002"  # one word, space and all
    assert train.parse_args(words[words.index(str(HERE / "train.py")) + 1:]).epochs == 50


@contextlib.contextmanager
def held(folder):
    """A run folder locked as a live train.py holds it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def test_a_locked_run_folder_stops_the_sweep_by_its_exit_status(tmp_path, capsys):
    # train.py exits with status 3 on a folder locked by a live train.py (an earlier sweep's run
    # still going): the sweep stops there instead of counting a failure and going on.
    out = tmp_path / "s"
    (out / "run-000").mkdir(parents=True)
    argv = ["sample", "--model", "vitp_1gf", "--optimizer", "adamw", "--runs", "2", "--epochs",
            "1", "--out", str(out), "--data", "fake", "--launch", "local", "--", "--img-size",
            "32", "--batch-size", "8", "--fake-size", "16", "--warmup-epochs", "0", "--workers",
            "0"]
    with held(out / "run-000"):
        code, _, err = run_tool(sweep.main, argv, capsys)
    assert code == 2 and err[-1].startswith("tool.py: error: run-000: exit 3: ")
    assert "in use by another train.py" in err[-1] and not (out / "run-001").exists()
    assert read_jsonl(out / "launch.jsonl")[0]["exit"] == FolderInUse.status == 3


# ------------------------------------------------------------------------------------------------
# tools/export.py, and the README's torchvision and timm sections: one 1-epoch train.py run on a
# few generated JPEGs serves every test that needs a run
# ------------------------------------------------------------------------------------------------

IMG_SIZE, CLASSES = 32, ("cat", "dog")
# train.py's evaluation transforms at 32 px: resize 32 * 256 / 224, centre crop, ImageNet mean/std
EVAL = T.Compose([T.Resize(37), T.CenterCrop(IMG_SIZE), T.ToTensor(),
                  T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A train.py run folder: ViT_C-1GF, one epoch of 2 steps on 8 generated JPEGs at 32 px."""
    root = tmp_path_factory.mktemp("export")
    for c, name in enumerate(CLASSES):
        write_images(root / "data" / "train" / name, 4, seed=c)
        write_images(root / "data" / "val" / name, 2, seed=10 + c)
    # --ema-alpha 0.125: EMA steps of 0.5 (x batch 4 / 1 epoch), so that the EMA moves but stays
    # apart from the model; --lr 2 (quoted at batch 2048: 0.004 here) moves the zero head.
    assert train.cli(["--data", str(root / "data"), "--out", str(root / "run"),
                      "--model", "vitc_1gf", "--img-size", str(IMG_SIZE), "--batch-size", "4",
                      "--epochs", "1", "--warmup-epochs", "0", "--lr", "2",
                      "--ema-period", "1", "--ema-alpha", "0.125", "--workers", "0"]) == 0
    yield root / "run"
    shutil.rmtree(root, ignore_errors=True)


def export_in_process(argv, capsys):
    """(exit status, stdout, stderr lines) of tools/export.py run in this process."""
    capsys.readouterr()
    code = run_cli(export.main, "export.py", [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def randomised(model):
    """`model` in float64 with random weights and BatchNorm statistics: a zero-initialised head
    and zero biases would make equal logits too easy."""
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for bn in [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]:
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# tools/export.py
# ------------------------------------------------------------------------------------------------

# What the README's loading lines are followed by in the fresh process: logits of the saved
# images, and the proof that nothing of this project was imported.
LOGITS = f"""
import sys
model.eval()
with torch.no_grad():
    torch.save(model(torch.load("images.pt", weights_only=True)), "logits.pt")
ours = [name for name, module in sys.modules.items()
        if str(getattr(module, "__file__", None) or "").startswith({str(ROOT)!r})]
assert not ours, ours
"""


def test_a_run_exported_gives_vitc_s_logits_in_torchvision_alone(run, tmp_path):
    out = tmp_path / "vitc_1gf-tv.pt"
    proc = subprocess.run([sys.executable, str(HERE / "tools" / "export.py"), str(run), "--to",
                           "torchvision", "--out", str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # the script, from another folder
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}: vitc_1gf (32 px, 2 classes) for torchvision's "
                                  f"VisionTransformer, the EMA's weights of best.pt (epoch 1, "
                                  f"val top-1 "), proc.stdout
    saved = load(out)
    assert saved.keys() == {"state_dict", "kwargs"}
    assert json.loads(json.dumps(saved["kwargs"])) == saved["kwargs"] == {  # plain types
        "image_size": 32, "patch_size": 16, "num_layers": 11, "num_heads": 3, "hidden_dim": 192,
        "mlp_dim": 576, "num_classes": 2, "conv_stem_configs": [
            {"out_channels": c, "kernel_size": 3, "stride": 2} for c in (24, 48, 96, 192)]}

    images = torch.stack([EVAL(Image.open(path).convert("RGB"))
                          for path in sorted((run.parent / "data" / "val").glob("*/*.jpg"))])
    torch.save(images, tmp_path / "images.pt")
    (block,) = readme_python_blocks("Exporting a trained model to torchvision",
                                    "docs/conv-stem-elsewhere.md")
    assert '"vitc_1gf-tv.pt"' in block  # the file name the README loads, replaced by ours
    script = tmp_path / "load.py"
    script.write_text(block.replace('"vitc_1gf-tv.pt"', repr(str(out))) + LOGITS)
    proc = subprocess.run([sys.executable, "-I", str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # -I: no PYTHONPATH, no script folder on the path
    assert proc.returncode == 0, proc.stderr

    ours = vitc.create_model("vitc_1gf", num_classes=2, img_size=IMG_SIZE)
    ours.load_state_dict(load(run / "best.pt")["model"])
    with torch.no_grad():
        expected = ours.eval()(images)
    logits = load(tmp_path / "logits.pt")
    assert expected.abs().max() > 1e-3  # the head has left zero: the comparison means something
    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-6), (logits - expected).abs().max()


def test_export_takes_best_pt_or_the_ema_or_model_of_a_checkpoint(run, tmp_path, capsys):
    best, checkpoint = load(run / "best.pt"), load(run / "checkpoint.pt")
    assert not torch.equal(checkpoint["ema"]["head.weight"], checkpoint["model"]["head.weight"])
    no_ema = tmp_path / "no-ema.pt"  # a checkpoint.pt of a run with --no-ema, optimizer left out
    saved_with_checksum({"model": checkpoint["model"], "ema": None,
                         "args": {**checkpoint["args"], "ema": False}}, no_ema)
    out = tmp_path / "out.pt"
    cases = [([run], best["model"], "EMA"),
             ([run / "best.pt", "--weights", "ema"], best["model"], "EMA"),
             ([run / "checkpoint.pt"], checkpoint["ema"], "EMA"),
             ([run / "checkpoint.pt", "--weights", "model"], checkpoint["model"], "model"),
             ([no_ema], checkpoint["model"], "model")]
    for argv, expected, whose in cases:
        code, printed, err = export_in_process([*argv, "--to", "torchvision", "--out", out], capsys)
        assert code == 0 and not err and f"the {whose}'s weights" in printed, (argv, err, printed)
        state_dict, renamed = load(out)["state_dict"], export.torchvision_state_dict(expected)
        assert state_dict.keys() == renamed.keys()
        assert all(torch.equal(state_dict[key], value) for key, value in renamed.items()), argv


def saved_with_checksum(contents, path):
    runsafe.checkpoint.save(contents, str(path))  # as train.py saves them


def test_export_refuses_a_damaged_file(run, tmp_path, capsys):
    damaged = tmp_path / "best.pt"
    data = bytearray((run / "best.pt").read_bytes())
    middle = len(data) // 2  # inside the weights' bytes
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    damaged.write_bytes(data)
    code, _, err = export_in_process([damaged, "--to", "torchvision", "--out",
                                      tmp_path / "out.pt"], capsys)
    assert code == 2 and err == [f"{PREFIX}{damaged}: damaged (its contents do not match its "
                                 f"checksum); no other copy of the run is kept"]
    assert not (tmp_path / "out.pt").exists()


PREFIX = "export.py: error: "


class Start(str):
    """An expected message of which only the start is fixed: the rest is worded by argparse or
    torch, which differ between versions."""


def test_export_bad_input_is_one_line(run, tmp_path, capsys):
    best = load(run / "best.pt")
    files = {"notes.txt": None, "tv.pt": {"state_dict": {}, "kwargs": {}},
             "resnet.pt": {**best, "args": {**best["args"], "model": "resnet50"}},
             "vitp.pt": {**best, "args": {**best["args"], "model": "vitp_1gf"}},
             "wide.pt": {**best, "args": {**best["args"], "num_classes": 5}},
             "no-ema.pt": {"model": best["model"], "ema": None,
                           "args": {**best["args"], "ema": False}}}
    for name, contents in files.items():
        if contents is None:
            (tmp_path / name).write_text("not a checkpoint\n")
        else:
            saved_with_checksum(contents, tmp_path / name)
    (tmp_path / "empty").mkdir()
    path = {name: tmp_path / name for name in [*files, "empty", "missing.pt"]}
    to = ["--to", "torchvision", "--out", tmp_path / "out.pt"]
    cases = [
        ([path["missing.pt"], *to], f"{path['missing.pt']}: no such file or folder"),
        ([path["empty"], *to], f"{path['empty']}: no best.pt in this folder (a run writes it at "
                               f"its first evaluation; its checkpoint.pt holds the last weights)"),
        ([path["notes.txt"], *to], Start(f"{path['notes.txt']}: not a checkpoint (torch.load: ")),
        ([path["tv.pt"], *to], f"{path['tv.pt']}: not a train.py best.pt or checkpoint.pt (no "
                               f"model weights with the run's arguments): it is already an export"),
        ([path["resnet.pt"], *to], f"{path['resnet.pt']}: a checkpoint of another model "
                                   f"('resnet50'); this project's are {', '.join(vitc.VARIANTS)}"),
        ([path["vitp.pt"], *to], f"{path['vitp.pt']}: the weights of another model: not "
                                 f"vitp_1gf's at 32 px with 2 classes (missing stem.proj.weight; "
                                 f"missing stem.proj.bias; 38 more)"),
        ([path["wide.pt"], *to], f"{path['wide.pt']}: the weights of another model: not "
                                 f"vitc_1gf's at 32 px with 5 classes (head.weight is [2, 192], "
                                 f"not [5, 192]; head.bias is [2], not [5])"),
        ([path["no-ema.pt"], "--weights", "ema", *to], f"{path['no-ema.pt']}: the run kept no "
                                                       f"EMA (--no-ema): pass --weights model"),
        ([run / "best.pt", "--weights", "model", *to],
         f"{run / 'best.pt'}: a best.pt holds only the EMA's weights; the run's checkpoint.pt "
         f"holds the model's too"),
        ([run, "--to", "torchvision", "--out", run / "best.pt"],
         f"--out {run / 'best.pt'} is the input: choose another file"),
        ([run, "--to", "torchvision", "--out", path["missing.pt"] / "out.pt"],
         f"cannot write {path['missing.pt'] / 'out.pt'} (No such file or directory); the previous "
         f"version, if any, is intact"),
        ([run, "--to", "timm", "--out", tmp_path / "out.pt"],
         Start("argument --to: invalid choice: 'timm' (choose from ")),
        ([run], "the following arguments are required: --to, --out"),
    ]
    for argv, message in cases:
        code, printed, err = export_in_process(argv, capsys)
        assert (code, printed, len(err)) == (2, "", 1) and err[0].startswith(PREFIX), (argv, err)
        line = err[0][len(PREFIX):]
        assert line.startswith(message) if isinstance(message, Start) else line == message, line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(path.keys() - {"missing.pt"})


def test_export_replaces_only_an_earlier_export_and_never_writes_into_a_run(run, tmp_path,
                                                                           capsys, monkeypatch):
    """--out RUN/checkpoint.pt once replaced the run's resumable checkpoint, and as root --out
    /dev/full the device node, with exit status 0."""
    run_files = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "best.pt")}
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("keep me\n")
    (tmp_path / "link.pt").symlink_to(tmp_path / "notes.txt")
    os.mkfifo(tmp_path / "pipe")
    refused = {"folder": "is a folder", "link.pt": "is a symbolic link", "pipe": "is a named pipe"}
    try:  # a device node as /dev/full is (1, 7), made here rather than risk the real one
        os.mknod(tmp_path / "full", 0o600 | stat.S_IFCHR, os.makedev(1, 7))
        refused["full"] = "is a character device"
    except PermissionError:  # not root: only root could have replaced /dev/full either
        pass
    in_run = "is a train.py run folder (it holds checkpoint.pt and best.pt): write the export " \
             "outside it"
    cases = [(run / "checkpoint.pt", [], f"{run} {in_run}"),
             (run / "checkpoint.pt", ["--force"], f"{run} {in_run}"),
             (run / "new-tv.pt", ["--force"], f"{run} {in_run}"),
             (tmp_path / "notes.txt", [], "exists and is not an earlier export: pass --force to "
                                          "replace it")]
    cases += [(tmp_path / name, force, f"{what}: name a file to write")
              for name, what in refused.items() for force in ([], ["--force"])]
    for out, force, message in cases:
        code, printed, err = export_in_process([run, "--to", "torchvision", "--out", out, *force],
                                               capsys)
        separator = ": " if message.startswith("/") else " "
        assert (code, printed, err) == (2, "", [f"{PREFIX}--out {out}{separator}{message}"]), (
            out, force, err)
    assert {name: (run / name).read_bytes() for name in run_files} == run_files
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".pt") == sorted(run_files)
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"
    assert (tmp_path / "link.pt").is_symlink()
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)
    assert "full" not in refused or stat.S_ISCHR(os.lstat(tmp_path / "full").st_mode)

    # where the README writes it, the folder the runs' folder is in: new, then an earlier export
    # replaced without --force; an empty file holds nothing to lose; --force replaces another file
    monkeypatch.chdir(run.parent)
    (tmp_path / "empty.pt").touch()
    for out, force in [("vitc_1gf-tv.pt", []), ("vitc_1gf-tv.pt", []),
                       (tmp_path / "empty.pt", []), (tmp_path / "notes.txt", ["--force"]),
                       (tmp_path / "notes.txt", [])]:
        code, printed, err = export_in_process([run.name, "--to", "torchvision", "--out", out,
                                                *force], capsys)
        assert code == 0 and not err and printed.startswith(f"wrote {out}: "), (out, err)
        assert export.is_export(out) and load(out).keys() == {"state_dict", "kwargs"}
    os.remove(run.parent / "vitc_1gf-tv.pt")


# ------------------------------------------------------------------------------------------------
# The README's conv stem in torchvision and in timm
# ------------------------------------------------------------------------------------------------


def test_readme_torchvision_conv_stem_configs_build_our_vitc_models(capsys):
    from torchvision.models.vision_transformer import VisionTransformer
    (block,) = readme_python_blocks("The conv stem in torchvision", "docs/conv-stem-elsewhere.md")
    namespace = {}
    exec(block, namespace)  # builds ViT_C-1GF at 224 px and prints its parameter count
    printed = capsys.readouterr().out.strip()
    assert printed == re.search(r"print\(.*\)  # (\d+)", block)[1]  # the README says what it prints
    configs = namespace["VITC"]
    assert sorted(configs) == sorted(name for name in vitc.VARIANTS if name.startswith("vitc_"))
    for name, kwargs in configs.items():
        with torch.device("meta"):  # structure and sizes only
            theirs = VisionTransformer(image_size=224, patch_size=16, **kwargs)
            twin, ours = export.torchvision_twin(name), vitc.create_model(name)
        assert parameter_count(theirs) == parameter_count(ours), name
        assert repr(theirs) == repr(twin), name  # every layer, stride, eps: the export's model
        assert [layer.num_heads for layer in theirs.encoder.layers] == [vitc.VARIANTS[name].heads
                                                                         ] * len(ours.blocks)
    assert int(printed) == parameter_count(vitc.create_model("vitc_1gf"))
    # Our weights, their logits (the other three are layer for layer the twins whose logits
    # test_vitc.py checks, or built alike: 4GF is 1GF wider)
    torch.manual_seed(0)
    ours = randomised(vitc.create_model("vitc_1gf", num_classes=7, img_size=IMG_SIZE))
    theirs = VisionTransformer(image_size=IMG_SIZE, patch_size=16, num_classes=7,
                               **configs["vitc_1gf"]).double()
    theirs.load_state_dict(export.torchvision_state_dict(ours.state_dict()))
    assert_same_logits(ours, theirs)


def test_readme_timm_adapter_makes_our_vitc_in_timm(capsys):
    pytest.importorskip("timm")
    (block,) = readme_python_blocks("The conv stem in timm", "docs/conv-stem-elsewhere.md")
    namespace = {}
    exec(block, namespace)  # builds ViT_C-1GF at 224 px and runs it
    assert capsys.readouterr().out.strip() == "torch.Size([2, 1000])"
    TimmConvStem, VisionTransformer = namespace["TimmConvStem"], namespace["VisionTransformer"]
    cfg = vitc.VARIANTS["vitc_1gf"]
    stem = partial(TimmConvStem, channels=cfg.stem_channels, strides=cfg.stem_strides)
    torch.manual_seed(0)
    ours = randomised(vitc.create_model("vitc_1gf", num_classes=7, img_size=IMG_SIZE))
    theirs = VisionTransformer(img_size=IMG_SIZE, patch_size=16, embed_dim=cfg.dim,
                               depth=cfg.depth, num_heads=cfg.heads,
                               mlp_ratio=cfg.mlp_dim / cfg.dim, num_classes=7,
                               embed_layer=stem).double()
    assert parameter_count(theirs) == parameter_count(ours)
    # Every name is already timm's, but the stem's (the README says so)
    theirs.load_state_dict({re.sub(r"^stem\.", "patch_embed.", key): value
                            for key, value in ours.state_dict().items()})
    assert_same_logits(ours, theirs)

    embed, x = theirs.patch_embed, torch.randn(2, 3, IMG_SIZE, IMG_SIZE, dtype=torch.float64)
    assert embed(x).shape == (2, 4, cfg.dim)  # tokens (B, N, D)
    assert (embed.num_patches, embed.grid_size, embed.feat_ratio()) == (4, (2, 2), 16)
    assert theirs.feature_info[-1]["reduction"] == 16
    features = theirs.forward_intermediates(x, indices=1, intermediates_only=True)
    assert features[0].shape == (2, cfg.dim, 2, 2)  # timm's dense features, through grid sizes
    for unsupported in ({"dynamic_img_size": True}, {"pre_norm": True}, {"patch_size": 8}):
        with pytest.raises(ValueError, match="TimmConvStem: needs patch_size=16"):
            VisionTransformer(**{"img_size": IMG_SIZE, "embed_dim": cfg.dim, "depth": 1,
                                 "num_heads": cfg.heads, "embed_layer": stem, **unsupported})


def test_report_and_plot_skip_a_bad_line_and_a_bad_run_with_a_warning(tmp_path, capsys):
    settings = {"model": "vitc_1gf", "optimizer": "adamw", "epochs": 3, "lr": 1e-3, "wd": 0.24}
    write_run(tmp_path / "runs" / "a", [50, 40, 35], settings)
    log = tmp_path / "runs" / "a" / "log.jsonl"
    lines = log.read_text().splitlines()  # epoch 2 glued onto a torn line, as resumes once did
    log.write_text("\n".join([lines[0], '{"val_top1": ' + lines[1], lines[2]]) + "\n")
    write_run(tmp_path / "runs" / "b", [50, 45, 42], settings)
    (tmp_path / "runs" / "c").mkdir()
    (tmp_path / "runs" / "c" / "args.jsonl").write_bytes(b"\xff\xfe\x00\n")  # garbled
    code, text, err = run_tool(sweep.main, ["report", str(tmp_path / "runs")], capsys)
    assert code == 0 and f"{tmp_path / 'runs'}: 2 runs: 2 finished" in text
    warned = "\n".join(err)
    assert f"{log}: line 2 is not a record of train.py's log (with its epoch), skipped" in warned
    assert f"{tmp_path / 'runs' / 'c'}: no readable args.jsonl, so its model and settings are " \
           f"unknown; left out" in warned
    assert warned.count(f"{log}: line 2") == 1  # each file read once
    code, _, err = run_tool(plot.main, [str(tmp_path / "runs" / f) for f in "ab"] + [
        "--out", str(tmp_path / "c.png")], capsys)
    assert code == (0 if HAS_MATPLOTLIB else 2) and "line 2 is not a record" in err[0]
    # in a sweep: a run whose log cannot be read at all is counted as such, the others stand
    out = tmp_path / "s"
    assert run_tool(sweep.main, ["sample", "--model", "vitc_1gf", "--optimizer", "adamw",
                                 "--runs", "3", "--epochs", "2", "--out", str(out), "--",
                                 "--warmup-epochs", "0"], capsys)[0] == 0
    write_run(out / "run-000", [40, 30])
    (out / "run-001" / "log.jsonl").mkdir(parents=True)  # not a file
    code, text, err = run_tool(sweep.main, ["report", str(out)], capsys)
    assert code == 0 and "3 runs: 1 finished, 1 unreadable, 1 not started" in text, err
    assert "run-001: unreadable (" in text and "run-001: " in err[0]


def test_report_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    # `sweep.py report SWEEP | head -3`: head exits after its lines, the pipe closes
    write_run(tmp_path / "a", [50, 40], {"model": "vitc_1gf", "optimizer": "adamw",
                                         "epochs": 2, "lr": 1e-3, "wd": 0.24})
    proc = subprocess.Popen([sys.executable, str(HERE / "tools" / "sweep.py"), "report",
                             str(tmp_path / "a")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the report is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=150) == 128 + signal.SIGPIPE  # as a shell shows a SIGPIPE death
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def slurm_plan(capsys, out, *options, runs=3):
    """sweep.py sample ... --launch slurm: (exit status, stdout, stderr lines)."""
    return run_tool(sweep.main, ["sample", "--model", "vitc_1gf", "--optimizer", "adamw",
                                 "--runs", str(runs), "--out", str(out), "--launch", "slurm",
                                 *options], capsys)


def test_the_cpu_slurm_script_quotes_its_paths_and_sizes_its_threads(tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, _ = slurm_plan(capsys, "a b%c", "--gpus", "0", "--ranks", "2", "--cpus", "3")
    script = (tmp_path / "a b%c" / "sweep.sbatch").read_text()
    assert code == 0 and "--gpus" not in script and "#SBATCH --cpus-per-task=3\n" in script
    assert f'#SBATCH --output="{tmp_path}/a b%%c/slurm-%A_%a.out"\n' in script  # % kept as is
    assert "#SBATCH --job-name=sweep-a_b_c\n" in script
    assert "torch.distributed.run --standalone --nproc_per_node=2" in script
    threads = script[script.index("ranks=2"):script.index("started=")]
    for cpus, expected in (("3", "1"), ("8", "4"), (None, "1")):  # per rank, at least 1
        env = {k: v for k, v in os.environ.items() if k != "SLURM_CPUS_PER_TASK"}
        if cpus:
            env["SLURM_CPUS_PER_TASK"] = cpus
        shown = subprocess.run(["bash", "-c", threads + 'echo "$OMP_NUM_THREADS"'], env=env,
                               capture_output=True, text=True).stdout.strip()
        assert shown == expected, (cpus, shown)
    code, _, err = slurm_plan(capsys, 'q"uote', "--gpus", "0")
    assert code == 2 and "cannot be written into a Slurm script" in err[-1]
    code, _, err = slurm_plan(capsys, "g", "--gpus", "2", "--ranks", "3")
    assert code == 2 and "train.py runs one rank per GPU" in err[-1]


def test_a_time_limit_too_short_for_the_stop_signal_is_warned_of(tmp_path, capsys):
    code, _, err = slurm_plan(capsys, tmp_path / "s", "--sbatch=--time=4:00")
    assert code == 0 and any("--time=4:00: Slurm sends the stop signal 120-180 s before the time "
                             "limit" in line and "would train 60 s or less" in line
                             for line in err), err
    code, _, err = slurm_plan(capsys, tmp_path / "s", "--sbatch=--time=1:00:00",
                              "--sbatch=--signal=B:TERM@600")
    assert code == 0 and not any("--time" in line for line in err), err
    script = (tmp_path / "s" / "sweep.sbatch").read_text()
    assert "#SBATCH --signal=B:TERM@600\n" in script and "@120" not in script
    assert [sweep.slurm_seconds(t) for t in ("90", "1:30", "1:00:00", "2-0", "1-2:3", "-1")] == [
        5400, 90, 3600, 172800, 93780, None]


def fake_squeue(folder, text, status=0):
    """A `squeue` first on PATH that prints `text` (and exits with `status`)."""
    folder.mkdir()
    (folder / "squeue").write_text(f"#!/bin/sh\ncat <<'EOF'\n{text}EOF\nexit {status}\n")
    (folder / "squeue").chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_regenerating_leaves_out_tasks_slurm_still_has_and_removes_a_spent_script(
        tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    slurm_plan(capsys, out)
    script = out / "sweep.sbatch"
    monkeypatch.setenv("PATH", fake_squeue(tmp_path / "bin", f"55|1|RUNNING|{script}\n"
                                           f"55|2|PENDING|/elsewhere/sweep.sbatch\n"))
    code, text, _ = slurm_plan(capsys, out)  # after a requeue, say: task 1 still runs
    assert code == 0 and "run-001: left out, still in Slurm as job 55_1 RUNNING" in text
    assert "#SBATCH --array=0,2\n" in script.read_text()
    write_run(out / "run-000", [30.0, 30.0] * 25)
    write_run(out / "run-002", [30.0] * 50, diverged=True)
    code, text, _ = slurm_plan(capsys, out)  # nothing left to submit: no script to submit again
    assert f"every run is finished, diverged or still in Slurm: {script} removed" in text
    assert not script.exists()
    monkeypatch.setenv("PATH", fake_squeue(tmp_path / "bin2", "", status=1))
    (out / "run-002" / "log.jsonl").unlink()
    code, _, err = slurm_plan(capsys, out)
    assert "squeue failed (exit 1): tasks of an earlier submission still queued would run " \
           "twice" in err[0] and "#SBATCH --array=1,2\n" in script.read_text()


@slow  # launches whole runs or benchmarks: VITC_SLOW=1
def test_the_slurm_script_records_each_task_outcome_also_without_slurm(data, tmp_path, capsys,
                                                                       monkeypatch):
    # The generated script run by bash as Slurm would run two array tasks: the first finishes,
    # the second finds its run folder locked (a task submitted twice) and fails.
    monkeypatch.chdir(tmp_path)
    code, _, err = slurm_plan(capsys, "s", "--gpus", "0", "--epochs", "1", "--data", str(data),
                              "--", "--img-size", "32", "--batch-size", "8", "--warmup-epochs",
                              "0", "--workers", "0", "--precise-bn", "8", runs=2)
    assert code == 0, err
    env = dict(os.environ, SLURM_CPUS_PER_TASK="1", SLURM_JOB_ID="77", SLURM_ARRAY_JOB_ID="76")
    task = subprocess.run(["bash", "s/sweep.sbatch"], env=dict(env, SLURM_ARRAY_TASK_ID="0"),
                          capture_output=True, text=True, timeout=300)
    assert task.returncode == 0, task.stderr[-3000:]
    assert "sweep.py: run-000 (array task 0): finished; exit status 0" in task.stdout
    (tmp_path / "s" / "run-001").mkdir()
    with held(tmp_path / "s" / "run-001"):
        task = subprocess.run(["bash", "s/sweep.sbatch"], env=dict(env, SLURM_ARRAY_TASK_ID="1"),
                              capture_output=True, text=True, timeout=300)
    assert task.returncode == 3, task.stderr[-3000:]
    ends = read_jsonl(tmp_path / "s" / "slurm.jsonl")
    assert [(e["run"], e["outcome"], e["exit"], e["job"]) for e in ends] == [
        ("run-000", "finished", 0, "77"), ("run-001", "failed", 3, "77")]
    (entry,) = read_jsonl(tmp_path / "s" / "run-000" / "args.jsonl")
    assert entry["resolved"]["device"].endswith(", 1 threads)")  # SLURM_CPUS_PER_TASK=1
    code, text, _ = run_tool(sweep.main, ["report", "s"], capsys)
    assert "2 runs: 1 finished, 1 failed" in text
    assert "run-001: failed (exit 3: its folder is in use by another train.py" in text


# ------------------------------------------------------------------------------------------------
# runsafe/decode.py: image modes
# ------------------------------------------------------------------------------------------------

from runsafe import decode  # noqa: E402
from runsafe.decode import load_rgb  # noqa: E402


def rgb_of(path, mode):
    """load_rgb(path) as an array, `path` checked to open in `mode` (the case the test is of)."""
    with Image.open(path) as image:
        assert image.mode == mode, image.mode
    image = load_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def grey(*values):
    return np.array([[[v] * 3 for v in values]], dtype=np.uint8)


@pytest.mark.parametrize("name, dtype, mode", [("png", np.uint16, "I;16"),
                                               ("tif", ">u2", "I;16B"), ("tif", np.int32, "I")])
def test_load_rgb_scales_16_bit_grayscale_to_8_bits(tmp_path, name, dtype, mode):
    """PIL's convert("RGB") clips at 255: a 16-bit PNG was 99.6% pure white."""
    path = tmp_path / f"deep.{name}"
    Image.fromarray(np.array([[0, 257, 1000, 32896, 65535]]).astype(dtype)).save(path)
    assert np.array_equal(rgb_of(path, mode), grey(0, 1, 4, 128, 255))  # v * 255 / 65535


def test_load_rgb_scales_float_images_in_0_to_1(tmp_path):
    """PIL's convert("RGB") made a float TIFF of values in [0, 1] all black."""
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0, 0.25, 0.5, 1]], dtype=np.float32)).save(path)
    assert np.array_equal(rgb_of(path, "F"), grey(0, 64, 128, 255))


def test_load_rgb_refuses_values_of_unknown_scale_naming_the_mode(tmp_path):
    for values, dtype, message in [([[0, 255]], np.float32, "mode F with values 0 to 255: only "
                                                            "0 to 1 has a known scale to 8 bits"),
                                   ([[0, np.nan]], np.float32, "mode F with values nan to nan"),
                                   ([[-5, 70000]], np.int32, "mode I with values -5 to 70000: "
                                                             "only 0 to 65535 has a known")]:
        path = tmp_path / "odd.tif"
        Image.fromarray(np.array(values, dtype=dtype)).save(path)
        with pytest.raises(ValueError, match=re.escape(message)):
            load_rgb(path)


def test_load_rgb_converts_the_other_modes_as_pil_does(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    for name, image, expected in [
            ("p.png", palette, [[[255, 0, 0], [0, 0, 255]]]),
            ("pt.png", transparent, [[[255, 0, 0], [0, 0, 255]]]),  # transparency dropped
            ("1.png", bilevel, grey(0, 255)), ("l.png", Image.new("L", (1, 1), 77), grey(77)),
            ("la.png", Image.new("LA", (1, 1), (100, 0)), grey(100)),
            ("rgba.png", Image.new("RGBA", (1, 1), (10, 20, 30, 0)), [[[10, 20, 30]]]),
            ("rgb.png", Image.new("RGB", (1, 1), (10, 20, 30)), [[[10, 20, 30]]])]:
        image.save(tmp_path / name)
        assert np.array_equal(rgb_of(tmp_path / name, image.mode), expected), name
    cmyk = tmp_path / "cmyk.jpg"  # red and white, in a JPEG's lossy neighbourhood
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(cmyk, quality=100)
    red = rgb_of(cmyk, "CMYK").astype(int)
    assert red.shape == (8, 16, 3) and np.abs(red - [255, 0, 0]).max() <= 3, red[0, 0]


def test_load_rgb_names_the_file_in_decompression_bomb_warnings_and_errors(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's limit: warns above, errs above 2x
    Image.new("L", (11, 10), 9).save(tmp_path / "large.png")
    Image.new("L", (15, 14), 9).save(tmp_path / "huge.png")
    with pytest.warns(Image.DecompressionBombWarning) as caught:
        assert np.array_equal(np.asarray(load_rgb(tmp_path / "large.png"))[0, 0], [9, 9, 9])
    assert [str(w.message) for w in caught] == [f"{tmp_path / 'large.png'}: Image size (110 "
                                                f"pixels) exceeds limit of 100 pixels, could be "
                                                f"decompression bomb DOS attack."]
    with pytest.raises(Image.DecompressionBombError, match=f"^{re.escape(str(tmp_path))}/huge"):
        load_rgb(tmp_path / "huge.png")


def test_load_rgb_passes_on_the_other_warnings_it_records(tmp_path, monkeypatch):
    def to_rgb(image):
        warnings.warn("from the decoder", UserWarning)
        return image.convert("RGB")
    monkeypatch.setattr(decode, "to_rgb", to_rgb)
    Image.new("L", (1, 1)).save(tmp_path / "l.png")
    with pytest.warns(UserWarning, match="^from the decoder$"):
        load_rgb(tmp_path / "l.png")
