"""Training-step speed of the paper's models, side by side, and of the input pipeline that feeds
them (a benchmark, not part of the paper).

    python tools/bench.py --models vitp_1gf vitc_1gf                 # ViT_C vs ViT_P
    python tools/bench.py --models vitp_1gf vitc_1gf --torchvision   # ours vs torchvision's ViT
    python tools/bench.py --models vitp_4gf vitc_4gf --compile     # a GPU: MFU, batch 256

Each listed model (and, with --torchvision, torchvision's VisionTransformer built with the same
configuration) runs --steps full training steps (forward, backward, AdamW step on a fixed random
batch) in turn, round after round, so that a noisy machine slows all of them alike. A model's
images/s comes from the geometric mean of its step times, and each ratio is the geometric mean of
the per-round ratios, which is the ratio of those geometric means: the images/s and the ratio
columns always agree. On CUDA a round's steps are timed with CUDA events around all of them (one
synchronize at the end, as in training, where the host runs ahead of the GPU), with TF32 and
cudnn.benchmark on as in train.py, under bf16 autocast, or fp16 with loss scaling on GPUs before
compute capability 8.0 (the V100, which has no bf16). MFU (model-flops utilisation, the fraction
of the GPU's arithmetic the model's own multiply-adds use) is 6 x forward multiply-adds x images/s
over two peaks: the matmul rate measured on the same GPU at the same precision ("MFU matmul"), and
NVIDIA's datasheet figure for the GPU, dense (without sparsity), as papers report MFU ("MFU
datasheet"; n/a for a GPU missing from DATASHEET_TFLOPS).

The input pipeline (--loader DIR): can the CPU cores feed the GPU?

    python tools/bench.py --loader /tmp/jpegs --make-jpegs 1000 --workers 1 2   # generated JPEGs
    python tools/bench.py --loader /imagenet --models vitp_1gf vitc_1gf vitp_36gf vitc_36gf

DIR is an ImageFolder (DIR/CLASS/*.jpg), or a train.py data folder, whose DIR/train is then used;
--make-jpegs N first fills a DIR that does not exist yet with N ImageNet-like JPEGs (about
500x375, ~100 KB at quality 90, fixed seed). It prints, from one process with one thread (what
one loader worker on one core does), the images/s of: reading the files' bytes; PIL decode +
convert("RGB"); torchvision.io.decode_jpeg; and train.py's whole train pipeline
(runsafe's ImageFiles with train.build_transforms: decode, RandomResizedCrop, flip, AutoAugment v0),
one stage after another on the same images each round, so that after the read (which on a cold
disk measures the storage) the others measure the CPU. Then the same pipeline through a
DataLoader with each --workers count, timed after one warm-up batch per worker (their start-up).
Last, the CPU cores one GPU needs: a GPU's training images/s (on CUDA the training step above,
at --precision and --batch-size; without CUDA the paper's Table 1 epoch times on 8 V100s) over
the images/s per worker of the DataLoader with the most workers, and the share of the GPU's rate
that this machine's workers deliver.
"""

import itertools
import math
import os
import random
import re
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the repository and tools/, wherever run from
import train  # noqa: E402
from runsafe.images import ImageFiles  # noqa: E402
import vitc  # noqa: E402
from export import torchvision_twin  # noqa: E402  (the one mapping of our ViT onto torchvision's)
from runsafe.errors import HelpFormatter, Parser, RunError, run_cli  # noqa: E402


