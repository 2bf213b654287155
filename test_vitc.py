"""Tests for vitc.py (the models, complexity, optimizer and schedule) and train.py (the recipe,
DDP, checkpoints, bad input). CPU only; run with `python -m pytest -q`, which also runs the tools'
tests (tools/test_tools.py).

Sections, in order:
- Shapes and stems: every variant's output, the token grid of both stems, the pasted ConvStem,
  the same logits as torchvision's VisionTransformer.
- Complexity: flop/param/activation parity, the nominal flops, torch's flop counter agrees.
- Initialisation: as the official code.
- Optimizer and schedule: no decay on norms and biases, warmup/peak/floor, linear scaling.
- Bad arguments get clear errors (vitc.py).
- train.py, the recipe's pieces: AutoAugment v0, lighting, precise BN, defaults, mixup, EMA.
- train.py runs, on generated JPEGs: checkpoints and exact resume, DDP, bad input and files,
  signals, divergence, full disks, the per-step checks, provenance.
- train.py's GPU settings, on the CPU: fp16 with loss scaling, torch.compile (also under DDP).
- train.py learns: both 1GF models far above chance.
"""

import argparse
import collections
import contextlib
import copy
import datetime
import errno
import fcntl
import functools
import hashlib
import importlib.util
import inspect
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import train
import vitc
from runsafe import checkpoint, folder, monitor, signals
from runsafe import dist as rdist
from runsafe.images import ImageFiles
from runsafe import run as runrun
from runsafe.errors import FolderInUse, RunError
from runsafe.monitor import CHECK_EVERY

HERE = Path(__file__).resolve().parent
SIZES = ["1gf", "4gf", "18gf", "36gf"]
# The slow tests (learning runs, torch.compile, torchrun, a real Slurm) run with VITC_SLOW=1, as
# bash .ci/run does; `python -m pytest -q` alone runs the others in about two minutes.
slow = pytest.mark.skipif(not os.environ.get("VITC_SLOW"), reason="slow: VITC_SLOW=1 runs it")


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


DOCS_STEM = "docs/conv-stem-elsewhere.md"  # the conv stem in torchvision and timm, the export


def readme_python_blocks(heading=None, path="README.md"):
    """The ```python blocks of README.md (or of `path`, e.g. a docs/ page), or those of the
    section titled `heading` (up to the next ## or ### heading): tests find their block by its
    section, wherever it moves."""
    text = (HERE / path).read_text()
    if heading is not None:
        text = re.split(rf"^##+ {re.escape(heading)}\n", text, flags=re.M)[1]
        text = re.split(r"^##+ ", text, flags=re.M)[0]
    return [block.split("```")[0] for block in text.split("```python\n")[1:]]


def test_readme_python_examples_run():
    # Every python block of the README and docs/ is run by a test: this one, the pasted ConvStem
    # below, and tools/test_tools.py's torchvision, timm and export blocks (docs/).
    assert len(readme_python_blocks()) == 2
    assert len(readme_python_blocks(path=DOCS_STEM)) == 3
    assert not any(readme_python_blocks(path=f"docs/{page.name}")
                   for page in (HERE / "docs").glob("*.md") if f"docs/{page.name}" != DOCS_STEM)
    exec(readme_python_blocks("The eight models")[0], {})  # the repository's API, run from here


def test_readme_conv_stem_is_vitc_s_and_runs_pasted_outside_the_repository(tmp_path):
    (block,) = readme_python_blocks("The conv stem")
    assert inspect.getsource(vitc.ConvStem) in block  # the README's copy is the real one
    script = tmp_path / "pasted.py"
    script.write_text(block)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = run([sys.executable, str(script)], cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "torch.Size([2, 196, 768])"


def test_conv_stem_can_be_pasted_alone():
    # ConvStem's source must run with nothing but math and torch.nn in scope.
    namespace = {"math": math, "nn": nn}
    exec(inspect.getsource(vitc.ConvStem), namespace)
    stem = namespace["ConvStem"](64, channels=(16, 32, 64, 128), strides=(2, 2, 2, 2))
    assert stem(torch.randn(2, 3, 32, 32)).shape == (2, 64, 2, 2)


def load_tool(name):
    """tools/NAME.py as a module (tools/ is not a package: the scripts run as files)."""
    spec = importlib.util.spec_from_file_location(name, HERE / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # one module, also for the tools that import it
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["vitp_1gf", "vitc_1gf", "vitc_18gf"])
def test_same_logits_as_torchvision_vision_transformer_with_our_weights(name):
    # An independent implementation of the same network: torchvision's VisionTransformer built
    # with our configuration (tools/export.py's twin), loaded with our (randomised) weights.
    ours = small(name, img_size=32, num_classes=7).double()
    with torch.no_grad():  # zero-initialised head and biases would make the check too easy
        for p in ours.parameters():
            p.normal_(0, 0.1)
        for bn in [m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]:
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    export = load_tool("export")  # the mapping tools/bench.py and tools/export.py use
    twin = export.torchvision_twin(name, img_size=32, num_classes=7).double()
    twin.load_state_dict(export.torchvision_state_dict(ours.state_dict()))  # strict: all placed
    assert_same_logits(twin, ours)


def assert_same_logits(expected_model, model, img_size=32):
    """Equal float64 logits on random images, in train mode (BatchNorm's batch statistics), then
    in eval mode (its running statistics); the logits must not be near zero."""
    x = torch.randn(4, 3, img_size, img_size, dtype=torch.float64)
    for train_mode in (True, False):
        expected_model.train(train_mode)
        model.train(train_mode)
        with torch.no_grad():
            expected, actual = expected_model(x), model(x)
        assert expected.abs().max() > 0.1
        assert torch.allclose(actual, expected, rtol=1e-9, atol=1e-9), train_mode


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
# Initialisation (official pycls/models/vit.py)
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


def test_both_stems_refuse_an_image_that_is_not_a_multiple_of_their_stride():
    # At 100 px a padded conv stem would give a 7x7 grid and patchify 6x6: neither is silent.
    conv, patchify = vitc.ConvStem(64, (8, 16, 32, 64), (2, 2, 2, 2)), vitc.PatchifyStem(64)
    for stem, name in ((conv, "ConvStem"), (patchify, "PatchifyStem")):
        with pytest.raises(ValueError, match=f"^{name}: a 100x96 input is not a multiple of"):
            stem(torch.randn(1, 3, 100, 96))
        assert stem(torch.randn(1, 3, 96, 112)).shape == (1, 64, 6, 7)


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
# train.py: the recipe's pieces (AutoAugment v0, lighting, precise BatchNorm, defaults)
# ------------------------------------------------------------------------------------------------


def test_autoaugment_v0_is_the_published_table():
    policy = train.AUTOAUGMENT_V0
    assert len(policy) == 25 and all(len(sub_policy) == 2 for sub_policy in policy)
    assert policy[0] == (("equalize", 0.8, 1), ("shear_y", 0.8, 4))
    assert policy[15] == (("rotate", 1.0, 7), ("translate_y", 0.8, 9))
    assert policy[24] == (("color", 0.8, 6), ("rotate", 0.4, 5))
    steps = [step for sub_policy in policy for step in sub_policy]
    assert {op for op, _, _ in steps} == set(train.AUTOAUGMENT_OPS)  # no op unused or missing
    assert all(0 <= p <= 1 and level in range(11) for _, p, level in steps)
    per_op = collections.defaultdict(lambda: [0, 0.0, 0])  # op: steps, probabilities, levels
    for op, probability, level in steps:
        per_op[op][0] += 1
        per_op[op][1] = round(per_op[op][1] + probability, 2)
        per_op[op][2] += level
    assert {op: tuple(v) for op, v in per_op.items()} == {  # the 25 published rows, summed up
        "auto_contrast": (2, 1.0, 9), "color": (9, 5.0, 37), "equalize": (12, 8.0, 55),
        "invert": (1, 0.4, 9), "posterize": (2, 1.2, 8), "rotate": (7, 4.6, 39),
        "shear_x": (2, 0.2, 9), "shear_y": (4, 2.6, 14), "solarize": (8, 4.6, 41),
        "solarize_add": (2, 1.4, 10), "translate_y": (1, 0.8, 9)}
    magnitude = train.autoaugment_magnitude
    assert magnitude("rotate", 10) == 30 and magnitude("shear_x", 10) == pytest.approx(0.3)
    assert magnitude("translate_y", 10) == pytest.approx(0.45)  # of the height
    assert (magnitude("solarize", 10), magnitude("solarize_add", 10)) == (256, 110)
    assert magnitude("posterize", 10) == 4  # bits
    assert magnitude("color", 0) == pytest.approx(0.1)
    assert magnitude("color", 10) == pytest.approx(1.9)
    signed = {op for op, (_, _, random_sign) in train.AUTOAUGMENT_OPS.items() if random_sign}
    assert signed == {"rotate", "shear_x", "shear_y", "translate_y"}


def test_autoaugment_v0_ops_at_their_official_magnitudes():
    gen = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=gen)

    def op(name, level):
        return train.AUTOAUGMENT_OPS[name][0](img, train.autoaugment_magnitude(name, level))
    assert torch.equal(op("posterize", 6), img & 0b11000000)  # int(4 * 0.6) = 2 bits
    assert torch.equal(op("posterize", 2), img & 0b10000000)  # int(0.8) = 0, but at least 1 bit
    assert torch.equal(op("solarize", 3), torch.where(img >= 76, 255 - img, img))  # int(76.8)
    assert torch.equal(op("solarize", 10), img)  # threshold 256: nothing to invert
    added = torch.where(img < 128, (img.int() + 33).clamp(max=255), img.int())  # int(110 * 0.3)
    assert torch.equal(op("solarize_add", 3), added.to(torch.uint8))
    assert torch.equal(op("color", 5), img)  # saturation factor 0.1 + 1.8 * 0.5 = 1
    grey = op("color", 0).int()
    assert (grey.max(0).values - grey.min(0).values).float().mean() < 0.2 * (
        img.int().max(0).values - img.int().min(0).values).float().mean()  # factor 0.1: greyish


