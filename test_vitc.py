"""Tests for vitc.py (the models, complexity, optimizer and schedule) and train.py (the recipe,
DDP, checkpoints, bad input). CPU only; run with `python -m pytest -q`."""

import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import train
import vitc

HERE = Path(__file__).resolve().parent
SIZES = ["1gf", "4gf", "18gf", "36gf"]


def small(name, img_size=32, num_classes=10, seed=0):
    torch.manual_seed(seed)
    return vitc.create_model(name, num_classes=num_classes, img_size=img_size)


# ------------------------------------------------------------------------------------------------
# Shapes and stems
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(vitc.VARIANTS))
def test_every_variant_output_shape_at_224(name):
    with torch.device("meta"):  # full-size models without allocating or computing anything
        model = vitc.create_model(name)
        out = model(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    assert model.pos_embed.shape == (1, 1 + 14 * 14, vitc.VARIANTS[name].dim)


@pytest.mark.parametrize("name", ["vitp_1gf", "vitc_1gf", "vitp_4gf", "vitc_4gf"])
@pytest.mark.parametrize("img_size", [16, 48])
def test_real_forward_small_images(name, img_size):
    out = small(name, img_size=img_size)(torch.randn(3, 3, img_size, img_size))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("img_size", [16, 64, 224])
def test_both_stems_give_the_same_token_grid(size, img_size):
    p, c = vitc.VARIANTS[f"vitp_{size}"], vitc.VARIANTS[f"vitc_{size}"]
    patchify = vitc.PatchifyStem(p.dim)
    conv = vitc.ConvStem(c.dim, c.stem_channels, c.stem_strides)
    assert patchify.stride == conv.stride == 16
    with torch.device("meta"):
        x = torch.empty(2, 3, img_size, img_size)
        shape = (2, p.dim, img_size // 16, img_size // 16)
        assert patchify.to("meta")(x).shape == conv.to("meta")(x).shape == shape


@pytest.mark.parametrize("size", SIZES)
def test_conv_stem_is_conv_bn_relu_then_a_bare_1x1(size):
    cfg = vitc.VARIANTS[f"vitc_{size}"]
    layers = list(vitc.ConvStem(cfg.dim, cfg.stem_channels, cfg.stem_strides).layers)
    assert len(layers) == 3 * len(cfg.stem_channels) + 1
    for i, (out, stride) in enumerate(zip(cfg.stem_channels, cfg.stem_strides)):
        conv, bn, relu = layers[3 * i: 3 * i + 3]
        assert isinstance(conv, nn.Conv2d) and conv.bias is None
        assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (stride, stride), (1, 1))
        assert conv.out_channels == out
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == out
        assert isinstance(relu, nn.ReLU)
    last = layers[-1]
    assert isinstance(last, nn.Conv2d) and last.kernel_size == (1, 1) and last.bias is not None
    assert last.out_channels == cfg.dim


def test_conv_stem_strides_follow_the_paper_rule():
    for name, cfg in vitc.VARIANTS.items():  # stride 2 doubles the channels, stride 1 keeps them
        chans = (cfg.stem_channels[0] // 2, *cfg.stem_channels) if cfg.stem_channels else ()
        for c_in, c_out, s in zip(chans, chans[1:], cfg.stem_strides):
            assert c_out == c_in * s, name
        assert math.prod(cfg.stem_strides) in (1, 16)


def test_vitc_rows_derive_from_vitp_rows():
    for size in SIZES:
        p, c = vitc.VARIANTS[f"vitp_{size}"], vitc.VARIANTS[f"vitc_{size}"]
        assert (c.dim, c.heads, c.mlp_dim, c.depth) == (p.dim, p.heads, p.mlp_dim, p.depth - 1)
        assert c.stem_channels and not p.stem_channels


def test_readme_python_examples_run():
    readme = (HERE / "README.md").read_text()
    blocks = readme.split("```python\n")[1:]
    assert len(blocks) == 2
    for block in blocks:
        exec(block.split("```")[0], {})


def test_conv_stem_can_be_pasted_alone():
    # ConvStem's source must run with nothing but math and torch.nn in scope.
    namespace = {"math": math, "nn": nn}
    exec(inspect.getsource(vitc.ConvStem), namespace)
    stem = namespace["ConvStem"](64, channels=(16, 32, 64, 128), strides=(2, 2, 2, 2))
    assert stem(torch.randn(2, 3, 32, 32)).shape == (2, 64, 2, 2)


# ------------------------------------------------------------------------------------------------
# Complexity
# ------------------------------------------------------------------------------------------------


def meta_complexity(name, **kwargs):
    with torch.device("meta"):
        return vitc.complexity(vitc.create_model(name, **kwargs))


@pytest.mark.parametrize("size", SIZES)
def test_flop_param_activation_parity_between_stems(size):
    # The paper's design point: ViT_C and ViT_P of one size match in flops and activations (within
    # 3% here) and in parameters (within 7%: the conv stem is lighter than the dropped block).
    p, c = meta_complexity(f"vitp_{size}"), meta_complexity(f"vitc_{size}")
    for key, tolerance in [("flops", 0.03), ("acts", 0.03), ("params", 0.07)]:
        assert abs(c[key] / p[key] - 1) < tolerance, (key, p[key], c[key])


@pytest.mark.parametrize("size, gigaflops", [("1gf", 1), ("4gf", 4), ("18gf", 18), ("36gf", 36)])
def test_variants_have_their_nominal_flops(size, gigaflops):
    for stem in ("vitp", "vitc"):
        assert abs(meta_complexity(f"{stem}_{size}")["flops"] / 1e9 / gigaflops - 1) < 0.1


@pytest.mark.parametrize("name", ["vitp_1gf", "vitc_1gf", "vitp_4gf", "vitc_4gf"])
def test_complexity_flops_agree_with_torch_flop_counter(name):
    model = small(name, img_size=48).eval()
    # The math backend runs attention as plain matmuls, which every torch version counts; before
    # torch 2.15, FlopCounterMode counted nothing for the CPU flash-attention kernel.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 48, 48))
    # FlopCounterMode counts 2 flops per multiply-add and no bias adds.
    assert 2 * vitc.complexity(model, bias_flops=False)["flops"] == counter.get_total_flops()


def test_complexity_counts_biases_params_and_acts_exactly():
    model = small("vitp_1gf", img_size=32)  # 2x2 grid: N = 5 tokens, d = 192, 10 classes
    n, d, m, blocks = 5, 192, 576, 12
    per_block_flops = n * (d * 3 * d + d * d + 2 * d * m) + 2 * n * n * d
    per_block_biases = n * (3 * d + d + m + d)
    stem_flops, stem_biases = 4 * (16 * 16 * 3 * d), 4 * d
    head_flops, head_biases = d * 10, 10
    cx, no_bias = vitc.complexity(model), vitc.complexity(model, bias_flops=False)
    assert no_bias["flops"] == blocks * per_block_flops + stem_flops + head_flops
    assert cx["flops"] - no_bias["flops"] == blocks * per_block_biases + stem_biases + head_biases
    assert cx["params"] == sum(p.numel() for p in model.parameters())
    per_block_acts = n * (3 * d + d + m + d) + 3 * n * n + n * d  # linears, QK^T, AV
    assert cx["acts"] == blocks * per_block_acts + 4 * d + 10


def test_complexity_leaves_the_model_untouched():
    model = small("vitc_1gf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vitc.complexity(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------------
# Initialisation (PAPER.md, official code)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vitp_1gf", "vitc_1gf"])
def test_initialisation_matches_the_official_code(name):
    model = small(name, img_size=224, num_classes=1000)
    assert (model.head.weight == 0).all() and (model.head.bias == 0).all()
    assert (model.cls_token == 0).all()
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.03)
    for block in model.blocks:
        assert (block.attn.qkv.bias == 0).all() and (block.attn.proj.bias == 0).all()
        bound = math.sqrt(6 / (192 + 3 * 192))  # Xavier-uniform over the fused 3d x d matrix
        assert block.attn.qkv.weight.abs().max() <= bound
        assert block.attn.qkv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
        for fc in (block.mlp.fc1, block.mlp.fc2):
            assert 0 < fc.bias.std().item() < 3e-6
    for norm in [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d))]:
        assert (norm.weight == 1).all() and (norm.bias == 0).all()
    if isinstance(model.stem, vitc.PatchifyStem):
        w = model.stem.proj.weight  # fan_in 3 x 16 x 16 = 768
        assert w.std().item() == pytest.approx(math.sqrt(1 / 768), rel=0.03)
        assert (model.stem.proj.bias == 0).all()
    else:
        convs = [m for m in model.stem.modules() if isinstance(m, nn.Conv2d)]
        for conv in convs[:-1]:
            expected = math.sqrt(2 / conv.out_channels)
            assert conv.weight.std().item() == pytest.approx(expected, rel=0.15)
        assert convs[-1].weight.std().item() == pytest.approx(math.sqrt(1 / 192), rel=0.05)
        assert (convs[-1].bias == 0).all()


