"""The sarcoma task: segmentation maps adapted from one modality to another (the thesis' ADDA)."""

import hashlib
import json
import pathlib
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
import scipy.special
from absl import logging

from data_pipeline import datasets
from sarcoma_jax import checkpoints, folds, input_pipeline, metrics
from sarcoma_jax.adda import task as task_lib
from sarcoma_jax.input_pipeline import ConfigError
from sarcoma_jax.segment import train as segment_train


def _canonical_domain(config_field: str, value: str) -> str:
    try:
        return datasets.canonical_domain(value)
    except datasets.DatasetError as error:
        raise ConfigError(f"config.data.{config_field}: {error}") from None


# What a source map's input and shape depend on: a reused segmentation run must agree with the
# ADDA config on each, or the game would play a map trained on other inputs (a U-Net is fully
# convolutional, so a different image size would even run, silently).
_SOURCE_RUN_FIELDS = (
    ("data", "image_size"),
    ("data", "context_slices"),
    ("model", "depth"),
    ("model", "base_filters"),
    ("model", "downsampling"),
    ("model", "upsampling"),
)
# Where the source run used the same data, what decides its patients' splits: it must match, or
# the source map would have trained on this run's target test patients.
_SPLIT_FIELDS = (
    ("data", "seed"),
    ("data", "split_scheme"),
    ("data", "num_folds"),
    ("data", "fold"),
)
# Values of fields that runs written before the field existed did not record.
_FIELD_DEFAULTS = {("data", "context_slices"): 0, ("data", "num_folds"): 0, ("data", "fold"): None}


def _segmentation_run_config(state_dir: pathlib.Path) -> dict | None:
    """The config.json of the run a checkpoint belongs to, if it can be found."""
    for folder in state_dir.parents:
        config_path = folder / "config.json"
        if config_path.is_file():
            return json.loads(config_path.read_text())
    return None


def _same_path(first: str | None, second: str | None) -> bool:
    """Whether two config paths name one folder (relative ones read from the current folder, as
    the README's commands run from the repository root)."""
    if not first or not second:
        return first == second
    return pathlib.Path(first).resolve() == pathlib.Path(second).resolve()


def _check_source_run(config: ml_collections.ConfigDict, source: str) -> None:
    """ConfigError where config.source_checkpoint's run disagrees with this config: modality,
    input and U-Net shape; and, on the same data, the patient splits (seed, scheme, fold)."""
    if folds.FOLD_FIELD in config.source_checkpoint:
        raise ConfigError(
            f"config.source_checkpoint {config.source_checkpoint}: '{folds.FOLD_FIELD}' is "
            "filled in only "
            "when every fold runs (config.data.num_folds without config.data.fold); name the "
            "fold's run itself"
        )
    state_dir = checkpoints.resolve_state_dir(config.source_checkpoint)
    run = _segmentation_run_config(state_dir)
    if run is None:
        return
    run_data = run.get("data", {})
    run_modality = run_data.get("modality")
    run_modality = None if run_modality is None else datasets.canonical_domain(run_modality)
    if run_modality is not None and run_modality != source:
        raise ConfigError(
            f"config.source_checkpoint {config.source_checkpoint} is a {run_modality} "
            f"segmentation run, but the source modality is {source}"
        )
    same_data = run_data.get("source") == config.data.get("source") and _same_path(
        run_data.get("path"), config.data.get("path")
    )
    for section, field in _SOURCE_RUN_FIELDS + (_SPLIT_FIELDS if same_data else ()):
        key = (section, field)
        if field not in run.get(section, {}) and key not in _FIELD_DEFAULTS:
            continue
        theirs = run.get(section, {}).get(field, _FIELD_DEFAULTS.get(key))
        ours = config[section].get(field, _FIELD_DEFAULTS.get(key))
        if theirs != ours:
            why = (
                " (other patient splits: the source map may have trained on this run's test "
                "patients)"
                if key in _SPLIT_FIELDS
                else ""
            )
            raise ConfigError(
                f"config.source_checkpoint {config.source_checkpoint} was trained with "
                f"{section}.{field}={theirs!r}, this run has {ours!r}{why}: pass "
                f"--config.{section}.{field}={theirs!r} (or the same config variant, e.g. "
                "':strong') or train a source map that matches"
            )


