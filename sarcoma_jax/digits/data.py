"""The digits data: one preprocessing for every source, and the offline pair (SPEC §8)."""

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from sklearn.datasets import load_digits

from data_pipeline.vocabulary import SPLITS
from sarcoma_jax import input_pipeline

IMAGE_SIDE = 28  # every digit image the models see is (28, 28, 1), float32 in [0, 1]
NUM_CLASSES = 10


class DigitsDataError(input_pipeline.ConfigError):
    """A problem with the digits data that the user can fix; main.py prints it in one line."""


class LabelledImages(NamedTuple):
    """One split of one domain.

    Attributes:
      images: (n, 28, 28, 1) float32 in [0, 1], ink and background as the domain has them.
      labels: (n,) int32 digit classes 0-9.
    """

    images: np.ndarray
    labels: np.ndarray


# A domain: split name ('train', 'val', 'test') -> LabelledImages.
Domain = dict[str, LabelledImages]


def to_model_images(images_uint8: np.ndarray) -> np.ndarray:
    """The one preprocessing of every digits source: grayscale 28x28, uint8 / 255.

    Args:
      images_uint8: (n, h, w, channels) uint8 with 1 (gray) or 3 (RGB) channels.

    Returns:
      (n, 28, 28, 1) float32 in [0, 1]. RGB becomes gray with PIL's ITU-R 601 luma
      (0.299 R + 0.587 G + 0.114 B); other sizes are resized bilinearly (antialiased).
    """
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4:
        raise ValueError(
            f"expected (n, h, w, c) uint8 images, got {images_uint8.dtype} {images_uint8.shape}"
        )
    gray = np.empty((len(images_uint8), IMAGE_SIDE, IMAGE_SIDE), np.uint8)
    for index, image in enumerate(images_uint8):
        pil_image = Image.fromarray(image if image.shape[-1] == 3 else image[..., 0])
        pil_image = pil_image.convert("L")
        if pil_image.size != (IMAGE_SIDE, IMAGE_SIDE):
            pil_image = pil_image.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR)
        gray[index] = np.asarray(pil_image)
    return (gray.astype(np.float32) / 255.0)[..., None]


def split_by_sizes(
    images: np.ndarray, labels: np.ndarray, sizes: Mapping[str, int], rng: np.random.Generator
) -> Domain:
    """Shuffles (images, labels) with rng and cuts consecutive pieces of the given sizes."""
    order = rng.permutation(len(labels))
    domain, start = {}, 0
    for split, size in sizes.items():
        chosen = order[start : start + size]
        domain[split] = LabelledImages(images[chosen], labels[chosen].astype(np.int32))
        start += size
    return domain


def fraction_sizes(total: int, fractions: Sequence[float]) -> dict[str, int]:
    """Split sizes for train/val/test fractions of `total`; test takes the rounding remainder."""
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DigitsDataError(
            f"split fractions must be 3 positive numbers summing to 1, got {tuple(fractions)}"
        )
    train, val = (round(total * fraction) for fraction in fractions[:2])
    return {"train": train, "val": val, "test": total - train - val}


# ----------------------------------------------------------------------------------------------
# Offline pair (SPEC §8): printed digits on clutter (SVHN-like) -> scikit-learn's handwritten
# digits (MNIST-like). Everything comes from what Pillow and scikit-learn ship.

SVHN_CROP_SIDE = 32  # the rendered source images are drawn like SVHN's 32x32 RGB crops
_GLYPH_CANVAS = 64  # side of the square on which one glyph is drawn and rotated
_MIN_LUMA_CONTRAST = 70  # |luma(ink) - luma(background)| of the centre digit, out of 255


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


