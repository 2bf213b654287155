"""Tests for vitc.py (the models, complexity, optimizer and schedule) and train.py (the recipe,
DDP, checkpoints, bad input). CPU only; run with `python -m pytest -q`."""

import inspect
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vitc

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
    with FlopCounterMode(display=False) as counter:
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
        w, std = model.stem.proj.weight, math.sqrt(1 / 768)
        assert w.abs().max() <= 2 * std and (model.stem.proj.bias == 0).all()
        assert w.std().item() == pytest.approx(0.88 * std, rel=0.05)  # 2-std truncation: 0.88x
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
