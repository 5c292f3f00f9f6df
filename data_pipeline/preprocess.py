"""Slice preprocessing (thesis §13.2): nearest-neighbour resize, then min-max to [0, 1]."""

import numpy as np

DEFAULT_IMAGE_SIZE = 128


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index for each output index of a nearest-neighbour resize along one axis.

    Pixel-centre convention ("half-pixel", as in skimage.transform.resize(order=0) and
    jax.image.resize(method='nearest')): pixel k covers [k, k + 1) in continuous coordinates, the
    centre of output pixel i lies at (i + 0.5) * size_in / size_out in input coordinates, and the
    output takes the input pixel that contains that point: floor((2 i + 1) size_in / (2 size_out)).
    E.g. 512 -> 128 takes input pixels 2, 6, 10, ...; 4 -> 8 takes 0, 0, 1, 1, 2, 2, 3, 3.

    We compute this with integers rather than calling a resize routine so that centres which fall
    exactly on a pixel boundary (every one of them for 512 -> 128) resolve identically everywhere,
    and so that image and mask are guaranteed the same map. Tests check it equals both libraries.

    Args:
        size_in: input length (pixels), >= 1.
        size_out: output length (pixels), >= 1.

    Returns:
        int64 (size_out,) indices into the input axis.
    """
    if size_in < 1 or size_out < 1:
        raise ValueError(f"sizes must be >= 1, got size_in={size_in}, size_out={size_out}")
    return (2 * np.arange(size_out, dtype=np.int64) + 1) * size_in // (2 * size_out)


def resize_nearest(array: np.ndarray, image_size: int) -> np.ndarray:
    """Resizes a 2-D array (rows, cols) to (image_size, image_size) by nearest neighbour.

    Aspect ratio is not kept (as in the thesis); values are copied, never interpolated, so the dtype
    and the set of values are preserved.
    """
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D slice (rows, cols), got shape {array.shape}")
    rows = nearest_indices(array.shape[0], image_size)
    cols = nearest_indices(array.shape[1], image_size)
    return array[rows[:, None], cols[None, :]]


def min_max(image: np.ndarray) -> np.ndarray:
    """Scales an image linearly to [0, 1]: (x - min) / (max - min); a constant image gives zeros.

    Computed in float64 and returned as float32. Non-finite pixels are an error (they would turn the
    whole image into NaN).
    """
    image_f64 = np.asarray(image, dtype=np.float64)
    if not np.all(np.isfinite(image_f64)):
        raise ValueError("image contains NaN or infinite values")
    low, high = image_f64.min(), image_f64.max()
    if high == low:
        return np.zeros(image_f64.shape, np.float32)
    return ((image_f64 - low) / (high - low)).astype(np.float32)


def preprocess(
    image: np.ndarray, mask: np.ndarray, image_size: int = DEFAULT_IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Preprocesses one slice the same way for every modality (CT, PT and MR alike).

    Args:
        image: (rows, cols) slice in physical units (HU, SUV, MR signal).
        mask: (rows, cols) tumour mask, any dtype; nonzero = tumour.
        image_size: output height and width in pixels.

    Returns:
        (image float32 (image_size, image_size, 1) in [0, 1],
         mask uint8 (image_size, image_size, 1) in {0, 1}); the mask goes through the image's map.
    """
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.shape != mask.shape:
        raise ValueError(f"image shape {image.shape} and mask shape {mask.shape} differ")
    image_resized = min_max(resize_nearest(image, image_size))
    mask_resized = (resize_nearest(mask, image_size) != 0).astype(np.uint8)
    return image_resized[..., None], mask_resized[..., None]
