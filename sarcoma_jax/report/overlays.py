"""Before/after overlays (thesis Figures 15-4..6): a run's target maps restored from their
checkpoints, applied to its target test slices."""

import functools
import json
import math
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import scipy.special
from matplotlib.figure import Figure  # not pyplot: no global figure state, no display backend.

from data_pipeline import context
from sarcoma_jax import checkpoints, figures, input_pipeline, metrics, models, runtime
from sarcoma_jax.adda import criteria as criteria_lib
from sarcoma_jax.adda import task as task_lib
from sarcoma_jax.report.runs import Run


def select_overlay_slices(
    f1_after: np.ndarray, count: int, band: tuple[float, float] = (60.0, 80.0)
) -> np.ndarray:
    """Slices as the thesis picks them for Figures 15-4..6: F1 between the 60th and 80th
    percentile (after DA), `count` of them spread evenly in F1 order; when the band holds fewer,
    the slices nearest to the band's middle percentile.

    Returns:
      Indices into f1_after, ordered by increasing F1.
    """
    f1_after = np.asarray(f1_after, np.float64)
    count = min(count, f1_after.size)
    low, high = np.percentile(f1_after, band)
    in_band = np.flatnonzero((f1_after >= low) & (f1_after <= high))
    if in_band.size >= count:
        by_f1 = in_band[np.argsort(f1_after[in_band], kind="stable")]
        return by_f1[np.linspace(0, by_f1.size - 1, count).round().astype(int)]
    middle = np.percentile(f1_after, sum(band) / 2)
    nearest = np.argsort(np.abs(f1_after - middle), kind="stable")[:count]
    return nearest[np.argsort(f1_after[nearest], kind="stable")]


def plot_before_after(
    images: np.ndarray,
    masks: np.ndarray,
    probs_before: np.ndarray,
    probs_after: np.ndarray,
    path: pathlib.Path,
    title: str = "",
) -> pathlib.Path:
    """Thesis Figures 15-4..6: per slice the input, the prediction before DA and after DA (truth
    orange, prediction red, per-image F1 above), and the probabilities after DA.

    Args:
      images, masks, probs_before, probs_after: (n, h, w, 1).
      path: the PNG to write.
      title: a line above the figure.
    """
    f1_before = metrics.dice_per_image(probs_before >= 0.5, masks > 0)
    f1_after = metrics.dice_per_image(probs_after >= 0.5, masks > 0)
    num_slices = images.shape[0]
    figure = Figure(figsize=(10, 2.6 * num_slices + 0.4))
    axes = figure.subplots(num_slices, 4, squeeze=False)
    for row in range(num_slices):
        image = images[row, ..., 0]
        for column, probs, f1 in ((1, probs_before, f1_before), (2, probs_after, f1_after)):
            axes[row, column].imshow(image, cmap="gray", vmin=0, vmax=1)
            figures.draw_contour(axes[row, column], masks[row, ..., 0] > 0, figures.TRUTH_COLOUR)
            figures.draw_contour(
                axes[row, column], probs[row, ..., 0] >= 0.5, figures.PREDICTION_COLOUR
            )
            axes[row, column].set_title(f"F1={f1[row]:.3f}", fontsize=8)
        if row == 0:
            axes[0, 1].set_title(f"before DA\nF1={f1_before[0]:.3f}", fontsize=8)
            axes[0, 2].set_title(f"after DA\nF1={f1_after[0]:.3f}", fontsize=8)
            axes[0, 0].set_title("input", fontsize=8)
            axes[0, 3].set_title("probabilities (after DA)", fontsize=8)
        axes[row, 0].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[row, 3].imshow(probs_after[row, ..., 0], cmap="gray", vmin=0, vmax=1)
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(title + "\ntruth orange, prediction red", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def _criterion_logits(run: Run, criterion: str, images: np.ndarray) -> np.ndarray:
    """Logits (n, h, w, 1) of the target map a criterion kept (from its checkpoint)."""
    state_dir = checkpoints.resolve_state_dir(
        run.workdir / "checkpoints" / criterion, what=f"{run.workdir}'s {criterion} pick"
    )
    variables = checkpoints.restore_variables(state_dir)
    model = models.create(run.config["model"])
    apply = jax.jit(functools.partial(model.apply, train=False))
    batch_size = int(run.config.get("eval_batch_size", 10))
    return runtime.predict(apply, variables, images, batch_size)


def render_overlays(
    run: Run, path: pathlib.Path, num_slices: int, data_cache: dict[str, Any]
) -> str | None:
    """Restores the target maps of an ADDA run before DA and at the recommended criterion's pick
    (the confusion stop, as the thesis), predicts the target test slices and plots `num_slices`
    of them (select_overlay_slices).

    Args:
      run: an ADDA run.
      path: the PNG to write.
      num_slices: slices to show.
      data_cache: loaded DomainData by data config, shared between runs of the same data.

    Returns:
      None, or a one-line note saying why nothing (or something doubtful) was rendered.
    """
    before, after = criteria_lib.BEFORE_DA, criteria_lib.RECOMMENDED
    for criterion in (before, after):
        if not (run.workdir / "checkpoints" / criterion).is_dir():
            return f"no overlay for {run.workdir}: no checkpoints/{criterion}"
    config = ml_collections.ConfigDict(run.config)
    data_key = json.dumps(run.config["data"], sort_keys=True)
    try:
        if data_key not in data_cache:
            data_cache[data_key] = task_lib.get_task(config.task).load_data(config)
        target_test = data_cache[data_key].target["test"]
        logits = {c: _criterion_logits(run, c, target_test["image"]) for c in (before, after)}
    except (*input_pipeline.USER_ERRORS, OSError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"no overlay for {run.workdir}: {message}"
    criteria = run.results["criteria"]
    f1_after = metrics.dice_per_image(logits[after] >= 0.0, target_test["mask"] > 0)
    shown = select_overlay_slices(f1_after, num_slices)
    label = criteria[after].get("label") or criteria_lib.label(after)
    plot_before_after(
        context.centre_channel(target_test["image"][shown]),  # the slice itself under 2.5D
        target_test["mask"][shown],
        scipy.special.expit(logits[before][shown].astype(np.float64)),
        scipy.special.expit(logits[after][shown].astype(np.float64)),
        path,
        title=f"{run.description}: {label} at step {criteria[after]['step']}",
    )
    recorded = criteria[after]["test"]["f1"]
    if not math.isclose(float(f1_after.mean()), recorded, abs_tol=1e-4):
        return (
            f"overlay of {run.workdir}: recomputed test F1 {f1_after.mean():.4f} differs from "
            f"results.json's {recorded:.4f}; the data may have changed since the run"
        )
    return None