# ------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vitp_1gf", "vitc_1gf"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_no_decay_group_is_exactly_norm_gains_and_biases(name, optimizer):
    model = small(name)
    opt = vitc.make_optimizer(model, optimizer, lr=0.1, weight_decay=0.05)
    norm_types = (nn.LayerNorm, nn.BatchNorm2d)
    expected = {f"{mname}.{pname}" if mname else pname
                for mname, module in model.named_modules()
                for pname, _ in module.named_parameters(recurse=False)
                if pname == "bias" or isinstance(module, norm_types)}
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = opt.param_groups
    assert {names[id(p)] for p in no_decay["params"]} == expected
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - expected
    assert {"pos_embed", "cls_token", "head.weight"} <= {names[id(p)] for p in decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert decay["fused"]  # the CPU has fused kernels for both optimizers
    if optimizer == "sgd":
        assert decay["momentum"] == 0.9 and decay["nesterov"]
    else:
        assert decay["betas"] == (0.9, 0.999)


def test_schedule_warmup_peak_and_floor():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = vitc.make_scheduler(opt, total_steps=101, warmup_steps=10)  # cosine over steps 10..100
    lrs = []
    for _ in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2)  # warmup starts at 0.1x the peak
    assert lrs[5] == pytest.approx(0.2 + 1.8 * 5 / 10)  # linear
    assert lrs[10] == pytest.approx(2.0) and max(lrs) == pytest.approx(2.0)  # peak after warmup
    assert lrs[-1] == pytest.approx(2.0 * 0.005)  # the last step uses the floor
    assert lrs[55] == pytest.approx(2.0 * (0.005 + 0.995 * 0.5 * (1 + math.cos(math.pi / 2))))
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a > b for a, b in zip(lrs[10:-1], lrs[11:]))


