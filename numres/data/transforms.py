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
    Pad(padding, fill, padding_mode)   add pixels round the image (constant, edge, reflect, symmetric)
    RandomCrop(size, padding=None, pad_if_needed=False, fill=0, padding_mode="constant")
                            pad, then a size window at a uniformly random place
                            (RandomCrop(32, padding=4): the CIFAR augmentation of He et al.)
    ColorJitter(brightness, contrast, saturation, hue)
                            the four adjustments with random factors, in random order;
                            Pillow images or float (C, H, W) arrays (after ToArray)
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

from .. import backend as B
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


# --- padding and random crops (torchvision's Pad / RandomCrop) -----------------------------------------

PADDING_MODES = ("constant", "edge", "reflect", "symmetric")


def _padding_sides(padding) -> tuple:
    """torchvision's padding argument as ``(left, top, right, bottom)``: an int pads every side, a pair
    ``(left/right, top/bottom)``, a 4-sequence each side."""
    if isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
        sides = (int(padding),) * 4
    elif isinstance(padding, (tuple, list)) and len(padding) in (1, 2, 4) and all(
            isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in padding):
        padding = [int(p) for p in padding]
        sides = tuple(padding * 4) if len(padding) == 1 else \
            (padding[0], padding[1], padding[0], padding[1]) if len(padding) == 2 else tuple(padding)
    else:
        raise ValueError(f"padding must be an int or a sequence of 1, 2 or 4 ints, got {padding!r}")
    if min(sides) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return sides


def _pixels_of(image, what):
    """``(pixels, rebuild)``: the ``(H, W[, C])`` array of a Pillow image or array, and how to turn a
    result back into the caller's type."""
    Image = _pillow()
    if isinstance(image, Image.Image):
        _check_image(image, what)
        mode, palette = image.mode, (image.getpalette() if image.mode == "P" else None)

        def rebuild(pixels):
            result = Image.fromarray(np.ascontiguousarray(pixels))
            if result.mode != mode and mode not in ("P",):
                result = result.convert(mode)
            if palette is not None:
                result.putpalette(palette)
            return result

        return np.asarray(image), rebuild
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise ValueError(f"{what} takes a Pillow image or (H, W[, C]) pixels, got shape {image.shape}")
        return image, lambda pixels: pixels
    raise TypeError(f"{what} takes a Pillow image or an (H, W[, C]) array, got {type(image).__name__}")


