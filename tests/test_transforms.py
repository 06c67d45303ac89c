"""numres.data.transforms against torchvision's documented definitions, Pillow itself and PyTorch.

torchvision is not installed here, so its definitions are written out in this file from
its documentation: RandomResizedCrop's sampling (with PyTorch's generator, as torchvision
draws it), Resize's shorter-side rule, CenterCrop's rounding and padding, the flip
probability.  Pixels are compared with the Pillow calls torchvision makes for Pillow
images, and ToArray/Normalize with the same arithmetic in PyTorch.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from numres.data import transforms as T
from numres.imagenet import preprocess

# --- helpers ------------------------------------------------------------------------------------------


def noise_image(width, height, seed=0, mode="RGB"):
    """Smooth gradients plus noise: resampling differences show, JPEG compresses sanely."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255.0 / max(width - 1, 1), yy * 255.0 / max(height - 1, 1),
                     127 + 100 * np.sin((xx + yy) / 9.0)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    return image if mode == "RGB" else image.convert(mode)


def torchvision_get_params(width, height, scale, ratio, generator):
    """torchvision's documented RandomResizedCrop.get_params, drawing from a torch.Generator."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float64))
    for _ in range(10):
        target_area = area * torch.empty(1, dtype=torch.float64).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = math.exp(torch.empty(1, dtype=torch.float64).uniform_(
            log_ratio[0].item(), log_ratio[1].item(), generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov distance between the empirical distributions of a and b."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return np.max(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                         - np.searchsorted(b, grid, side="right") / len(b)))


def ks_limit(n, m, alpha=1e-3):
    """The two-sample KS critical value: c(alpha) sqrt((n + m) / (n m)), c = sqrt(-ln(alpha / 2) / 2)."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


# --- RandomResizedCrop --------------------------------------------------------------------------------

@pytest.mark.parametrize("width, height, scale, ratio", [
    (500, 375, (0.08, 1.0), (3 / 4, 4 / 3)),      # a photo, the default recipe
    (64, 200, (0.08, 1.0), (3 / 4, 4 / 3)),       # tall: many attempts fail, the fallback matters
    (120, 90, (0.3, 0.6), (0.5, 2.0)),
])
def test_random_resized_crop_sampling_matches_torchvisions_distribution(width, height, scale, ratio):
    n = 4000
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    ours = np.array([T.RandomResizedCrop.get_params(width, height, scale, ratio, rng) for _ in range(n)])
    theirs = np.array([torchvision_get_params(width, height, scale, ratio, generator) for _ in range(n)])
    for params in (ours, theirs):
        top, left, h, w = params.T
        assert np.all((h > 0) & (w > 0) & (top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width))

    def features(params):
        top, left, h, w = params.T.astype(float)
        return {"area fraction": h * w / (width * height), "log aspect": np.log(w / h),
                "top": top / np.maximum(height - h, 1), "left": left / np.maximum(width - w, 1)}

    limit = ks_limit(n, n)
    for (name, a), b in zip(features(ours).items(), features(theirs).values()):
        assert ks_statistic(a, b) < limit, f"{name}: KS {ks_statistic(a, b):.4f} >= {limit:.4f}"


def test_random_resized_crop_tries_ten_times_before_falling_back():
    # A 100 x 100 image with scale (0.9, 1): one attempt succeeds with probability p (computed here on a
    # fine grid); the whole image comes out after ten failures, or from a success that rounds to 100 x 100.
    size, scale, ratio = 100, (0.9, 1.0), (3 / 4, 4 / 3)
    s = np.linspace(scale[0], scale[1], 2001)[:, None]
    t = np.linspace(math.log(ratio[0]), math.log(ratio[1]), 2001)[None, :]
    w = np.rint(np.sqrt(s * size * size * np.exp(t)))
    h = np.rint(np.sqrt(s * size * size / np.exp(t)))
    accepted = (w <= size) & (h <= size)
    p, q = accepted.mean(), (accepted & (w == size) & (h == size)).mean()

    def expected_full(attempts):
        return (1 - p) ** attempts + q * (1 - (1 - p) ** attempts) / p

    n = 20000
    rng = np.random.default_rng(1)
    full = sum(T.RandomResizedCrop.get_params(size, size, scale, ratio, rng) == (0, 0, size, size) for _ in range(n))
    sigma = math.sqrt(expected_full(10) * (1 - expected_full(10)) / n)
    assert abs(full / n - expected_full(10)) < 5 * sigma
    # The test tells 10 from 9 or 11 attempts.
    assert abs(expected_full(9) - expected_full(10)) > 8 * sigma
    assert abs(expected_full(11) - expected_full(10)) > 8 * sigma


