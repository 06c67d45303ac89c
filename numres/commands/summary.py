"""``numres summary MODEL [--input 1x3x224x224]``: per-layer output shape, parameters and multiply-accumulates."""
from __future__ import annotations

import numres

from .. import models
from ..summary import format_summary, summarize
from . import UsageError


def parse_shape(text: str) -> tuple:
    """``"1x3x224x224"`` -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise ValueError(f"--input must look like 1x3x224x224 (positive integers joined by 'x'), got {text!r}")
    return shape


def _builder(name: str):
    for namespace in (models, numres):
        builder = getattr(namespace, name, None)
        if not name.startswith("_") and name[:1].islower() and callable(builder) and not isinstance(builder, type):
            return builder
    known = sorted(n for n in getattr(models, "__all__", dir(models)) if n[:1].islower())
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(known)}")


def _default_input(name: str) -> str:
    return "1x3x32x32" if name in getattr(models, "CIFAR_MODELS", {}) else "1x3x224x224"


def add_arguments(parser):
    parser.add_argument("model", metavar="MODEL", help="builder name, e.g. resnet18, resnet50, resnext50_32x4d")
    parser.add_argument("--input", default=None,
                        help="input shape N x C x H x W (default: 1x3x32x32 for the CIFAR nets, else 1x3x224x224)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier outputs (builder's default)")
    parser.add_argument("--shapes-only", action="store_true",
                        help="propagate shapes without computing (fast; same table)")


def run(args) -> int:
    builder = _builder(args.model)
    shape = parse_shape(args.input or _default_input(args.model))
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = builder(**kwargs)
    try:
        summary = summarize(model, shape, shapes_only=args.shapes_only)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--input {'x'.join(map(str, shape))} does not fit {args.model}: {exc}") from exc
    print(format_summary(summary, title=args.model))
    return 0
