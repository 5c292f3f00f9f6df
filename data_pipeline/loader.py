"""Numpy batches for training and evaluation from preprocessed slices, in memory or from TFDS.

A *source* is either the dict that `load_arrays` returns (arrays with a leading example axis) or
any random-access data source with `len()` and `source[i] -> {'image': ..., 'mask': ...}`, e.g.
`tfds.data_source(...)[split]` or `builder.as_data_source()[split]` of the `soft_tissue_sarcoma`
builder. Batches are `{'image': float32 (batch, h, w, 1), 'mask': uint8 (batch, h, w, 1)}`.

Order comes from grain: the example indices are shuffled with grain's index shuffle, reseeded every
epoch (seed + epoch), so the stream depends only on the seed and the number of examples.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np
import tqdm

from data_pipeline import context
from data_pipeline import preprocess as preprocess_lib

BATCH_KEYS = ("image", "mask")


class _Record(Protocol):
    """What `load_arrays` needs of a slice record (data_pipeline.index.SliceRecord)."""

    patient_key: str

    def load(self) -> tuple[np.ndarray, np.ndarray]: ...


def load_arrays(
    records: Sequence[_Record],
    image_size: int = preprocess_lib.DEFAULT_IMAGE_SIZE,
    progress: bool = False,
    context_slices: int = 0,
    series: Mapping[str, Sequence[_Record]] | None = None,
) -> dict[str, np.ndarray]:
    """Loads and preprocesses slices into memory, in the order of `records`.

    Args:
        records: slice records (`Index.query(...)`), each with `.load() -> (image, mask)` at the
            original resolution in physical units and a `.patient_key`.
        image_size: output height and width in pixels.
        progress: show a tqdm progress bar.
        context_slices: k > 0 stacks the k neighbouring slices on each side as channels (2.5D,
            data_pipeline/context.py: 2k + 1 channels in slice order, the slice in the middle,
            edge slices repeated at a series' ends), each preprocessed as a slice of its own; the
            mask is the centre slice's.
        series: with context_slices > 0, every slice of the records' series in slice order
            (`context.series_slices`).

    Returns:
        {'image': float32 (n, image_size, image_size, 2 context_slices + 1) in [0, 1],
          'mask': uint8 (n, image_size, image_size, 1) in {0, 1},
          'patient_key': str (n,)}; n may be 0.
    """
    if context_slices and series is None:
        raise ValueError("context_slices > 0 needs the records' series (context.series_slices)")
    channels = 2 * context_slices + 1
    images = np.zeros((len(records), image_size, image_size, channels), np.float32)
    masks = np.zeros((len(records), image_size, image_size, 1), np.uint8)
    # Neighbouring examples share most of their slices: each is read and preprocessed once.
    preprocessed: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for i, record in enumerate(tqdm.tqdm(records, desc="slices", disable=not progress)):
        if not context_slices:
            images[i], masks[i] = preprocess_lib.preprocess(*record.load(), image_size=image_size)
            continue
        for channel, neighbour in enumerate(context.neighbours(record, series, context_slices)):
            key = (neighbour.series_key, int(neighbour.slice_index))
            if key not in preprocessed:
                preprocessed[key] = preprocess_lib.preprocess(
                    *neighbour.load(), image_size=image_size
                )
            images[i, ..., channel] = preprocessed[key][0][..., 0]
        masks[i] = preprocessed[(record.series_key, int(record.slice_index))][1]
    patient_keys = np.asarray([record.patient_key for record in records], dtype=np.str_)
    return {"image": images, "mask": masks, "patient_key": patient_keys}


def num_examples(source: Any) -> int:
    """Number of examples in a source (an array dict or a random-access data source)."""
    if isinstance(source, Mapping):
        lengths = {key: len(source[key]) for key in BATCH_KEYS if key in source}
        if set(lengths) != set(BATCH_KEYS) or len(set(lengths.values())) != 1:
            raise ValueError(
                f"an array source needs 'image' and 'mask' of one length, got lengths {lengths}"
            )
        return lengths["image"]
    return len(source)


def _gather(source: Any, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at `indices` stacked into a batch dict with the `BATCH_KEYS`."""
    if isinstance(source, Mapping):
        return {key: np.asarray(source[key][indices]) for key in BATCH_KEYS}
    examples = [source[int(i)] for i in indices]
    return {key: np.stack([np.asarray(example[key]) for example in examples]) for key in BATCH_KEYS}


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
    # grain's defaults (16 threads, 500 elements ahead) are sized for big hosts; batches of slices
    # are cheap to gather, so a few threads and a short buffer keep memory bounded.
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)


def train_batches(
    source: Any,
    batch_size: int,
    seed: int,
    *,
    num_threads: int = 1,
    prefetch: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """An endless stream of shuffled training batches, identical for the same seed and source.

    The examples form one stream, epoch after epoch, each epoch a fresh permutation of all examples
    (seeded by seed + epoch); every batch is full (batch_size examples). Since the stream never ends
    there is no remainder to drop; a batch can straddle two epochs, so over any epoch's worth of the
    stream every example is seen exactly once. One epoch is `num_examples(source) / batch_size`
    batches.

    Args:
        source: an array dict from `load_arrays` or a random-access data source (see module doc).
        batch_size: examples per batch.
        seed: shuffle seed, 0 <= seed < 2**32.
        num_threads: grain threads that gather batches ahead of time (0: gather on demand).
        prefetch: batches kept ready ahead of the consumer.

    Returns:
        A grain iterator of `{'image': (batch, h, w, 1) float32, 'mask': (batch, h, w, 1) uint8}`;
        `get_state()` / `set_state()` resume it exactly.

    Raises:
        ValueError: the source is empty or batch_size < 1.
    """
    size = num_examples(source)
    if size == 0:
        raise ValueError("no training examples: the query matched no slices")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = (
        grain.MapDataset.range(size)
        .shuffle(seed=seed)
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .map(lambda indices: _gather(source, indices))
    )
    return iter(dataset.to_iter_dataset(_read_options(num_threads, prefetch)))


def eval_batches(
    source: Any,
    batch_size: int,
    *,
    num_threads: int = 1,
    prefetch: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the source in its stored order; the last batch holds the remainder.

    Every example appears exactly once, so metrics over the pass are over the whole split. The last
    batch is smaller when batch_size does not divide the number of examples (callers that need a
    fixed shape, e.g. for jit, pad it themselves); an empty source gives no batches.

    Args:
        source: an array dict from `load_arrays` or a random-access data source (see module doc).
        batch_size: examples per batch (the last may have fewer).
        num_threads: grain threads that gather batches ahead of time (0: gather on demand).
        prefetch: batches kept ready ahead of the consumer.

    Returns:
        An iterator of `{'image': (b, h, w, 1) float32, 'mask': (b, h, w, 1) uint8}` with
        b <= batch_size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = num_examples(source)
    if size == 0:
        return iter(())
    dataset = (
        grain.MapDataset.range(size)
        .batch(batch_size, drop_remainder=False)
        .map(lambda indices: _gather(source, indices))
    )
    return iter(dataset.to_iter_dataset(_read_options(num_threads, prefetch)))