def test_linear_scaling_rule():
    assert vitc.scale_lr(1e-3, 2048) == pytest.approx(1e-3)
    assert vitc.scale_lr(1e-3, 256) == pytest.approx(1.25e-4)


@pytest.mark.parametrize("name", ["vitp_1gf", "vitc_1gf"])
@pytest.mark.parametrize("optimizer, lr", [("adamw", 1e-3), ("sgd", 0.1)])
def test_one_step_lowers_the_loss(name, optimizer, lr):
    model = small(name)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    opt = vitc.make_optimizer(model, optimizer, lr=lr, weight_decay=0.05)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert F.cross_entropy(model(x), y).item() < loss.item()


# ------------------------------------------------------------------------------------------------
# Bad arguments get clear errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(channels=(24, 48), strides=(2,)), "equal length"),
    (dict(channels=(), strides=()), "non-empty"),
    (dict(channels=(24, 48), strides=(2, 3)), "1 or 2"),
    (dict(channels=(24, 0), strides=(2, 2)), "positive"),
])
def test_conv_stem_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vitc.ConvStem(192, **kwargs)


def test_wrong_input_size_names_both_sizes():
    with pytest.raises(ValueError, match=r"input is 64x48 .* built for 32x32"):
        small("vitc_1gf")(torch.randn(1, 3, 64, 48))