def test_autoaugment_v0_geometric_ops_fill_grey_and_interpolate_bilinearly():
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    rotated = train.AUTOAUGMENT_OPS["rotate"][0](white, 30.0)
    assert rotated[:, 0, 0].tolist() == [128] * 3 and rotated[:, 16, 16].tolist() == [255] * 3
    assert ((rotated > 128) & (rotated < 255)).any()  # edges blended: bilinear, not nearest
    sheared = train.AUTOAUGMENT_OPS["shear_x"][0](white, 0.3)
    assert (sheared[:, 0] > 128).all()  # sheared about the top-left corner: row 0 ~stays
    assert (sheared[:, -1] == 128).sum() >= 3 * 8  # the bottom row moved by ~9 px: grey there
    shifted = train.AUTOAUGMENT_OPS["translate_y"][0](white, 0.45)  # 0.45 * 32 = 14 rows
    assert (shifted == 128).all(2).all(0).sum() == 14 and (shifted == 255).all(2).all(0).sum() == 18


def test_autoaugment_v0_geometric_ops_match_pil_affine_warps():
    # The official ops are PIL warps (bilinear, grey fill) of the same magnitude and sign.
    gen = torch.Generator().manual_seed(0)
    small = torch.randint(0, 256, (12, 14, 3), dtype=torch.uint8, generator=gen).numpy()
    image = Image.fromarray(small).resize((112, 96), Image.BILINEAR)  # smooth: edges decide
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    warp = {"resample": Image.BILINEAR, "fillcolor": (128, 128, 128)}
    reference = {
        "rotate": lambda v: image.rotate(v, **warp),
        "shear_x": lambda v: image.transform(image.size, Image.AFFINE, (1, v, 0, 0, 1, 0), **warp),
        "shear_y": lambda v: image.transform(image.size, Image.AFFINE, (1, 0, 0, v, 1, 0), **warp),
        "translate_y": lambda v: image.transform(image.size, Image.AFFINE,
                                                 (1, 0, 0, 0, 1, v * image.size[1]), **warp)}
    for op, pil in reference.items():
        for level in (3, 9):
            for sign in (1, -1):
                magnitude = sign * train.autoaugment_magnitude(op, level)
                ours = train.AUTOAUGMENT_OPS[op][0](tensor, magnitude).permute(1, 2, 0).int()
                diff = (ours - torch.from_numpy(np.array(pil(magnitude))).int()).abs()
                assert diff.float().mean() < 2.5, (op, level, sign)  # grey levels of 255


def test_autoaugment_v0_runs_each_step_with_its_probability(monkeypatch):
    calls, signs = collections.Counter(), collections.Counter()

    def recorder(op):
        def record(image, magnitude):
            calls[op] += 1
            signs[op, (magnitude > 0) - (magnitude < 0)] += 1
            return image
        return record
    fake = {op: (recorder(op), magnitudes, random_sign)
            for op, (_, magnitudes, random_sign) in train.AUTOAUGMENT_OPS.items()}
    monkeypatch.setattr(train, "AUTOAUGMENT_OPS", fake)
    torch.manual_seed(0)
    augment, image, draws = train.AutoAugmentV0(), torch.zeros(3, 4, 4, dtype=torch.uint8), 20000
    for _ in range(draws):
        augment(image)
    expected = collections.Counter()
    for sub_policy in train.AUTOAUGMENT_V0:  # each sub-policy drawn with probability 1/25
        for op, probability, _ in sub_policy:
            expected[op] += probability / 25
    for op, rate in expected.items():
        assert calls[op] / draws == pytest.approx(rate, abs=0.012), op
    for op in ("rotate", "shear_y"):  # a random sign; level 0 gives magnitude 0
        assert signs[op, -1] / (signs[op, -1] + signs[op, 1]) == pytest.approx(0.5, abs=0.03)
    assert signs["color", -1] == 0


def test_lighting_offsets_follow_the_imagenet_pca():
    torch.manual_seed(0)
    n, cpu = 20000, torch.device("cpu")
    images, labels = torch.full((n, 3, 2, 2), 100, dtype=torch.uint8), torch.zeros(n)
    lit, _ = train.to_device(images, labels, cpu, lighting=0.1)
    plain, _ = train.to_device(images, labels, cpu, lighting=0.0)
    offset = (lit - plain) * torch.tensor(train.STD).view(1, 3, 1, 1)  # in [0, 1] RGB units
    assert torch.allclose(offset, offset[:, :, :1, :1].expand_as(offset), atol=1e-5)  # per image
    offset = offset[:, :, 0, 0].double()
    vectors, values = torch.tensor(train.EIGVEC).double(), torch.tensor(train.EIGVAL).double()
    expected = vectors @ torch.diag((0.1 * values) ** 2) @ vectors.T  # offset = V (alpha * eigval)
    assert torch.allclose(torch.cov(offset.T), expected, atol=0.03 * expected.max().item())
    assert torch.allclose(offset.var(0), expected.diagonal(), rtol=0.05)
    assert offset.mean(0).abs().max() < 4 * expected.diagonal().max().sqrt() / math.sqrt(n)


def batch_statistics(model, batches):
    """Per BatchNorm of `model`: (mean, unbiased variance) of its input, averaged with equal
    weight over `batches`, from full forward passes in train mode on a copy of the model."""
    model = copy.deepcopy(model).train()
    norms = train.batch_norms(model)
    stats = {bn: [0.0, 0.0] for bn in norms}

    def hook(bn, inputs):
        stats[bn][0] += inputs[0].mean((0, 2, 3)) / len(batches)
        stats[bn][1] += inputs[0].var((0, 2, 3), unbiased=True) / len(batches)
    for bn in norms:
        bn.register_forward_pre_hook(hook)
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return [stats[bn] for bn in norms]


def assert_running_stats(model, expected):
    for bn, (mean, var) in zip(train.batch_norms(model), expected, strict=True):
        assert torch.allclose(bn.running_mean, mean, atol=1e-5)
        assert torch.allclose(bn.running_var, var, rtol=1e-4, atol=1e-5)


def test_precise_bn_sets_running_stats_to_the_batch_statistics():
    model = small("vitc_1gf").eval()
    torch.manual_seed(1)
    batches = [torch.randn(4, 3, 32, 32) * 2 + 0.5 for _ in range(3)]
    expected = batch_statistics(model, batches)
    params = {name: p.clone() for name, p in model.named_parameters()}
    assert train.precise_bn([model], iter(batches)) == 3
    assert_running_stats(model, expected)
    assert all(bn.momentum == 0.1 and bn.num_batches_tracked == 0
               for bn in train.batch_norms(model))  # restored
    assert not model.training and all(torch.equal(p, params[n]) for n, p in
                                      model.named_parameters())


def test_precise_bn_leaves_vitp_untouched():
    model = small("vitp_1gf")
    before = copy.deepcopy(model.state_dict())

    def no_images():
        raise AssertionError("ViT_P has no BatchNorm: precise BN must not load any image")
        yield
    assert train.precise_bn([model], no_images()) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def precise_bn_rank(rank, init_file, batches):  # one of two gloo ranks (torch.multiprocessing)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = small("vitc_1gf")
    train.precise_bn([model], iter(batches[rank]))
    stats = [torch.stack([bn.running_mean, bn.running_var]) for bn in train.batch_norms(model)]
    gathered = [None, None]
    dist.all_gather_object(gathered, stats)
    if rank == 0:
        torch.save(gathered, f"{init_file}.out")
    dist.barrier()
    dist.destroy_process_group()


@slow  # two gloo ranks
def test_precise_bn_averages_over_ranks_and_every_rank_holds_the_result(tmp_path):
    torch.manual_seed(2)
    batches = [[torch.randn(4, 3, 32, 32) + rank for _ in range(2)] for rank in range(2)]
    torch.multiprocessing.spawn(precise_bn_rank, args=(str(tmp_path / "init"), batches), nprocs=2)
    rank0, rank1 = torch.load(tmp_path / "init.out", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True))
    model = small("vitc_1gf")
    for bn, stat in zip(train.batch_norms(model), rank0):
        bn.running_mean.copy_(stat[0])
        bn.running_var.copy_(stat[1])
    assert_running_stats(model, batch_statistics(small("vitc_1gf"), batches[0] + batches[1]))


@pytest.mark.parametrize("size, lr, wd", [("1gf", 1e-3, 0.24), ("4gf", 1e-3, 0.24),
                                          ("18gf", 1e-3, 0.24), ("36gf", 6e-4, 0.28)])
