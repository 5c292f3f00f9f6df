"""Digits for the §10.1 demonstration: SVHN -> MNIST through tfds, and an offline pair (SPEC §8)."""

import functools
import gzip
import io
import json
import pathlib
import socket
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import scipy.io
import tensorflow_datasets as tfds
import tqdm
from absl import logging
from etils import epath
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from sklearn.datasets import load_digits
from tensorflow_datasets.datasets.svhn_cropped import svhn_cropped_dataset_builder
from tensorflow_datasets.image_classification import mnist

from data_pipeline.vocabulary import SPLITS
from sarcoma_jax import input_pipeline, models, train_adda

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


def _split_by_sizes(
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


def _fraction_sizes(total: int, fractions: Sequence[float]) -> dict[str, int]:
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
    source = _split_by_sizes(
        rendered.images,
        rendered.labels,
        dict(zip(SPLITS, source_sizes, strict=True)),
        np.random.default_rng(source_seed),
    )
    handwritten = load_handwritten_digits()
    target = _split_by_sizes(
        handwritten.images,
        handwritten.labels,
        _fraction_sizes(len(handwritten.labels), target_fractions),
        np.random.default_rng(target_seed),
    )
    return source, target


# ----------------------------------------------------------------------------------------------
# Source-only classifier (§10.1 step 1): LeNet trained on the source, kept at its best source-val
# accuracy; evaluated on the target it gives the "before DA" accuracy.


class ClassifierState(NamedTuple):
    """Explicit training state: LeNet params, Adam state, step count and a base PRNG key.

    The dropout key of step s is fold_in(rng, s), so no key is carried from step to step.
    """

    params: Any
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar
    rng: jax.Array  # uint32 (2,)


def classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of (batch, 10) logits against (batch,) int labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def create_classifier_optimizer(
    learning_rate: float = 2e-4, b1: float = 0.5, b2: float = 0.999
) -> optax.GradientTransformation:
    """Adam of SPEC §4 for SVHN->MNIST: 2e-4, betas (0.5, 0.999)."""
    return optax.adam(learning_rate, b1=b1, b2=b2)


def _init_params(rng: jax.Array, model: nn.Module) -> Any:
    return model.init(rng, jnp.zeros((1, IMAGE_SIDE, IMAGE_SIDE, 1)), train=False)["params"]


@functools.partial(jax.jit, static_argnames=("model", "optimizer"))
def init_classifier(
    rng: jax.Array, model: nn.Module, optimizer: optax.GradientTransformation
) -> ClassifierState:
    """LeNet params for (batch, 28, 28, 1) images and a fresh optimizer state (compiled: flax's
    init op by op is slow)."""
    init_rng, state_rng = jax.random.split(rng)
    params = _init_params(init_rng, model)
    return ClassifierState(params, optimizer.init(params), jnp.zeros((), jnp.int32), state_rng)


@functools.partial(jax.jit, static_argnames=("model", "optimizer", "weight_decay"))
def classifier_train_step(
    state: ClassifierState,
    images: jax.Array,
    labels: jax.Array,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    weight_decay: float,
) -> tuple[ClassifierState, jax.Array]:
    """One Adam step on cross-entropy + weight_decay * sum of squared kernels (Keras' l2).

    Args:
      state: the classifier state.
      images: (batch, 28, 28, 1) float32.
      labels: (batch,) int32.
      model: the LeNet module (static).
      optimizer: the optax transformation (static).
      weight_decay: the L2 weight on kernels (1e-3 in SPEC §4).

    Returns:
      The new state and the batch's total loss.
    """
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
        return classification_loss(logits, labels) + weight_decay * models.kernel_l2_penalty(params)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return ClassifierState(params, opt_state, state.step + 1, state.rng), loss


def accuracy_of_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of (n, 10) logits whose argmax is the (n,) label."""
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == np.asarray(labels)))


@functools.partial(jax.jit, static_argnames=("model",))
def _logits(params: Any, images: jax.Array, model: nn.Module) -> jax.Array:
    return model.apply({"params": params}, images, train=False)


def predict_logits(
    params: Any, model: nn.Module, images: np.ndarray, batch_size: int = 500
) -> np.ndarray:
    """(n, 10) logits of (n, 28, 28, 1) images in evaluation mode (fixed-size batches)."""
    logits = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        padded = np.zeros((batch_size, *batch.shape[1:]), np.float32)
        padded[: len(batch)] = batch
        logits.append(np.asarray(_logits(params, padded, model))[: len(batch)])
    return np.concatenate(logits)


def accuracy(params: Any, model: nn.Module, data: LabelledImages) -> float:
    """Fraction of `data` that the classifier gets right."""
    return accuracy_of_logits(predict_logits(params, model, data.images), data.labels)


def batches(
    data: LabelledImages, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of shuffled full batches (the remainder is dropped)."""
    order = rng.permutation(len(data.labels))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        chosen = order[start : start + batch_size]
        yield data.images[chosen], data.labels[chosen]


def train_source_classifier(
    source: Domain,
    seed: int,
    num_epochs: int,
    batch_size: int = 20,
    weight_decay: float = 1e-3,
    optimizer: optax.GradientTransformation | None = None,
    model: nn.Module | None = None,
    progress: bool = False,
) -> tuple[Any, list[dict[str, float]]]:
    """Trains LeNet on source['train']; keeps the epoch with the best source['val'] accuracy.

    Returns:
      (params of the best epoch, per-epoch history [{'epoch', 'loss', 'val_accuracy'}]).
    """
    model = model or models.LeNetEncoder()
    optimizer = optimizer or create_classifier_optimizer()
    state = init_classifier(jax.random.PRNGKey(seed), model, optimizer)
    order_rng = np.random.default_rng(seed)
    best_params, best_accuracy, history = state.params, -1.0, []
    for epoch in tqdm.trange(num_epochs, desc="source", disable=not progress):
        losses = []
        for images, labels in batches(source["train"], batch_size, order_rng):
            state, loss = classifier_train_step(
                state, images, labels, model, optimizer, weight_decay
            )
            losses.append(loss)
        val_accuracy = accuracy(state.params, model, source["val"])
        history.append(
            {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_accuracy": val_accuracy}
        )
        if val_accuracy > best_accuracy:
            best_params, best_accuracy = state.params, val_accuracy
    return best_params, history


# ----------------------------------------------------------------------------------------------
# SVHN -> MNIST through tfds, without TensorFlow.
#
# tfds' own `mnist` and `svhn_cropped` builders read their downloads with tf.io.gfile, extract the
# .gz files with it and PNG-encode numpy images with tf.image.encode_png, so preparing them needs
# TensorFlow (reading a prepared array_record copy does not). The two builders below are the same
# datasets (name, version, features, train and test splits, checksums, metadata) with those three
# steps done with gzip, scipy and Pillow; what they write is read back with `as_data_source`, so a
# copy that `tfds build --file_format=array_record` wrote with TensorFlow is read as well.


def _png_bytes(image_uint8: np.ndarray) -> bytes:
    """PNG encoding with Pillow of an (h, w, 1) or (h, w, 3) uint8 image (tfds stores PNG)."""
    buffer = io.BytesIO()
    Image.fromarray(image_uint8[..., 0] if image_uint8.shape[-1] == 1 else image_uint8).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def _check_reachable(url: str, timeout_s: float = 10.0) -> None:
    """Raises OSError at once when the download host cannot be reached.

    Without it, tfds retries each file with back-off for minutes before failing.
    """
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
        pass


class MnistWithoutTensorflow(mnist.MNIST, skip_registration=True):
    """tfds' `mnist` 3.0.1 (train 60000, test 10000), prepared without TensorFlow."""

    name = "mnist"
    url_infos = mnist.MNIST.url_infos  # tfds' checksums of the four files

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        files = {
            "train_data": mnist._MNIST_TRAIN_DATA_FILENAME,
            "train_labels": mnist._MNIST_TRAIN_LABELS_FILENAME,
            "test_data": mnist._MNIST_TEST_DATA_FILENAME,
            "test_labels": mnist._MNIST_TEST_LABELS_FILENAME,
        }
        urls = {key: urllib.parse.urljoin(self.URL, name) for key, name in files.items()}
        _check_reachable(urls["train_data"])
        paths = dl_manager.download(urls)  # the .gz files, read below with gzip
        return {
            split: self._generate_examples(
                paths[f"{split}_data"], paths[f"{split}_labels"], num_examples
            )
            for split, num_examples in (
                ("train", mnist._TRAIN_EXAMPLES),
                ("test", mnist._TEST_EXAMPLES),
            )
        }

    def _generate_examples(
        self, data_path: epath.PathLike, label_path: epath.PathLike, num_examples: int
    ):
        side = mnist._MNIST_IMAGE_SIZE
        with epath.Path(data_path).open("rb") as raw, gzip.open(raw) as data_file:
            data_file.read(16)  # IDX header: magic, count, rows, columns
            images = np.frombuffer(data_file.read(side * side * num_examples), np.uint8)
        with epath.Path(label_path).open("rb") as raw, gzip.open(raw) as label_file:
            label_file.read(8)  # IDX header: magic, count
            labels = np.frombuffer(label_file.read(num_examples), np.uint8)
        images = images.reshape(num_examples, side, side, 1)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield index, {"image": _png_bytes(image), "label": int(label)}


class SvhnCroppedWithoutTensorflow(svhn_cropped_dataset_builder.Builder, skip_registration=True):
    """tfds' `svhn_cropped` 3.1.0 (train 73257, test 26032), prepared without TensorFlow.

    Only train and test are downloaded: the 'extra' split (531131 images, 1.3 GB) is not used here.
    """

    name = "svhn_cropped"
    pkg_dir_path = svhn_cropped_dataset_builder.Builder._get_pkg_dir_path()  # README, citation
    url_infos = svhn_cropped_dataset_builder.Builder.url_infos  # tfds' checksums

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        urls = {
            split: urllib.parse.urljoin(svhn_cropped_dataset_builder.URL, f"{split}_32x32.mat")
            for split in ("train", "test")
        }
        _check_reachable(urls["train"])
        paths = dl_manager.download(urls)
        return {split: self._generate_examples(f"{split}_", paths[split]) for split in paths}

    def _generate_examples(self, split_prefix: str, filepath: epath.PathLike):
        with epath.Path(filepath).open("rb") as mat_file:
            data = scipy.io.loadmat(mat_file)
        images = np.moveaxis(data["X"], -1, 0)  # (32, 32, 3, n) -> (n, 32, 32, 3)
        labels = data["y"].reshape(-1) % 10  # SVHN stores the digit 0 as 10
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield (
                index,
                {
                    "image": _png_bytes(image),
                    "label": int(label),
                    "id": f"{split_prefix}{index:06d}",
                },
            )


TFDS_BUILDERS = {"mnist": MnistWithoutTensorflow, "svhn_cropped": SvhnCroppedWithoutTensorflow}

OFFLINE_CONFIG = "configs/adda_digits_offline.py"


def load_tfds_split(
    name: str, split: str, data_dir: str | None = None, max_examples: int | None = None
) -> LabelledImages:
    """Images and labels of one tfds split, read through `as_data_source` (array_record).

    The first call downloads and prepares the dataset (array_record, into data_dir, default
    ~/tensorflow_datasets); later calls read what is there.

    Args:
      name: 'mnist' or 'svhn_cropped'.
      split: a tfds split name, e.g. 'train' or 'test'.
      data_dir: tfds data folder.
      max_examples: read at most this many (the first ones), for quick runs.

    Returns:
      `to_model_images` of the images, and labels int32.

    Raises:
      DigitsDataError: the dataset is not there and cannot be downloaded (no internet), or the
        folder holds a copy that cannot be read without TensorFlow.
    """
    if name not in TFDS_BUILDERS:
        raise DigitsDataError(
            f"unknown digits dataset {name!r}; use one of {sorted(TFDS_BUILDERS)}"
        )
    builder = TFDS_BUILDERS[name](data_dir=data_dir)
    try:
        builder.download_and_prepare(
            file_format="array_record",
            # tfds' prepared copies on GCS are tfrecord, which only TensorFlow reads.
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    except OSError as error:
        raise DigitsDataError(
            f"{name} is not in {builder.data_dir} and its first download needs the internet "
            f"({error.__class__.__name__}); offline, use {OFFLINE_CONFIG}"
        ) from error
    try:
        source = builder.as_data_source(split=split)
    except NotImplementedError as error:  # tfds' message for a tfrecord copy
        raise DigitsDataError(
            f"{builder.data_dir} holds {name} as tfrecord (prepared with TensorFlow), which is "
            "read only as array_record here; give another config.data.tfds_data_dir"
        ) from error
    count = len(source) if max_examples is None else min(len(source), max_examples)
    examples = [source[index] for index in range(count)]  # mock_data's __getitems__ is broken
    images = np.stack([np.asarray(example["image"], np.uint8) for example in examples])
    labels = np.array([int(example["label"]) for example in examples], np.int32)
    return LabelledImages(to_model_images(images), labels)


def svhn_mnist_pair(
    seed: int,
    data_dir: str | None = None,
    val_examples: int = 5000,
    max_examples: int | None = None,
) -> tuple[Domain, Domain]:
    """SVHN (source) -> MNIST (target), as in §10.1.1.

    Each domain's tfds 'train' split is divided by a seeded shuffle into train and val
    (`val_examples` images); 'test' is tfds' test split.

    Args:
      seed: the train/val division.
      data_dir: tfds data folder (default ~/tensorflow_datasets).
      val_examples: images of each domain's tfds train split kept for validation.
      max_examples: read at most this many images per tfds split (quick runs).

    Returns:
      (source, target): split name -> LabelledImages.

    Raises:
      DigitsDataError: no internet for the first download, or too few images for val_examples.
    """
    source_seed, target_seed = np.random.SeedSequence(seed).spawn(2)
    domains = []
    for name, domain_seed in (("svhn_cropped", source_seed), ("mnist", target_seed)):
        train = load_tfds_split(name, "train", data_dir, max_examples)
        if not 0 < val_examples < len(train.labels):
            raise DigitsDataError(
                f"val_examples must be in [1, {len(train.labels) - 1}] for {name}, "
                f"got {val_examples}"
            )
        sizes = {"train": len(train.labels) - val_examples, "val": val_examples}
        domain = _split_by_sizes(
            train.images, train.labels, sizes, np.random.default_rng(domain_seed)
        )
        domain["test"] = load_tfds_split(name, "test", data_dir, max_examples)
        domains.append(domain)
    return domains[0], domains[1]


# ----------------------------------------------------------------------------------------------
# The digits Task of the ADDA game (sarcoma_jax.train_adda), and the §10-3 table.

DATASETS = ("offline", "svhn_mnist")


def load_pair(data_config: Mapping[str, Any]) -> tuple[Domain, Domain]:
    """(source, target) of `config.data` (configs/adda_svhn_mnist.py documents the fields)."""
    if data_config["dataset"] == "offline":
        return offline_pair(
            data_config["seed"], data_config["source_sizes"], data_config["target_fractions"]
        )
    return svhn_mnist_pair(
        data_config["seed"],
        data_config["tfds_data_dir"],
        data_config["val_examples"],
        data_config["max_examples"],
    )


def _as_arrays(domain: Domain) -> dict[str, dict[str, np.ndarray]]:
    return {split: {"image": data.images, "label": data.labels} for split, data in domain.items()}


def _as_labelled(arrays: Mapping[str, np.ndarray]) -> LabelledImages:
    return LabelledImages(arrays["image"], arrays["label"])


SOURCE_RUN_FILE = "source.json"  # in <workdir>/source: history and accuracies of the source run


class DigitsTask:
    """Digit classification, SVHN-like -> MNIST-like (thesis §10.1, SPEC §3-4, §8).

    Config (configs/adda_svhn_mnist.py): `config.data.dataset` 'svhn_mnist' (tfds) or 'offline'
    (SPEC §8); `config.model` LeNet ('lenet'), `config.discriminator` the MLP on its 10 logits;
    `config.source` the source-only training (trained into <workdir>/source), unless
    `config.source_checkpoint` names the workdir (or its 'source' folder) of an earlier digits
    run to reuse. The primary metric is classification accuracy.
    """

    primary_metric = "accuracy"

    def validate_config(self, config: ml_collections.ConfigDict) -> None:
        data = config.data
        if data.dataset not in DATASETS:
            raise input_pipeline.ConfigError(
                f"config.data.dataset {data.dataset!r} is unknown; use one of {', '.join(DATASETS)}"
            )
        if config.model.name != "lenet":
            raise input_pipeline.ConfigError(
                f"config.model.name {config.model.name!r}: the digits task needs 'lenet'"
            )
        if config.discriminator.name != "mlp_discriminator":
            raise input_pipeline.ConfigError(
                f"config.discriminator.name {config.discriminator.name!r}: the digits task needs "
                "'mlp_discriminator' (it sees the 10 logits)"
            )
        if data.dataset == "offline":
            if len(data.source_sizes) != 3 or min(data.source_sizes) < 1:
                raise input_pipeline.ConfigError(
                    f"config.data.source_sizes must be 3 positive counts, got {data.source_sizes}"
                )
            _fraction_sizes(1, data.target_fractions)  # raises DigitsDataError if invalid
        elif data.val_examples < 1:
            raise input_pipeline.ConfigError(
                f"config.data.val_examples must be >= 1, got {data.val_examples}"
            )
        for name in ("num_epochs", "batch_size"):
            if config.source[name] < 1:
                raise input_pipeline.ConfigError(
                    f"config.source.{name} must be >= 1, got {config.source[name]}"
                )
        if config.source_checkpoint:
            _source_run_dir(config.source_checkpoint)
        elif jax.process_count() > 1:
            raise input_pipeline.ConfigError(
                "a multi-host run needs config.source_checkpoint: train the source map first "
                "(on one host), then pass its workdir"
            )

    def load_data(self, config: ml_collections.ConfigDict) -> train_adda.DomainData:
        source, target = load_pair(config.data)
        return train_adda.DomainData(source=_as_arrays(source), target=_as_arrays(target))

    def source_variables(
        self,
        config: ml_collections.ConfigDict,
        workdir: pathlib.Path,
        data: train_adda.DomainData,
    ) -> dict:
        model = models.create(config.model)
        template = jax.eval_shape(
            functools.partial(_init_params, model=model), jax.random.PRNGKey(0)
        )
        if config.source_checkpoint:
            run_dir = _source_run_dir(config.source_checkpoint)
        else:
            run_dir = pathlib.Path(workdir) / "source"
            if not (run_dir / SOURCE_RUN_FILE).is_file():
                _train_source_run(config, model, data, run_dir)
        params = ocp.StandardCheckpointer().restore(
            (run_dir / "params").resolve(),
            template,
        )
        return {"params": params, "batch_stats": {}}

    def evaluate(self, outputs: np.ndarray, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"accuracy": accuracy_of_logits(outputs, arrays["label"])}


def _source_run_dir(path: str | pathlib.Path) -> pathlib.Path:
    """The folder of a source run: `path` itself or its 'source' subfolder (a digits workdir)."""
    root = pathlib.Path(path).expanduser()
    for folder in (root, root / "source"):
        if (folder / SOURCE_RUN_FILE).is_file() and (folder / "params").is_dir():
            return folder
    raise input_pipeline.ConfigError(
        f"no digits source run in {path} (config.source_checkpoint): expected a digits ADDA "
        f"workdir or its source folder, with {SOURCE_RUN_FILE} and params/"
    )


def _train_source_run(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    data: train_adda.DomainData,
    run_dir: pathlib.Path,
) -> None:
    """Trains the source classifier of config.source into run_dir (params/, source.json)."""
    logging.info("training the source classifier into %s", run_dir)
    source = {split: _as_labelled(arrays) for split, arrays in data.source.items()}
    params, history = train_source_classifier(
        source,
        seed=config.seed,
        num_epochs=config.source.num_epochs,
        batch_size=config.source.batch_size,
        weight_decay=config.source.weight_decay,
        optimizer=create_classifier_optimizer(
            config.source.learning_rate, config.source.b1, config.source.b2
        ),
        model=model,
        progress=config.progress_bar,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((run_dir / "params").resolve(), params, force=True)
    checkpointer.wait_until_finished()
    record = {
        "history": history,
        "source_val_accuracy": accuracy(params, model, source["val"]),
        "target_val_accuracy": accuracy(
            params, model, _as_labelled(data.target["val"])
        ),  # before DA, for the log only
    }
    (run_dir / SOURCE_RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")


# Thesis Table 10-3 (SVHN -> MNIST accuracy), SPEC §7.
THESIS_TABLE_10_3 = {
    "source": 0.9095,
    "before_da": 0.6424,
    "adda": {"highest_peak": 0.8218, "confusion": 0.7994, "latest": 0.8128, "best_loss": 0.7994},
    "reset": {"highest_peak": 0.8169, "confusion": 0.7944, "latest": 0.8114, "best_loss": 0.7944},
}
TABLE_CRITERIA = ("highest_peak", "confusion", "latest", "best_loss")


def _mean_sd(values: Sequence[float]) -> str:
    """'0.812 ± 0.010 (n=5)' (sample sd), '0.812 (n=1)', or '–' for no values."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f} (n=1)"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} (n={len(values)})"


def table_10_3(workdirs: Sequence[str | pathlib.Path], include_thesis: bool = True) -> str:
    """The §10-3 table as markdown from digits ADDA workdirs (their results.json).

    Rows ADDA and RESET (from each run's scheme); columns source accuracy, before DA, then
    highest peak (oracle) / confusion / latest / best loss stop, each the test accuracy as
    mean ± sample sd over the runs (n = runs; a criterion a run did not reach is left out of its
    cell). Source and before-DA accuracy are averaged per seed first, since both schemes of one
    seed share them. With include_thesis, the thesis' numbers follow as a last pair of rows.

    Raises:
      FileNotFoundError: a workdir without results.json.
    """
    per_seed: dict[str, dict[int, list[float]]] = {"source": {}, "before_da": {}}
    cells: dict[str, dict[str, list[float]]] = {
        scheme: {name: [] for name in TABLE_CRITERIA} for scheme in train_adda.SCHEMES
    }
    for workdir in workdirs:
        results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
        criteria = results["criteria"]
        per_seed["source"].setdefault(results["seed"], []).append(
            results["source_test"]["accuracy"]
        )
        if "initial" in criteria:
            per_seed["before_da"].setdefault(results["seed"], []).append(
                criteria["initial"]["test"]["accuracy"]
            )
        for name in TABLE_CRITERIA:
            if name in criteria:
                cells[results["scheme"]][name].append(criteria[name]["test"]["accuracy"])
    shared = {
        column: _mean_sd([float(np.mean(values)) for values in by_seed.values()])
        for column, by_seed in per_seed.items()
    }
    lines = [
        "| source accuracy | before DA | scheme | highest peak (oracle) | confusion stop "
        "| latest stop | best loss stop |",
        "|---|---|---|---|---|---|---|",
    ]
    for scheme in train_adda.SCHEMES:
        row = [shared["source"], shared["before_da"], scheme.upper()]
        row += [_mean_sd(cells[scheme][name]) for name in TABLE_CRITERIA]
        lines.append("| " + " | ".join(row) + " |")
    if include_thesis:
        for scheme in train_adda.SCHEMES:
            row = [f"{THESIS_TABLE_10_3[key]:.4f}" for key in ("source", "before_da")]
            row.append(f"{scheme.upper()} (thesis, SVHN→MNIST)")
            row += [f"{THESIS_TABLE_10_3[scheme][name]:.4f}" for name in TABLE_CRITERIA]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