def pad(image, padding, fill=0, padding_mode="constant"):
    """torchvision's ``F.pad`` on a Pillow image or ``(H, W[, C])`` array.

    ``padding_mode``: ``"constant"`` (the value ``fill``, a number or one per channel), ``"edge"``
    (repeat the border pixel), ``"reflect"`` (mirror without repeating the border: ``3 2 | 1 2 3``)
    or ``"symmetric"`` (mirror repeating it: ``2 1 | 1 2 3``); NumPy's ``np.pad`` modes of those names.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
    left, top, right, bottom = _padding_sides(padding)
    pixels, rebuild = _pixels_of(image, "pad")
    height, width = pixels.shape[:2]
    if padding_mode == "reflect" and (max(left, right) >= width or max(top, bottom) >= height):
        raise ValueError(f"reflect padding of {max(left, right, top, bottom)} needs an image larger than that, "
                         f"got {width} x {height}")
    if padding_mode != "constant":
        widths = ((top, bottom), (left, right)) + ((0, 0),) * (pixels.ndim - 2)
        return rebuild(np.pad(pixels, widths, mode=padding_mode))
    channels = pixels.shape[2] if pixels.ndim == 3 else 1
    fill_values = np.asarray(fill, dtype=np.float64).reshape(-1)
    if fill_values.size not in (1, channels):
        raise ValueError(f"fill must be one number or one per channel ({channels}), got {fill!r}")
    out = np.empty((height + top + bottom, width + left + right) + pixels.shape[2:], dtype=pixels.dtype)
    out[...] = fill_values.astype(pixels.dtype) if pixels.ndim == 3 else fill_values[0].astype(pixels.dtype)
    out[top:top + height, left:left + width] = pixels
    return rebuild(out)


class Pad(Transform):
    """Pad every side (see :func:`pad`): ``Pad(4)`` adds 4 pixels all round."""

    def __init__(self, padding, fill=0, padding_mode="constant"):
        _padding_sides(padding)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
        self.padding, self.fill, self.padding_mode = padding, fill, padding_mode

    def __call__(self, image, rng=None):
        return pad(image, self.padding, self.fill, self.padding_mode)

    def _arguments(self):
        return f"padding={self.padding}, fill={self.fill}, padding_mode={self.padding_mode}"


def _image_size(image) -> tuple:
    """``(height, width)`` of a Pillow image or an ``(H, W[, C])`` array."""
    if isinstance(image, np.ndarray):
        return image.shape[0], image.shape[1]
    return image.height, image.width


class RandomCrop(RandomTransform):
    """torchvision's RandomCrop: pad (optionally), then keep a ``size`` window at a uniformly random place.

    * ``padding`` (None, an int, a pair or four sides, as :func:`pad`) is added first, with ``fill`` and
      ``padding_mode``; ``RandomCrop(32, padding=4)`` is the CIFAR augmentation of He et al.
    * ``pad_if_needed=True`` then pads a side shorter than the crop by the shortfall on *both* ends
      (torchvision's rule), so any image can be cropped.
    * The window's top-left ``(i, j)`` is uniform over ``0..H-h`` x ``0..W-w`` (:meth:`get_params`).

    Takes and returns a Pillow image or ``(H, W[, C])`` pixels.
    """

    def __init__(self, size, padding=None, pad_if_needed=False, fill=0, padding_mode="constant"):
        self.size = _pair(size, "RandomCrop")
        if padding is not None:
            _padding_sides(padding)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
        self.padding, self.pad_if_needed, self.fill, self.padding_mode = padding, pad_if_needed, fill, padding_mode

    @staticmethod
    def get_params(image, output_size, rng=None) -> tuple:
        """``(i, j, h, w)``: a uniformly random ``output_size`` window of ``image`` (top, left, height, width)."""
        height, width = _image_size(image)
        th, tw = output_size
        if height < th or width < tw:
            raise ValueError(f"Required crop size {(th, tw)} is larger than input image size {(height, width)}")
        if (height, width) == (th, tw):
            return 0, 0, height, width
        rng = _generator(rng)
        i = int(rng.integers(0, height - th + 1))
        j = int(rng.integers(0, width - tw + 1))
        return i, j, th, tw

    def padded(self, image):
        """The image after ``padding`` and ``pad_if_needed`` (the deterministic half of the transform)."""
        if self.padding is not None:
            image = pad(image, self.padding, self.fill, self.padding_mode)
        height, width = _image_size(image)
        if self.pad_if_needed and width < self.size[1]:
            image = pad(image, [self.size[1] - width, 0], self.fill, self.padding_mode)
        if self.pad_if_needed and height < self.size[0]:
            image = pad(image, [0, self.size[0] - height], self.fill, self.padding_mode)
        return image

    def __call__(self, image, rng=None):
        image = self.padded(image)
        i, j, h, w = self.get_params(image, self.size, rng)
        return crop(image, i, j, h, w)

    def _arguments(self):
        return f"size={self.size}, padding={self.padding}"


def crop(image, top, left, height, width):
    """The ``height x width`` window at ``(top, left)`` of a Pillow image or ``(H, W[, C])`` array."""
    if isinstance(image, np.ndarray):
        return image[top:top + height, left:left + width].copy()
    return image.crop((left, top, left + width, top + height))


# --- colour (torchvision's ColorJitter) ------------------------------------------------------------------

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)      # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


def _is_pillow(image):
    try:
        Image = _pillow()
    except ImportError:
        return False
    return isinstance(image, Image.Image)


def _float_image(image, what):
    """A float ``(..., C, H, W)`` array in [0, 1] with 1 or 3 channels; anything else a clear error."""
    if not hasattr(image, "ndim") or image.ndim < 3 or image.dtype.kind != "f":
        raise TypeError(f"{what} takes a Pillow image or float (..., C, H, W) pixels in [0, 1] (after ToArray), "
                        f"got {getattr(image, 'dtype', type(image).__name__)} "
                        f"{tuple(getattr(image, 'shape', ()))}")
    if image.shape[-3] not in (1, 3):
        raise ValueError(f"{what} takes 1 or 3 channels, got {image.shape[-3]}")
    return image


def _grayscale(image):
    """``0.2989 R + 0.587 G + 0.114 B`` keeping a channel axis of 1."""
    r, g, b = image[..., 0:1, :, :], image[..., 1:2, :, :], image[..., 2:3, :, :]
    dtype = image.dtype.type
    return (dtype(GRAY_WEIGHTS[0]) * r + dtype(GRAY_WEIGHTS[1]) * g + dtype(GRAY_WEIGHTS[2]) * b).astype(image.dtype)


def _blend(image, other, ratio):
    """``clip(ratio * image + (1 - ratio) * other, 0, 1)``: towards ``other`` below 1, away from it above."""
    xp = B.xp_of(image)
    dtype = image.dtype.type
    return xp.clip(dtype(ratio) * image + dtype(1.0 - ratio) * other, 0, 1).astype(image.dtype)


def _check_factor(factor, name):
    if factor < 0:
        raise ValueError(f"{name} ({factor}) is not non-negative.")


def adjust_brightness(image, brightness_factor):
    """Scale the pixels: ``clip(f x, 0, 1)`` (Pillow's ImageEnhance.Brightness for Pillow images).
    0 gives black, 1 the image."""
    _check_factor(brightness_factor, "brightness_factor")
    if _is_pillow(image):
        from PIL import ImageEnhance
        return ImageEnhance.Brightness(image).enhance(brightness_factor)
    image = _float_image(image, "adjust_brightness")
    return _blend(image, 0.0, brightness_factor)


def adjust_contrast(image, contrast_factor):
    """Blend with the image's mean grey level ``m``: ``clip(f x + (1 - f) m, 0, 1)`` (Pillow's
    ImageEnhance.Contrast for Pillow images, whose mean is rounded to an integer).  0 gives flat grey."""
    _check_factor(contrast_factor, "contrast_factor")
    if _is_pillow(image):
        from PIL import ImageEnhance
        return ImageEnhance.Contrast(image).enhance(contrast_factor)
    image = _float_image(image, "adjust_contrast")
    grey = _grayscale(image) if image.shape[-3] == 3 else image
    return _blend(image, grey.mean(axis=(-3, -2, -1), keepdims=True), contrast_factor)


def adjust_saturation(image, saturation_factor):
    """Blend with the image's own grey version: ``clip(f x + (1 - f) grey(x), 0, 1)`` (Pillow's
    ImageEnhance.Color for Pillow images).  0 gives black and white; a one-channel image is unchanged."""
    _check_factor(saturation_factor, "saturation_factor")
    if _is_pillow(image):
        from PIL import ImageEnhance
        return ImageEnhance.Color(image).enhance(saturation_factor)
    image = _float_image(image, "adjust_saturation")
    if image.shape[-3] == 1:
        return image
    return _blend(image, _grayscale(image), saturation_factor)


def rgb_to_hsv(image):
    """``(..., 3, H, W)`` RGB in [0, 1] -> HSV, each in [0, 1] (Python's ``colorsys.rgb_to_hsv``, vectorised).

    ``v = max``, ``s = (max - min) / max``; with ``c = max - min`` the hue in sixths of a turn is
    ``(g - b) / c`` where red is the maximum, ``2 + (b - r) / c`` where green is, ``4 + (r - g) / c``
    where blue is, taken modulo 1 after dividing by 6 (0 for greys)."""
    xp = B.xp_of(image)
    r, g, b = image[..., 0, :, :], image[..., 1, :, :], image[..., 2, :, :]
    v = image.max(axis=-3)
    c = v - image.min(axis=-3)
    grey = c == 0
    s = c / xp.where(grey, 1, v)
    c = xp.where(grey, 1, c)
    h = xp.where(v == r, (g - b) / c, xp.where(v == g, 2.0 + (b - r) / c, 4.0 + (r - g) / c))
    h = xp.where(grey, 0, xp.mod(h / 6.0 + 1.0, 1.0))
    return xp.stack([h, s, v], axis=-3).astype(image.dtype)


def hsv_to_rgb(image):
    """The inverse of :func:`rgb_to_hsv` (``colorsys.hsv_to_rgb``): sector ``i = floor(6 h) mod 6``,
    ``f = 6 h - floor(6 h)``, ``p = v (1 - s)``, ``q = v (1 - s f)``, ``t = v (1 - s (1 - f))``, and
    ``(r, g, b)`` is ``(v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)`` in sectors 0..5."""
    xp = B.xp_of(image)
    h, s, v = image[..., 0, :, :], image[..., 1, :, :], image[..., 2, :, :]
    sector = xp.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = sector.astype(np.int64) % 6
    p = xp.clip(v * (1.0 - s), 0, 1)
    q = xp.clip(v * (1.0 - s * f), 0, 1)
    t = xp.clip(v * (1.0 - s * (1.0 - f)), 0, 1)
    table = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
    channels = []
    for channel in range(3):
        out = xp.zeros_like(v)
        for index, values in enumerate(table):
            out = xp.where(sector == index, values[channel], out)
        channels.append(out)
    return xp.stack(channels, axis=-3).astype(image.dtype)


def adjust_hue(image, hue_factor):
    """Turn every pixel's hue by ``hue_factor`` of a full turn, ``-0.5 <= hue_factor <= 0.5``.

    Float arrays: to HSV, ``h = (h + hue_factor) mod 1``, back to RGB.  Pillow images (as torchvision
    does them): Pillow's 8-bit HSV, the hue byte shifted by ``int(hue_factor * 255)`` modulo 256.
    Grey (one-channel) images are unchanged."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    if _is_pillow(image):
        Image = _pillow()
        mode = image.mode
        if mode in ("L", "1", "I", "F"):
            return image
        h, s, v = image.convert("HSV").split()
        shifted = (np.asarray(h, dtype=np.int64) + int(hue_factor * 255)) % 256
        h = Image.fromarray(shifted.astype(np.uint8))
        return Image.merge("HSV", (h, s, v)).convert(mode)
    image = _float_image(image, "adjust_hue")
    if image.shape[-3] == 1:
        return image
    xp = B.xp_of(image)
    hsv = rgb_to_hsv(image)
    hsv[..., 0, :, :] = xp.mod(hsv[..., 0, :, :] + image.dtype.type(hue_factor), 1.0)
    return hsv_to_rgb(hsv)


def _jitter_range(value, name, center=1.0, bound=(0.0, math.inf), clip_first_on_zero=True):
    """torchvision's ColorJitter argument rule: a number ``v`` means ``[center - v, center + v]`` (the
    lower end clipped at 0 for factors), a pair is the range itself; ``None`` when it can only be
    ``center`` (no change)."""
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"If {name} is a single number, it must be non negative.")
        value = [center - float(value), center + float(value)]
        if clip_first_on_zero:
            value[0] = max(value[0], 0.0)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        value = [float(value[0]), float(value[1])]
    else:
        raise TypeError(f"{name} should be a single number or a list/tuple with length 2.")
    if not bound[0] <= value[0] <= value[1] <= bound[1]:
        raise ValueError(f"{name} values should be between {bound}, but got {value}.")
    if value[0] == value[1] == center:
        return None
    return tuple(value)


