"""A small learnable ImageFolder, for trying train.py and tools/sweep.py on a CPU (a tool, not
part of the paper).

    python tools/toydata.py data/toy                    # 320 train and 200 val PNGs, 40x40
    python train.py --data data/toy --model vitp_1gf --img-size 32 --batch-size 16 \\
        --epochs 15 --warmup-epochs 1 --lr 0.03 --workers 0

Four classes, each image's class being its pattern: horizontal stripes, vertical stripes, a disc,
or a smooth gradient, with random colours, periods, phases, sizes and places (chance: 25% top-1).
The test suite trains both 1GF models on it until they classify it.
"""

import argparse
import json
import os
import random
import sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runsafe.errors import Parser, RunError, run_cli  # noqa: E402  (one-line errors, as train.py's)

PATTERNS = ("hstripes", "vstripes", "disc", "gradient")


def draw_pattern(kind, rng, size=40):
    """A random-coloured image whose class is its pattern (see the module docstring)."""
    background = tuple(rng.randrange(256) for _ in range(3))
    colour = tuple((c + rng.randrange(96, 160)) % 256 for c in background)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    period, phase = rng.randrange(8, 17), rng.randrange(16)
    if kind == "hstripes":
        for y in range(-phase, size, period):
            draw.rectangle([0, y, size, y + period // 2 - 1], fill=colour)
    elif kind == "vstripes":
        for x in range(-phase, size, period):
            draw.rectangle([x, 0, x + period // 2 - 1, size], fill=colour)
    elif kind == "disc":
        r = rng.randrange(size // 4, size // 2)
        x, y = rng.randrange(r, size - r + 1), rng.randrange(r, size - r + 1)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    else:
        vertical = rng.random() < 0.5
        for i in range(size):
            shade = tuple(round(b + (c - b) * i / (size - 1)) for b, c in zip(background, colour))
            draw.line([(i, 0), (i, size)] if vertical else [(0, i), (size, i)], fill=shade)
    return image


TOY_MARK = "toydata.json"  # in the folder's root: plots of runs on it say they are toy data


def make(root, train=80, val=50, size=40, seed=0):
    """root/{train,val}/PATTERN/N.png: `train` and `val` images per class, and root/TOY_MARK."""
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, TOY_MARK), "w") as f:
        json.dump({"classes": len(PATTERNS), "train_images": train * len(PATTERNS),
                   "val_images": val * len(PATTERNS), "size": size}, f)
    for split, count in (("train", train), ("val", val)):
        for kind in PATTERNS:
            folder = os.path.join(root, split, kind)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                draw_pattern(kind, rng, size).save(os.path.join(folder, f"{i}.png"))


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("root", help="the folder to create (it must not exist)")
    p.add_argument("--train", type=int, default=80, help="train images per class")
    p.add_argument("--val", type=int, default=50, help="val images per class")
    p.add_argument("--size", type=int, default=40, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if os.path.exists(args.root):
        raise RunError(f"{args.root} exists: choose a new folder")
    if min(args.train, args.val) < 1 or args.size < 8:
        raise RunError("--train and --val must be at least 1 and --size at least 8")
    make(args.root, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.root}: {4 * args.train} train and {4 * args.val} val images, "
          f"{args.size}x{args.size}, 4 classes")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "toydata.py"))
