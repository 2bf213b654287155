"""Training curves of train.py runs, side by side (a tool, not part of the paper).

    python tools/plot.py runs/vitp_1gf-20261124-101500 runs/vitc_1gf-20261124-101502
    python tools/plot.py runs/sweep-c1/run-* --out sweep-c1-curves.png

Each argument is a run folder written by train.py (its args.jsonl and log.jsonl). One figure
(a PNG, or the format of --out's extension): the train loss against epoch on the left, val top-1
of the model (solid) and of its EMA (dashed) on the right, one colour per run, labelled by model
and settings; a run whose loss went non-finite ends in an x. Needs matplotlib, which the rest of
the project does not: pip install -r tools/requirements.txt.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runsafe.errors import Parser, RunError, run_cli  # noqa: E402  (one-line errors, as train.py's)


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


def plot_runs(runs, labels, path, groups=None, note=None):
    """Train loss and val / EMA top-1 against epoch, a colour and a legend entry per run; with
    `groups` (a key per run), each group in shades of its own colour; `note` above both. Writes
    `path` (in the format of its extension)."""
    plt = pyplot()
    fig, (loss_ax, top1_ax) = plt.subplots(1, 2, figsize=(13, 5))
    colours = run_colours(plt, groups) if groups else [f"C{i % 10}" for i in range(len(runs))]
    for run, label, colour in zip(runs, labels, colours):
        epochs = [r for r in run["log"] or [] if "train_loss" in r]
        loss_ax.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs],
                     color=colour, label=label)
        for key, style in (("val_top1", "-"), ("ema_top1", "--")):
            points = [(r["epoch"], r[key]) for r in epochs if key in r]
            if points:
                top1_ax.plot(*zip(*points), style, color=colour, marker=".")
        diverged = [r for r in run["log"] or [] if "diverged" in r]
        if diverged and epochs:  # the last logged loss, marked where the run stopped
            loss_ax.plot(diverged[-1]["epoch"], epochs[-1]["train_loss"], "x", color=colour,
                         markersize=10)
    loss_ax.set(xlabel="epoch", ylabel="train loss", title="train loss (x: diverged)")
    top1_ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="val top-1: model -, EMA --")
    if len(runs) <= 32:
        loss_ax.legend(fontsize="x-small", title="lr quoted at batch 2048",
                       title_fontsize="x-small", ncol=1 + len(runs) // 12)
    if note:
        fig.suptitle(note, fontsize="medium")
    save_figure(fig, path)


def run_colours(plt, groups):
    """A colour per run: one colour map per group (blues, oranges, ...), a shade per run in it."""
    maps = ["Blues", "Oranges", "Greens", "Reds", "Purples", "Greys"]
    members = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    colours = [None] * len(groups)
    for g, indices in enumerate(members.values()):
        cmap = plt.get_cmap(maps[g % len(maps)])
        for k, i in enumerate(indices):  # from mid to full strength: never near white
            colours[i] = cmap(0.45 + 0.55 * k / max(1, len(indices) - 1))
    return colours


def data_note(runs):
    """A title for runs on tools/toydata.py's images ('toy data: ...'), or None."""
    marks = set()
    for run in runs:
        data = (run["args"] or {}).get("data")
        path = os.path.join(data, "toydata.json") if isinstance(data, str) else ""
        try:
            with open(path) as f:
                toy = json.load(f)
            marks.add((toy["train_images"], toy["val_images"], toy["size"], toy["classes"],
                       run["args"].get("img_size")))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not all on toy data
    if len(marks) != 1:
        return None
    train, val, size, classes, img_size = marks.pop()
    return (f"toy data (tools/toydata.py), not ImageNet: {train} train / {val} val images of "
            f"{size}x{size} px, {classes} classes, trained at {img_size}x{img_size}\nthe "
            f"machinery at toy scale, not the paper's result (the README says why ViT_C can "
            f"trail here)")


def save_figure(fig, path):
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise RunError(f"cannot write {path} ({e.strerror or e})") from None
    except (RuntimeError, ValueError) as e:  # a format that needs what is missing (.pgf: LaTeX)
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise RunError(f"cannot write {path} (matplotlib: {reason})") from None
    finally:
        pyplot().close(fig)


def figure_path(out, name="curves.png"):
    """The file that --out names: `name` in it if it is a folder; else itself, its extension
    one that matplotlib writes (png, pdf, svg, ...: it picks the format), .png added if it has
    none (as savefig would add it, unsaid)."""
    if os.path.isdir(out):
        return os.path.join(out, name)
    if out.endswith(("/", os.sep)):
        raise RunError(f"--out {out}: no such folder")
    extension = os.path.splitext(out)[1][1:]
    pyplot()
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # the backend pyplot() chose
    formats = FigureCanvasAgg.get_supported_filetypes()
    if extension and extension.lower() not in formats:
        raise RunError(f"--out {out}: matplotlib writes no .{extension} files; name a folder or "
                       f"a file ending in .{', .'.join(sorted(formats))}")
    return out if extension else f"{out}.png"


def unique_labels(runs):
    """describe() of each run, with its folder name added where two runs would share a label."""
    labels = [describe(run["args"]) for run in runs]
    return [f"{label} ({os.path.basename(os.path.normpath(run['folder']))})"
            if labels.count(label) > 1 else label for run, label in zip(runs, labels)]


def main(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_FOLDER", help="train.py run folders")
    parser.add_argument("--out", default="curves.png",
                        help="the figure to write, its extension the format (.png, .pdf, .svg "
                             "and the others matplotlib writes; .png if none), or an existing "
                             "folder to write curves.png in")
    args = parser.parse_args(argv)
    runs = [read_run(folder) for folder in args.runs]
    path = figure_path(args.out)
    plot_runs(runs, unique_labels(runs), path, note=data_note(runs))
    print(f"wrote {path}: {len(runs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "plot.py"))
