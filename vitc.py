"""ViT_P and ViT_C of "Early Convolutions Help Transformers See Better" (Xiao et al., 2021).

The paper replaces ViT's patchify stem (one 16x16, stride-16 convolution) by a convolutional stem
(a few 3x3 convolutions with BatchNorm and ReLU, then a 1x1 convolution to the transformer width)
and removes one transformer block so that flops stay equal. This file holds, in reading order:
the two stems, the transformer, the ViT, the paper's eight variants, complexity counting exactly as
the paper counts it, and the optimizer and learning-rate schedule factories.

    python vitc.py    # complexity table of the eight variants (benchmarks: tools/bench.py)

Imports only the standard library and torch; `ConvStem` needs nothing but `torch.nn` and `math`.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# Stems: (B, in_chans, H, W) -> (B, dim, H / stride, W / stride), with `stride` an attribute.
# ------------------------------------------------------------------------------------------------


class PatchifyStem(nn.Module):
    """ViT's original stem: one patch_size x patch_size convolution with stride patch_size."""

    def __init__(self, dim, patch_size=16, in_chans=3):
        super().__init__()
        if patch_size < 1 or dim < 1 or in_chans < 1:
            raise ValueError(f"PatchifyStem: dim, patch_size and in_chans must be positive, "
                             f"got dim={dim}, patch_size={patch_size}, in_chans={in_chans}")
        self.in_chans, self.stride = in_chans, patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        # Official init: trunc_normal_(std=sqrt(1 / fan_in)) with its default bounds of +-2
        # (absolute, i.e. ~50 std here, so in effect a plain normal), zero bias.
        fan_in = in_chans * patch_size * patch_size
        nn.init.trunc_normal_(self.proj.weight, std=math.sqrt(1.0 / fan_in), a=-2.0, b=2.0)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        if x.shape[-2] % self.stride or x.shape[-1] % self.stride:  # would drop a partial patch
            raise ValueError(f"PatchifyStem: a {x.shape[-2]}x{x.shape[-1]} input is not a "
                             f"multiple of the patch size {self.stride}")
        return self.proj(x)  # (B, dim, H / patch_size, W / patch_size)


