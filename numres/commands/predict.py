"""``numres predict IMAGE... --weights FILE``: the most likely classes of each image.

    numres predict cat.jpg --weights resnet50-0676ba61.pth         # torchvision weights: ImageNet classes
    numres predict digit.png --weights runs/digits-resnet20         # a run of `numres train`: its own classes

The architecture comes from the weights (``--model`` is optional and checked against
them); see :mod:`numres.inference`.  Needs Pillow to read images: pip install 'numres[image]'.
"""
from __future__ import annotations

import os

from ..inference import classify, load_classifier
from . import UsageError


def add_arguments(parser):
    parser.description = ("Top classes of images, with a numres training checkpoint (its own classes and "
                          "preprocessing) or torchvision / numres ImageNet weights. Reading images needs "
                          "Pillow: pip install 'numres[image]'.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    parser.add_argument("--weights", required=True,
                        help="checkpoint.npz or run folder of `numres train`, a torchvision .pth, or a numres .npz")
    parser.add_argument("--model", help="builder name, e.g. resnet50; optional: taken from the weights, "
                                        "and checked against them when given")
    parser.add_argument("--top", type=int, default=5, help="how many classes to print (default: 5)")
    parser.add_argument("--backend", default="numpy", help="numpy (cpu) or cupy (cuda); default: numpy")


def run(args) -> int:
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    for path in args.images:
        if not os.path.exists(path):
            raise UsageError(f"no such image: {path}")
    classifier = load_classifier(args.weights, args.model, args.backend)
    print(classifier.description)
    top = min(args.top, len(classifier.classes))
    for path in args.images:
        (ranking,) = classify(classifier, [path], top)
        print(f"{path}:")
        for rank, (name, index, probability) in enumerate(ranking, 1):
            print(f"  {rank}. {100 * probability:6.2f}%  {name} ({index})")
    return 0
