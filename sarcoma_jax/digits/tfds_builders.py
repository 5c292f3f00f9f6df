"""SVHN -> MNIST through tfds, without TensorFlow (§10.1.1)."""

import gzip
import io
import socket
import urllib.parse

import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tensorflow_datasets.datasets.svhn_cropped import svhn_cropped_dataset_builder
from tensorflow_datasets.image_classification import mnist

from sarcoma_jax.digits.data import (
    DigitsDataError,
    Domain,
    LabelledImages,
    split_by_sizes,
    to_model_images,
)

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
        domain = split_by_sizes(
            train.images, train.labels, sizes, np.random.default_rng(domain_seed)
        )
        domain["test"] = load_tfds_split(name, "test", data_dir, max_examples)
        domains.append(domain)
    return domains[0], domains[1]
