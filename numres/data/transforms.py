"""torchvision's image transforms, with torchvision's names, arguments and results, on Pillow and NumPy.

Geometric transforms take and return Pillow images; :class:`ToArray` turns one into a
``(C, H, W)`` float array in ``[0, 1]`` and :class:`Normalize` standardises it per channel::

    RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3/4, 4/3))
        area fraction s ~ U(scale), log aspect ratio t ~ U(log ratio), then
        w = round(sqrt(s * W * H * e^t)),  h = round(sqrt(s * W * H / e^t));
        if 0 < w <= W and 0 < h <= H the crop's top-left is uniform over the valid positions,
        else try again; after 10 failed attempts, the central crop of the whole image with
        its aspect ratio clamped into ``ratio``.  The crop is resized to ``size``.
    Resize(size)            an int: the shorter side becomes ``size`` and the longer
                            int(size * long / short); a pair (h, w): exactly that size
    CenterCrop(size)        top = round((H - h) / 2), left = round((W - w) / 2) (Python's round);
                            an image smaller than the crop is first padded with zeros,
                            (d // 2) before and ((d + 1) // 2) after
    RandomHorizontalFlip(p) mirror with probability p
    ToArray()               (H, W, C) uint8 -> (C, H, W) float32, x / 255
    Normalize(mean, std)    (x - mean_c) / std_c

Resampling is Pillow's ``Image.resize`` with the named filter (bilinear by default,
antialiased when shrinking), which is what torchvision does for Pillow images.

**Randomness.**  Every transform is called as ``transform(image, rng)`` with a
``numpy.random.Generator``; the random ones draw only from it, so one generator per
sample (the loader seeds it from ``(seed, epoch, index)``) makes the result
deterministic.  Without one they draw from a fresh, unseeded generator.

**Reduced-size JPEG decoding.**  Given a JPEG that has been opened but not yet decoded
(``Image.open(path)``), :class:`RandomResizedCrop` and :class:`Resize` ask Pillow's
``Image.draft`` to decode it at 1/2, 1/4 or 1/8 of its size: the largest reduction ``r``
for which the region they resample still has at least as many pixels as the output in
both directions (``crop_w // r >= out_w`` and ``crop_h // r >= out_h``), so the image
is still shrunk (never enlarged) by the final resize and no detail the output can
show is lost.  The resize then reads the same region in the reduced image's
coordinates (Pillow's ``box=``).  ``draft=False`` turns this off; results then equal
torchvision's exactly.  Drafting changes the opened image object in place (its size),
as ``Image.draft`` does.

:func:`train_transform` and :func:`eval_transform` are the pipelines of torchvision's
ImageNet classification reference recipe.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from ..imagenet import _pillow, resized_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)      # torchvision's ImageNet statistics (RGB, pixels in [0, 1])
IMAGENET_STD = (0.229, 0.224, 0.225)

MAX_ATTEMPTS = 10          # RandomResizedCrop's tries before it falls back to a central crop
DRAFT_REDUCTIONS = (8, 4, 2)    # what libjpeg's scaled decoding offers (besides 1)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def _resample(name):
    Image = _pillow()
    if isinstance(name, str) and name.lower() in INTERPOLATIONS:
        return getattr(Image.Resampling, name.upper())
    if isinstance(name, int) and not isinstance(name, bool) and name in set(Image.Resampling):
        return Image.Resampling(name)
    raise ValueError(f"unknown interpolation {name!r}; choose one of {', '.join(INTERPOLATIONS)}")


def _pair(size, what) -> tuple:
    """``size`` as ``(h, w)``: an int is a square; a 1-sequence too (torchvision's convention)."""
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (int(size), int(size))
    elif isinstance(size, (tuple, list)) and len(size) == 1:
        size = (int(size[0]), int(size[0]))
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        size = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"{what} size must be an int or a (height, width) pair, got {size!r}")
    if min(size) < 1:
        raise ValueError(f"{what} size must be positive, got {size}")
    return size


def _check_image(image, what):
    Image = _pillow()
    if not isinstance(image, Image.Image):
        raise TypeError(f"{what} takes a Pillow image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{what}: the image has no pixels ({image.width} x {image.height})")


def _generator(rng):
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


# --- reduced-size JPEG decoding -----------------------------------------------------------------------

def draft_reduction(region_w: float, region_h: float, out_w: int, out_h: int) -> int:
    """The largest JPEG reduction r in (8, 4, 2, 1) with ``region // r >= out`` in both directions."""
    for reduction in DRAFT_REDUCTIONS:
        if region_w // reduction >= out_w and region_h // reduction >= out_h:
            return reduction
    return 1