class ConvStem(nn.Module):
    """The paper's convolutional stem (section 3): [3x3 conv -> BatchNorm -> ReLU] per entry of
    `channels`/`strides`, then a 1x1 conv with bias to `dim` and nothing after it.

    ConvStem(768, channels=(64, 128, 128, 256, 256, 512), strides=(2, 2, 1, 2, 1, 2)) is the stem
    of ViT_C-18GF; its `stride` attribute is the product of the strides (16 for all paper stems).
    """

    def __init__(self, dim, channels, strides, in_chans=3):
        super().__init__()
        channels, strides = tuple(channels), tuple(strides)
        if not channels or len(channels) != len(strides):
            raise ValueError(f"ConvStem: channels and strides must be non-empty and of equal "
                             f"length, got channels={channels}, strides={strides}")
        if any(s not in (1, 2) for s in strides):
            raise ValueError(f"ConvStem: every stride must be 1 or 2, got strides={strides}")
        if min(channels) < 1 or dim < 1 or in_chans < 1:
            raise ValueError(f"ConvStem: dim, channels and in_chans must be positive, "
                             f"got dim={dim}, channels={channels}, in_chans={in_chans}")
        self.in_chans, self.stride = in_chans, math.prod(strides)
        layers, prev = [], in_chans
        for out, stride in zip(channels, strides):
            conv = nn.Conv2d(prev, out, 3, stride=stride, padding=1, bias=False)
            nn.init.normal_(conv.weight, std=math.sqrt(2.0 / out))  # official init
            layers += [conv, nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            prev = out
        last = nn.Conv2d(prev, dim, 1)  # plays the role of the patchify conv: bias, no norm/act
        nn.init.normal_(last.weight, std=math.sqrt(1.0 / dim))
        nn.init.zeros_(last.bias)
        self.layers = nn.Sequential(*layers, last)

    def forward(self, x):
        if x.shape[-2] % self.stride or x.shape[-1] % self.stride:  # padding would round it up
            raise ValueError(f"ConvStem: a {x.shape[-2]}x{x.shape[-1]} input is not a multiple "
                             f"of the stem's stride {self.stride}, so its grid would not be a "
                             f"patchify stem's")
        return self.layers(x)  # (B, dim, H / stride, W / stride)


# ------------------------------------------------------------------------------------------------
# Transformer: pre-norm blocks; no dropout, stochastic depth or layer scale (section 3).
# ------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, initialised like
    nn.MultiheadAttention (Xavier-uniform over the whole 3d x d input projection, zero biases)."""

    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)  # weight keeps nn.Linear's default init, as in PyTorch MHA
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # unbind, not qkv[i]: its backward needs no zero-filled buffers
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D / heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim, mlp_dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)
        for fc in (self.fc1, self.fc2):  # official init: Xavier-uniform, biases N(0, 1e-6)
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), MLP(dim, mlp_dim)

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ------------------------------------------------------------------------------------------------
# ViT: stem -> tokens + class token + position embedding -> blocks -> LayerNorm -> head(class token)
# ------------------------------------------------------------------------------------------------


class ViT(nn.Module):
    def __init__(self, stem, dim, depth, heads, mlp_dim, num_classes=1000, img_size=224):
        super().__init__()
        if img_size % stem.stride:
            raise ValueError(f"ViT: img_size {img_size} is not a multiple of the stem's total "
                             f"stride {stem.stride}")
        self.img_size, self.in_chans = img_size, stem.in_chans
        num_tokens = 1 + (img_size // stem.stride) ** 2  # class token + 14 x 14 grid at 224
        self.stem = stem
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, dim))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)  # official init: the classifier starts at zero
        nn.init.zeros_(self.head.bias)

    def forward(self, x):  # (B, 3, S, S) -> (B, num_classes)
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"ViT: input is {x.shape[-2]}x{x.shape[-1]} but the model was built "
                             f"for {self.img_size}x{self.img_size} (pass img_size= to build it)")
        x = self.stem(x).flatten(2).transpose(1, 2)  # (B, N - 1, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))  # (B, N, D)
        return self.head(x[:, 0])


# ------------------------------------------------------------------------------------------------
# The paper's eight variants (Table 1; section 3). ViT_C = ViT_P with a conv stem, one block fewer.
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTConfig:
    dim: int  # transformer width d
    depth: int  # number of transformer blocks
    heads: int  # attention heads (head width 64 everywhere)
    mlp_dim: int  # hidden width of the MLP: 3d at 1 and 4GF, 4d at 18 and 36GF
    stem_channels: tuple = ()  # conv stem: output channels of each 3x3 conv; () = patchify stem
    stem_strides: tuple = ()  # conv stem: stride of each 3x3 conv, their product is 16


_STEM_1GF, _STEM_4GF = ((24, 48, 96, 192), (2, 2, 2, 2)), ((48, 96, 192, 384), (2, 2, 2, 2))
_STEM_18GF = ((64, 128, 128, 256, 256, 512), (2, 2, 1, 2, 1, 2))  # also the 36GF stem


def _with_conv_stem(cfg, stem):  # section 3: swap the stem, drop one block to keep the flops
    return replace(cfg, depth=cfg.depth - 1, stem_channels=stem[0], stem_strides=stem[1])


VARIANTS = {
    "vitp_1gf": ViTConfig(dim=192, depth=12, heads=3, mlp_dim=576),
    "vitp_4gf": ViTConfig(dim=384, depth=12, heads=6, mlp_dim=1152),
    "vitp_18gf": ViTConfig(dim=768, depth=12, heads=12, mlp_dim=3072),  # = ViT-B/16
    "vitp_36gf": ViTConfig(dim=1024, depth=14, heads=16, mlp_dim=4096),
}
VARIANTS.update({
    "vitc_1gf": _with_conv_stem(VARIANTS["vitp_1gf"], _STEM_1GF),
    "vitc_4gf": _with_conv_stem(VARIANTS["vitp_4gf"], _STEM_4GF),
    "vitc_18gf": _with_conv_stem(VARIANTS["vitp_18gf"], _STEM_18GF),
    "vitc_36gf": _with_conv_stem(VARIANTS["vitp_36gf"], _STEM_18GF),
})


def create_model(name, num_classes=1000, img_size=224):
    """One of the paper's variants by name, e.g. create_model("vitc_4gf", img_size=64)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(VARIANTS)}")
    if img_size < 16 or img_size % 16:
        raise ValueError(f"img_size must be a positive multiple of 16, got {img_size}")
    cfg = VARIANTS[name]
    if cfg.stem_channels:
        stem = ConvStem(cfg.dim, cfg.stem_channels, cfg.stem_strides)
    else:
        stem = PatchifyStem(cfg.dim, patch_size=16)
    return ViT(stem, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_dim, num_classes, img_size)


# ------------------------------------------------------------------------------------------------
# Complexity as in Table 1, counted as the official code (pycls/models/vit.py) counts it: flops
# are multiply-adds of convolutions, linear layers and the two attention matmuls, plus one op per
# bias element at every output position; acts are the output elements of those same operations;
# params are all parameters.
# ------------------------------------------------------------------------------------------------


def complexity(model, bias_flops=True):
    """{"flops", "params", "acts"} of `model` for one image at model.img_size, as integers.

    Runs one forward pass on the meta device with hooks, so nothing is computed and the model is
    not modified. bias_flops=False leaves out the bias adds, which is what FlopCounterMode counts
    (at two flops per multiply-add)."""
    counts = {"flops": 0, "acts": 0}

    def count(module, inputs, out):
        if isinstance(module, Attention):  # QK^T and AV: N^2 d multiply-adds each
            _, N, D = inputs[0].shape
            counts["flops"] += 2 * N * N * D
            counts["acts"] += module.heads * N * N + N * D
            return
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            per_output = module.in_features
        has_bias = bias_flops and module.bias is not None
        counts["flops"] += out.numel() * (per_output + has_bias)
        counts["acts"] += out.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear, Attention))]
    state = {k: torch.empty_like(v, device="meta")
             for k, v in [*model.named_parameters(), *model.named_buffers()]}
    x = torch.empty(1, model.in_chans, model.img_size, model.img_size, device="meta")
    try:
        with torch.no_grad():
            torch.func.functional_call(model, state, (x,))
    finally:
        for h in hooks:
            h.remove()
    return {"flops": counts["flops"], "params": sum(p.numel() for p in model.parameters()),
            "acts": counts["acts"]}