class ColorJitter(RandomTransform):
    """torchvision's ColorJitter: random brightness, contrast, saturation and hue changes, in random order.

    Each argument is a number ``v`` (a factor drawn uniformly from ``[max(0, 1 - v), 1 + v]``; for hue
    ``[-v, v]`` with ``v <= 0.5``) or a ``(min, max)`` pair.  Per call, :meth:`get_params` draws the order
    (a permutation of the four) and the factors; then :func:`adjust_brightness`, :func:`adjust_contrast`,
    :func:`adjust_saturation` and :func:`adjust_hue` run in that order.  Takes Pillow images (before
    ToArray, Pillow's ImageEnhance math as in torchvision) or float ``(..., 3, H, W)`` arrays in [0, 1]
    (torchvision's tensor math, on either backend).
    """

    def __init__(self, brightness=0, contrast=0, saturation=0, hue=0):
        self.brightness = _jitter_range(brightness, "brightness")
        self.contrast = _jitter_range(contrast, "contrast")
        self.saturation = _jitter_range(saturation, "saturation")
        self.hue = _jitter_range(hue, "hue", center=0.0, bound=(-0.5, 0.5), clip_first_on_zero=False)

    @staticmethod
    def get_params(brightness, contrast, saturation, hue, rng=None):
        """``(order, b, c, s, h)``: a permutation of ``0..3`` and a factor drawn from each range (None
        for a range that is None)."""
        rng = _generator(rng)
        order = [int(i) for i in rng.permutation(4)]
        factors = [None if bounds is None else float(rng.uniform(bounds[0], bounds[1]))
                   for bounds in (brightness, contrast, saturation, hue)]
        return (order, *factors)

    def __call__(self, image, rng=None):
        order, *factors = self.get_params(self.brightness, self.contrast, self.saturation, self.hue, rng)
        adjust = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        for index in order:
            if factors[index] is not None:
                image = adjust[index](image, factors[index])
        return image

    def _arguments(self):
        return f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, hue={self.hue}"


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
           "Pad", "RandomCrop", "ColorJitter", "pad", "crop", "adjust_brightness", "adjust_contrast",
           "adjust_saturation", "adjust_hue", "rgb_to_hsv", "hsv_to_rgb", "PADDING_MODES",
           "IMAGENET_MEAN", "IMAGENET_STD"]