def can_draft(image) -> bool:
    """True for a JPEG opened but not decoded yet (the only state in which ``Image.draft`` works)."""
    return (getattr(image, "format", None) == "JPEG" and bool(getattr(image, "tile", None))
            and not getattr(image, "decoderconfig", ()) and image.mode in ("RGB", "L"))


def draft_for(image, box, out_w, out_h, enabled=True):
    """Decode ``image`` at a reduced size when ``box`` (left, top, right, bottom) allows it.

    Returns ``(image, box)`` with the box in the coordinates of the image as decoded.
    """
    if not enabled or not can_draft(image):
        return image, box
    left, top, right, bottom = box
    reduction = draft_reduction(right - left, bottom - top, out_w, out_h)
    if reduction == 1:
        return image, box
    width, height = image.size
    result = image.draft(image.mode, (width // reduction, height // reduction))
    if result is None:                      # Pillow declined (e.g. an unusual tile layout)
        return image, box
    _, (_, _, reduced_w, reduced_h) = result
    scale_x, scale_y = width / reduced_w, height / reduced_h
    return image, (left / scale_x, top / scale_y, right / scale_x, bottom / scale_y)


# --- the transforms -----------------------------------------------------------------------------------

class Transform:
    """Base class: ``transform(image, rng=None)``; the random ones draw from ``rng`` only."""

    def __call__(self, image, rng=None):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self._arguments()})"

    def _arguments(self) -> str:
        return ""


class Compose(Transform):
    """Apply ``transforms`` in order, giving each of numres's transforms the same generator.

    Plain callables (a ``lambda image: ...``) are called with the image alone.
    """

    def __init__(self, transforms):
        self.transforms = list(transforms)
        for transform in self.transforms:
            if not callable(transform):
                raise TypeError(f"Compose takes callables, got {type(transform).__name__}")

    def __call__(self, image, rng=None):
        rng = _generator(rng) if any(isinstance(t, RandomTransform) for t in self.transforms) else rng
        for transform in self.transforms:
            image = transform(image, rng) if isinstance(transform, Transform) else transform(image)
        return image

    def split_array_tail(self):
        """``(head, to_array, normalize)``: the pipeline cut before a final ToArray [+ Normalize].

        The loader runs ``head`` in its workers (giving uint8 pixels) and the tail on the
        model's backend.  ``to_array`` is None when the pipeline does not end that way.
        """
        items = list(self.transforms)
        normalize = items.pop() if items and isinstance(items[-1], Normalize) else None
        if items and isinstance(items[-1], ToArray):
            to_array = items.pop()
            return Compose(items), to_array, normalize
        return self, None, None

    def __repr__(self):
        inner = "".join(f"\n    {t!r}" for t in self.transforms)
        return f"Compose({inner}\n)"


class RandomTransform(Transform):
    """A transform that draws from the generator it is given."""


class RandomResizedCrop(RandomTransform):
    """A random area fraction and aspect ratio of the image, resized to ``size`` (see the module notes)."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), interpolation="bilinear",
                 antialias=True, draft=True):
        self.size = _pair(size, "RandomResizedCrop")
        if len(scale) != 2 or len(ratio) != 2:
            raise ValueError(f"scale and ratio must be (min, max) pairs, got {scale} and {ratio}")
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"scale and ratio must be positive (min, max) pairs, got {scale} and {ratio}")
        if antialias is not True:
            raise ValueError("numres resizes with Pillow, which always antialiases: antialias must be True")
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.interpolation, self._resample = interpolation, _resample(interpolation)
        self.antialias, self.draft = antialias, draft

    @staticmethod
    def get_params(width, height, scale, ratio, rng):
        """``(top, left, h, w)`` of the crop, drawn from ``rng`` as torchvision's ``get_params`` does."""
        area = width * height
        log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
        for _ in range(MAX_ATTEMPTS):
            target_area = area * rng.uniform(scale[0], scale[1])
            aspect = math.exp(rng.uniform(log_low, log_high))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        # Fallback: the whole image, its aspect ratio clamped into the range, centred.
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(height * max(ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image, rng=None):
        _check_image(image, "RandomResizedCrop")
        top, left, h, w = self.get_params(image.width, image.height, self.scale, self.ratio, _generator(rng))
        out_h, out_w = self.size
        box = (left, top, left + w, top + h)
        image, box = draft_for(image, box, out_w, out_h, self.draft)
        if box == (left, top, left + w, top + h):          # full resolution: crop, then resize (torchvision)
            return image.crop(box).resize((out_w, out_h), self._resample)
        return image.resize((out_w, out_h), self._resample, box=box)

    def _arguments(self):
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}, interpolation={self.interpolation}"