def _disjoint_patient_groups(
    source_patients: set[str], target_patients: set[str], seed: int
) -> tuple[set[str], set[str]]:
    """Splits training patients so that no patient gives images to both domains.

    Patients with images of both domains are ranked by sha256(seed:key) (as data_pipeline's
    splits are) and dealt alternately to the source and the target; the others stay where they
    are.
    """
    shared = sorted(
        source_patients & target_patients,
        key=lambda key: hashlib.sha256(f"{seed}:{key}".encode()).hexdigest(),
    )
    to_source = set(shared[0::2])
    to_target = set(shared[1::2])
    return (source_patients - to_target), (target_patients - to_source)


class SegmentationTask:
    """Tumour segmentation, one modality to another (the thesis' experiments).

    Config: `config.data.source_modality` / `target_modality` and the data fields of
    configs/segment_base.py; `config.model` a U-Net; `config.source` the segmentation config that
    trains the source map into workdir/source (segment/train.py), unless `config.source_checkpoint`
    names a segmentation run to reuse. `config.data.disjoint_domains`: source and target training
    images from disjoint patients.
    """

    primary_metric = "f1"
    # Label-free criteria (adda/probe.py): a unit is a pixel, features are the U-Net's last hidden
    # layer, flipping an image left-right flips its segmentation.
    feature_module = "dec0_conv1"
    flip_invariant = True

    def validate_config(self, config: ml_collections.ConfigDict) -> None:
        source = _canonical_domain("source_modality", config.data.source_modality)
        target = _canonical_domain("target_modality", config.data.target_modality)
        if source == target:
            raise ConfigError(
                f"config.data.source_modality and target_modality are both {source}; "
                "adaptation needs two different domains"
            )
        if config.model.name != "unet":
            raise ConfigError(f"config.model.name {config.model.name!r}: segmentation needs 'unet'")
        if config.model.get("eval_batch_stats"):
            raise ConfigError(
                "config.model.eval_batch_stats: the ADDA game applies the maps with their running "
                "averages; train the source with eval_batch_stats=False"
            )
        input_pipeline.validate_data_config(
            {**config.data.to_dict(), "modality": source}, size_divisor=2**config.model.depth
        )
        if config.source_checkpoint:
            _check_source_run(config, source)
        else:
            if jax.process_count() > 1:
                raise ConfigError(
                    "a multi-host run needs config.source_checkpoint: train the source segmenter "
                    "first (on one host), then pass its workdir"
                )
            segment_train.validate_config(config.source)

    def load_data(self, config: ml_collections.ConfigDict) -> task_lib.DomainData:
        data_config = config.data
        index = input_pipeline.open_index(data_config, progress=config.progress_bar)
        # With folds both domains take the fold's patients (the same patients, co-registered).
        fold_splits = input_pipeline.patient_splits(index, data_config)
        records = {
            domain: input_pipeline.query_splits(
                index,
                data_config[f"{domain}_modality"],
                tumour_only=data_config.tumour_only,
                fold_splits=fold_splits,
            )
            for domain in ("source", "target")
        }
        if data_config.disjoint_domains:
            source_patients, target_patients = _disjoint_patient_groups(
                {record.patient_key for record in records["source"]["train"]},
                {record.patient_key for record in records["target"]["train"]},
                data_config.seed,
            )
            for domain, keep in (("source", source_patients), ("target", target_patients)):
                records[domain]["train"] = [
                    record for record in records[domain]["train"] if record.patient_key in keep
                ]
                if not records[domain]["train"]:
                    raise ConfigError(
                        f"config.data.disjoint_domains leaves no {domain} training slices; "
                        "use more patients"
                    )
        arrays = {
            domain: input_pipeline.load_splits(
                domain_records,
                data_config.image_size,
                context_slices=data_config.get("context_slices", 0),
                index=index,
            )
            for domain, domain_records in records.items()
        }
        return task_lib.DomainData(source=arrays["source"], target=arrays["target"])

    def source_variables(
        self, config: ml_collections.ConfigDict, workdir: pathlib.Path, data: task_lib.DomainData
    ) -> dict:
        del data  # The segmentation run loads its own.
        if config.source_checkpoint:
            state_dir = checkpoints.resolve_state_dir(config.source_checkpoint)
        else:
            source_workdir = workdir / "source"
            if not (source_workdir / "results.json").is_file():
                logging.info("training the source map into %s", source_workdir)
                segment_train.train_and_evaluate(config.source, source_workdir)
            state_dir = checkpoints.resolve_state_dir(source_workdir)
        return checkpoints.restore_variables(state_dir)

    def prepare_seeds(
        self,
        config: ml_collections.ConfigDict,
        workdir: pathlib.Path,
        seed_configs: list[ml_collections.ConfigDict],
    ) -> list[ml_collections.ConfigDict]:
        """A `num_seeds` run's source maps: one num_seeds segmentation run of all the seeds into
        workdir/source (segment/train.py, `num_seeds`), which each seed's config then names as its
        source_checkpoint (unless config.source_checkpoint already gives one to all)."""
        if config.source_checkpoint:
            return seed_configs
        source_workdir = workdir / "source"
        if not (source_workdir / "results.json").is_file():
            source_config = config.source.copy_and_resolve_references()
            source_config.seed = seed_configs[0].seed
            source_config.num_seeds = len(seed_configs)
            logging.info("training %d source maps into %s", len(seed_configs), source_workdir)
            segment_train.train_and_evaluate(source_config, source_workdir)
        for seed_config in seed_configs:
            seed_config.source_checkpoint = str(source_workdir / f"seed_{seed_config.seed}")
        return seed_configs

    def evaluate(self, outputs: np.ndarray, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        # Logits: a pixel is tumour where its logit >= 0 (p >= 0.5); AUC ranks the logits.
        return metrics.segmentation_metrics(outputs, arrays["mask"], threshold=0.0)

    def per_image(self, outputs: np.ndarray, arrays: Mapping[str, np.ndarray]) -> dict[str, list]:
        """Per test image F1 (Dice) and patient key, for the §15-3 box plots
        (report.plot_da_boxplots) and the per-patient scores of cross-validation (folds.py)."""
        # Thresholded as in `evaluate`, so that their mean is its f1.
        dice = metrics.dice_per_image(outputs >= 0.0, arrays["mask"] > 0)
        return {"patient_key": np.asarray(arrays["patient_key"]).tolist(), "f1": dice.tolist()}

    def unit_probabilities(self, outputs: np.ndarray) -> np.ndarray:
        """(pixels, 2) float64: each pixel's P(background), P(tumour) from its logit."""
        tumour = scipy.special.expit(np.asarray(outputs, np.float64).reshape(-1))
        return np.stack([1.0 - tumour, tumour], axis=1)

    def agreement(self, outputs: np.ndarray, other_outputs: np.ndarray) -> float:
        """Mean per-image Dice between the two predictions at p >= 0.5 (empty and empty: 1)."""
        return float(np.mean(metrics.dice_per_image(outputs >= 0.0, other_outputs >= 0.0)))

    def per_image_loss(self, outputs: np.ndarray, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """(n,) float64 pixel BCE summed per image, the training loss (segment/steps.py)."""
        logits = np.asarray(outputs, np.float64).reshape(len(outputs), -1)
        masks = np.asarray(arrays["mask"], np.float64).reshape(len(outputs), -1)
        # log(1 + exp(-|x|)) + max(x, 0) - x * y: the stable form of sigmoid cross-entropy.
        losses = np.logaddexp(0.0, -np.abs(logits)) + np.maximum(logits, 0.0) - logits * masks
        return losses.sum(axis=1)
