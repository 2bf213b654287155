"""A train.py run as torchvision's VisionTransformer (a tool, not part of the paper).

    python tools/export.py runs/vitc_1gf-20261124-101500 --to torchvision --out vitc_1gf-tv.pt
    python tools/export.py runs/vitc_1gf-20261124-101500/checkpoint.pt --weights model \\
        --to torchvision --out vitc_1gf-last-model-tv.pt

The input is a run folder (its best.pt: the best EMA weights, or the model's for a run with
--no-ema), a best.pt, or a checkpoint.pt (the last epoch's weights: the EMA's, or the model's
with --weights model). The output is {"state_dict": ..., "kwargs": ...}, which
torch.load(FILE, weights_only=True) reads in a project that has only torch and torchvision:
`kwargs` are VisionTransformer's constructor arguments in plain types, with conv_stem_configs a
list of dicts of ConvStemConfig fields (None for a ViT_P). torchvision's defaults give the rest:
BatchNorm and ReLU after each 3x3 stem convolution, LayerNorm eps 1e-6, no dropout.

    import torch
    from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer
    saved = torch.load("vitc_1gf-tv.pt", weights_only=True)
    stem = saved["kwargs"].pop("conv_stem_configs")  # None for a ViT_P
    model = VisionTransformer(**saved["kwargs"],
                              conv_stem_configs=stem and [ConvStemConfig(**c) for c in stem])
    model.load_state_dict(saved["state_dict"])

This module is also the one place that knows how our ViT maps onto torchvision's:
torchvision_twin() builds torchvision's model of a variant and torchvision_state_dict() renames
our weights for it; tools/bench.py and the tests use both.
"""

import os
import re
import stat
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the repository and tools/, wherever run from
from runsafe.errors import Parser, RunError, run_cli  # noqa: E402  (as train.py's)
from runsafe import checkpoint  # noqa: E402
from runsafe.folder import save_atomic  # noqa: E402

import vitc  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Our ViT as torchvision's VisionTransformer: constructor arguments and parameter names
# ------------------------------------------------------------------------------------------------


def torchvision_kwargs(name, img_size=224, num_classes=1000):
    """VisionTransformer's constructor arguments for the paper's model `name`, in plain types.

    Left out where torchvision's defaults already are the paper's: LayerNorm eps 1e-6 (the
    official configs' LN.EPS), no dropout, BatchNorm and ReLU after each 3x3 stem convolution;
    torchvision adds the stem's final 1x1 convolution to hidden_dim itself. patch_size is 16 for
    both stems: with a conv stem torchvision uses it only for the token grid (image_size //
    patch_size), which the product of the strides, 16, also gives."""
    cfg = vitc.VARIANTS[name]
    stem = [{"out_channels": channels, "kernel_size": 3, "stride": stride}
            for channels, stride in zip(cfg.stem_channels, cfg.stem_strides)]
    return {"image_size": img_size, "patch_size": 16, "num_layers": cfg.depth,
            "num_heads": cfg.heads, "hidden_dim": cfg.dim, "mlp_dim": cfg.mlp_dim,
            "num_classes": num_classes, "conv_stem_configs": stem or None}


def build_torchvision(kwargs):
    """torchvision's VisionTransformer from `kwargs` as this tool writes them (the README's
    loading lines): the stem's dicts become ConvStemConfigs."""
    from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer
    kwargs = dict(kwargs)
    stem = kwargs.pop("conv_stem_configs")
    return VisionTransformer(**kwargs,
                             conv_stem_configs=stem and [ConvStemConfig(**c) for c in stem])


def torchvision_twin(name, img_size=224, num_classes=1000):
    """torchvision's VisionTransformer with the width, depth, heads, MLP and stem of `name`."""
    return build_torchvision(torchvision_kwargs(name, img_size, num_classes))


# vitc.ViT's parameter names -> torchvision's (torchvision/models/vision_transformer.py), in order.
RENAMES = [(r"^stem\.proj\.", "conv_proj."), (r"^cls_token$", "class_token"),
           (r"^pos_embed$", "encoder.pos_embedding"), (r"^norm\.", "encoder.ln."),
           (r"^head\.", "heads.head."),
           (r"^blocks\.(\d+)\.", r"encoder.layers.encoder_layer_\1."),
           (r"\.norm1\.", ".ln_1."), (r"\.norm2\.", ".ln_2."),
           (r"\.attn\.qkv\.(weight|bias)$", r".self_attention.in_proj_\1"),  # both fused q, k, v
           (r"\.attn\.proj\.", ".self_attention.out_proj."),
           (r"\.mlp\.fc1\.", ".mlp.0."), (r"\.mlp\.fc2\.", ".mlp.3.")]


