"""Images per second through the training input pipeline, against Pillow alone, beside the model's step.

    python benchmarks/loader.py                     # 512 generated 500x375 JPEGs, 1 and 2 workers
    python benchmarks/loader.py --model             # and the ResNet-50 train step's images/s
    python benchmarks/loader.py --images 32 --batch 8 --workers 1 --repeats 1     # a smoke run

The work per image is torchvision's training preset: decode the JPEG, RandomResizedCrop
to 224 (bilinear), horizontal flip with probability 1/2, scale to [0, 1], normalise.
The report gives, in one run:

* **pillow-floor** - that work done the plain way in this one process: a full
  ``Image.open(...).convert("RGB")``, Pillow crop + resize + flip, NumPy scale and
  normalise, image by image (what a torchvision pipeline does in one process);
* **numres, 0 workers** - :class:`numres.data.ImageLoader` doing the same in-process
  (drafted JPEG decoding, batches normalised in one pass), with and without drafting;
* **numres, k workers** - the loader with ``k`` worker processes (``--workers``);
* with ``--model``: the ResNet-50 train step (forward, backward, SGD) at ``--model-batch``,
  in images/s, so the reader sees which of the two is the bottleneck on this machine.

Loader rates are the median over ``--repeats`` epochs after one warm-up epoch (which
starts the workers).  It also states how many worker processes a GPU needs: the GPU's
train-step rate (``--gpu-images-per-second``, or the best numres train rate found in
``benchmarks/results/gpu_resnet50_*.json``) divided by one worker's rate.  Results go to
``benchmarks/results/loader.json``.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="JPEGs to generate (default 512)")
    parser.add_argument("--image-size", default="500x375", help="width x height of the JPEGs")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per setting")
    parser.add_argument("--data-dir", help="reuse (or create) the generated JPEGs here instead of a temp folder")
    parser.add_argument("--model", action="store_true", help="also time the ResNet-50 train step")
    parser.add_argument("--model-batch", type=int, default=8)
    parser.add_argument("--model-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for the model step")
    parser.add_argument("--gpu-images-per-second", type=float, help="a GPU train-step rate to size workers for")
    parser.add_argument("--out", default=RESULTS)
    return parser.parse_args(argv)


# --- the data -----------------------------------------------------------------------------------------

def photo(rng, width, height):
    """A photo-like picture: smooth gradients, a few shapes and sensor-like noise (JPEG compresses it ~10:1)."""
    from PIL import Image, ImageDraw
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack([127 + 90 * np.sin(xx / rng.uniform(30, 90) + phase[c] + yy / rng.uniform(40, 120))
                     for c in range(3)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        x1, y1 = x0 + rng.uniform(20, width / 2), y0 + rng.uniform(20, height / 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return image


def make_jpegs(root, count, width, height, classes=4):
    """``root/class<k>/<n>.jpg``; files already there (a previous run) are kept."""
    rng = np.random.default_rng(0)
    for n in range(count):
        folder = os.path.join(root, f"class{n % classes}")
        path = os.path.join(folder, f"{n:05d}.jpg")
        if not os.path.exists(path):
            os.makedirs(folder, exist_ok=True)
            photo(rng, width, height).save(path, quality=90)
    return root


# --- the floor: Pillow alone, one process -------------------------------------------------------------

def pillow_floor(paths, crop, mean, std, seed=0):
    """Seconds for the preset done image by image with Pillow and NumPy (no drafting, no batching tricks)."""
    from PIL import Image

    from numres.data.transforms import RandomResizedCrop
    rng = np.random.default_rng(seed)
    mean = np.asarray(mean, np.float32)[:, None, None]
    std = np.asarray(std, np.float32)[:, None, None]
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
        top, left, h, w = RandomResizedCrop.get_params(image.width, image.height, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        image = image.crop((left, top, left + w, top + h)).resize((crop, crop), Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
        x = (x - mean) / std
    return time.perf_counter() - started


# --- numres's loader ----------------------------------------------------------------------------------

def loader_rate(root, args, workers, draft=True):
    """``(images/s median, [epoch seconds])`` of ImageLoader over the folder."""
    from numres.data import ImageFolder, ImageLoader
    from numres.data.transforms import train_transform
    dataset = ImageFolder(root, transform=train_transform(args.crop, draft=draft))
    seconds = []
    with ImageLoader(dataset, args.batch, shuffle=True, seed=0, num_workers=workers, drop_last=False) as loader:
        for epoch in range(args.repeats + 1):            # the first epoch starts the workers: not timed
            started = time.perf_counter()
            count = sum(len(y) for _, y in loader)
            if epoch:
                seconds.append(time.perf_counter() - started)
    assert count == len(dataset)
    return len(dataset) / statistics.median(seconds), seconds


def model_rate(args):
    """Images/s of the numres ResNet-50 train step (forward, backward, SGD) on random inputs."""
    import threadpoolctl

    import numres as nr
    nr.parallel.set_num_threads(args.threads)
    with threadpoolctl.threadpool_limits(limits=args.threads):
        model = nr.resnet50(num_classes=1000)
        criterion = nr.nn.CrossEntropyLoss()
        optimizer = nr.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.model_batch, 3, args.crop, args.crop), dtype=np.float32)
        y = rng.integers(0, 1000, args.model_batch)
        times = []
        for step in range(args.model_repeats + 1):
            started = time.perf_counter()
            optimizer.zero_grad()
            criterion(model(x), y)
            model.backward(criterion.backward(), need_input_grad=False)
            optimizer.step()
            if step:
                times.append(time.perf_counter() - started)
    return args.model_batch / statistics.median(times)


def gpu_rate(args):
    """A GPU train-step rate: the argument, or the best numres train rate in the GPU benchmark's results."""
    if args.gpu_images_per_second:
        return args.gpu_images_per_second, "--gpu-images-per-second"
    best, source = None, None
    for path in glob.glob(os.path.join(RESULTS, "gpu_resnet50_*.json")):
        with open(path) as stream:
            report = json.load(stream)
        for run in report.get("runs", []):
            if run.get("mode") == "train" and run.get("size") == 224:
                rate = max(run.get("numres_images_per_s", 0), run.get("numres_graph_images_per_s", 0))
                if best is None or rate > best:
                    best, source = rate, f"{os.path.basename(path)} ({report.get('card', {}).get('name', '?')})"
    return best, source


