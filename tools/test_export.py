"""Tests of tools/export.py and of the README's torchvision and timm sections (CPU, seconds).

One 1-epoch train.py run on a few generated JPEGs serves every test that needs a run; its
folder is deleted at the end (a checkpoint of ViT_C-1GF is ~75 MB).
"""

import json
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms as T

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # the repository and tools/, however pytest was started
import export  # noqa: E402
import train  # noqa: E402
import vitc  # noqa: E402
from test_vitc import readme_python_blocks, write_images  # noqa: E402

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


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path):  # exports are ~17 MB each
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def export_in_process(argv, capsys):
    """(exit status, stdout, stderr lines) of tools/export.py run in this process."""
    capsys.readouterr()
    code = export.cli(export.main, "export.py", [str(a) for a in argv])
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


def assert_same_logits(ours, theirs, img_size=IMG_SIZE):
    x = torch.randn(4, 3, img_size, img_size, dtype=torch.float64)
    for train_mode in (True, False):  # BatchNorm's batch statistics, then its running ones
        ours.train(train_mode)
        theirs.train(train_mode)
        with torch.no_grad():
            expected, actual = ours(x), theirs(x)
        assert expected.abs().max() > 0.1
        assert torch.allclose(actual, expected, rtol=1e-9, atol=1e-9), train_mode


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
    proc = subprocess.run([sys.executable, str(HERE / "export.py"), str(run), "--to",
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
    (block,) = readme_python_blocks("Exporting a trained model to torchvision")
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
    torch.save({"model": checkpoint["model"], "ema": None,
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
            torch.save(contents, tmp_path / name)
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
         f"--out {path['missing.pt'] / 'out.pt'}: cannot write it (No such file or directory)"),
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


# ------------------------------------------------------------------------------------------------
# The README's conv stem in torchvision and in timm
# ------------------------------------------------------------------------------------------------


def test_readme_torchvision_conv_stem_configs_build_our_vitc_models(capsys):
    from torchvision.models.vision_transformer import VisionTransformer
    (block,) = readme_python_blocks("The conv stem in torchvision")
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
    (block,) = readme_python_blocks("The conv stem in timm")
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