def torchvision_state_dict(state_dict):
    """A vitc.ViT's state dict under the names of torchvision's VisionTransformer (same tensors).

    Our conv stem is one Sequential [conv, bn, relu] x n + 1x1 conv; torchvision's holds
    conv_bn_relu_0 ... conv_bn_relu_{n-1} (each Sequential(conv, bn, relu)) and conv_last."""
    stem = [re.match(r"stem\.layers\.(\d+)\.(.*)", key) for key in state_dict]
    last = max((int(match[1]) for match in stem if match), default=None)  # the 1x1 conv
    renamed = {}
    for match, (key, value) in zip(stem, state_dict.items()):
        if match:
            layer, rest = int(match[1]), match[2]
            block, position = divmod(layer, 3)
            key = (f"conv_proj.conv_last.{rest}" if layer == last
                   else f"conv_proj.conv_bn_relu_{block}.{position}.{rest}")
        for pattern, replacement in RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


# ------------------------------------------------------------------------------------------------
# Reading a run's weights
# ------------------------------------------------------------------------------------------------


def read_run_file(source):
    """(path, contents) of a run folder's best.pt or of a checkpoint file, checked to be
    train.py's: weights with the arguments of the run that wrote them."""
    path = os.path.join(source, "best.pt") if os.path.isdir(source) else source
    if not os.path.exists(path):
        raise RunError(f"{source}: no best.pt in this folder (a run writes it at its first "
                        f"evaluation; its checkpoint.pt holds the last weights)"
                        if os.path.isdir(source) else f"{source}: no such file or folder")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise RunError(f"{path}: cannot read it ({e.strerror or e})") from None
    except Exception as e:  # pickle, zip or weights-only errors: not a torch checkpoint
        raise RunError(f"{path}: not a checkpoint (torch.load: {type(e).__name__})") from None
    if not (isinstance(contents, dict) and isinstance(contents.get("model"), dict)
            and isinstance(contents.get("args"), dict)):
        hint = (": it is already an export" if isinstance(contents, dict)
                and {"state_dict", "kwargs"} <= contents.keys() else "")
        raise RunError(f"{path}: not a train.py best.pt or checkpoint.pt (no model weights with "
                        f"the run's arguments){hint}")
    checkpoint.verify(path, contents)  # a damaged file is refused, not exported
    return path, contents


WHOSE = {"ema": "the EMA's", "model": "the model's"}


def choose_weights(path, contents, weights):
    """(state dict, "ema" or "model"): a checkpoint.pt holds the model's weights and the EMA's
    (None with --no-ema), a best.pt only those evaluated best."""
    if "ema" not in contents:  # best.pt: the EMA's weights, or the model's for a run without EMA
        held = "ema" if contents["args"].get("ema", True) else "model"
        if weights not in (None, held):
            raise RunError(f"{path}: a best.pt holds only {WHOSE[held]} weights; the run's "
                            f"checkpoint.pt holds {WHOSE[weights]} too")
        return contents["model"], held
    weights = weights or ("ema" if contents["ema"] is not None else "model")
    if contents[weights] is None:
        raise RunError(f"{path}: the run kept no EMA (--no-ema): pass --weights model")
    return contents[weights], weights