def blas_info():
    try:
        import threadpoolctl
        return [{k: e.get(k) for k in ("internal_api", "version", "num_threads")}
                for e in threadpoolctl.threadpool_info() if e.get("user_api") == "blas"]
    except ImportError:
        return []


def main(argv=None):
    args = parse_args(argv)
    from PIL import __version__ as pillow_version

    from numres.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    workers = [int(v) for v in args.workers.split(",") if v.strip()]
    temporary = None
    if args.data_dir:
        root = args.data_dir
    else:
        temporary = tempfile.TemporaryDirectory(prefix="numres-loader-bench-")
        root = temporary.name
    print(f"generating {args.images} JPEGs of {width}x{height} in {root} ...", flush=True)
    make_jpegs(root, args.images, width, height)
    paths = sorted(glob.glob(os.path.join(root, "*", "*.jpg")))[:args.images]

    results = []
    floor = statistics.median(pillow_floor(paths, args.crop, IMAGENET_MEAN, IMAGENET_STD, seed)
                              for seed in range(args.repeats))
    floor_rate = len(paths) / floor
    results.append({"setting": "pillow-floor (1 process)", "workers": 0, "images_per_s": floor_rate})
    print(f"{'pillow alone, 1 process':32s} {floor_rate:8.1f} img/s", flush=True)
    for name, count, draft in [("numres, 0 workers, no draft", 0, False), ("numres, 0 workers", 0, True)] + \
            [(f"numres, {k} worker{'s' if k > 1 else ''}", k, True) for k in workers]:
        rate, seconds = loader_rate(root, args, count, draft)
        results.append({"setting": name, "workers": count, "draft": draft, "images_per_s": rate,
                        "epoch_seconds": seconds, "vs_pillow_floor": rate / floor_rate})
        print(f"{name:32s} {rate:8.1f} img/s  ({rate / floor_rate:.2f}x the floor)", flush=True)

    report = {"benchmark": "loader", "when": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "pillow": pillow_version, "blas": blas_info(),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}
    one_worker = next((r["images_per_s"] for r in results if r["workers"] == 1), None)
    if args.model:
        step = model_rate(args)
        report["resnet50_train_step_images_per_s"] = step
        print(f"{'ResNet-50 train step':32s} {step:8.1f} img/s  (batch {args.model_batch}, {args.threads} threads)")
        if one_worker:
            cores = step / one_worker
            report["cores_to_feed_the_cpu_step"] = cores
            print(f"feeding the CPU step takes {cores:.2f} worker cores "
                  f"({'the loader is not' if cores < 1 else 'the loader IS'} the bottleneck with 1 worker)")
    rate, source = gpu_rate(args)
    if rate and one_worker:
        needed = math.ceil(rate / one_worker)
        report["gpu"] = {"train_images_per_s": rate, "source": source, "workers_needed": needed}
        print(f"a GPU training at {rate:.0f} img/s ({source}) needs about {needed} workers "
              f"(one worker: {one_worker:.0f} img/s)")
    elif one_worker:
        print(f"a GPU training at R img/s needs about R / {one_worker:.0f} workers (ceil)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "loader.json")
    from numres.io import atomic_write
    atomic_write(path, lambda stream: stream.write(json.dumps(report, indent=2).encode()))
    print(f"wrote {path}")
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    main()