@functools.cache
def _bundled_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at `size` px; cached, loading is slow.

    Raises:
      DigitsDataError: Pillow older than 10.1 or built without FreeType, where load_default
        gives a fixed-size bitmap font.
    """
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise DigitsDataError(
            "the offline digits need Pillow >= 10.1 with FreeType (a scalable bundled font)"
        )
    return font


def _glyph_mask(digit: int, font_size: int, stroke: int, angle_deg: float) -> Image.Image:
    """An 'L' mask (_GLYPH_CANVAS square) of one digit centred in it, rotated by angle_deg."""
    mask = Image.new("L", (_GLYPH_CANVAS, _GLYPH_CANVAS), 0)
    font = _bundled_font(font_size)
    centre = _GLYPH_CANVAS // 2
    ImageDraw.Draw(mask).text(
        (centre, centre),
        str(digit),
        fill=255,
        font=font,
        anchor="mm",
        stroke_width=stroke,
        stroke_fill=255,
    )
    return mask.rotate(angle_deg, resample=Image.Resampling.BICUBIC)


def _render_printed_digit(digit: int, rng: np.random.Generator) -> np.ndarray:
    """One SVHN-like 32x32 RGB uint8 image of `digit`: a house number crop with neighbours."""
    side = SVHN_CROP_SIDE
    background_rgb = rng.integers(0, 256, 3)
    ink_rgb = rng.integers(0, 256, 3)
    while abs(_luma(ink_rgb) - _luma(background_rgb)) < _MIN_LUMA_CONTRAST:
        ink_rgb = rng.integers(0, 256, 3)

    # Background: a linear colour gradient plus clutter near its colour (blocks, edges, rings).
    ramp = np.linspace(-1.0, 1.0, side)
    direction = rng.uniform(-1.0, 1.0, 2)
    gradient = direction[0] * ramp[None, :, None] + direction[1] * ramp[:, None, None]
    tilt_rgb = rng.uniform(-40, 40, 3)
    canvas = np.clip(background_rgb + gradient * tilt_rgb, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 7)):
        clutter_rgb = tuple(int(c) for c in np.clip(background_rgb + rng.normal(0, 45, 3), 0, 255))
        x0, y0, x1, y1 = rng.integers(-8, side + 8, 4)
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        shape = rng.integers(3)
        if shape == 0:
            draw.rectangle(box, fill=clutter_rgb)
        elif shape == 1:
            draw.line(box, fill=clutter_rgb, width=int(rng.integers(1, 4)))
        else:
            draw.ellipse(box, outline=clutter_rgb, width=int(rng.integers(1, 3)))

    # The digit, and its neighbours in the house number cut off at the sides.
    font_size = int(rng.integers(20, 31))
    stroke = int(rng.integers(0, 2))
    angle_deg = float(rng.uniform(-12, 12))
    digit_width = int(0.62 * font_size) + 2 * stroke
    centre = np.array([side // 2, side // 2]) + rng.integers(-2, 3, 2)
    gap = int(rng.integers(1, 5))
    offsets = [0]
    if rng.random() < 0.8:
        offsets.append(-(digit_width + gap))
    if rng.random() < 0.8:
        offsets.append(digit_width + gap)
    ink = tuple(int(c) for c in ink_rgb)
    for offset in offsets:
        shown = digit if offset == 0 else int(rng.integers(NUM_CLASSES))
        mask = _glyph_mask(shown, font_size, stroke, angle_deg)
        corner = (int(centre[0] + offset - _GLYPH_CANVAS // 2), int(centre[1] - _GLYPH_CANVAS // 2))
        image.paste(Image.new("RGB", mask.size, ink), corner, mask)

    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 1.0))))
    noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(0, 10), (side, side, 3))
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def render_printed_digits(num_images: int, seed: int) -> LabelledImages:
    """SVHN-like printed digits, deterministic per seed and Pillow version (balanced, shuffled).

    Each image: a 32x32 colour crop with a gradient background, clutter near its colour, the digit
    drawn with Pillow's bundled font at a random size (20-30 px), weight, rotation (±12°),
    position (±2 px) and colour (luma contrast >= 70/255 against the background, either
    polarity), neighbouring digits cut off at the sides, blur and noise; then `to_model_images`.

    Returns:
      images (num_images, 28, 28, 1) float32 in [0, 1] and labels (num_images,) int32.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_images) % NUM_CLASSES).astype(np.int32)
    rgb = np.stack([_render_printed_digit(int(label), rng) for label in labels])
    return LabelledImages(to_model_images(rgb), labels)


HANDWRITTEN_DIGIT_BOX = 20  # MNIST: each digit fits a 20x20 box centred in the 28x28 image


def load_handwritten_digits() -> LabelledImages:
    """scikit-learn's 1797 handwritten digits (UCI optdigits), made MNIST-like.

    The 8x8 counts (0-16, ink high: white on black as in MNIST) are scaled to uint8, upsampled
    bicubically to 20x20 and padded to 28x28, as MNIST centres its digits in a 20x20 box, then
    go through `to_model_images` like every other source.

    Returns:
      images (1797, 28, 28, 1) float32 in [0, 1] and labels (1797,) int32, in scikit-learn order.
    """
    bunch = load_digits()
    counts_uint8 = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    pad = (IMAGE_SIDE - HANDWRITTEN_DIGIT_BOX) // 2
    framed = np.zeros((len(counts_uint8), IMAGE_SIDE, IMAGE_SIDE, 1), np.uint8)
    for index, counts in enumerate(counts_uint8):
        upsampled = Image.fromarray(counts).resize(
            (HANDWRITTEN_DIGIT_BOX, HANDWRITTEN_DIGIT_BOX), Image.Resampling.BICUBIC
        )
        framed[index, pad : pad + HANDWRITTEN_DIGIT_BOX, pad : pad + HANDWRITTEN_DIGIT_BOX, 0] = (
            np.asarray(upsampled)
        )
    return LabelledImages(to_model_images(framed), bunch.target.astype(np.int32))


def offline_pair(
    seed: int,
    source_sizes: Sequence[int] = (4000, 1000, 1000),
    target_fractions: Sequence[float] = (0.6, 0.2, 0.2),
) -> tuple[Domain, Domain]:
    """The offline SVHN-like -> MNIST-like pair, deterministic per seed.

    Args:
      seed: draws the rendered source images and the target's split.
      source_sizes: rendered train, val, test images.
      target_fractions: train, val, test fractions of the 1797 handwritten digits.

    Returns:
      (source, target): split name -> LabelledImages.
    """
    if len(source_sizes) != 3 or min(source_sizes) < 1:
        raise DigitsDataError(f"source_sizes must be 3 positive counts, got {tuple(source_sizes)}")
    source_seed, target_seed = np.random.SeedSequence(seed).spawn(2)
    rendered = render_printed_digits(sum(source_sizes), int(source_seed.generate_state(1)[0]))
    source = split_by_sizes(
        rendered.images,
        rendered.labels,
        dict(zip(SPLITS, source_sizes, strict=True)),
        np.random.default_rng(source_seed),
    )
    handwritten = load_handwritten_digits()
    target = split_by_sizes(
        handwritten.images,
        handwritten.labels,
        fraction_sizes(len(handwritten.labels), target_fractions),
        np.random.default_rng(target_seed),
    )
    return source, target
