"""ImageNet inputs and outputs: torchvision's evaluation preprocessing and the 1000 class names.

The preprocessing of torchvision's ImageNet weights (``ResNet50_Weights.IMAGENET1K_V1.transforms()``)::

    resize      the shorter side to 256 (bilinear, antialiased, as Pillow does it); the longer side
                becomes int(256 * long / short)
    crop        the central 224 x 224 (top = round((H - 224) / 2), left = round((W - 224) / 2))
    scale       x / 255, so pixels lie in [0, 1]
    normalise   (x - mean) / std per channel, mean = (0.485, 0.456, 0.406), std = (0.229, 0.224, 0.225)

giving a (3, 224, 224) float32 array in RGB order.  Decoding and resizing use Pillow, an
optional dependency (``pip install 'numres[image]'``).
"""
from __future__ import annotations

import functools
import os
from importlib import resources

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
RESIZE = 256
CROP = 224


def _pillow():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("reading images needs Pillow, which is not installed: "
                          "pip install 'numres[image]' (or pip install pillow)") from exc
    return Image


@functools.lru_cache(maxsize=1)
def class_names() -> tuple:
    """The 1000 ImageNet class names, in the order of torchvision's classifier outputs."""
    text = resources.files("numres.resources").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != 1000:
        raise RuntimeError(f"numres/resources/imagenet_classes.txt holds {len(names)} names, expected 1000")
    return names


def resized_size(width: int, height: int, size: int = RESIZE) -> tuple:
    """``(new_width, new_height)`` with the shorter side ``size`` (torchvision's rounding: int())."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels ({width} x {height})")
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, crop: int = CROP) -> tuple:
    """Pillow's ``(left, top, right, bottom)`` for the central ``crop`` x ``crop`` square."""
    if width < crop or height < crop:
        raise ValueError(f"image of {width} x {height} is smaller than the {crop} x {crop} crop")
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    return left, top, left + crop, top + crop


def normalize(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels -> (3, H, W) float32, scaled to [0, 1] and normalised by MEAN, STD."""
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) RGB pixels, got shape {pixels.shape}")
    x = pixels.astype(np.float32) / np.float32(255.0)
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(image, resize: int = RESIZE, crop: int = CROP) -> np.ndarray:
    """A Pillow image -> the (3, crop, crop) float32 array torchvision's ImageNet models expect."""
    Image = _pillow()
    image = image.convert("RGB")
    new_size = resized_size(image.width, image.height, resize)
    if new_size != image.size:
        image = image.resize(new_size, Image.BILINEAR)
    image = image.crop(center_crop_box(image.width, image.height, crop))
    return normalize(np.asarray(image, dtype=np.uint8))


def load_image(path, resize: int = RESIZE, crop: int = CROP) -> np.ndarray:
    """Decode the image file at ``path`` and :func:`preprocess` it."""
    Image = _pillow()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such image: {path}")
    try:
        with Image.open(path) as image:
            return preprocess(image, resize, crop)
    except Image.UnidentifiedImageError as exc:
        raise ValueError(f"{path} is not an image Pillow can read") from exc


def top_k(logits: np.ndarray, k: int = 5) -> list:
    """For each row of ``logits`` (N, classes): ``[(class_index, probability), ...]`` for the k most likely.

    Probabilities are the softmax ``exp(z_i - max z) / sum_j exp(z_j - max z)``, computed in float64.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"expected (N, classes) logits, got shape {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    probabilities = np.exp(z)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[(int(i), float(row[i])) for i in indices] for row, indices in zip(probabilities, order)]
