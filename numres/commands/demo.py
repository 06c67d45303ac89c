"""``numres demo``: numres at its main job, with nothing but NumPy.

It builds a ResNet, runs a training-mode forward and backward pass on random
images, takes one SGD step, and checks the hand-written backward against finite
differences (in float64) for a whole BasicBlock and a Bottleneck.
"""
from __future__ import annotations

import time

import numpy as np

import numres as nr

from ..models import resnet
from . import UsageError


def add_arguments(parser):
    parser.add_argument("--model", default="resnet18", help="an ImageNet ResNet builder: resnet18 ... resnet152, "
                                                             "resnext50_32x4d, ... (default: resnet18)")
    parser.add_argument("--batch", type=int, default=4, help="images in the batch (default: 4)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default: 64)")
    parser.add_argument("--backend", default="numpy", help="numpy (cpu) or cupy (cuda); default: numpy")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the random batch (default: 0)")


def run(args) -> int:
    builders = [name for name in resnet.__all__ if name[:1].islower()]
    if args.model not in builders:
        raise UsageError(f"unknown model {args.model!r}; choose one of {', '.join(builders)}")
    if args.batch < 1 or args.size < 32:
        raise UsageError(f"--batch must be at least 1 and --size at least 32 (an ImageNet ResNet halves the "
                         f"image five times), got --batch {args.batch} --size {args.size}")
    nr.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = getattr(resnet, args.model)(num_classes=10, backend=args.backend)
    count = sum(p.size for p in model.parameters())
    print(f"{args.model}: {count:,} parameters, backend={args.backend}, dtype=float32")

    xp = model.xp
    x = xp.asarray(rng.standard_normal((args.batch, 3, args.size, args.size)), dtype=np.float32)
    target = xp.asarray(rng.integers(0, 10, args.batch))
    criterion = nr.nn.CrossEntropyLoss()
    optimizer = nr.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    start = time.perf_counter()
    logits = model(x)
    loss = criterion(logits, target)
    dx = model.backward(criterion.backward())
    optimizer.step()
    nr.backend.synchronize(args.backend)
    elapsed = time.perf_counter() - start
    grad_norm = float(np.sqrt(sum(float((nr.to_numpy(p.grad).astype(np.float64) ** 2).sum())
                                  for p in model.parameters())))
    print(f"forward + backward + SGD step on {tuple(x.shape)}: {elapsed * 1000:.0f} ms")
    print(f"  loss {float(nr.to_numpy(loss)):.4f}, |dL/dx| {float(np.linalg.norm(nr.to_numpy(dx))):.3e}, "
          f"|dL/dparams| {grad_norm:.3e}")

    print("finite-difference check of the hand-written backward (float64, central differences):")
    results = []
    for name, block, shape in [
            ("BasicBlock(16 -> 32, stride 2)", _basic_block(nr, args.backend), (2, 16, 7, 7)),
            ("Bottleneck(32 -> 64, stride 2)", _bottleneck(nr, args.backend), (2, 32, 6, 6))]:
        result = nr.gradcheck(block.to(dtype="float64"), rng.standard_normal(shape), max_entries=12,
                              seed=args.seed)
        results.append(result)
        print(f"  {name}: {len(result.errors)} tensors, worst relative error {result.worst:.1e}")
    passed = all(result.passed() for result in results)
    worst = max((result.worst for result in results), key=lambda e: (e != e, e))   # NaN counts as largest
    verdict = "agrees" if passed else "DISAGREES"
    print(f"backward {verdict} with finite differences (worst {worst:.1e}).")
    return 0 if passed else 1


def _basic_block(nr, backend):
    down = nr.nn.Sequential(nr.nn.Conv2d(16, 32, 1, stride=2, bias=False, backend=backend),
                            nr.nn.BatchNorm2d(32, backend=backend))
    return nr.BasicBlock(16, 32, stride=2, downsample=down, backend=backend)


def _bottleneck(nr, backend):
    down = nr.nn.Sequential(nr.nn.Conv2d(32, 64, 1, stride=2, bias=False, backend=backend),
                            nr.nn.BatchNorm2d(64, backend=backend))
    return nr.Bottleneck(32, 16, stride=2, downsample=down, backend=backend)
