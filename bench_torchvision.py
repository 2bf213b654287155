"""Speed check: a training step of vitc.py's ViT against torchvision's VisionTransformer built with
the same configuration (same width, depth, heads, MLP, stem), timed side by side in one run.

    python bench_torchvision.py --models vitp_1gf vitc_1gf vitp_4gf vitc_4gf

On CUDA both run under bf16 autocast (and torch.compile with --compile); on the CPU in fp32. The
two implementations take turns, one training step each, so that machine noise hits both alike;
the median step time of each is reported with the ratio torchvision / ours (above 1: ours is
faster).
"""

import argparse
from functools import partial

import torch
import torch.nn as nn
from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer

import vitc


def torchvision_twin(name, img_size):
    cfg = vitc.VARIANTS[name]
    stem = [ConvStemConfig(c, 3, s, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU)
            for c, s in zip(cfg.stem_channels, cfg.stem_strides)] or None
    return VisionTransformer(image_size=img_size, patch_size=16, num_layers=cfg.depth,
                             num_heads=cfg.heads, hidden_dim=cfg.dim, mlp_dim=cfg.mlp_dim,
                             num_classes=1000, conv_stem_configs=stem,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vitp_1gf", "vitc_1gf"],
                        choices=list(vitc.VARIANTS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each model")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    print(f"device {device}, {'bf16 autocast' if cuda else 'fp32'}, batch {args.batch_size}, "
          f"img {args.img_size}, {torch.get_num_threads()} threads, compile {args.compile}")
    for name in args.models:
        models = {"ours": vitc.create_model(name, img_size=args.img_size).to(device),
                  "torchvision": torchvision_twin(name, args.img_size).to(device)}
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
        if counts["ours"] != counts["torchvision"]:
            raise SystemExit(f"{name}: the two models differ in size: {counts}")
        steps = {k: vitc.make_train_step(m, args.batch_size, args.img_size, amp=cuda,
                                         compile=args.compile) for k, m in models.items()}
        times = vitc.time_steps(steps, args.steps)
        median = {k: vitc.median(t) for k, t in times.items()}
        ratios = sorted(tv / ours for ours, tv in zip(times["ours"], times["torchvision"]))
        print(f"{name:<10} ours {args.batch_size / median['ours']:7.1f} img/s   torchvision "
              f"{args.batch_size / median['torchvision']:7.1f} img/s   torchvision/ours step "
              f"time: median of paired steps {vitc.median(ratios):.3f} "
              f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