def resized_output_size(width, height, size, max_size=None) -> tuple:
    """``(new_h, new_w)`` of :class:`Resize`: the shorter side ``size`` (int) or exactly ``(h, w)``."""
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    requested = int(size[0]) if isinstance(size, (tuple, list)) else int(size)
    new_w, new_h = resized_size(width, height, requested)          # the shorter side becomes `requested`
    if max_size is not None:
        if max_size <= requested:
            raise ValueError(f"max_size ({max_size}) must be larger than the requested size ({requested})")
        new_long = max(new_w, new_h)
        if new_long > max_size:
            new_short = int(max_size * requested / new_long)
            new_w, new_h = (new_short, max_size) if width <= height else (max_size, new_short)
    return new_h, new_w


class Resize(Transform):
    """Resize to ``size``: an int sets the shorter side (aspect ratio kept), a pair ``(h, w)`` the exact size."""

    def __init__(self, size, interpolation="bilinear", max_size=None, antialias=True, draft=True):
        if isinstance(size, (tuple, list)) and len(size) == 2:
            if max_size is not None:
                raise ValueError("max_size only applies when size is a single int (the shorter side)")
            _pair(size, "Resize")
        elif not (isinstance(size, numbers.Integral) or (isinstance(size, (tuple, list)) and len(size) == 1)):
            raise ValueError(f"Resize size must be an int or a (height, width) pair, got {size!r}")
        else:
            _pair(size, "Resize")
        if antialias is not True:
            raise ValueError("numres resizes with Pillow, which always antialiases: antialias must be True")
        self.size, self.max_size, self.draft = size, max_size, draft
        self.interpolation, self._resample = interpolation, _resample(interpolation)

    def __call__(self, image, rng=None):
        _check_image(image, "Resize")
        width, height = image.size
        new_h, new_w = resized_output_size(width, height, self.size, self.max_size)
        image, box = draft_for(image, (0, 0, width, height), new_w, new_h, self.draft)
        if box == (0, 0, width, height):
            return image.resize((new_w, new_h), self._resample)
        return image.resize((new_w, new_h), self._resample, box=box)

    def _arguments(self):
        return f"size={self.size}, interpolation={self.interpolation}, max_size={self.max_size}"