@pytest.mark.parametrize("width, height, expected", [
    (100, 50, (0, 16, 50, 67)),      # wider than 4/3: the full height, width round(50 * 4/3) = 67, centred
    (50, 100, (16, 0, 67, 50)),      # taller than 3/4: the full width, height round(50 / (3/4)) = 67
])
def test_random_resized_crop_fallback_is_the_clamped_central_crop(width, height, expected):
    rng = np.random.default_rng(0)
    # scale (0.99, 1) of an image with aspect ratio 2 (or 1/2) never fits with a ratio in [3/4, 4/3]
    for _ in range(20):
        assert T.RandomResizedCrop.get_params(width, height, (0.99, 1.0), (3 / 4, 4 / 3), rng) == expected


@pytest.mark.parametrize("size, out", [(24, (24, 24)), ((20, 30), (20, 30)), ([17], (17, 17))])
def test_random_resized_crop_pixels_are_pillows_crop_then_bilinear_resize(size, out):
    image = noise_image(90, 70)
    transform = T.RandomResizedCrop(size, draft=False)
    for seed in range(5):
        result = transform(image, np.random.default_rng(seed))
        top, left, h, w = T.RandomResizedCrop.get_params(90, 70, (0.08, 1.0), (3 / 4, 4 / 3),
                                                         np.random.default_rng(seed))
        reference = image.crop((left, top, left + w, top + h)).resize((out[1], out[0]), Image.BILINEAR)
        assert result.size == (out[1], out[0])
        assert np.array_equal(np.asarray(result), np.asarray(reference))


def test_bilinear_is_antialiased_like_pytorchs_antialiased_interpolation():
    # torchvision's tensor path: interpolate(mode="bilinear", antialias=True); on Pillow images it calls
    # Pillow.  The two agree to within uint8 rounding.
    image = noise_image(97, 61)
    result = np.asarray(T.Resize((23, 40), draft=False)(image)).astype(np.float64)
    x = torch.from_numpy(np.asarray(image).astype(np.float64)).permute(2, 0, 1)[None]
    reference = torch.nn.functional.interpolate(x, size=(23, 40), mode="bilinear", antialias=True,
                                                align_corners=False)[0].permute(1, 2, 0).numpy()
    difference = np.abs(result - reference)
    assert difference.max() <= 1.0 and difference.mean() < 0.4      # bicubic would be 4.5 and 0.83


# --- JPEG draft decoding ------------------------------------------------------------------------------

def test_draft_reduction_keeps_at_least_the_output_resolution():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        region_w, region_h = rng.integers(1, 3000, 2)
        out_w, out_h = rng.integers(1, 400, 2)
        r = T.draft_reduction(region_w, region_h, out_w, out_h)
        assert r in (1, 2, 4, 8)
        if r > 1:
            assert region_w // r >= out_w and region_h // r >= out_h
        if r < 8:           # the next reduction would go below the output size
            assert region_w // (2 * r) < out_w or region_h // (2 * r) < out_h


