"""Training-step speed of the paper's models, side by side (a benchmark, not part of the paper).

    python tools/bench.py --models vitp_1gf vitc_1gf                 # ViT_C vs ViT_P
    python tools/bench.py --models vitp_1gf vitc_1gf --torchvision   # ours vs torchvision's ViT
    python tools/bench.py --models vitp_4gf vitc_4gf --batch-size 256 --compile   # a GPU, MFU

Each listed model (and, with --torchvision, torchvision's VisionTransformer built with the same
configuration) runs one full training step (forward, backward, AdamW step on a fixed random batch)
in turn, round after round, so that a noisy machine slows all of them alike. A model's images/s
comes from the geometric mean of its step times, and each ratio is the geometric mean of the
per-round ratios, which is the ratio of those geometric means: the images/s and the ratio columns
always agree. On CUDA the steps run under bf16 autocast with TF32 on, and MFU (model-flops
utilisation, the fraction of the GPU's arithmetic the model's own multiply-adds use) is
6 x forward multiply-adds x images/s over the bf16 matmul rate measured on the same GPU.
"""

import argparse
import math
import os
import sys
import time
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vitc  # noqa: E402  (the repository root, wherever this script is run from)


def torchvision_twin(name, img_size=224, num_classes=1000):
    """torchvision's VisionTransformer with the width, depth, heads, MLP and stem of `name`."""
    from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer
    cfg = vitc.VARIANTS[name]
    stem = [ConvStemConfig(c, 3, s, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU)
            for c, s in zip(cfg.stem_channels, cfg.stem_strides)] or None
    return VisionTransformer(image_size=img_size, patch_size=16, num_layers=cfg.depth,
                             num_heads=cfg.heads, hidden_dim=cfg.dim, mlp_dim=cfg.mlp_dim,
                             num_classes=num_classes, conv_stem_configs=stem,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6))


def make_train_step(model, batch_size, img_size, amp=False, compile=False, num_classes=1000):
    """A function that runs one training step of `model` on its device and returns its seconds."""
    device = next(model.parameters()).device
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    opt = vitc.make_optimizer(model, "adamw", 1e-4, 0.05)
    run = torch.compile(model) if compile else model
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start
    return step


def bf16_matmul_peak(n=8192, reps=20):
    """Achieved bf16 matmul FLOP/s on this GPU: the denominator of MFU."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def geometric_mean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def time_rounds(steps, rounds, warmup=2):
    """{name: [seconds per timed round]}: each round runs one step of every model in turn."""
    times = {name: [] for name in steps}
    for i in range(warmup + rounds):
        for name, step in steps.items():
            seconds = step()
            if i >= warmup:  # warm-up rounds include allocation, autotuning and compilation
                times[name].append(seconds)
    return times


def report(times, batch_size, pairs, flops=None, peak=None):
    print(f"{'model':<22} {'img/s':>9} {'ms/step':>9}" + ("      MFU" if peak else ""))
    for name, seconds in times.items():
        step = geometric_mean(seconds)
        line = f"{name:<22} {batch_size / step:>9.1f} {step * 1e3:>9.1f}"
        if peak:  # training = forward + backward = 3 x the forward's multiply-adds, 2 flops each
            line += f" {6 * flops[name] * batch_size / step / peak:>8.1%}"
        print(line)
    for a, b in pairs:
        ratios = [x / y for x, y in zip(times[a], times[b])]
        print(f"step time {a} / {b}: {geometric_mean(ratios):.3f} "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vitp_1gf", "vitc_1gf"],
                        choices=list(vitc.VARIANTS), metavar="NAME",
                        help=f"any of {', '.join(vitc.VARIANTS)}")
    parser.add_argument("--torchvision", action="store_true",
                        help="also time torchvision's VisionTransformer twin of each model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak = bf16_matmul_peak() if cuda else None
    detail = f"bf16, matmul peak {peak / 1e12:.0f} TFLOP/s" if cuda else "fp32"
    print(f"torch {torch.__version__}, {device} ({detail}), {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, {args.img_size} px, compile {args.compile}, "
          f"{args.rounds} rounds")
    models, pairs = {}, []
    for name in args.models:
        models[name] = vitc.create_model(name, img_size=args.img_size)
        if args.torchvision:
            twin = torchvision_twin(name, args.img_size)
            sizes = [sum(p.numel() for p in m.parameters()) for m in (twin, models[name])]
            if sizes[0] != sizes[1]:
                sys.exit(f"bench.py: error: {name} and its torchvision twin differ in size {sizes}")
            models[f"{name} (torchvision)"] = twin
            pairs.append((f"{name} (torchvision)", name))
        paired = name.replace("vitc_", "vitp_")
        if name.startswith("vitc_") and paired in args.models:
            pairs.append((name, paired))
    flops = {}
    for name, model in models.items():
        with torch.device("meta"):  # the twin has our model's flops: count ours
            base = name.split(" ")[0]
            flops[name] = vitc.complexity(vitc.create_model(base, img_size=args.img_size),
                                          bias_flops=False)["flops"]
        model.to(device)
    steps = {name: make_train_step(m, args.batch_size, args.img_size, amp=cuda,
                                   compile=args.compile) for name, m in models.items()}
    report(time_rounds(steps, args.rounds), args.batch_size, pairs, flops, peak)


if __name__ == "__main__":
    main()