def test_create_model_rejects_unknown_names_and_sizes():
    with pytest.raises(ValueError, match="vitp_1gf, vitp_4gf.*vitc_36gf"):
        vitc.create_model("vit_b16")
    with pytest.raises(ValueError, match="multiple of 16"):
        vitc.create_model("vitc_1gf", img_size=40)
    with pytest.raises(ValueError, match="not divisible by heads"):
        vitc.ViT(vitc.PatchifyStem(100), dim=100, depth=1, heads=3, mlp_dim=10)
    with pytest.raises(ValueError, match="not a multiple of the stem's total stride"):
        vitc.ViT(vitc.ConvStem(64, (8, 16, 32), (2, 2, 2)), 64, 1, 1, 64, img_size=36)


def test_factories_reject_bad_arguments():
    model = small("vitp_1gf")
    with pytest.raises(ValueError, match="adamw, sgd"):
        vitc.make_optimizer(model, "lamb", lr=1e-3, weight_decay=0.1)
    opt = vitc.make_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        vitc.make_scheduler(opt, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="floor"):
        vitc.make_scheduler(opt, total_steps=10, warmup_steps=1, floor=2.0)


# ------------------------------------------------------------------------------------------------
# train.py: runs on a tiny ImageFolder of generated JPEGs
# ------------------------------------------------------------------------------------------------

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = ("cat", "dog", "fox"), 8, 3  # 9 val: odd, for 2 ranks


def write_images(folder, count, seed):
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.jpg")


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    for c, name in enumerate(CLASSES):
        write_images(root / "train" / name, TRAIN_PER_CLASS, seed=c)
        write_images(root / "val" / name, VAL_PER_CLASS, seed=100 + c)
    return root


def tiny(data, out, *extra):
    """Arguments of a run that takes seconds: 32 px, global batch 8, 3 steps per epoch."""
    return ["--data", str(data), "--out", str(out), "--model", "vitc_1gf", "--img-size", "32",
            "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--ema-period", "1",
            "--workers", "0", *extra]


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def torchrun_two_ranks(argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "train.py"), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="session")
def full_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert train.cli(tiny(data, out, "--workers", "1")) == 0
    return out