def test_adamw_defaults_are_the_papers_peak_settings(size, lr, wd):
    for stem in ("patch", "conv"):  # section 6: 6.0e-4 / 0.28 for both 36GF models
        args = train.parse_args(["--data", "fake", "--stem", stem, "--size", size])
        assert (args.lr, args.wd) == (lr, wd)


def test_defaults_are_the_official_recipe():
    args = train.parse_args(["--data", "fake"])
    assert (args.autoaugment, args.lighting, args.precise_bn) == ("v0", 0.1, 8192)
    assert (args.mixup, args.cutmix, args.label_smoothing) == (0.8, 1.0, 0.1)
    assert (args.ema, args.ema_period, args.ema_alpha) == (True, 32, 1e-5)
    assert (args.batch_size, args.epochs, args.warmup_epochs) == (2048, 400, 5)
    assert args.eval_precision == "fp32"


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 2048)" in text and "(default: v0)" in text and "(default: 8192)" in text


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
    # a = --ema-alpha x batch x period / epochs = 0.5, with no warmup (which copies)
    args = train.parse_args(["--data", "fake", "--ema-alpha", "0.5", "--batch-size", "1",
                             "--ema-period", "1", "--epochs", "1", "--warmup-epochs", "0"])
    assert train.ema_alpha(args) == 0.5
    train.update_ema(argparse.Namespace(args=args, ema=ema, model=model, step=1,
                                        ema_alpha=train.ema_alpha(args)), epoch=0)
    assert torch.allclose(ema.weight, torch.full((2,), 2.0)) and ema.num_batches_tracked == 5


# ------------------------------------------------------------------------------------------------
# train.py runs, on a tiny ImageFolder of generated JPEGs. Every test's folder is deleted when it
# ends: a checkpoint of even the smallest paper model is ~75 MB.
# ------------------------------------------------------------------------------------------------

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = ("cat", "dog", "fox"), 8, 3  # 9 val: odd, for 2 ranks


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def write_images(folder, count, seed, start=0):
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        pixels = torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.jpg")


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    for c, name in enumerate(CLASSES):
        write_images(root / "train" / name, TRAIN_PER_CLASS, seed=c)
        write_images(root / "val" / name, VAL_PER_CLASS, seed=100 + c)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def tiny(data, out, *extra):
    """A run of seconds with every recipe default on: 32 px, global batch 8, 3 steps per epoch."""
    return ["--data", str(data), "--out", str(out), "--model", "vitc_1gf", "--img-size", "32",
            "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--ema-period", "1",
            "--workers", "0", *extra]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def read_log(out):
    return read_jsonl(Path(out) / "log.jsonl")


def timeless(records):
    """Log records without their timings, which differ from run to run."""
    return [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_sec", "eval_time")}
            for r in records]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def proc_stat(pid):
    """(state, parent) of a live process, from /proc/PID/stat: "pid (name) state ppid ..."."""
    with open(f"/proc/{pid}/stat") as f:
        state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def alive(pid):
    try:
        return proc_stat(pid)[0] != "Z"
    except (OSError, ValueError):
        return False


def descendants(pid):
    """The processes started by `pid`, and by them, and so on."""
    children = collections.defaultdict(list)
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError):
            children[proc_stat(entry)[1]].append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children[todo.pop()]
        found += kids
        todo += kids
    return found


def stop_all(proc, grace=10):
    """Ends `proc` and every process it started (torchrun's ranks sit in sessions of their own,
    and DataLoader workers may outlive their parent): SIGTERM, then SIGKILL after `grace` s."""
    pids = [proc.pid, *descendants(proc.pid)]
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        if not any(alive(pid) for pid in pids[1:]):
            return


@contextlib.contextmanager
def started(cmd, **kwargs):
    """subprocess.Popen, and everything it started ended when the block ends, however it ends."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        stop_all(proc)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def run(cmd, timeout=150, **kwargs):
    """subprocess.run(cmd, capture_output=True, text=True), leaving no process behind, also when
    it times out."""
    with started(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as p:
        out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def torchrun_two_ranks(argv, script=HERE / "train.py", tmp=None, timeout=150):
    """torchrun with 2 gloo ranks; its own temporary files (error files) go to `tmp`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", **({"TMPDIR": str(tmp)} if tmp else {}))
    return run(cmd, timeout=timeout, env=env)


def torchrun_patched(tmp_path, patch, argv):
    """torchrun_two_ranks of train.py with `patch` (Python source, run in each rank after
    `import os, train`) applied first: a rank that fails or sees things its own way."""
    script = tmp_path / "patched_train.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(HERE)!r})\nimport train\n"
                      f"{patch}\nsys.exit(train.cli())\n")
    return torchrun_two_ranks(argv, script, tmp=tmp_path)


@pytest.fixture(scope="session")
def full_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert train.cli(tiny(data, out, "--workers", "1")) == 0
    yield out
    shutil.rmtree(out, ignore_errors=True)