class CenterCrop(Transform):
    """The central ``size`` crop; an image smaller than the crop is padded with zeros first."""

    def __init__(self, size):
        self.size = _pair(size, "CenterCrop")

    def __call__(self, image, rng=None):
        _check_image(image, "CenterCrop")
        crop_h, crop_w = self.size
        width, height = image.size
        # torchvision pads (d // 2) before and ((d + 1) // 2) after each short side, then crops the padded image.
        pad_left = (crop_w - width) // 2 if crop_w > width else 0
        pad_top = (crop_h - height) // 2 if crop_h > height else 0
        padded_w = width + pad_left + ((crop_w - width + 1) // 2 if crop_w > width else 0)
        padded_h = height + pad_top + ((crop_h - height + 1) // 2 if crop_h > height else 0)
        top = int(round((padded_h - crop_h) / 2.0)) - pad_top
        left = int(round((padded_w - crop_w) / 2.0)) - pad_left
        if (left, top, crop_w, crop_h) == (0, 0, width, height):
            return image.copy()
        # Pillow fills the part of a crop box outside the image with zeros: that is the padding.
        return image.crop((left, top, left + crop_w, top + crop_h))

    def _arguments(self):
        return f"size={self.size}"


class RandomHorizontalFlip(RandomTransform):
    """Mirror left-right with probability ``p`` (one uniform draw per call: flip when it is < p)."""

    def __init__(self, p=0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, image, rng=None):
        if _generator(rng).random() < self.p:
            if isinstance(image, np.ndarray):                  # (H, W[, C]) pixels
                return np.ascontiguousarray(image[:, ::-1])
            return image.transpose(_pillow().Transpose.FLIP_LEFT_RIGHT)
        return image

    def _arguments(self):
        return f"p={self.p}"


def to_uint8_pixels(image) -> np.ndarray:
    """A Pillow image or ``(H, W[, C])`` uint8 array as ``(H, W, C)`` uint8 pixels."""
    Image = _pillow()
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        pixels = np.asarray(image, dtype=np.uint8)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"ToArray takes uint8 pixels, got dtype {image.dtype}")
        pixels = image
    else:
        raise TypeError(f"ToArray takes a Pillow image or a uint8 array, got {type(image).__name__}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3:
        raise ValueError(f"ToArray takes (H, W) or (H, W, C) pixels, got shape {pixels.shape}")
    return pixels


class ToArray(Transform):
    """``(H, W, C)`` uint8 (or a Pillow image) -> ``(C, H, W)`` float, ``x / 255``: torchvision's ToTensor."""

    def __init__(self, dtype="float32"):
        from ..backend import normalize_dtype
        self.dtype = normalize_dtype(dtype)

    def __call__(self, image, rng=None):
        return self.apply(to_uint8_pixels(image)[None], np)[0]

    def apply(self, batch, xp, dtype=None):
        """``(N, H, W, C)`` uint8 on ``xp`` -> ``(N, C, H, W)`` contiguous floats in [0, 1] (one pass + a scale)."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        n, h, w, c = batch.shape
        x = xp.empty((n, c, h, w), dtype=dtype)
        x[...] = batch.transpose(0, 3, 1, 2)           # the uint8 -> float conversion is exact
        x /= dtype.type(255)
        return x

    def _arguments(self):
        return f"dtype={self.dtype.name}"


class Normalize(Transform):
    """``(x - mean_c) / std_c`` on ``(C, H, W)`` floats (``(N, C, H, W)`` through :meth:`apply`)."""

    def __init__(self, mean, std, inplace=False):
        self.mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        self.std = np.asarray(std, dtype=np.float64).reshape(-1)
        if self.mean.shape != self.std.shape or self.mean.size == 0:
            raise ValueError(f"Normalize needs as many means as stds, got {self.mean.size} and {self.std.size}")
        if np.any(self.std == 0) or not np.all(np.isfinite(self.std)) or not np.all(np.isfinite(self.mean)):
            raise ValueError(f"Normalize's std must be finite and non-zero and its mean finite; got "
                             f"mean {self.mean.tolist()}, std {self.std.tolist()}")
        self.inplace = inplace
        self._constants = {}

    def __getstate__(self):                           # device constants stay behind when pickled
        return {**self.__dict__, "_constants": {}}

    def __call__(self, x, rng=None):
        if not isinstance(x, np.ndarray) or x.ndim != 3 or x.dtype.kind != "f":
            raise TypeError(f"Normalize takes (C, H, W) float arrays, got "
                            f"{getattr(x, 'shape', type(x).__name__)} {getattr(x, 'dtype', '')}")
        return self.apply(x[None], np, inplace=self.inplace)[0]

    def apply(self, x, xp, inplace=False):
        """Normalise the ``(N, C, H, W)`` floats ``x`` on ``xp``, in the dtype of ``x``."""
        if x.shape[1] != self.mean.size and self.mean.size != 1:
            raise ValueError(f"Normalize has {self.mean.size} channel means but the image has "
                             f"{x.shape[1]} channels")
        key = (id(xp), x.dtype.str)
        if key not in self._constants:                 # upload the constants once per backend and dtype
            self._constants[key] = (xp.asarray(self.mean.reshape(1, -1, 1, 1), dtype=x.dtype),
                                    xp.asarray(self.std.reshape(1, -1, 1, 1), dtype=x.dtype))
        mean, std = self._constants[key]
        if not inplace:
            x = x.copy()
        x -= mean
        x /= std
        return x

    def _arguments(self):
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


# --- torchvision's ImageNet reference recipe ----------------------------------------------------------

def train_transform(crop_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, hflip_prob=0.5,
                    interpolation="bilinear", draft=True) -> Compose:
    """RandomResizedCrop(crop) -> RandomHorizontalFlip -> ToArray -> Normalize (the reference's training preset)."""
    steps = [RandomResizedCrop(crop_size, interpolation=interpolation, draft=draft)]
    if hflip_prob > 0:
        steps.append(RandomHorizontalFlip(hflip_prob))
    return Compose(steps + [ToArray(), Normalize(mean, std)])


def eval_transform(resize_size=256, crop_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   interpolation="bilinear", draft=True) -> Compose:
    """Resize(shorter side) -> CenterCrop -> ToArray -> Normalize (the reference's evaluation preset)."""
    return Compose([Resize(resize_size, interpolation=interpolation, draft=draft), CenterCrop(crop_size),
                    ToArray(), Normalize(mean, std)])


__all__ = ["Transform", "RandomTransform", "Compose", "RandomResizedCrop", "Resize", "CenterCrop",
           "RandomHorizontalFlip", "ToArray", "Normalize", "train_transform", "eval_transform",
           "resized_output_size", "draft_reduction", "can_draft", "INTERPOLATIONS", "MAX_ATTEMPTS",
           "IMAGENET_MEAN", "IMAGENET_STD"]
