"""Training curves of train.py runs, side by side (a tool, not part of the paper).

    python tools/plot.py runs/vitp_1gf-20261124-101500 runs/vitc_1gf-20261124-101502
    python tools/plot.py runs/sweep-c1/run-* --out sweep-c1-curves.png

Each argument is a run folder written by train.py (its args.jsonl and log.jsonl). One PNG: the
train loss against epoch on the left, val top-1 of the model (solid) and of its EMA (dashed) on
the right, one colour per run, labelled by model and settings; a run whose loss went non-finite
ends in an x. Needs matplotlib, which the rest of the project does not:
pip install -r tools/requirements.txt.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train import Parser, RunError, run_cli  # noqa: E402  (one-line errors, as train.py's)


def warn(message):
    """A warning line on stderr, named after the tool that runs (plot.py, sweep.py)."""
    print(f"{os.path.basename(sys.argv[0])}: warning: {message}", file=sys.stderr)


def read_jsonl(path, valid=lambda record: True, what="a JSON record"):
    """The records of a .jsonl file for which valid(record) holds. Any other line (torn by a
    write cut short, or garbled) is skipped with a warning that names the file and line: one bad
    line must not hide the rest of a run, nor one bad run the others."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise RunError(f"{path}: cannot read it ({e.strerror or e})") from None
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and valid(record):
            records.append(record)
        else:
            warn(f"{path}: line {i + 1} is not {what}, skipped: {line[:60]!r}")
    return records


def read_run(folder, need_log=True):
    """{'folder', 'args' (train.py's arguments, from the last line of args.jsonl), 'log' (one
    record per epoch, plus a record with 'diverged' if the loss went non-finite), or None when
    there is no log.jsonl and `need_log` is False}."""
    if not os.path.isdir(folder):
        raise RunError(f"{folder}: no such folder")
    log_path = os.path.join(folder, "log.jsonl")
    if not os.path.exists(log_path):
        if need_log:
            raise RunError(f"{folder}: no log.jsonl (not a train.py run folder, or its first "
                            f"epoch has not ended)")
        log = None
    else:
        log = read_jsonl(log_path, lambda r: isinstance(r.get("epoch"), int),
                         "a record of train.py's log (with its epoch)")
    return {"folder": folder, "args": read_args(folder), "log": log}


def read_args(folder):
    """train.py's arguments of a run folder (its last invocation's, in args.jsonl), or {}."""
    path = os.path.join(folder, "args.jsonl")
    invocations = read_jsonl(path, lambda r: isinstance(r.get("args"), dict) and {
        "model", "optimizer", "lr", "wd", "epochs"} <= r["args"].keys(),
        "train.py's arguments") if os.path.exists(path) else []
    return invocations[-1]["args"] if invocations else {}


def describe(args):
    """'vitc_1gf adamw lr 0.001 wd 0.24 400 ep' from train.py's arguments."""
    if not args:
        return "unknown settings (no args.jsonl)"
    return (f"{args['model']} {args['optimizer']} lr {args['lr']:.3g} wd {args['wd']:.3g} "
            f"{args['epochs']} ep")


def pyplot():
    """matplotlib's pyplot on a file-only backend, or a one-line error saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise RunError("plots need matplotlib, which is optional: pip install -r "
                        "tools/requirements.txt") from None
    return plt


def plot_runs(runs, labels, path):
    """Train loss and val / EMA top-1 against epoch; runs with the same label share a colour
    and one legend entry. Writes `path` (PNG)."""
    plt = pyplot()
    fig, (loss_ax, top1_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {}
    for run, label in zip(runs, labels):
        first = label not in colours
        colour = colours.setdefault(label, f"C{len(colours) % 10}")
        epochs = [r for r in run["log"] or [] if "train_loss" in r]
        loss_ax.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs],
                     color=colour, label=label if first else None)
        for key, style in (("val_top1", "-"), ("ema_top1", "--")):
            points = [(r["epoch"], r[key]) for r in epochs if key in r]
            if points:
                top1_ax.plot(*zip(*points), style, color=colour, marker=".")
        diverged = [r for r in run["log"] or [] if "diverged" in r]
        if diverged and epochs:  # the last logged loss, marked where the run stopped
            loss_ax.plot(diverged[-1]["epoch"], epochs[-1]["train_loss"], "x", color=colour,
                         markersize=10)
    loss_ax.set(xlabel="epoch", ylabel="train loss", title="train loss")
    top1_ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="val top-1: model -, EMA --")
    if colours and len(colours) <= 20:
        loss_ax.legend(fontsize="small")
    save_figure(fig, path)


def save_figure(fig, path):
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise RunError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        pyplot().close(fig)


def unique_labels(runs):
    """describe() of each run, with its folder name added where two runs would share a label."""
    labels = [describe(run["args"]) for run in runs]
    return [f"{label} ({os.path.basename(os.path.normpath(run['folder']))})"
            if labels.count(label) > 1 else label for run, label in zip(runs, labels)]


def main(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_FOLDER", help="train.py run folders")
    parser.add_argument("--out", default="curves.png", help="the PNG to write")
    args = parser.parse_args(argv)
    runs = [read_run(folder) for folder in args.runs]
    plot_runs(runs, unique_labels(runs), args.out)
    print(f"wrote {args.out}: {len(runs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "plot.py"))