# ------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule (section 5.4 and appendix).
# ------------------------------------------------------------------------------------------------

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def param_groups(model, weight_decay):
    """Two groups: decay on weights, position embedding and class token (as the official code);
    no decay on normalisation gains and on any bias, which the paper calls crucial."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(module, _NORMS) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, name, lr, weight_decay, momentum=0.9, betas=(0.9, 0.999)):
    """AdamW or SGD (momentum 0.9, Nesterov as in the official code) with no decay on norms and
    biases; uses the fused kernels on CPU and CUDA, where they are many times faster."""
    groups = param_groups(model, weight_decay)
    device = next(model.parameters()).device.type
    fast = {"fused": True} if device in ("cpu", "cuda") else {"foreach": True}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **fast)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, **fast)
    raise ValueError(f"unknown optimizer {name!r}; valid names: adamw, sgd")


def scale_lr(lr, batch_size, base_batch_size=2048):
    """Linear scaling rule: the paper quotes learning rates at batch 2048."""
    return lr * batch_size / base_batch_size


def lr_factor(step, total_steps, warmup_steps, warmup_start=0.1, floor=0.005):
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup from
    warmup_start to 1 over warmup_steps, then a half-period cosine from 1 down to `floor`, which
    the last step (total_steps - 1) reaches exactly. The official code instead changes the lr once
    per epoch, with the cosine spanning the whole run and the warmup multiplied onto it; the
    endpoints (0.1x start, 0.005x floor) are the official ones."""
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_scheduler(optimizer, total_steps, warmup_steps, warmup_start=0.1, floor=0.005):
    """LambdaLR applying lr_factor; call scheduler.step() after every optimizer step."""
    if total_steps < 1 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps < total_steps, got "
                         f"total_steps={total_steps}, warmup_steps={warmup_steps}")
    if not 0.0 <= floor <= 1.0 or not 0.0 <= warmup_start <= 1.0:
        raise ValueError(f"floor and warmup_start are fractions of the peak lr in [0, 1], got "
                         f"floor={floor}, warmup_start={warmup_start}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, warmup_start, floor))


# ------------------------------------------------------------------------------------------------
# Command line: the complexity table (benchmarks live in tools/bench.py)
# ------------------------------------------------------------------------------------------------


def stem_description(name):
    cfg = VARIANTS[name]
    if not cfg.stem_channels:
        return "patchify 16x16 / 16"
    return f"conv {list(cfg.stem_channels)} / {list(cfg.stem_strides)} + 1x1"


def print_complexity_table():
    print(f"{'model':<10} {'GF':>6} {'params M':>9} {'acts M':>7} {'blocks':>6}  stem")
    for size in ("1gf", "4gf", "18gf", "36gf"):
        for name in (f"vitp_{size}", f"vitc_{size}"):
            with torch.device("meta"):  # counting needs shapes only: build nothing real
                cx = complexity(create_model(name))
            print(f"{name:<10} {cx['flops'] / 1e9:>6.2f} {cx['params'] / 1e6:>9.2f} "
                  f"{cx['acts'] / 1e6:>7.2f} {VARIANTS[name].depth:>6}  {stem_description(name)}")


if __name__ == "__main__":
    print_complexity_table()