def test_a_run_writes_checkpoint_log_and_what_it_resolved(full_run):
    (entry,) = read_jsonl(full_run / "args.jsonl")
    assert entry["command"][:3] == ["train.py", "--data", str(full_run.parent / "imagenet0")]
    args, resolved = entry["args"], entry["resolved"]
    assert args["model"] == "vitc_1gf" and args["lr"] == 1e-3 and args["wd"] == 0.24
    assert resolved["peak_lr"] == pytest.approx(1e-3 * 8 / 2048)  # the lr actually used
    assert (resolved["world_size"], resolved["micro_batch"], resolved["accum_steps"]) == (1, 8, 1)
    assert resolved["workers"] == 1 and resolved["start_step"] == 0
    assert (resolved["train_precision"], resolved["eval_precision"]) == ("fp32", "fp32")
    assert resolved["device"].startswith("cpu") and resolved["torch"] == torch.__version__
    assert resolved["torchvision"] == torchvision.__version__
    log = read_log(full_run)
    assert [r["epoch"] for r in log] == [1, 2] and log[-1]["step"] == 2 * 3
    for record in log:
        for key in ("lr", "train_loss", "val_top1", "val_top5", "ema_top1", "ema_top5",
                    "epoch_time", "images_per_sec"):
            assert math.isfinite(record[key]), key
        assert record["val_images"] == len(CLASSES) * VAL_PER_CLASS and record["unreadable"] == 0
        assert "resumed_mid_epoch" not in record and "val_unreadable" not in record
    ckpt = load(full_run / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (2, 6) and ckpt["args"]["model"] == "vitc_1gf"
    assert ckpt["scheduler"]["last_epoch"] == 6 and len(ckpt["rng"]) == 1
    model = vitc.create_model("vitc_1gf", num_classes=3, img_size=32)
    model.load_state_dict(ckpt["model"])  # plain keys: unwrapped, uncompiled
    assert load(full_run / "best.pt")["model"].keys() == ckpt["ema"].keys()
    assert not list(full_run.glob("*.tmp"))


def test_resume_with_every_default_on_gives_the_same_weights(data, full_run, tmp_path):
    # tiny() leaves the recipe's defaults on: AutoAugment v0, lighting, mixup/CutMix, label
    # smoothing, EMA and precise BN, whose statistics are in the compared state dicts.
    assert train.cli(tiny(data, tmp_path, "--workers", "1", "--stop-after", "1")) == 0
    assert load(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert train.cli(tiny(data, tmp_path, "--workers", "1", "--resume", "auto")) == 0
    resumed, full = load(tmp_path / "checkpoint.pt"), load(full_run / "checkpoint.pt")
    for part in ("model", "ema"):
        for key, value in full[part].items():
            assert torch.equal(resumed[part][key], value), (part, key)
    assert timeless(read_log(tmp_path)) == timeless(read_log(full_run))
    first, second = read_jsonl(tmp_path / "args.jsonl")  # the history of both invocations
    assert first["args"]["stop_after"] == 1 and second["args"]["resume"] == "auto"
    assert (first["resolved"]["start_step"], second["resolved"]["start_step"]) == (0, 3)
    args = second["args"]
    assert (args["autoaugment"], args["lighting"], args["precise_bn"]) == ("v0", 0.1, 8192)
    assert (args["mixup"], args["cutmix"], args["label_smoothing"]) == (0.8, 1.0, 0.1)


def test_precise_bn_changes_only_the_bn_statistics(data, full_run, tmp_path):
    # It draws from its own RNG: turning it off leaves every weight of the run as it was.
    assert train.cli(tiny(data, tmp_path, "--workers", "1", "--precise-bn", "0")) == 0
    plain, precise = load(tmp_path / "checkpoint.pt"), load(full_run / "checkpoint.pt")
    names = {name for name, _ in vitc.create_model("vitc_1gf").named_parameters()}
    for part in ("model", "ema"):
        assert all(torch.equal(plain[part][k], precise[part][k]) for k in names)
        stats = [k for k in names ^ plain[part].keys() if k.endswith("running_var")]
        assert stats and all(not torch.equal(plain[part][k], precise[part][k]) for k in stats)


def test_evaluation_leaves_the_training_alone(data, full_run, tmp_path):
    # Evaluating (and precise BN) only at the end instead of every epoch: the same weights.
    assert train.cli(tiny(data, tmp_path, "--workers", "1", "--eval-every", "2")) == 0
    once, every = load(tmp_path / "checkpoint.pt"), load(full_run / "checkpoint.pt")
    for name, _ in vitc.create_model("vitc_1gf").named_parameters():
        assert torch.equal(once["model"][name], every["model"][name]), name


@slow
def test_torchrun_two_ranks_counts_every_val_image_once(data, tmp_path):
    # Two gloo ranks, with gradient accumulation (micro-batches of 2, DDP's no_sync path).
    proc = torchrun_two_ranks(tiny(data, tmp_path / "run", "--epochs", "1", "--warmup-epochs",
                                   "0", "--accum-steps", "2", "--workers", "1"), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = read_log(tmp_path / "run")
    assert record["val_images"] == len(CLASSES) * VAL_PER_CLASS  # 5 on rank 0, 4 on rank 1
    assert record["step"] == 3  # 24 images / global batch 8
    assert len(load(tmp_path / "run" / "checkpoint.pt")["rng"]) == 2
    assert proc.stdout.count("vitc_1gf:") == 1  # rank 1 prints nothing
    (entry,) = read_jsonl(tmp_path / "run" / "args.jsonl")
    assert (entry["resolved"]["world_size"], entry["resolved"]["micro_batch"]) == (2, 2)


def test_fake_data_runs_with_bf16_evaluation(tmp_path, monkeypatch):
    dtypes = collections.Counter()
    real_forward = vitc.ViT.forward

    def forward(model, x):
        out = real_forward(model, x)
        dtypes["train" if model.training else "eval", out.dtype] += 1
        return out
    monkeypatch.setattr(vitc.ViT, "forward", forward)
    argv = ["--data", "fake", "--fake-size", "32", "--out", str(tmp_path), "--img-size", "32",
            "--batch-size", "16", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0",
            "--stem", "patch", "--size", "1gf", "--autoaugment", "none", "--eval-precision",
            "bf16"]
    assert train.cli(argv) == 0
    (record,) = read_log(tmp_path)
    assert record["val_images"] == 8 and record["step"] == 2
    assert read_jsonl(tmp_path / "args.jsonl")[0]["resolved"]["eval_precision"] == "bf16"
    assert set(dtypes) == {("train", torch.float32), ("eval", torch.bfloat16)}


def test_each_run_gets_a_new_folder_unless_out_is_given(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--data", str(data), "--model", "vitp_1gf", "--img-size", "16", "--batch-size", "24",
            "--epochs", "1", "--warmup-epochs", "0", "--workers", "0", "--no-ema"]
    assert train.cli(argv) == 0 and train.cli(argv) == 0  # the same command twice
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(run.name.startswith("vitp_1gf-") for run in runs)
    assert all((run / "checkpoint.pt").is_file() for run in runs)
    assert "pass --out" in run_failing([*argv, "--resume", "auto"], capsys)
    assert len(list((tmp_path / "runs").iterdir())) == 2


def run_failing(argv, capsys, training_started=False, status=2):
    """Runs train.py in-process, expecting exit status 2 (or `status`) and a one-line error
    (after the progress bars and warnings, when training had started)."""
    capsys.readouterr()
    code = train.cli(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == status and "Traceback" not in "".join(lines), lines
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
    assert "invalid choice" in run_failing(tiny(data, tmp_path, "--autoaugment", "v1"), capsys)
    err = run_failing(tiny(data, tmp_path, "--model", "vitc_36gf", "--optimizer", "sgd"), capsys)
    assert "no SGD settings" in err
    assert "--ema-alpha" in run_failing(tiny(data, tmp_path, "--ema-alpha", "-1"), capsys)
    assert "--cutmix" in run_failing(tiny(data, tmp_path, "--cutmix", "nan"), capsys)
    assert "--lighting" in run_failing(tiny(data, tmp_path, "--lighting", "-0.1"), capsys)
    assert "--precise-bn" in run_failing(tiny(data, tmp_path, "--precise-bn", "-1"), capsys)
    assert "multiple of 16" in run_failing(tiny(data, tmp_path, "--img-size", "40"), capsys)
    err = run_failing(tiny(data, tmp_path, "--img-size", "100"), capsys)
    assert err.endswith("--img-size 100 is not a multiple of 16 (the stems' stride): the nearest "
                        "are 96 and 112")
    (tmp_path / "file").write_text("")
    assert "not a folder" in run_failing(tiny(data, tmp_path / "file"), capsys)


@slow
def test_bad_input_under_torchrun_is_the_first_line_and_the_root_cause(data, tmp_path):
    proc = torchrun_two_ranks(tiny(data, tmp_path / "run", "--batch-size", "9"), tmp=tmp_path)
    assert proc.returncode != 0
    line = "train.py: error: --batch-size 9 is not divisible by world size 2 x --accum-steps 1"
    assert proc.stderr.lstrip().splitlines()[0] == line, proc.stderr
    root_cause = proc.stderr.split("Root Cause (first observed failure):")[1]
    assert f"traceback : {line}\n" in root_cause and "Traceback" not in root_cause


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


def test_a_finished_run_can_drop_its_checkpoint_and_a_stopped_one_keeps_it(data, tmp_path,
                                                                          capsys):
    argv = tiny(data, tmp_path, "--no-keep-checkpoint", "--precise-bn", "0")
    assert train.cli([*argv, "--stop-after", "1"]) == 0
    assert (tmp_path / "checkpoint.pt").exists()  # stopped before its end: kept, to resume
    assert train.cli([*argv, "--resume", "auto"]) == 0
    assert not (tmp_path / "checkpoint.pt").exists()  # finished: dropped
    assert (tmp_path / "best.pt").exists() and [r["epoch"] for r in read_log(tmp_path)] == [1, 2]
    assert len(read_jsonl(tmp_path / "args.jsonl")) == 2
    capsys.readouterr()
    assert train.cli([*argv, "--resume", "auto"]) == 0  # as when the checkpoint is kept
    assert f"the run in {tmp_path} is complete (2 epochs): nothing to train" in capsys.readouterr().out
    assert "already holds a run" in run_failing(argv, capsys)  # never a new run over its logs
    assert [r["epoch"] for r in read_log(tmp_path)] == [1, 2]


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
    assert read_log(tmp_path)[-1] == {"epoch": 2, "step": 4, "diverged": "nan"}  # for reports
    monkeypatch.setattr(F, "cross_entropy", real)
    err = run_failing(tiny(data, tmp_path, "--resume", "auto"), capsys)  # not retried blindly
    assert "diverged (loss nan at step 4): resuming it would repeat that" in err


def limit_file_size():  # in the child: writes past 30 MB fail with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (30 * 2 ** 20, 30 * 2 ** 20))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(data, tmp_path):
    assert train.cli(tiny(data, tmp_path, "--stop-after", "1")) == 0
    saved = (tmp_path / "checkpoint.pt").read_bytes()  # ~75 MB: its next version cannot fit
    proc = run([sys.executable, str(HERE / "train.py"), *tiny(data, tmp_path, "--resume", "auto")],
               preexec_fn=limit_file_size)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: cannot write ") and "File too large" in last
    assert "intact" in last and "Traceback" not in proc.stderr
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved and not list(tmp_path.glob("*.tmp"))


def test_a_second_train_py_on_a_busy_folder_is_refused(data, full_run, capsys):
    held = os.open(full_run, os.O_RDONLY)  # the run folder itself, as a first run would hold it
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = run_failing(tiny(data, full_run, "--resume", "auto"), capsys, status=3)
    finally:
        os.close(held)
    assert "in use by another train.py" in err  # status 3, not bad input: a sweep can tell


@slow
def test_an_error_on_one_rank_stops_every_rank_with_its_line(data, tmp_path):
    # Rank 1 alone cannot read its data (as on a node without the mount): both ranks stop with
    # that rank's line, instead of rank 0 waiting in a collective or reporting a lost peer.
    proc = torchrun_patched(tmp_path, (
        "real = train.build_datasets\n"
        "def build_datasets(args):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise train.RunError('/data/train: missing on this node')\n"
        "    return real(args)\n"
        "train.build_datasets = build_datasets"), tiny(data, tmp_path / "run"))
    line = "train.py: error: [rank 1] /data/train: missing on this node"
    assert proc.returncode != 0 and proc.stderr.lstrip().splitlines()[0] == line, proc.stderr
    root_cause = proc.stderr.split("Root Cause (first observed failure):")[1]
    assert f"traceback : {line}\n" in root_cause


def write_odd_and_bad_images(root):
    """Images that must just work (grayscale, RGBA, palette, CMYK) in train/cat; unreadable
    files in each train class (truncated, empty, not an image, two in a row) and in val/cat."""
    noise = torch.randint(0, 256, (40, 48, 3), generator=torch.Generator().manual_seed(7),
                          dtype=torch.uint8).numpy()
    rgb = Image.fromarray(noise)
    rgb.convert("L").save(root / "train" / "cat" / "grey.jpg")
    rgb.convert("RGBA").save(root / "train" / "cat" / "rgba.png")
    rgb.convert("P").save(root / "train" / "cat" / "palette.png")
    rgb.convert("CMYK").save(root / "train" / "cat" / "cmyk.jpg")
    encoded = io.BytesIO()
    rgb.save(encoded, "JPEG")
    (root / "train" / "cat" / "truncated.jpg").write_bytes(encoded.getvalue()[:500])
    (root / "train" / "dog" / "empty.jpg").write_bytes(b"")
    (root / "train" / "fox" / "notes.jpg").write_text("not an image\n")
    (root / "train" / "fox" / "zero.jpg").write_bytes(b"\0" * 100)  # right after notes.jpg
    (root / "val" / "cat" / "truncated.jpg").write_bytes(encoded.getvalue()[:500])
    # 32 train files (4 full batches, so every file is read each epoch), 10 val files


@pytest.fixture
def bad_data(data, tmp_path):
    root = shutil.copytree(data, tmp_path / "data")
    write_odd_and_bad_images(root)
    return root


def test_unreadable_images_are_named_replaced_and_counted(bad_data, tmp_path, capsys):
    root = bad_data
    capsys.readouterr()
    assert train.cli(tiny(root, tmp_path / "run", "--max-bad-fraction", "0.5")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    for name, reason in [("cat/truncated.jpg", "truncated"), ("dog/empty.jpg", "cannot identify"),
                         ("fox/notes.jpg", "cannot identify"), ("fox/zero.jpg", "cannot")]:
        assert sum(f"train/{name} (" in line and reason in line for line in warnings) == 2  # epochs
    # read once per evaluation, for the model and its EMA together: 2 epochs, 2 warnings
    assert sum("val/cat/truncated.jpg" in line for line in warnings) == 2
    assert not [line for line in warnings if any(n in line for n in ("grey", "rgba", "palette",
                                                                      "cmyk"))]
    for record in read_log(tmp_path / "run"):
        assert record["unreadable"] == 4 and record["step"] % 4 == 0  # each bad file once
        assert record["val_images"] == 9 and record["val_unreadable"] == 1  # never silently


def test_unreadable_val_images_over_the_limit_stop_the_run_after_its_checkpoint(data, tmp_path,
                                                                               capsys):
    root = shutil.copytree(data, tmp_path / "data")
    (root / "val" / "cat" / "empty.jpg").write_bytes(b"")  # 1 of 10 > --max-bad-fraction 0.01
    err = run_failing(tiny(root, tmp_path / "run"), capsys, training_started=True)
    assert "1 of 10 val images are unreadable" in err
    assert load(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1  # the epoch is kept


def test_too_many_unreadable_images_stop_the_run(bad_data, tmp_path, capsys):
    err = run_failing(tiny(bad_data, tmp_path / "run"), capsys, training_started=True)
    assert "unreadable train images in epoch 1" in err and "--max-bad-fraction 0.01" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_sigterm_checkpoints_mid_epoch_and_resume_logs_the_whole_epoch(tmp_path, monkeypatch):
    argv = ["--data", "fake", "--fake-size", "240", "--out", str(tmp_path), "--img-size", "32",
            "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0"]
    with started([sys.executable, str(HERE / "train.py"), *argv], stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True) as proc:
        progress = read_until(proc, r"\| *([3-9]|\d\d+)/60 ")  # step 3 of 60
        seen = int(re.findall(r"\| *(\d+)/60 ", progress)[-1])  # the step shown at the signal
        proc.send_signal(signal.SIGTERM)
        progress += read_until(proc, "SIGTERM: stopping at the next check")  # taken: the next
        proc.send_signal(signal.SIGTERM)  # is a repeat, as Slurm and torchrun each send one
        out, err = proc.communicate(timeout=120)
    err = progress + err
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out and f"--out {tmp_path} --resume auto" in out
    assert "SIGTERM again: the stop is under way" in err and "KeyboardInterrupt" not in err
    ckpt = load(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 0 and 3 <= ckpt["step"] < 60
    assert ckpt["step"] % CHECK_EVERY == 0 and ckpt["step"] < seen + 2 * CHECK_EVERY
    assert ckpt["progress"]["steps"] == ckpt["step"]  # the figures of the steps done so far
    ended = []
    real_train_one_epoch = train.train_one_epoch
    monkeypatch.setattr(train, "train_one_epoch", lambda run, epoch: real_train_one_epoch(
        run, epoch) and not ended.append(dict(run.progress)))
    assert train.cli([*argv, "--resume", "auto"]) == 0
    (record,) = read_log(tmp_path)
    assert record["epoch"] == 1 and record["step"] == 60  # the remaining steps, not a restart
    assert record["resumed_mid_epoch"]
    (progress,) = ended  # the logged figures: all 100 steps, including those before the signal
    assert progress["steps"] == 60 and progress["loss_sum"] > ckpt["progress"]["loss_sum"]
    assert record["train_loss"] == pytest.approx(progress["loss_sum"] / 60)


def read_until(proc, pattern):
    """What proc wrote to stderr until `pattern` (a regular expression) shows."""
    text = ""
    while not re.search(pattern, text):
        chunk = proc.stderr.read(64)
        assert chunk, f"ended before {pattern!r}: {text[-2000:]}"
        text += chunk
    return text


def test_a_signal_to_every_process_of_a_run_stops_it_cleanly_and_a_kill_frees_its_folder(
        tmp_path):
    # torchrun and Slurm signal every process of a rank, its DataLoader workers too (which die
    # of SIGTERM unless they ignore it); Slurm's --signal=USR1@... is a stop, like SIGTERM.
    argv = [sys.executable, str(HERE / "train.py"), *fake_run(tmp_path, "--fake-size", "240",
                                                              "--workers", "2")]
    with started(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        read_until(proc, r"\| *([3-9]|\d\d+)/60 ")
        os.killpg(proc.pid, signal.SIGUSR1)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by SIGUSR1" in out, err[-2000:]
    assert load(tmp_path / "checkpoint.pt")["step"] == 20
    # kill -9 (an out-of-memory kill, a node lost): the workers, which live on for seconds,
    # must not hold the folder's lock: an immediate resume is not refused.
    with started([*argv, "--resume", "auto"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True) as proc:
        read_until(proc, r"\| *2[3-9]/60 ")
        workers = descendants(proc.pid)
        proc.kill()
        proc.wait()
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # at once, not "in use"
        finally:
            os.close(fd)
            for pid in workers:  # orphans now: not proc's to stop
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert len(workers) == 2


def test_a_closed_terminal_neither_output_errors_nor_sighup_lose_the_epoch(tmp_path):
    # `train.py | tee log` with tee gone, or the ssh session closed: writes fail, then SIGHUP
    with started([sys.executable, str(HERE / "train.py"), *fake_run(tmp_path, "--fake-size",
                                                                    "4000")],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        read_until(proc, r"\| *([3-9]|\d\d+)/1000 ")
        proc.stdout.close()
        proc.stderr.close()
        time.sleep(0.5)  # a few more steps' progress bars written into the closed pipe
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=120) == 0
    step = load(tmp_path / "checkpoint.pt")["step"]
    assert step % 20 == 0 and 0 < step < 1000  # stopped at a check, with its checkpoint


def test_a_filesystem_without_locks_gets_its_own_warning(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(folder.fcntl, "flock", no_locks)
    monkeypatch.setattr(folder.fcntl, "lockf", no_locks)
    folder.lock(str(tmp_path))  # not "in use by another train.py", and the run goes on
    folder.unlock()
    err = capsys.readouterr().err
    assert f"warning: cannot lock {tmp_path} (No locks available: a filesystem without locks" in err


def test_the_lock_holds_with_its_file_deleted_and_on_nfs(tmp_path, monkeypatch):
    holder = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); "
              f"from runsafe import folder; folder.lock({str(tmp_path)!r}); print('held', "
              f"flush=True); sys.stdin.read()"]
    with started(holder, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.readline() == "held\n"
        with monkeypatch.context() as nfs:  # NFS's flock cannot lock a folder: .lock still holds
            nfs.setattr(folder.fcntl, "flock", lambda fd, operation: (_ for _ in ()).throw(
                OSError(errno.EBADF, os.strerror(errno.EBADF))))
            with pytest.raises(FolderInUse):
                folder.lock(str(tmp_path))
        (tmp_path / ".lock").unlink()  # deleted by hand: the folder's own lock still holds
        with pytest.raises(FolderInUse):
            folder.lock(str(tmp_path))
    folder.lock(str(tmp_path))  # the holder gone: free
    folder.unlock()


def test_sigterm_again_never_aborts_a_stop_but_ctrl_c_again_does(capfd):
    before = signal.getsignal(signal.SIGTERM)
    with signals.caught():
        os.kill(os.getpid(), signal.SIGTERM)  # from Slurm, say
        os.kill(os.getpid(), signal.SIGTERM)  # and forwarded by torchrun: the stop goes on
        assert signals.requested() == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a user's Ctrl-C still aborts
    assert signal.getsignal(signal.SIGTERM) == before
    assert "SIGTERM again: the stop is under way" in capfd.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1])
def test_sighup_and_sigusr1_stop_the_run_like_sigterm(signum):
    # a closed terminal, and Slurm's --signal=USR1@...: a stop with a checkpoint, not a death
    with signals.caught():
        os.kill(os.getpid(), signum)
        assert signals.requested() == signal.Signals(signum).name


def test_a_second_ctrl_c_during_a_checkpoint_write_aborts_after_it(tmp_path):
    def write(f):
        os.kill(os.getpid(), signal.SIGINT)  # the first: a stop
        f.write(b"first half ")
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again, in the middle of the write
        f.write(b"second half")
    with signals.caught(), pytest.raises(KeyboardInterrupt):
        folder.save_atomic(str(tmp_path / "checkpoint.pt"), write)
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"first half second half"  # whole
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_a_signal_during_the_setup_ends_the_run_cleanly_and_leaves_no_folder(data, tmp_path,
                                                                            capsys, monkeypatch):
    # With a time limit shorter than Slurm's --signal lead, SIGTERM comes while the data is
    # scanned: the run ends there, status 0, and the folder made for it goes again.
    monkeypatch.chdir(tmp_path)
    real = train.build_datasets

    def signalled_while_scanning(args):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's copy of it
        return real(args)
    monkeypatch.setattr(train, "build_datasets", signalled_while_scanning)
    argv = tiny(data, "unused")[:2] + tiny(data, "unused")[4:]  # without --out: runs/MODEL-...
    capsys.readouterr()
    assert train.cli(argv) == 0
    out = capsys.readouterr().out
    assert "train.py: stopped by SIGTERM before training began, nothing written" in out
    assert not (tmp_path / "runs").exists()
    assert train.cli([*argv, "--out", str(tmp_path / "given")]) == 0
    assert not (tmp_path / "given").exists()


def test_sigterm_while_torch_loads_is_not_lost(tmp_path):
    # The handler is in place before `import torch` (seconds): poll the process's caught
    # signals (/proc), then signal it while it is still starting.
    with started([sys.executable, str(HERE / "train.py"), *fake_run(tmp_path / "run")],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        caught = 0
        while not caught & (1 << (signal.SIGTERM - 1)):
            assert proc.poll() is None, proc.communicate()
            with open(f"/proc/{proc.pid}/status") as f:
                caught = int(next(line for line in f if line.startswith("SigCgt")).split()[1], 16)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=150)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM before training began" in out and not (tmp_path / "run").exists()


def test_a_log_lost_after_its_checkpoint_is_written_again_on_resume(data, tmp_path, capsys,
                                                                  monkeypatch):
    # A full disk (or a kill) between the epoch's checkpoint and log.jsonl: the checkpoint
    # carries the epochs' records, and the resume writes the log from them; the resume also says
    # where it continues and that --accum-steps changed the BatchNorm batch.
    real = folder.write_lines

    def full_disk_for_the_log(path, records):
        if path.endswith("log.jsonl"):
            raise RunError(f"cannot write {path} (No space left on device)")
        return real(path, records)
    monkeypatch.setattr(folder, "write_lines", full_disk_for_the_log)
    err = run_failing(tiny(data, tmp_path, "--stop-after", "1"), capsys, training_started=True)
    assert "log.jsonl (No space left on device)" in err
    ckpt = load(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and [r["epoch"] for r in ckpt["history"]] == [1]
    assert not (tmp_path / "log.jsonl").exists()
    monkeypatch.setattr(folder, "write_lines", real)
    assert train.cli(tiny(data, tmp_path, "--resume", "auto", "--accum-steps", "2")) == 0
    out, err = capsys.readouterr()
    assert f"resuming from {tmp_path / 'checkpoint.pt'}: step 3 of 6 (epoch 2)" in out
    assert ("changed since the checkpoint: --accum-steps 1 -> 2, so the BatchNorm batch (images "
            "per rank and micro-step) 8 -> 4") in out
    log = read_log(tmp_path)
    assert log[0] == ckpt["history"][0] and [r["epoch"] for r in log] == [1, 2]


def test_lines_appended_by_processes_at_once_are_all_kept(tmp_path):
    # A sweep's Slurm tasks add their outcomes to one slurm.jsonl, at the same time.
    path = tmp_path / "slurm.jsonl"
    writer = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from runsafe import folder\n"
              f"for i in range(100): folder.append_line({str(path)!r}, {{'w': sys.argv[1], 'i': i}})")
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(started([sys.executable, "-c", writer, str(w)]))
                 for w in range(4)]
        assert [proc.wait(timeout=60) for proc in procs] == [0] * 4
    assert sorted((r["w"], r["i"]) for r in read_jsonl(path)) == [
        (str(w), i) for w in range(4) for i in range(100)]


def test_a_write_cut_short_by_a_full_disk_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "log.jsonl"
    folder.write_lines(str(path), [{"epoch": 1}])
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, limit[1]))  # files may grow to 100 bytes
    try:
        with pytest.raises(RunError, match="cannot write .* room for the old and the new file"):
            folder.write_lines(str(path), [{"epoch": 1}, {"epoch": 2, "pad": "x" * 200}])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_text() == '{"epoch": 1}\n' and not list(tmp_path.glob("*.tmp"))
    folder.write_lines(str(path), [{"epoch": 1}, {"epoch": 2}])
    assert read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]


def test_resume_with_renamed_or_reordered_class_folders_is_refused(data, full_run, tmp_path,
                                                                   capsys):
    root = shutil.copytree(data, tmp_path / "data")
    for split in ("train", "val"):  # cat -> zebra: dog, fox, zebra would be labels 0, 1, 2
        (root / split / "cat").rename(root / split / "zebra")
    err = run_failing(tiny(root, tmp_path / "run", "--resume", str(full_run / "checkpoint.pt")),
                      capsys)
    assert f"class folders of {root / 'train'} are not those the checkpoint was trained on" in err
    assert "label 0 was class 'cat' and is now 'dog'" in err
    assert load(full_run / "checkpoint.pt")["classes"] == list(CLASSES)


@pytest.mark.parametrize("mixing", [[], ["--mixup", "0", "--cutmix", "0"]])
def test_a_data_folder_gone_mid_run_ends_with_one_line_and_loses_nothing(data, tmp_path, capsys,
                                                                         monkeypatch, mixing):
    # train/ disappears after epoch 1 (an unmounted filesystem): every item of epoch 2 becomes a
    # blank (label -1), which mixup and the loss would refuse with a traceback.
    root = shutil.copytree(data, tmp_path / "data")
    real = runrun.end_epoch

    def unmounted_after_epoch_1(run, record):
        real(run, record)
        shutil.move(root / "train", tmp_path / "elsewhere")
    monkeypatch.setattr(runrun, "end_epoch", unmounted_after_epoch_1)
    err = run_failing(tiny(root, tmp_path / "run", *mixing), capsys, training_started=True)
    assert err == (f"train.py: error: {root / 'train'}: 64 files in a row cannot be read: the "
                   f"folder is gone (an unmounted filesystem?) (at step 4, epoch 2); "
                   f"the last checkpoint stays in {tmp_path / 'run'}")
    assert load(tmp_path / "run" / "checkpoint.pt")["step"] == 3  # epoch 1's, untouched
    assert [r["epoch"] for r in read_log(tmp_path / "run")] == [1]


def test_image_files_reached_twice_through_links_are_refused(data, tmp_path, capsys):
    root = shutil.copytree(data, tmp_path / "data")
    loop = root / "train" / "cat" / "again"
    loop.symlink_to(root / "train" / "cat")  # 8 files would become 8 x 41
    err = run_failing(tiny(root, tmp_path / "run"), capsys)
    assert f"{loop / '0.jpg'} is {root / 'train' / 'cat' / '0.jpg'} again (a symbolic link loop" in err
    loop.unlink()
    twice = root / "train" / "dog" / "cat.jpg"
    twice.symlink_to(root / "train" / "cat" / "0.jpg")  # one image, two labels
    err = run_failing(tiny(root, tmp_path / "run"), capsys)
    assert f"{twice} is {root / 'train' / 'cat' / '0.jpg'} again (a symbolic link loop, or a " \
           f"second link" in err
    twice.unlink()
    outside = tmp_path / "outside.jpg"  # a link to an image reached once is fine
    shutil.copy(root / "train" / "cat" / "0.jpg", outside)
    (root / "train" / "dog" / "linked.jpg").symlink_to(outside)
    assert len(ImageFiles(str(root / "train"), None, True, 32)) == 25


def flip_bytes_in_the_middle(path, count=64):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the tensors' bytes
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(data)


def test_a_damaged_checkpoint_is_refused_naming_what_is_intact(data, full_run, tmp_path, capsys):
    run = shutil.copytree(full_run, tmp_path / "run")
    flip_bytes_in_the_middle(run / "checkpoint.pt")
    err = run_failing(tiny(data, run, "--resume", "auto"), capsys)
    best = load(run / "best.pt")["epoch"]
    assert err == (f"train.py: error: {run / 'checkpoint.pt'}: damaged (its contents do not match "
                   f"its checksum); {run / 'best.pt'} (epoch {best}) is intact and holds the best "
                   f"weights")


@pytest.mark.parametrize("change, message", [
    (lambda c: c["model"].pop("head.weight"),  # as a checkpoint of an older vitc.py would be
     "its contents do not fit this train.py (RuntimeError: Error(s) in loading state_dict"),
    (lambda c: c.update(args="vitc_1gf"),
     "not a train.py checkpoint ('args' missing or of the wrong type"),
    (lambda c: c.update(rng=[]), "not a train.py checkpoint (no RNG state in 'rng')"),
    (lambda c: c.update(rng=[{}]), "its contents do not fit this train.py (KeyError: 'torch')"),
])
def test_a_checkpoint_of_the_right_format_but_wrong_contents_is_one_line(data, full_run, tmp_path,
                                                                        capsys, change, message):
    ckpt = load(full_run / "checkpoint.pt")
    change(ckpt)
    checkpoint.save(ckpt, str(tmp_path / "checkpoint.pt"))  # with a checksum: not damaged
    assert message in run_failing(tiny(data, tmp_path, "--resume", "auto"), capsys)


def test_resume_given_a_folder_says_what_it_takes(data, full_run, capsys):
    err = run_failing(tiny(data, full_run, "--resume", str(full_run)), capsys)
    assert err.endswith(f"--resume {full_run}: a folder; --resume takes a checkpoint file, or "
                        f"'auto' with --out RUN_FOLDER")


def test_data_gone_mid_run_names_the_class_folders_that_went(data, tmp_path):
    root = shutil.copytree(data, tmp_path / "data")
    train_set = ImageFiles(str(root / "train"), None, True, 32)
    watch = argparse.Namespace(run=argparse.Namespace(train_set=train_set, args=argparse.Namespace(
        data=str(root))))
    (root / "train" / "cat").rename(root / "train" / "lynx")
    assert monitor.Monitor.data_gone(watch) == (
        f"{root / 'train'}: 64 files in a row cannot be read: class folders gone since the run "
        f"began: cat")


def test_checkpoints_hold_cpu_copies(tmp_path, monkeypatch):
    # On a GPU the run's state is on the device; a checkpoint must load on a machine without one.
    copied, real = [], torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: copied.append(t) or real(t, *a, **k))
    state = {"model": {"w": torch.ones(2)}, "optimizer": {"state": {0: {"m": torch.zeros(3)}}},
             "rng": [{"torch": torch.get_rng_state()}]}
    checkpoint.save(state, str(tmp_path / "c.pt"))
    assert len(copied) >= 3  # each tensor, at least
    assert checkpoint.load(str(tmp_path / "c.pt"))["model"]["w"].device.type == "cpu"


def test_a_gpu_without_kernels_in_this_torch_is_refused(monkeypatch):
    # The default CUDA 13 wheels have no sm_70 (V100) kernels: its first kernel would fail.
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: [
        "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    capability = {"value": (7, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    with pytest.raises(RunError, match=r"^Tesla V100-SXM2-32GB \(sm_70\) has no kernels in torch "
                                       r".*built for sm_75 .*: install a torch build that has "
                                       r"them \(for V100: the CUDA 12.6 wheels"):
        rdist.check_gpu(torch.device("cuda", 0))
    for capability["value"] in ((9, 0), (12, 1)):  # H100: sm_90; a newer GPU: compute_120's PTX
        rdist.check_gpu(torch.device("cuda", 0))


def test_precision_defaults_to_bf16_from_compute_capability_8_and_fp16_before(monkeypatch):
    capability = {"value": (7, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    assert train.default_precision(torch.device("cuda", 0)) == "fp16"  # V100: loss scaling
    capability["value"] = (8, 0)
    assert train.default_precision(torch.device("cuda", 0)) == "bf16"  # A100 and later
    assert train.default_precision(torch.device("cpu")) == "fp32"


def test_ranks_wait_for_each_other_as_long_as_dist_timeout_says(monkeypatch):
    # NCCL's own default is 10 minutes: less than rank 0 may need to write a 36GF checkpoint.
    seen = {}

    def init_process_group(backend, **kwargs):
        seen.update(kwargs, backend=backend)
        raise RuntimeError("no process group in this test")
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="no process group"):
        with rdist.distributed(45):
            pass
    assert seen["backend"] == "gloo" and seen["timeout"] == datetime.timedelta(minutes=45)
    assert train.parse_args(["--data", "fake"]).dist_timeout == 30


def test_workers_default_to_the_cores_this_process_may_use_per_local_rank(data, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(48)))  # Slurm's, say
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    args = train.parse_args(tiny(data, tmp_path)[:-2])  # without --workers
    assert train.build_run(args, 0, 1, torch.device("cpu")).workers == 12


def test_grad_scaler_private_scale_means_what_fp16_counts_skipped_steps_by():
    # scaled_step reads GradScaler._scale (get_scale() would wait for the GPU): should a torch
    # upgrade change that attribute's meaning, this fails.
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    run = argparse.Namespace(scaler=scaler, optimizer=optimizer)
    for grad, skipped in ((1.0, False), (math.inf, True), (1.0, False)):
        scaler.scale(model(torch.ones(1, 2)).sum()).backward()
        model.weight.grad.fill_(grad)
        assert isinstance(scaler._scale, torch.Tensor) and scaler._scale.item() == scaler.get_scale()
        assert bool(train.scaled_step(run)) is skipped
        optimizer.zero_grad()
    assert scaler.get_scale() == 2.0  # halved once, at the overflow


@slow
def test_data_gone_on_one_rank_in_precise_bn_stops_every_rank(data, tmp_path):
    # Rank 1 alone loses its data after training epoch 1: its precise BN finds nothing but
    # blanks. Every rank stops with its line, none waits in a collective for the timeout.
    proc = torchrun_patched(tmp_path, (
        "real = train.train_one_epoch\n"
        "def train_one_epoch(run, epoch):\n"
        "    done = real(run, epoch)\n"
        "    if os.environ['RANK'] == '1':\n"
        "        run.train_set.loader = lambda path: open('/no/such/file')\n"
        "    return done\n"
        "train.train_one_epoch = train_one_epoch"),
        tiny(data, tmp_path / "run", "--epochs", "1", "--warmup-epochs", "0"))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert proc.returncode != 0 and errors[0].startswith("train.py: error: [rank 1] "), proc.stderr
    assert "images could not be read (in precise BN after epoch 1)" in errors[0]


@slow
def test_ranks_that_find_different_checkpoints_are_refused(data, tmp_path):
    # --out on a node's own disk: only rank 0's node has the checkpoint; the others would start
    # a new run beside the resumed one.
    (tmp_path / "node1").mkdir()
    assert train.cli(tiny(data, tmp_path / "node0" / "run", "--stop-after", "1")) == 0
    proc = torchrun_patched(tmp_path, f"os.chdir({str(tmp_path)!r} + '/node' + os.environ['RANK'])",
                            tiny(data, "run", "--resume", "auto"))
    line = proc.stderr.lstrip().splitlines()[0]
    assert proc.returncode != 0 and line == ("train.py: error: the ranks found different "
                                             "checkpoints in run (or none): --out must be on a "
                                             "filesystem that every node sees"), proc.stderr


@slow
def test_ranks_that_see_other_data_are_refused_naming_the_rank(data, tmp_path):
    # One node's copy of the data lacks a file: the shards would overlap, or the ranks hang.
    proc = torchrun_patched(tmp_path, (
        "real = train.build_datasets\n"
        "def build_datasets(args):\n"
        "    train_set, val_set, classes = real(args)\n"
        "    if os.environ['RANK'] == '1':\n"
        "        del train_set.samples[5]\n"
        "    return train_set, val_set, classes\n"
        "train.build_datasets = build_datasets"), tiny(data, tmp_path / "run"))
    line = proc.stderr.lstrip().splitlines()[0]
    assert proc.returncode != 0 and line.startswith("train.py: error: rank 1 (on "), proc.stderr
    assert "sees other data than rank 0" in line and "train/val images 23/9 against 24/9" in line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# train.py's GPU settings, on the CPU: fp16 autocast with loss scaling, and torch.compile
# (inductor compiles C++ kernels here: the smallest model at 32 px keeps that to a minimum)
# ------------------------------------------------------------------------------------------------


def test_fp16_resume_gives_the_same_weights_and_loss_scale(data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert train.cli(tiny(data, full, "--train-precision", "fp16")) == 0
    assert train.cli(tiny(data, split, "--train-precision", "fp16", "--stop-after", "1")) == 0
    assert train.cli(tiny(data, split, "--train-precision", "fp16", "--resume", "auto")) == 0
    resumed, whole = load(split / "checkpoint.pt"), load(full / "checkpoint.pt")
    for part in ("model", "ema"):
        for key, value in whole[part].items():
            assert torch.equal(resumed[part][key], value), (part, key)
    assert resumed["scaler"] == whole["scaler"] and whole["scaler"]["scale"] > 0
    logs = read_log(full), read_log(split)
    assert [r["skipped_steps"] for r in logs[0]] == [r["skipped_steps"] for r in logs[1]]
    assert timeless(logs[1]) == timeless(logs[0])
    assert read_jsonl(full / "args.jsonl")[0]["resolved"]["train_precision"] == "fp16"


def test_fp16_skips_overflowing_steps_but_stops_on_a_non_finite_loss(data, tmp_path, monkeypatch,
                                                                     capsys):
    # An fp32 epoch, then an fp16 one whose 2nd step gets an infinite gradient, then a NaN loss.
    argv = tiny(data, tmp_path, "--epochs", "3", "--stop-after", "1")
    assert train.cli(argv) == 0
    assert load(tmp_path / "checkpoint.pt")["scaler"] is None
    monkeypatch.setattr(torch.amp, "GradScaler",  # no overflow of its own at this scale
                        functools.partial(torch.amp.GradScaler, init_scale=1.0))
    backwards, dtypes = [], collections.Counter()
    real_create_model, real_forward = vitc.create_model, vitc.ViT.forward

    def create_model(*args, **kwargs):
        model = real_create_model(*args, **kwargs)
        model.cls_token.register_hook(lambda grad: backwards.append(grad) or (
            torch.full_like(grad, math.inf) if len(backwards) == 2 else grad))
        return model

    def forward(model, x):
        out = real_forward(model, x)
        dtypes["train" if model.training else "eval", out.dtype] += 1
        return out
    monkeypatch.setattr(vitc, "create_model", create_model)
    monkeypatch.setattr(vitc.ViT, "forward", forward)
    assert train.cli([*argv, "--train-precision", "fp16", "--resume", "auto"]) == 0
    assert len(backwards) == 3 and dtypes["train", torch.float16] == 3  # fp16 autocast
    log = read_log(tmp_path)
    assert "skipped_steps" not in log[0] and log[1]["skipped_steps"] == 1  # and no divergence
    ckpt = load(tmp_path / "checkpoint.pt")
    assert ckpt["scaler"]["scale"] == 0.5  # halved once, from the fresh scaler's 1.0
    assert all(state["step"] == 5 for state in ckpt["optimizer"]["state"].values())  # 6 steps
    assert ckpt["scheduler"]["last_epoch"] == 6  # the schedule counts the skipped step too
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    real_cross_entropy = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy",
                        lambda *a, **k: real_cross_entropy(*a, **k) * float("nan"))
    err = run_failing([*argv, "--train-precision", "fp16", "--resume", "auto"], capsys,
                      training_started=True)
    assert "loss is nan at step 7 (epoch 3)" in err  # before scaling: a divergence, not a skip
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved
    assert read_log(tmp_path)[-1] == {"epoch": 3, "step": 7, "diverged": "nan"}


@pytest.fixture(scope="session")
def compile_tmp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compile")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def compile_env(compile_tmp, monkeypatch):
    """For the processes the test starts: inductor's kernel cache and precompiled header (150 MB,
    built once) in a folder that the tests share and that is deleted after them, not in
    /tmp/torchinductor_USER. (Importing torch sets TORCHINDUCTOR_CACHE_DIR in this process.)"""
    monkeypatch.setenv("TMPDIR", str(compile_tmp))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(compile_tmp / "inductor"))
    return compile_tmp


@slow
def test_compiled_run_matches_eager_and_resumes_uncompiled_and_back(data, tmp_path, compile_env):
    # Micro-batches of 2, as in the torchrun test below, which then finds its kernels compiled.
    argv = lambda out, *extra: tiny(data, out, "--epochs", "3", "--accum-steps", "4", *extra)

    def compiled_run(*argv):
        proc = run([sys.executable, str(HERE / "train.py"), *argv, "--compile"], timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train.cli(argv(eager, "--stop-after", "1")) == 0
    compiled_run(*argv(compiled, "--stop-after", "1"))
    one, other = load(eager / "checkpoint.pt"), load(compiled / "checkpoint.pt")
    model = vitc.create_model("vitc_1gf", num_classes=3, img_size=32)
    for part in ("model", "ema"):  # the keys of an uncompiled model, and the eager run's values
        model.load_state_dict(other[part])
        for key, value in one[part].items():  # BatchNorm's: precise BN ran, also on the EMA
            assert torch.allclose(other[part][key].double(), value.double(), rtol=1e-3,
                                  atol=1e-5), (part, key)
    (e,), (c,) = read_log(eager), read_log(compiled)
    assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-5)
    assert train.cli(argv(compiled, "--stop-after", "1", "--resume", "auto")) == 0
    compiled_run(*argv(compiled, "--resume", "auto"))
    assert [r["epoch"] for r in read_log(compiled)] == [1, 2, 3]
    final = load(compiled / "checkpoint.pt")
    assert final["step"] == 9 and all(torch.isfinite(v).all() for v in final["model"].values())
    model.load_state_dict(final["model"])
    model.load_state_dict(load(compiled / "best.pt")["model"])


@slow
def test_compiled_torchrun_two_ranks_splits_the_graph_at_ddp_buckets(data, tmp_path, monkeypatch,
                                                                     compile_env):
    # DDP(compile(model)): Dynamo's DDPOptimizer, which lets the gradient all-reduces overlap the
    # backward, must still split the compiled graph (it logs its buckets at level INFO).
    monkeypatch.setenv("TORCH_LOGS", "torch._dynamo.backends.distributed")
    proc = torchrun_two_ranks(tiny(data, tmp_path / "run", "--epochs", "1", "--warmup-epochs",
                                   "0", "--accum-steps", "2", "--compile"), tmp=compile_env,
                              timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("DDPOptimizer used bucket cap") >= 2, proc.stderr[-3000:]
    (record,) = read_log(tmp_path / "run")
    assert record["step"] == 3 and record["val_images"] == len(CLASSES) * VAL_PER_CLASS
    ckpt = load(tmp_path / "run" / "checkpoint.pt")
    vitc.create_model("vitc_1gf", num_classes=3, img_size=32).load_state_dict(ckpt["model"])
    assert len(ckpt["rng"]) == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ------------------------------------------------------------------------------------------------
# train.py learns: the paper's two 1GF models, trained briefly on generated images
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patterns(tmp_path_factory):
    root = tmp_path_factory.mktemp("patterns")
    load_tool("toydata").make(root)  # 320 train and 200 val images of 4 patterns, 40x40
    yield root
    shutil.rmtree(root, ignore_errors=True)


# ViT_C-1GF runs the whole default pipeline (AutoAugment v0, lighting, mixup/CutMix, label
# smoothing, EMA, precise BN), which slows learning this short; ViT_P-1GF runs it without
# mixup/CutMix. With --seed 0 to 4 (0 is the test's) they ended at 58.5-76.5% and 95-97.5%.
@slow
@pytest.mark.parametrize("model, extra, threshold", [
    ("vitc_1gf", [], 45),
    ("vitp_1gf", ["--mixup", "0", "--cutmix", "0"], 75),
])
def test_train_py_learns_far_above_chance(patterns, tmp_path, model, extra, threshold):
    argv = ["--data", str(patterns), "--out", str(tmp_path / "run"), "--model", model,
            "--img-size", "32", "--batch-size", "16", "--epochs", "15", "--warmup-epochs", "1",
            "--lr", "0.03", "--ema-period", "1", "--ema-alpha", "0.02", "--precise-bn", "64",
            "--eval-every", "15", "--workers", "0", *extra]
    assert train.cli(argv) == 0
    final = read_log(tmp_path / "run")[-1]
    assert final["val_images"] == 200
    assert final["val_top1"] > threshold and final["ema_top1"] > threshold, final


# ------------------------------------------------------------------------------------------------
# train.py reads the step's figures every CHECK_EVERY steps, not at every step
# ------------------------------------------------------------------------------------------------


def fake_run(out, *extra):
    """50 steps of 4 images at 32 px on random data, no evaluation cost to speak of."""
    return ["--data", "fake", "--fake-size", "200", "--out", str(out), "--img-size", "32",
            "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0",
            "--model", "vitp_1gf", "--autoaugment", "none", "--no-ema", *extra]


def test_the_step_waits_for_its_figures_only_every_check(tmp_path, monkeypatch):
    # A host-device sync per step was an all-reduce of the step's figures read with .tolist():
    # now the figures of 50 steps are read 3 times (after steps 20 and 40, and at the end).
    reductions, in_epoch = [], []
    real_all_sum, real_epoch = monitor.all_sum, train.train_one_epoch
    monkeypatch.setattr(monitor, "all_sum", lambda tensor: (
        reductions.append(tuple(tensor.shape)) if in_epoch else None) or real_all_sum(tensor))
    monkeypatch.setattr(train, "train_one_epoch", lambda run, epoch: (
        in_epoch.append(1), real_epoch(run, epoch), in_epoch.clear()))
    assert train.cli(fake_run(tmp_path)) == 0
    # a row per step: loss, fp16's skipped update, unreadable files, blanks, the stop flag
    assert CHECK_EVERY == 20 and reductions == [(20, 5), (20, 5), (10, 5)]
    (record,) = read_log(tmp_path)
    assert record["step"] == 50 and math.isfinite(record["train_loss"])


def test_a_loss_gone_non_finite_between_checks_is_found_at_its_step(tmp_path, capsys,
                                                                     monkeypatch):
    real, calls = F.cross_entropy, []

    def nan_at_step_5(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) * (float("nan") if len(calls) == 5 else 1.0)
    monkeypatch.setattr(F, "cross_entropy", nan_at_step_5)
    err = run_failing(fake_run(tmp_path), capsys, training_started=True)
    assert "loss is nan at step 5 (epoch 1)" in err and len(calls) == 20  # read at step 20
    assert read_log(tmp_path) == [{"epoch": 1, "step": 5, "diverged": "nan"}]
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "best.pt").exists()


def test_args_jsonl_records_the_code_that_ran(full_run):
    (entry,) = read_jsonl(full_run / "args.jsonl")
    for name in ("train.py", "vitc.py"):
        digest = hashlib.sha256((HERE / name).read_bytes()).hexdigest()
        assert entry["code"][f"{name}_sha256"] == digest
    git = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True,
                         text=True)
    expected = git.stdout.strip() if git.returncode == 0 else None  # not run from a checkout
    assert entry["code"]["git_commit"] == expected


def test_help_shows_the_recipe_and_the_run_apart(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    recipe, run = text.index("\nrecipe:"), text.index("\nrun:")
    for flag in ("--mixup", "--ema-alpha", "--precise-bn", "--epochs", "--lr"):
        assert recipe < text.index(f"  {flag} ") < run, flag
    for flag in ("--workers", "--resume", "--compile", "--out"):
        assert text.index(f"  {flag} ") > run, flag