def test_single_process_run_writes_checkpoint_args_and_log(full_run):
    args = json.loads((full_run / "args.json").read_text())
    assert args["model"] == "vitc_1gf" and args["lr"] == 1e-3 and args["wd"] == 0.24
    log = read_log(full_run)
    assert [r["epoch"] for r in log] == [1, 2] and log[-1]["step"] == 2 * 3
    for record in log:
        for key in ("lr", "train_loss", "val_top1", "val_top5", "ema_top1", "ema_top5",
                    "epoch_time", "images_per_sec"):
            assert math.isfinite(record[key]), key
        assert record["val_images"] == len(CLASSES) * VAL_PER_CLASS
    ckpt = load(full_run / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (2, 6) and ckpt["args"]["model"] == "vitc_1gf"
    assert ckpt["scheduler"]["last_epoch"] == 6 and len(ckpt["rng"]) == 1
    model = vitc.create_model("vitc_1gf", num_classes=3, img_size=32)
    model.load_state_dict(ckpt["model"])  # plain keys: unwrapped, uncompiled
    assert load(full_run / "best.pt")["model"].keys() == ckpt["ema"].keys()
    assert not list(full_run.glob("*.tmp"))


def test_resume_after_epoch_1_gives_the_same_weights(data, full_run, tmp_path):
    assert train.cli(tiny(data, tmp_path, "--workers", "1", "--stop-after", "1")) == 0
    assert load(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert train.cli(tiny(data, tmp_path, "--workers", "1", "--resume", "auto")) == 0
    resumed, full = load(tmp_path / "checkpoint.pt"), load(full_run / "checkpoint.pt")
    for part in ("model", "ema"):
        for key, value in full[part].items():
            assert torch.equal(resumed[part][key], value), (part, key)
    assert read_log(tmp_path) == [dict(r, epoch_time=r2["epoch_time"],
                                       images_per_sec=r2["images_per_sec"])
                                  for r, r2 in zip(read_log(full_run), read_log(tmp_path))]


def test_torchrun_two_ranks_counts_every_val_image_once(data, tmp_path):
    # Two gloo ranks, with gradient accumulation (micro-batches of 2, DDP's no_sync path).
    proc = torchrun_two_ranks(tiny(data, tmp_path, "--epochs", "1", "--warmup-epochs", "0",
                                   "--accum-steps", "2", "--workers", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = read_log(tmp_path)
    assert record["val_images"] == len(CLASSES) * VAL_PER_CLASS  # 5 on rank 0, 4 on rank 1
    assert record["step"] == 3  # 24 images / global batch 8
    assert len(load(tmp_path / "checkpoint.pt")["rng"]) == 2
    assert proc.stdout.count("vitc_1gf:") == 1  # rank 1 prints nothing


def test_fake_data_runs(tmp_path):
    argv = ["--data", "fake", "--fake-size", "32", "--out", str(tmp_path), "--img-size", "32",
            "--batch-size", "16", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0",
            "--stem", "patch", "--size", "1gf", "--no-autoaugment"]
    assert train.cli(argv) == 0
    (record,) = read_log(tmp_path)
    assert record["val_images"] == 8 and record["step"] == 2


def test_mixup_targets_carry_no_label_smoothing():
    args = train.parse_args(["--data", "fake"])
    mix = train.build_mix(args, num_classes=10)
    torch.manual_seed(0)
    for _ in range(10):  # smoothing is left to the loss: mixed targets touch two classes at most
        _, targets = mix(torch.randn(6, 3, 8, 8), torch.arange(6))
        assert targets.shape == (6, 10) and torch.allclose(targets.sum(1), torch.ones(6))
        assert ((targets > 0).sum(1) <= 2).all()


def test_ema_update_blends_floats_and_copies_counters():
    model, ema = nn.BatchNorm2d(2), nn.BatchNorm2d(2)
    model.weight.data.fill_(3.0)
    model.num_batches_tracked += 5
    train.update_ema(ema, model, 0.5)
    assert torch.allclose(ema.weight, torch.full((2,), 2.0)) and ema.num_batches_tracked == 5


def run_failing(argv, capsys, training_started=False):
    """Runs train.py in-process, expecting exit status 2 and a one-line error (after the progress
    bars, when training had started)."""
    capsys.readouterr()
    code = train.cli(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "".join(lines), lines
    assert lines[-1].startswith("train.py: error: ") and (training_started or len(lines) == 1)
    return lines[-1]


def test_bad_data_folders_fail_before_training(data, tmp_path, capsys, monkeypatch):
    assert "no such folder" in run_failing(tiny(tmp_path / "missing", tmp_path / "o"), capsys)
    (tmp_path / "only_val" / "val").mkdir(parents=True)
    err = run_failing(tiny(tmp_path / "only_val", tmp_path / "o"), capsys)
    assert "only_val/train: missing" in err
    broken = tmp_path / "broken"
    write_images(broken / "train" / "a", 4, seed=0)
    (broken / "train" / "empty").mkdir()
    write_images(broken / "val" / "a", 2, seed=1)
    assert "empty" in run_failing(tiny(broken, tmp_path / "o"), capsys)
    monkeypatch.delenv("IMAGENET", raising=False)
    assert "--data fake" in run_failing(["--out", str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()  # nothing written before the checks passed


def test_bad_arguments_fail_with_one_line(data, tmp_path, capsys):
    err = run_failing(tiny(data, tmp_path, "--model", "vitc_2gf"), capsys)
    assert "unknown model 'vitc_2gf'" in err and "vitc_18gf" in err
    err = run_failing(tiny(data, tmp_path, "--batch-size", "10", "--accum-steps", "3"), capsys)
    assert "not divisible" in err
    assert "--epochs" in run_failing(tiny(data, tmp_path, "--warmup-epochs", "5"), capsys)
    assert "invalid choice" in run_failing(tiny(data, tmp_path, "--stem", "hybrid"), capsys)
    err = run_failing(tiny(data, tmp_path, "--model", "vitc_36gf", "--optimizer", "sgd"), capsys)
    assert "no SGD settings" in err
    assert "--ema-alpha" in run_failing(tiny(data, tmp_path, "--ema-alpha", "-1"), capsys)
    assert "--cutmix" in run_failing(tiny(data, tmp_path, "--cutmix", "nan"), capsys)
    assert "multiple of 16" in run_failing(tiny(data, tmp_path, "--img-size", "40"), capsys)
    (tmp_path / "file").write_text("")
    assert "not a folder" in run_failing(tiny(data, tmp_path / "file"), capsys)


def test_batch_not_divisible_by_world_size_under_torchrun(data, tmp_path):
    proc = torchrun_two_ranks(tiny(data, tmp_path, "--batch-size", "9"))
    assert proc.returncode != 0
    assert "--batch-size 9 is not divisible by world size 2" in proc.stderr


def test_resume_from_another_model_or_recipe_is_refused(data, full_run, tmp_path, capsys):
    resume = ["--resume", str(full_run / "checkpoint.pt")]
    err = run_failing(tiny(data, tmp_path, "--model", "vitp_1gf", *resume), capsys)
    assert "checkpoint has model=vitc_1gf, this run has model=vitp_1gf" in err
    err = run_failing(tiny(data, tmp_path, "--batch-size", "4", *resume), capsys)
    assert "checkpoint has batch_size=8, this run has batch_size=4" in err
    err = run_failing(tiny(data, tmp_path, "--optimizer", "sgd", *resume), capsys)
    assert "checkpoint has optimizer=adamw" in err
    err = run_failing(tiny(data, tmp_path, "--resume", str(full_run / "best.pt")), capsys)
    assert "not a train.py checkpoint" in err
    err = run_failing(tiny(data, tmp_path, "--resume", str(tmp_path / "nope.pt")), capsys)
    assert "no such file" in err


def test_a_new_run_never_overwrites_an_old_one(data, full_run, capsys):
    before = (full_run / "checkpoint.pt").read_bytes()
    assert "already holds a run" in run_failing(tiny(data, full_run), capsys)
    assert (full_run / "checkpoint.pt").read_bytes() == before


def test_warmup_rounding_never_reaches_the_last_step(data, tmp_path):
    # 3 steps in all; 0.9 warmup epochs round to 3 steps, clipped to 2 so the cosine keeps a step
    assert train.cli(tiny(data, tmp_path, "--epochs", "1", "--warmup-epochs", "0.9")) == 0


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data, tmp_path, capsys, monkeypatch):
    assert train.cli(tiny(data, tmp_path, "--stop-after", "1")) == 0
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    err = run_failing(tiny(data, tmp_path, "--resume", "auto"), capsys, training_started=True)
    assert "loss is nan at step 4 (epoch 2)" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_sigterm_checkpoints_mid_epoch_and_resume_finishes(tmp_path):
    argv = ["--data", "fake", "--fake-size", "400", "--out", str(tmp_path), "--img-size", "32",
            "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0"]
    proc = subprocess.Popen([sys.executable, str(HERE / "train.py"), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "args.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # a few steps in
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out and "--resume auto" in out
    ckpt = load(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 0 and 0 < ckpt["step"] < 100
    assert train.cli([*argv, "--resume", "auto"]) == 0
    (record,) = read_log(tmp_path)
    assert record["epoch"] == 1 and record["step"] == 100  # the remaining steps, not a restart
