"""``numres predict IMAGE... --model resnet50 --weights FILE``: the top-5 ImageNet classes of each image.

The weights may be a torchvision ``.pth`` file (read without PyTorch, see
:mod:`numres.torch_checkpoint`) or a numres ``.npz``; the number of classes follows the
file.  Each image gets torchvision's evaluation preprocessing (:mod:`numres.imagenet`),
and the model runs in eval mode under :func:`numres.no_grad`.
"""
from __future__ import annotations

import os


def add_arguments(parser):
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    parser.add_argument("--model", default="resnet50", help="builder name, e.g. resnet18 ... resnet152 "
                        "(default: resnet50)")
    parser.add_argument("--weights", required=True, help="torchvision .pth checkpoint or numres .npz file")
    parser.add_argument("--top", type=int, default=5, help="how many classes to print (default: 5)")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])


def build_model(name: str, weights, backend: str = "numpy"):
    """The named builder of :mod:`numres.models`, loaded with ``weights``, in eval mode."""
    import numres.models as models

    builder = getattr(models, name, None)
    if name.startswith("_") or not callable(builder) or isinstance(builder, type):
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(available_models())}")
    return builder(weights=weights, backend=backend).eval()


def available_models() -> list:
    import numres.models as models

    return sorted(name for name in getattr(models, "__all__", dir(models))
                  if not name.startswith("_") and callable(getattr(models, name)) and name[0].islower())


def predict(model, images, top: int = 5) -> list:
    """For each preprocessed (3, H, W) array: ``[(class_index, probability), ...]``, most likely first."""
    import numres as nr
    from .imagenet import top_k

    results = []
    with nr.no_grad():
        for image in images:
            x = model.xp.asarray(image[None], dtype=model.dtype)
            logits = nr.to_numpy(model(x))
            results.extend(top_k(logits, top))
    return results


def _label(index: int, num_classes: int) -> str:
    from .imagenet import class_names

    return class_names()[index] if num_classes == 1000 else f"class {index}"


def run(args) -> int:
    from .imagenet import load_image
    from .nn import StateDictError

    if args.top < 1:
        raise SystemExit("numres predict: --top must be at least 1")
    for path in args.images:
        if not os.path.exists(path):
            raise SystemExit(f"numres predict: no such image: {path}")
    try:
        model = build_model(args.model, args.weights, args.backend)
    except (ValueError, FileNotFoundError, StateDictError) as exc:
        raise SystemExit(f"numres predict: {exc}") from exc
    num_classes = model.fc.out_features
    top = min(args.top, num_classes)
    for path in args.images:
        try:
            image = load_image(path)
        except (ImportError, ValueError) as exc:
            raise SystemExit(f"numres predict: {exc}") from exc
        (ranking,) = predict(model, [image], top)
        print(f"{path}:")
        for rank, (index, probability) in enumerate(ranking, 1):
            print(f"  {rank}. {100 * probability:6.2f}%  {_label(index, num_classes)} ({index})")
    return 0
