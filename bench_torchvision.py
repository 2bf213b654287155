"""Speed check: a training step of vitc.py's ViT against torchvision's VisionTransformer built with
the same configuration (same width, depth, heads, MLP, stem), timed side by side in one run.

    python bench_torchvision.py --models vitp_1gf vitc_1gf vitp_4gf vitc_4gf

On CUDA both run under bf16 autocast (and torch.compile with --compile); on the CPU in fp32. The
two implementations are timed in alternating rounds so that machine noise hits both alike; the
median step time of each is reported with the ratio torchvision / ours (above 1: ours is faster).
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
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
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
        assert counts["ours"] == counts["torchvision"], f"configurations differ: {counts}"
        times = {k: [] for k in models}
        for _ in range(args.rounds):
            for key, model in models.items():
                times[key] += vitc.train_step_times(model, args.batch_size, args.img_size,
                                                    args.steps, warmup=1, amp=cuda,
                                                    compile=args.compile)
        median = {k: sorted(t)[len(t) // 2] for k, t in times.items()}
        print(f"{name:<10} ours {args.batch_size / median['ours']:8.1f} img/s   torchvision "
              f"{args.batch_size / median['torchvision']:8.1f} img/s   torchvision/ours step time "
              f"{median['torchvision'] / median['ours']:.3f}")


if __name__ == "__main__":
    main()