def test_jpeg_draft_decodes_smaller_and_stays_close_to_the_full_decode(tmp_path):
    path = tmp_path / "photo.jpg"
    noise_image(800, 600, seed=3).save(path, quality=92)
    out = 64
    crop = T.RandomResizedCrop(out, scale=(0.5, 1.0))
    exact = T.RandomResizedCrop(out, scale=(0.5, 1.0), draft=False)
    for seed in range(4):
        opened = Image.open(path)
        top, left, h, w = T.RandomResizedCrop.get_params(800, 600, (0.5, 1.0), (3 / 4, 4 / 3),
                                                         np.random.default_rng(seed))
        reduced, box = T.draft_for(opened, (left, top, left + w, top + h), out, out)
        r = T.draft_reduction(w, h, out, out)
        assert r >= 2 and reduced.size == ((800 + r - 1) // r, (600 + r - 1) // r)
        assert box[2] - box[0] >= out and box[3] - box[1] >= out          # never below the output's detail
        drafted = np.asarray(crop(Image.open(path), np.random.default_rng(seed))).astype(float)
        with Image.open(path) as full:
            full.load()
            reference = np.asarray(exact(full, np.random.default_rng(seed))).astype(float)
        assert drafted.shape == reference.shape == (out, out, 3)
        assert np.abs(drafted - reference).mean() < 3.0, np.abs(drafted - reference).mean()
    # Resize(100) of 800 x 600: the output is 133 x 100, so 1/4 (200 x 150) is the most the decoder may drop.
    opened = Image.open(path)
    resized = T.Resize(100)(opened)
    assert opened.size == (200, 150) and resized.size == (133, 100)
    with Image.open(path) as full:
        reference = np.asarray(T.Resize(100, draft=False)(full)).astype(float)
    assert np.abs(np.asarray(resized).astype(float) - reference).mean() < 3.0
    # A PNG, or a JPEG already decoded, is resized exactly as without drafting.
    loaded = Image.open(path)
    loaded.load()
    assert not T.can_draft(loaded) and T.can_draft(Image.open(path))


# --- Resize, CenterCrop, flips ------------------------------------------------------------------------

@pytest.mark.parametrize("width, height, size, max_size, expected_hw", [
    (500, 375, 256, None, (256, 341)),       # 256 * 500 / 375 = 341.33 -> int() = 341
    (375, 500, 256, None, (341, 256)),
    (300, 300, 100, None, (100, 100)),
    (1000, 10, 5, None, (5, 500)),
    (500, 375, 256, 300, (225, 300)),        # the longer side capped at max_size, the shorter int(300 * 256 / 341)
    (500, 375, (10, 20), None, (10, 20)),    # a pair is the exact (h, w)
    (500, 375, [128], None, (128, 170)),     # a 1-sequence is the shorter side
])
def test_resize_follows_the_shorter_side_rule_and_is_pillows_bilinear(width, height, size, max_size, expected_hw):
    assert T.resized_output_size(width, height, size, max_size) == expected_hw
    if width * height <= 200_000:
        image = noise_image(width, height)
        result = T.Resize(size, max_size=max_size, draft=False)(image)
        reference = image.resize((expected_hw[1], expected_hw[0]), Image.BILINEAR)
        assert np.array_equal(np.asarray(result), np.asarray(reference))


def test_resize_interpolation_names_map_to_pillows_filters():
    image = noise_image(50, 40)
    for name, flag in (("nearest", Image.NEAREST), ("bicubic", Image.BICUBIC), ("lanczos", Image.LANCZOS)):
        result = T.Resize((13, 17), interpolation=name)(image)
        assert np.array_equal(np.asarray(result), np.asarray(image.resize((17, 13), flag)))


def center_crop_reference(pixels, crop_h, crop_w):
    """torchvision's documented CenterCrop on an (H, W, C) array: zero-pad the short sides, then round()."""
    height, width = pixels.shape[:2]
    if crop_w > width or crop_h > height:
        pad = ((max(crop_h - height, 0) // 2, max(crop_h - height + 1, 0) // 2),
               (max(crop_w - width, 0) // 2, max(crop_w - width + 1, 0) // 2), (0, 0))
        pixels = np.pad(pixels, pad)
        height, width = pixels.shape[:2]
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return pixels[top:top + crop_h, left:left + crop_w]


@pytest.mark.parametrize("width, height, crop", [
    (9, 7, (4, 4)),         # (7 - 4) / 2 = 1.5 -> round() = 2 (half to even); (9 - 4) / 2 = 2.5 -> 2
    (10, 8, (3, 5)), (6, 6, 6), (5, 3, (6, 8)),       # the last crop is larger than the image on both sides
    (5, 9, (4, 8)), (9, 5, (8, 4)),                   # larger on one side only
])
def test_center_crop_rounds_and_pads_as_torchvision(width, height, crop):
    image = noise_image(width, height)
    crop_h, crop_w = (crop, crop) if isinstance(crop, int) else crop
    result = np.asarray(T.CenterCrop(crop)(image))
    assert result.shape == (crop_h, crop_w, 3)
    assert np.array_equal(result, center_crop_reference(np.asarray(image), crop_h, crop_w))


def test_horizontal_flip_probability_and_pixels():
    image = noise_image(11, 5)
    flipped = np.asarray(image)[:, ::-1]
    for p in (0.0, 0.3, 0.5, 1.0):
        rng, n = np.random.default_rng(7), 4000
        flips = 0
        for _ in range(n):
            out = np.asarray(T.RandomHorizontalFlip(p)(image, rng))
            is_flipped = np.array_equal(out, flipped)
            assert is_flipped or np.array_equal(out, np.asarray(image))
            flips += is_flipped
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(flips / n - p) <= 5 * sigma + 1e-12
    array = np.asarray(image)
    assert np.array_equal(T.RandomHorizontalFlip(1.0)(array, np.random.default_rng(0)), flipped)


# --- ToArray, Normalize -------------------------------------------------------------------------------

def test_to_array_is_torchvisions_to_tensor():
    image = noise_image(13, 7)
    pixels = torch.from_numpy(np.asarray(image).copy())
    result = T.ToArray()(image)
    reference = pixels.permute(2, 0, 1).float().div(255).numpy()
    assert result.dtype == np.float32 and result.shape == (3, 7, 13) and result.flags.c_contiguous
    assert np.array_equal(result, reference)
    result64 = T.ToArray("float64")(np.asarray(image))
    assert np.array_equal(result64, pixels.permute(2, 0, 1).double().div(255).numpy())
    grey = T.ToArray()(image.convert("L"))
    assert grey.shape == (1, 7, 13)
    with pytest.raises(TypeError, match="uint8"):
        T.ToArray()(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="Pillow image or a uint8 array"):
        T.ToArray()([1, 2, 3])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_normalize_matches_pytorch(dtype):
    rng = np.random.default_rng(0)
    x = rng.random((3, 9, 7))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    truth = ((torch.from_numpy(x) - torch.tensor(mean, dtype=torch.float64)[:, None, None])
             / torch.tensor(std, dtype=torch.float64)[:, None, None]).numpy()
    result = T.Normalize(mean, std)(x.astype(dtype))
    assert result.dtype == np.dtype(dtype)
    error = np.abs(result - truth).max() / np.abs(truth).max()
    assert error <= (1e-10 if dtype == "float64" else 1e-6), error
    if dtype == "float32":      # the same float32 operations as torchvision's sub_(mean).div_(std)
        reference = torch.from_numpy(x.astype(np.float32)).sub_(torch.tensor(mean)[:, None, None]).div_(
            torch.tensor(std)[:, None, None]).numpy()
        assert np.array_equal(result, reference)


def test_normalize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="non-zero"):
        T.Normalize((0.5, 0.5, 0.5), (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="as many means as stds"):
        T.Normalize((0.5, 0.5), (0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="3 channel means but the image has 4 channels"):
        T.Normalize((0.5,) * 3, (0.2,) * 3)(np.zeros((4, 2, 2), np.float32))
    with pytest.raises(TypeError, match=r"\(C, H, W\) float"):
        T.Normalize((0.5,) * 3, (0.2,) * 3)(np.zeros((3, 2, 2), np.uint8))


# --- pipelines and bad arguments ----------------------------------------------------------------------

def test_reference_recipe_pipelines():
    train, evaluation = T.train_transform(), T.eval_transform()
    crop, flip, to_array, normalize = train.transforms
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (224, 224)
    assert crop.scale == (0.08, 1.0) and crop.ratio == (3 / 4, 4 / 3) and crop.interpolation == "bilinear"
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5 and isinstance(to_array, T.ToArray)
    assert normalize.mean.tolist() == [0.485, 0.456, 0.406] and normalize.std.tolist() == [0.229, 0.224, 0.225]
    resize, center = evaluation.transforms[:2]
    assert resize.size == 256 and center.size == (224, 224)
    image = noise_image(500, 375)
    x = train(image, np.random.default_rng(0))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert np.array_equal(x, train(image, np.random.default_rng(0)))          # deterministic per generator
    assert not np.array_equal(x, train(image, np.random.default_rng(1)))
    # The evaluation preset equals numres.imagenet.preprocess (written separately, for pretrained models).
    y = evaluation(image)
    reference = preprocess(image)
    assert y.shape == (3, 224, 224) and np.abs(y - reference).max() <= 1e-6


def test_transforms_reject_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        T.RandomResizedCrop(0)
    with pytest.raises(ValueError, match=r"\(min, max\)"):
        T.RandomResizedCrop(10, scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'"):
        T.Resize(10, interpolation="cubic")
    with pytest.raises(ValueError, match="max_size"):
        T.Resize((10, 10), max_size=20)
    with pytest.raises(ValueError, match=r"flip probability must be in \[0, 1\]"):
        T.RandomHorizontalFlip(1.5)
    with pytest.raises(TypeError, match="Pillow image"):
        T.CenterCrop(3)(np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        T.RandomHorizontalFlip()(noise_image(4, 4), rng=3)


# --- Pad, RandomCrop, ColorJitter (issue 18) -----------------------------------------------------------
#
# torchvision's definitions, written out in PyTorch: padding modes are torch.nn.functional.pad's
# ("edge" = "replicate"; "symmetric" = the image mirrored with its border repeated, built by flipping);
# the colour adjustments are torchvision's tensor formulas (blend with black / the mean grey / the grey
# image, clamped to [0, 1]; hue through HSV, here Python's colorsys pixel by pixel).  For Pillow images
# torchvision calls Pillow's ImageEnhance, which is what numres must equal.

def torch_pad(chw, left, top, right, bottom, mode, fill=0.0):
    """torchvision's padding of a (C, H, W) tensor."""
    x = chw[None]
    if mode == "constant":
        out = torch.nn.functional.pad(x, (left, right, top, bottom), mode="constant", value=0.0)[0]
        mask = torch.ones_like(chw[:1], dtype=torch.bool)
        inside = torch.nn.functional.pad(mask[None].double(), (left, right, top, bottom))[0].bool()
        fill = torch.as_tensor(fill, dtype=out.dtype).reshape(-1, 1, 1).expand(out.shape[0], 1, 1)
        return torch.where(inside, out, fill)
    if mode in ("edge", "reflect"):
        return torch.nn.functional.pad(x, (left, right, top, bottom), mode="replicate" if mode == "edge"
                                       else "reflect")[0]
    rows = torch.cat([chw.flip(1)[:, chw.shape[1] - top:], chw, chw.flip(1)[:, :bottom]], dim=1)
    return torch.cat([rows.flip(2)[:, :, rows.shape[2] - left:], rows, rows.flip(2)[:, :, :right]], dim=2)


def as_chw(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float64).transpose(2, 0, 1).copy())


@pytest.mark.parametrize("mode", T.PADDING_MODES)
@pytest.mark.parametrize("padding", [3, (2, 1), (1, 2, 3, 0), [2], (0, 0, 0, 4)])
def test_pad_matches_torch_padding(mode, padding):
    image = noise_image(9, 7, seed=3)
    fill = (10, 20, 30)
    left, top, right, bottom = T._padding_sides(padding)
    expected = torch_pad(as_chw(image), left, top, right, bottom, mode, fill)
    for value in (image, np.asarray(image)):
        padded = T.Pad(padding, fill=fill, padding_mode=mode)(value)
        assert type(padded) is type(value)
        assert np.array_equal(as_chw(padded).numpy(), expected.numpy())
    grey = np.asarray(image.convert("L"))
    padded = T.pad(grey, padding, fill=5, padding_mode=mode)
    assert np.array_equal(padded, torch_pad(torch.from_numpy(grey[None].astype(np.float64)), left, top, right,
                                            bottom, mode, 5.0)[0].numpy())


def test_random_crop_is_a_window_of_the_padded_image():
    """RandomCrop(32, padding=4): every output is the 32x32 window at (i, j) of the zero-padded image,
    with (i, j) uniform over 0..8 x 0..8."""
    image = noise_image(32, 32, seed=4)
    crop = T.RandomCrop(32, padding=4)
    padded = torch_pad(as_chw(image), 4, 4, 4, 4, "constant")
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        state = rng.bit_generator.state
        out = crop(image, rng)
        replay = np.random.default_rng()
        replay.bit_generator.state = state
        i, j = int(replay.integers(0, 9)), int(replay.integers(0, 9))
        assert np.array_equal(as_chw(out).numpy(), padded[:, i:i + 32, j:j + 32].numpy())
        seen.add((i, j))
    assert len(seen) > 70                              # of 81 places
    same = np.random.default_rng(5)
    assert np.array_equal(np.asarray(crop(image, same)), np.asarray(crop(image, np.random.default_rng(5))))


def test_random_crop_pad_if_needed_and_params_follow_torchvision():
    image = noise_image(10, 6, seed=5)
    # torchvision pads a short side by the whole shortfall at both ends, then crops at random
    crop = T.RandomCrop((9, 12), pad_if_needed=True, fill=7, padding_mode="constant")
    padded = crop.padded(image)
    expected = torch_pad(as_chw(image), 2, 3, 2, 3, "constant", 7)
    assert np.array_equal(as_chw(padded).numpy(), expected.numpy())
    out = crop(np.asarray(image), np.random.default_rng(0))
    assert out.shape == (9, 12, 3)
    assert T.RandomCrop.get_params(image, (6, 10)) == (0, 0, 6, 10)
    with pytest.raises(ValueError, match=r"Required crop size \(7, 10\) is larger than input image size \(6, 10\)"):
        T.RandomCrop(size=(7, 10))(image)
    with pytest.raises(ValueError, match="padding_mode"):
        T.RandomCrop(8, padding=1, padding_mode="wrap")
    with pytest.raises(ValueError, match="padding must be"):
        T.RandomCrop(8, padding=(1, 2, 3))
    assert repr(T.RandomCrop(32, padding=4)) == "RandomCrop(size=(32, 32), padding=4)"


def torchvision_gray(x):
    return (0.2989 * x[..., 0:1, :, :] + 0.587 * x[..., 1:2, :, :] + 0.114 * x[..., 2:3, :, :]).to(x.dtype)


def torchvision_adjust(name, x, factor):
    """torchvision's tensor formulas for float images in [0, 1]."""
    if name == "brightness":
        return (factor * x).clamp(0, 1)
    if name == "contrast":
        mean = torchvision_gray(x).mean(dim=(-3, -2, -1), keepdim=True)
        return (factor * x + (1 - factor) * mean).clamp(0, 1)
    if name == "saturation":
        return (factor * x + (1 - factor) * torchvision_gray(x)).clamp(0, 1)
    import colorsys
    out = torch.empty_like(x)
    for row in range(x.shape[1]):
        for col in range(x.shape[2]):
            h, s, v = colorsys.rgb_to_hsv(*x[:, row, col].tolist())
            out[:, row, col] = torch.tensor(colorsys.hsv_to_rgb((h + factor) % 1.0, s, v), dtype=x.dtype)
    return out


def colour_image(seed, height=7, width=6, dtype=np.float64):
    """Random colours plus greys, pure hues and ties between channels."""
    rng = np.random.default_rng(seed)
    x = rng.random((3, height, width))
    x[:, 0, 0] = 0.5
    x[:, 0, 1] = [1.0, 0.0, 0.0]
    x[:, 0, 2] = [0.2, 0.9, 0.9]
    x[:, 0, 3] = [0.7, 0.7, 0.1]
    x[:, 1, :] = np.round(x[:, 1, :] * 4) / 4
    return x.astype(dtype)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue"])
def test_colour_adjustments_match_torchvision_formulas(name):
    factors = (-0.5, -0.21, 0.0, 0.13, 0.5) if name == "hue" else (0.0, 0.4, 1.0, 1.6)
    adjust = getattr(T, f"adjust_{name}")
    for factor in factors:
        for seed in range(2):
            x = colour_image(seed)
            expected = torchvision_adjust(name, torch.from_numpy(x), factor)
            out = adjust(x, factor)
            assert out.dtype == np.float64 and out.shape == x.shape
            assert np.abs(out - expected.numpy()).max() < 1e-12, (factor, np.abs(out - expected.numpy()).max())
            single = adjust(x.astype(np.float32), factor)
            assert single.dtype == np.float32 and np.abs(single - expected.numpy()).max() < 2e-6
        batch = np.stack([colour_image(0), colour_image(1)])           # (N, 3, H, W) on the backend
        stacked = np.stack([adjust(colour_image(0), factor), adjust(colour_image(1), factor)])
        if name != "contrast":
            assert np.array_equal(adjust(batch, factor), stacked)
    with pytest.raises(ValueError):
        adjust(colour_image(0), 0.7 if name == "hue" else -0.1)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue"])
def test_colour_adjustments_on_pillow_images_are_torchvisions(name):
    """For Pillow images torchvision calls ImageEnhance (brightness, contrast, saturation) and shifts
    the hue byte of Pillow's HSV by int(255 h) modulo 256."""
    from PIL import ImageEnhance
    image = noise_image(11, 9, seed=6)
    adjust = getattr(T, f"adjust_{name}")
    for factor in ((-0.5, -0.2, 0.0, 0.3) if name == "hue" else (0.0, 0.5, 1.3)):
        out = adjust(image, factor)
        if name == "hue":
            h, s, v = image.convert("HSV").split()
            shifted = Image.fromarray(((np.asarray(h).astype(np.int64) + int(factor * 255)) % 256).astype(np.uint8))
            expected = Image.merge("HSV", (shifted, s, v)).convert("RGB")
        else:
            enhancer = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                        "saturation": ImageEnhance.Color}[name]
            expected = enhancer(image).enhance(factor)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(expected))
    grey = image.convert("L")
    if name in ("hue",):
        assert adjust(grey, 0.3) is grey


def test_color_jitter_ranges_order_and_draws():
    jitter = T.ColorJitter(brightness=0.4, contrast=(0.5, 0.9), saturation=1.5, hue=0.1)
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == \
        ((0.6, 1.4), (0.5, 0.9), (0.0, 2.5), (-0.1, 0.1))
    assert T.ColorJitter().brightness is None and T.ColorJitter(hue=0).hue is None
    assert T.ColorJitter(brightness=(1, 1)).brightness is None
    for kwargs, error in ((dict(brightness=-0.1), ValueError), (dict(hue=0.6), ValueError),
                          (dict(contrast=(0.9, 0.5)), ValueError), (dict(saturation=(1, 2, 3)), TypeError)):
        with pytest.raises(error):
            T.ColorJitter(**kwargs)
    x = colour_image(3)
    rng = np.random.default_rng(9)
    orders = set()
    for _ in range(40):
        state = rng.bit_generator.state
        out = jitter(x, rng)
        replay = np.random.default_rng()
        replay.bit_generator.state = state
        order, b, c, s, h = T.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation,
                                                     jitter.hue, replay)
        assert sorted(order) == [0, 1, 2, 3] and 0.6 <= b <= 1.4 and 0.5 <= c <= 0.9 and abs(h) <= 0.1
        expected = torch.from_numpy(x)
        for index in order:
            expected = torchvision_adjust(("brightness", "contrast", "saturation", "hue")[index], expected,
                                          (b, c, s, h)[index])
        assert np.abs(out - expected.numpy()).max() < 1e-12
        orders.add(tuple(order))
    assert len(orders) > 10
    image = noise_image(8, 8, seed=1)
    pipeline = T.Compose([T.RandomCrop(8, padding=2), jitter, T.ToArray()])
    assert np.array_equal(pipeline(image, np.random.default_rng(2)), pipeline(image, np.random.default_rng(2)))
    with pytest.raises(TypeError, match="float"):
        jitter(np.zeros((8, 8, 3), np.uint8))