def seconds_per_call(fn, calls, cuda):
    """Mean seconds of `calls` calls of fn; on CUDA from events recorded before and after them all,
    with one synchronize at the end and none between calls."""
    if not cuda:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def make_train_step(model, batch_size, img_size, precision, compile=False, steps=1,
                    num_classes=1000):
    """A function that runs `steps` training steps of `model` on its device at `precision`
    (bf16, fp16 or fp32) and returns their mean seconds."""
    device = next(model.parameters()).device
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    opt = vitc.make_optimizer(model, "adamw", 1e-4, 0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # as train.py
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    run = torch.compile(model) if compile else model

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
            loss = F.cross_entropy(run(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return lambda: seconds_per_call(step, steps, device.type == "cuda")


def default_precision():
    """fp32 on the CPU; on CUDA bf16, or fp16 before compute capability 8.0 (the V100: no bf16)."""
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"


def matmul_peak(precision, n=8192, reps=20):
    """Achieved matmul FLOP/s on this GPU at `precision` (fp32: TF32 from the A100 on): the
    denominator of "MFU matmul"."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    seconds_per_call(lambda: a @ b, 3, cuda=True)  # warm-up
    return 2 * n ** 3 / seconds_per_call(lambda: a @ b, reps, cuda=True)


# Dense tensor-core TFLOP/s (the datasheets' figures "with sparsity" halved), per precision, from
# NVIDIA's datasheets; fp32 is TF32 (which bench.py turns on) from the A100 on. The first entry
# whose key is a word of torch.cuda.get_device_name() wins, so variants come before the plain name.
DATASHEET_TFLOPS = [
    ("V100S", {"fp16": 130}),  # NVIDIA V100 datasheet: V100S PCIe
    ("V100-PCIE", {"fp16": 112}),  # V100 PCIe
    ("V100", {"fp16": 125}),  # V100 SXM2
    ("A100", {"bf16": 312, "fp16": 312, "fp32": 156}),  # NVIDIA A100 datasheet: PCIe and SXM4
    ("H100 NVL", {"bf16": 835, "fp16": 835, "fp32": 417}),  # NVIDIA H100 datasheet
    ("H100 PCIe", {"bf16": 756, "fp16": 756, "fp32": 378}),
    ("H100", {"bf16": 989, "fp16": 989, "fp32": 494}),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", {"bf16": 835, "fp16": 835, "fp32": 417}),  # NVIDIA H200 datasheet
    ("H200", {"bf16": 989, "fp16": 989, "fp32": 494}),  # H200 SXM
    ("L4", {"bf16": 121, "fp16": 121, "fp32": 60}),  # NVIDIA L4 datasheet
    ("A10", {"bf16": 125, "fp16": 125, "fp32": 62.5}),  # NVIDIA A10 datasheet
]


def datasheet_peak(precision):
    """(FLOP/s or None, what it is): this GPU's entry in DATASHEET_TFLOPS at `precision`."""
    name = torch.cuda.get_device_name()
    for key, tflops in DATASHEET_TFLOPS:
        if re.search(rf"\b{re.escape(key)}\b", name, re.IGNORECASE):
            if precision not in tflops:
                return None, f"n/a (no {precision} figure for {name})"
            return tflops[precision] * 1e12, f"{tflops[precision]:g} TFLOP/s ({key})"
    return None, f"n/a (unknown GPU {name})"


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


def report(times, batch_size, pairs, flops, peaks):
    """peaks: {MFU column: FLOP/s, or None for n/a}; none without CUDA."""
    print(f"{'model':<22} {'img/s':>9} {'ms/step':>9}" + "".join(f" {c:>13}" for c in peaks))
    for name, seconds in times.items():
        step = geometric_mean(seconds)
        line = f"{name:<22} {batch_size / step:>9.1f} {step * 1e3:>9.1f}"
        for peak in peaks.values():  # training = 3 x the forward's multiply-adds, 2 flops each
            line += f" {6 * flops[name] * batch_size / step / peak:>13.1%}" if peak else \
                f" {'n/a':>13}"
        print(line)
    for a, b in pairs:
        ratios = [x / y for x, y in zip(times[a], times[b])]
        print(f"step time {a} / {b}: {geometric_mean(ratios):.3f} "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")


# The paper's Table 1: minutes per ImageNet-1k epoch (1,281,167 train images) on 8 V100 GPUs.
PAPER_EPOCH_MINUTES = {"vitp_1gf": 2.6, "vitp_4gf": 3.8, "vitp_18gf": 11.5, "vitp_36gf": 18.8,
                       "vitc_1gf": 2.7, "vitc_4gf": 3.9, "vitc_18gf": 11.4, "vitc_36gf": 18.6}
IMAGENET_TRAIN_IMAGES = 1281167


def make_jpegs(root, count, classes=8, seed=0):
    """Writes `count` ImageNet-like JPEGs to root/train/class_K/. JPEG decoding costs about in
    proportion to the compressed size, so they are made to compress like photos: smooth colour
    fields, a few hard-edged shapes, and grain (which sets the size: ~60-150 KB at quality 90)."""
    from PIL import ImageDraw
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)

    def smooth(h, w, cell):  # colour noise on a grid of `cell` pixels, interpolated
        noise = torch.rand(1, 3, h // cell + 2, w // cell + 2, generator=gen)
        return F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[0]
    for i in range(count):
        w, h = rng.randint(400, 600), rng.randint(300, 450)
        if rng.random() < 0.25:  # a quarter portrait
            w, h = h, w
        image = to_pil_image((255 * (0.7 * smooth(h, w, 64) + 0.3 * smooth(h, w, 8)))
                             .clamp(0, 255).to(torch.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(3, 10)):
            (x0, x1), (y0, y1) = sorted(rng.sample(range(w), 2)), sorted(rng.sample(range(h), 2))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x0, y0, x1, y1], fill=tuple(rng.randrange(256) for _ in range(3)))
        grain = rng.uniform(14, 34) * torch.randn(1, h, w, generator=gen)
        image = to_pil_image((pil_to_tensor(image) + grain).clamp(0, 255).to(torch.uint8))
        folder = os.path.join(root, "train", f"class_{i % classes}")
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def open_images(args):
    """train.py's train set on --loader DIR (or DIR/train): runsafe.images.ImageFiles with the train
    transforms train.py builds from its own defaults at --img-size."""
    folder = os.path.join(args.loader, "train")
    folder = folder if os.path.isdir(folder) else args.loader
    try:
        train_tf = train.build_transforms(train.parse_args(
            ["--data", args.loader, "--img-size", str(args.img_size)]))[0]
        return ImageFiles(folder, train_tf, replace=True, blank_size=args.img_size)
    except OSError as e:  # no class folders, or a class folder without images
        raise RunError(f"--loader {folder}: {str(e).splitlines()[0]}")


def describe(dataset, sample=500):
    """Mean file size and pixel size of up to `sample` files spread over the data set."""
    from PIL import Image

    def pixels(path):
        with Image.open(path) as image:  # reads the header only
            return image.size
    paths = [p for p, _ in dataset.samples[::max(1, len(dataset) // sample)]]
    sizes = [pixels(p) for p in paths]
    return (sum(map(os.path.getsize, paths)) / len(paths) / 1e3,
            *(round(sum(s[k] for s in sizes) / len(sizes)) for k in (0, 1)), len(paths))


def stage_steps(dataset, chunk, seed=0):
    """{stage: step()}: a step runs its stage on the next `chunk` images of a fixed random order
    and returns its seconds. All stages take the same images in a round, the read first."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    path = [dataset.samples[i][0] for i in order]

    def read(k):
        with open(path[k], "rb") as f:
            return f.read()
    stages = {"read file bytes": read,
              "PIL decode + convert RGB": lambda k: dataset.loader(path[k]),
              "torchvision.io.decode_jpeg": lambda k: decode_jpeg(read_file(path[k]),
                                                                  mode=ImageReadMode.RGB),
              "train pipeline (ImageFiles)": lambda k: dataset[order[k]]}

    def make_step(name, run):
        rounds = itertools.count()

        def step():
            first = next(rounds) * chunk
            start = time.perf_counter()
            try:
                for k in range(first, first + chunk):
                    run(k % len(order))
            except (OSError, RuntimeError, ValueError) as e:  # e.g. decode_jpeg on a PNG
                raise RunError(f"{name}: {path[k % len(order)]}: {type(e).__name__}: {e}"
                               .splitlines()[0])
            return time.perf_counter() - start
        return step
    return {name: make_step(name, run) for name, run in stages.items()}


def time_loader(dataset, workers, batch_size, images, pin_memory):
    """(images/s, seconds to the first batch) of `dataset` through a DataLoader. Each worker
    makes whole batches, so the warm-up is one batch per worker (their start-up included) and
    the timed part whole rounds of one batch per worker: batches already prepared while the
    warm-up ones were awaited do not flatter the rate."""
    from torch.utils.data import DataLoader, RandomSampler
    rounds = max(1, math.ceil(images / (batch_size * workers)))
    sampler = RandomSampler(dataset, num_samples=(rounds + 1) * workers * batch_size,
                            generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    batches = iter(DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers,
                              pin_memory=pin_memory))
    next(batches)
    first = time.perf_counter() - start
    for _ in range(workers - 1):
        next(batches)
    start = time.perf_counter()
    count = sum(len(labels) for _, labels, _ in batches)
    return count / (time.perf_counter() - start), first


def gpu_images_per_sec(args):
    """{model: (training images/s of one GPU, where that comes from)}."""
    if not torch.cuda.is_available():
        return {name: (IMAGENET_TRAIN_IMAGES / (PAPER_EPOCH_MINUTES[name] * 60) / 8,
                       f"paper Table 1, {PAPER_EPOCH_MINUTES[name]} min/epoch on 8 V100s")
                for name in args.models}
    steps = {name: make_train_step(vitc.create_model(name, img_size=args.img_size).cuda(),
                                   args.batch_size, args.img_size, args.precision, args.compile,
                                   args.steps)
             for name in args.models}
    source = f"{torch.cuda.get_device_name()}, {args.precision} step, batch {args.batch_size}"
    return {name: (args.batch_size / geometric_mean(seconds), source)
            for name, seconds in time_rounds(steps, args.rounds).items()}


def bench_loader(args):
    """The input pipeline benchmark (see the module docstring)."""
    if args.make_jpegs and not os.path.exists(args.loader):
        start = time.perf_counter()
        try:
            make_jpegs(args.loader, args.make_jpegs)
        except OSError as e:
            raise RunError(f"--make-jpegs: cannot write to {args.loader} ({e.strerror or e})")
        print(f"made {args.make_jpegs} JPEGs in {args.loader}/train "
              f"({time.perf_counter() - start:.0f} s)")
    elif args.make_jpegs:
        print(f"{args.loader} exists: using its images, none generated")
    if not os.path.isdir(args.loader):
        raise RunError(f"--loader {args.loader}: no such folder (--make-jpegs N generates one)")
    dataset = open_images(args)
    import torchvision
    from PIL import __version__ as pil_version
    from PIL import features
    kb, width, height, sampled = describe(dataset)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {pil_version} "
          f"(libjpeg-turbo {features.version_feature('libjpeg_turbo')}), {os.cpu_count()} cores, "
          f"load average {load:.2f}")
    print(f"{dataset.root}: {len(dataset)} images, {len(dataset.classes)} classes, mean "
          f"{kb:.1f} KB and {width}x{height} px ({sampled} files); train pipeline at "
          f"{args.img_size} px")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one stage = one core, as in a loader worker (which has 1 thread)
    torch.manual_seed(0)  # the augmentations' draws
    chunk = max(1, args.images // args.rounds)
    times = time_rounds(stage_steps(dataset, chunk), args.rounds, warmup=1)
    torch.set_num_threads(threads)
    print(f"\none process, one thread: {args.rounds} rounds of {chunk} images per stage")
    print(f"{'stage':<30} {'img/s':>9} {'ms/img':>8}  rounds img/s")
    for name, seconds in times.items():
        rates = [chunk / s for s in seconds]
        print(f"{name:<30} {chunk / geometric_mean(seconds):>9.1f} "
              f"{geometric_mean(seconds) / chunk * 1e3:>8.2f}  {min(rates):.0f}-{max(rates):.0f}")
    per_core = chunk / geometric_mean(times["train pipeline (ImageFiles)"])

    print(f"\nDataLoader of the train pipeline, batch {args.batch_size}: >= {args.images} images "
          f"timed after a warm-up batch per worker\n(first batch: the workers' start-up + one "
          f"batch, which alone takes {args.batch_size / per_core:.2f} s at the one-process rate)")
    print(f"{'workers':>7} {'img/s':>9} {'per worker':>10} {'vs 1 process':>12} "
          f"{'first batch s':>13}")
    loader = {}
    for workers in args.workers:
        rate, first = time_loader(dataset, workers, args.batch_size, args.images,
                                  torch.cuda.is_available())
        loader[workers] = rate
        print(f"{workers:>7} {rate:>9.1f} {rate / workers:>10.1f} "
              f"{rate / workers / per_core:>12.0%} {first:>13.2f}")

    # Cores from the DataLoader's rate, not the bare pipeline's: what train.py actually gets;
    # the best rate per worker, as a busy machine slows the runs with more workers most.
    most = max(loader)
    per_worker = max(rate / workers for workers, rate in loader.items())
    print(f"\nCPU cores one GPU needs = its training img/s / {per_worker:.1f} img/s per loader "
          f"worker (the best per-worker rate above); 'fed' = the share of the GPU's img/s that "
          f"the {most} workers above deliver" + ("" if torch.cuda.is_available() else
          "\nno CUDA here: the GPU img/s are the paper's, ImageNet epoch time (Table 1) / 8 V100s"))
    print(f"{'model':<10} {'GPU img/s':>9} {'cores':>6} {'fed':>5}  GPU img/s from")
    for name, (rate, source) in gpu_images_per_sec(args).items():
        print(f"{name:<10} {rate:>9.1f} {rate / per_worker:>6.1f} "
              f"{min(1.0, loader[most] / rate):>5.0%}  {source}")


def main(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0],
                          formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vitp_1gf", "vitc_1gf"],
                        choices=list(vitc.VARIANTS), metavar="NAME",
                        help=f"any of {', '.join(vitc.VARIANTS)}")
    parser.add_argument("--torchvision", action="store_true",
                        help="also time torchvision's VisionTransformer twin of each model")
    parser.add_argument("--batch-size", type=int,
                        help="images per step (default: 256 on CUDA, lower it if memory runs "
                             "out; 32 on the CPU, 256 with --loader, also per DataLoader batch)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                        help="autocast dtype, fp16 with loss scaling; fp32 is TF32 on CUDA "
                             "(default: bf16 on CUDA, fp16 before compute capability 8.0, fp32 "
                             "on the CPU)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds")
    parser.add_argument("--steps", type=int,
                        help="training steps per model and round, timed together (default: 10 "
                             "on CUDA, 1 on the CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--loader", metavar="DIR",
                        help="time the input pipeline on the JPEGs in DIR (or DIR/train), one "
                             "sub-folder per class, instead of the training step")
    parser.add_argument("--make-jpegs", type=int, metavar="N",
                        help="--loader: if DIR does not exist, first fill it with N generated "
                             "ImageNet-like JPEGs (default: none)")
    parser.add_argument("--workers", type=int, nargs="+", metavar="N",
                        default=sorted({1, os.cpu_count() or 1}),
                        help="--loader: DataLoader worker counts to time")
    parser.add_argument("--images", type=int, default=2048,
                        help="--loader: images timed per stage and per worker count")
    args = parser.parse_args(argv)
    if args.make_jpegs is not None and args.loader is None:
        raise RunError("--make-jpegs N makes JPEGs for --loader DIR: pass --loader too")
    cuda = torch.cuda.is_available()
    if cuda:  # as train.py
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    args.precision = args.precision or default_precision()
    args.steps = (10 if cuda else 1) if args.steps is None else args.steps
    if args.batch_size is None:
        args.batch_size = 256 if cuda or args.loader is not None else 32
    if min(args.batch_size, args.rounds, args.steps) < 1:
        raise RunError("--batch-size, --rounds and --steps must be >= 1")
    if args.loader is not None:
        if min(args.images, *args.workers) < 1 or (
                args.make_jpegs is not None and args.make_jpegs < 1):
            raise RunError("--images, --workers and --make-jpegs must be >= 1")
        if args.torchvision:
            raise RunError("--torchvision times training steps: it has no meaning with --loader")
        bench_loader(args)
        return 0
    device = "cuda" if cuda else "cpu"
    detail, peaks = args.precision, {}
    if cuda:
        peaks["MFU matmul"] = matmul_peak(args.precision)
        peaks["MFU datasheet"], sheet = datasheet_peak(args.precision)
        detail += (f"; peak: matmul measured {peaks['MFU matmul'] / 1e12:.0f} TFLOP/s, "
                   f"datasheet {sheet}")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if cuda else 'cpu'} "
          f"({detail}), {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.img_size} px, compile {args.compile}, {args.rounds} rounds x {args.steps} steps")
    models, pairs = {}, []
    for name in args.models:
        models[name] = vitc.create_model(name, img_size=args.img_size)
        if args.torchvision:
            twin = torchvision_twin(name, args.img_size)
            sizes = [sum(p.numel() for p in m.parameters()) for m in (twin, models[name])]
            if sizes[0] != sizes[1]:
                raise RunError(f"{name} and its torchvision twin differ in size {sizes}")
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
    steps = {name: make_train_step(m, args.batch_size, args.img_size, args.precision,
                                   args.compile, args.steps) for name, m in models.items()}
    report(time_rounds(steps, args.rounds), args.batch_size, pairs, flops, peaks)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "bench.py"))