def check_model(path, state_dict, args):
    """(name, img_size, num_classes) of the run, its weights checked to be that model's."""
    name, img_size, num_classes = (args.get(k) for k in ("model", "img_size", "num_classes"))
    if name not in vitc.VARIANTS:
        raise RunError(f"{path}: a checkpoint of another model ({name!r}); this project's are "
                        f"{', '.join(vitc.VARIANTS)}")
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            expected = vitc.create_model(name, num_classes, img_size).state_dict()
    except (TypeError, ValueError) as e:
        raise RunError(f"{path}: the run's arguments do not make a {name} ({e})") from None
    found = {key: tuple(getattr(value, "shape", ())) for key, value in state_dict.items()}
    differences = ([f"missing {k}" for k in expected if k not in found]
                   + [f"unexpected {k}" for k in found if k not in expected]
                   + [f"{k} is {list(found[k])}, not {list(v.shape)}" for k, v in expected.items()
                      if k in found and found[k] != tuple(v.shape)])
    if differences:
        raise RunError(f"{path}: the weights of another model: not {name}'s at {img_size} px "
                        f"with {num_classes} classes ({'; '.join(differences[:2])}"
                        f"{f'; {len(differences) - 2} more' if len(differences) > 2 else ''})")
    return name, img_size, num_classes


# ------------------------------------------------------------------------------------------------
# Where the export may go
# ------------------------------------------------------------------------------------------------

RUN_FILES = ("checkpoint.pt", "best.pt")  # what makes a folder a train.py run's
KINDS = [(stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"),
         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
         (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")]


def is_export(path):
    """Whether `path` is an earlier export: a torch file that torch.load(weights_only=True)
    reads as a dict of exactly "state_dict" and "kwargs" (what main() writes; exports of every
    version of this tool are). Memory-mapped: only the header is read."""
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch zip file, not readable, not weights only: not ours
        return False
    return isinstance(contents, dict) and contents.keys() == {"state_dict", "kwargs"}


def check_out(out, force):
    """Refuses an --out whose replacement would lose something: a path that is not a regular
    file (save_atomic's rename would put a file in place of a device, a link or a pipe), a file
    in a run folder (its checkpoint.pt, best.pt or logs), or, without --force, an existing file
    that is not an earlier export."""
    folder = os.path.dirname(os.path.abspath(out))
    held = [name for name in RUN_FILES if os.path.lexists(os.path.join(folder, name))]
    if held:
        raise RunError(f"--out {out}: {folder} is a train.py run folder (it holds "
                       f"{' and '.join(held)}): write the export outside it")
    try:
        mode = os.lstat(out).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise RunError(f"--out {out}: cannot look at it ({e.strerror or e})") from None
    kind = next((what for test, what in KINDS if test(mode)), None)
    if kind or not stat.S_ISREG(mode):
        raise RunError(f"--out {out} is {kind or 'not a regular file'}: name a file to write")
    if not force and os.path.getsize(out) and not is_export(out):
        raise RunError(f"--out {out} exists and is not an earlier export: pass --force to "
                       f"replace it")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", metavar="RUN_FOLDER_OR_CHECKPOINT",
                        help="a train.py run folder (its best.pt), a best.pt or a checkpoint.pt")
    parser.add_argument("--to", required=True, choices=["torchvision"],
                        help="the library whose model the weights are written for")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="the file to write: a new one, an empty one, or an earlier export "
                             "(a torch file of exactly the keys state_dict and kwargs, as this "
                             "tool writes), which is replaced; never a folder, link, device or "
                             "pipe, nor a file in a run folder (one holding checkpoint.pt or "
                             "best.pt)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out also when it is another file (still never one of "
                             "the paths refused above)")
    parser.add_argument("--weights", choices=["ema", "model"],
                        help="of a checkpoint.pt: the EMA's (default, where the run kept one) "
                             "or the model's; a best.pt holds only those evaluated best")
    args = parser.parse_args(argv)
    path, contents = read_run_file(args.source)
    if os.path.abspath(args.out) == os.path.abspath(path):
        raise RunError(f"--out {args.out} is the input: choose another file")
    check_out(args.out, args.force)
    state_dict, weights = choose_weights(path, contents, args.weights)
    name, img_size, num_classes = check_model(path, state_dict, contents["args"])
    export = {"state_dict": torchvision_state_dict(state_dict),
              "kwargs": torchvision_kwargs(name, img_size, num_classes)}
    save_atomic(args.out, lambda f: torch.save(export, f))
    epoch, top1 = contents.get("epoch"), contents.get("top1")
    print(f"wrote {args.out}: {name} ({img_size} px, {num_classes} classes) for torchvision's "
          f"VisionTransformer, {WHOSE[weights]} weights of "
          f"{os.path.basename(path)} (epoch {epoch}"
          + (f", val top-1 {top1:.2f}%)" if isinstance(top1, (int, float)) else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "export.py"))
