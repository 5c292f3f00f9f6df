"""Patient-level k-fold cross-validation: every fold of a config run into W/fold_<i>/, the folds'
per-patient test scores pooled into W/results.json, each patient tested exactly once.

`python main.py --config=... --workdir=W --config.data.num_folds=K` (no `config.data.fold`) runs
folds 0, 1, ..., K-1, each a complete ordinary run of that fold (segmentation or ADDA, with or
without `num_seeds`; the loops see the fold only as `config.data.fold`, which input_pipeline turns
into the fold's patients), then writes:

  W/config.json, provenance.json  the folds run (`data.fold` unset)
  W/fold_<i>/                     fold i's run, laid out as any run (seed_<s>/ with num_seeds)
  W/results.json                  {"num_folds", "seeds",
                                   "patients": {key: {"fold", "test_images"}},
                                   "folds": {i: {"test_patients", "seeds": {s: {set: metrics}}}},
                                   "pooled": {set: {"seeds": {s: pooled},
                                                    "over_seeds": {figure: {"mean", "sd", "n"}},
                                                    "per_patient": {key: {"mean", "sd", "n"}}}}}

A score set is what a run scores per test image: a segmentation run's `model` and its
`baseline_threshold`, an ADDA run's stopping criteria. Pooled per seed over the folds:
  f1                       mean over every test image of every fold (SPEC §4's F1 on all patients)
  patient_f1               per patient, the mean F1 of its test images
  patient_f1_mean, _sd     mean and sample sd over patients of patient_f1
  accuracy, zero_ratio     the folds' values weighted by their test images (every image has the
                           same pixels, so this is the figure over all pixels)
  auc_fold_mean            mean over folds of the pixel ROC AUC (the folds' models rank pixels on
                           different scales, so their pixels are not ranked together)
`over_seeds` gives the mean and sample sd over seeds of each figure; `per_patient` the mean and sd
over seeds of each patient's F1.

Started again in W, a fold whose results.json was written with the same config is skipped; an
interrupted fold resumes as any run does.

An ADDA folds run trains each fold's source map unless `config.source_checkpoint` names one per
fold with `{fold}` (e.g. `runs/seg_CT/fold_{fold}`: a segmentation folds run of the same data,
seed and K); a single source checkpoint for every fold is refused (it saw other folds' test
patients).
"""

import copy
import json
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from sarcoma_jax import input_pipeline, runtime
from sarcoma_jax import workdir as workdir_lib
from sarcoma_jax.input_pipeline import ConfigError

FOLD_DIR_PREFIX = "fold_"
FOLD_FIELD = "{fold}"  # in config.source_checkpoint: filled in with each fold's index
MODEL = "model"  # a segmentation run's score set of its trained model
BASELINE = "baseline_threshold"  # ... and of its intensity threshold
WEIGHTED_FIGURES = ("accuracy", "zero_ratio")


def runs_all_folds(config: ml_collections.ConfigDict) -> bool:
    """Whether `config` asks for every fold: `data.num_folds` set and `data.fold` not."""
    data = config.get("data")
    return bool(data is not None and data.get("num_folds") and data.get("fold") is None)


def fold_config(config: ml_collections.ConfigDict, fold: int) -> ml_collections.ConfigDict:
    """The config of one fold: `data.fold` set (in an ADDA config a reference that
    `source.data.fold` shares, so the source map trains on the same fold)."""
    single = copy.deepcopy(config)
    single.data.fold = fold
    checkpoint = single.get("source_checkpoint")
    if checkpoint and FOLD_FIELD in checkpoint:
        single.source_checkpoint = checkpoint.replace(FOLD_FIELD, str(fold))
    return single


def fold_dir(workdir: pathlib.Path, fold: int) -> pathlib.Path:
    return pathlib.Path(workdir) / f"{FOLD_DIR_PREFIX}{fold}"


def _read_json(path: pathlib.Path) -> Any:
    return json.loads(pathlib.Path(path).read_text())


def seed_results(run_dir: pathlib.Path) -> dict[int, dict]:
    """One finished run's results per seed: its results.json, or with `num_seeds` its seeds'."""
    results = _read_json(pathlib.Path(run_dir) / workdir_lib.RESULTS_FILE)
    if "seed_workdirs" not in results:
        return {int(results["seed"]): results}
    return {
        int(seed["seed"]): seed
        for seed in (
            _read_json(pathlib.Path(run_dir) / name / workdir_lib.RESULTS_FILE)
            for name in results["seed_workdirs"]
        )
    }


def score_sets(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """A seed's score sets: name -> {'test': metrics, 'test_per_image': {'patient_key', 'f1'}}."""
    if "criteria" in results:  # an ADDA run: one per stopping criterion that picked a model
        return dict(results["criteria"])
    return {MODEL: results, BASELINE: results["baseline_threshold"]}


def _mean_sd(values: Sequence[float]) -> dict[str, Any]:
    values = [float(value) for value in values if value is not None]
    return {
        "mean": float(np.mean(values)) if values else None,
        "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        "n": len(values),
    }


def _pool_seed(sections: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """One seed's score set pooled over its folds (fold -> {'test', 'test_per_image'})."""
    keys, f1, weights = [], [], {}
    for fold, section in sections.items():
        per_image = section.get("test_per_image", {})
        if "patient_key" not in per_image:
            raise ValueError(
                f"fold {fold}: results without per-image patient keys (test_per_image); rerun it"
            )
        keys += per_image["patient_key"]
        f1 += per_image["f1"]
        weights[fold] = len(per_image["f1"])
    keys, f1 = np.asarray(keys), np.asarray(f1, np.float64)
    patient_f1 = {str(key): float(f1[keys == key].mean()) for key in sorted(set(keys.tolist()))}
    total = sum(weights.values())
    pooled = {
        "f1": float(f1.mean()),
        "images": int(f1.size),
        "patients": len(patient_f1),
        "patient_f1": patient_f1,
        "patient_f1_mean": float(np.mean(list(patient_f1.values()))),
        "patient_f1_sd": _mean_sd(list(patient_f1.values()))["sd"],
        "auc_fold_mean": _mean_sd([s["test"].get("auc") for s in sections.values()])["mean"],
    }
    for name in WEIGHTED_FIGURES:
        values = [(s["test"].get(name), weights[fold]) for fold, s in sections.items()]
        if all(value is not None for value, _ in values):
            pooled[name] = float(sum(value * weight for value, weight in values) / total)
    return pooled


def pool_folds(fold_results: Mapping[int, Mapping[int, Mapping[str, Any]]]) -> dict[str, Any]:
    """Pools the per-image test scores of every fold, per seed and score set.

    Args:
      fold_results: fold -> seed -> that run's results.json (every fold with the same seeds).

    Returns:
      {"seeds", "patients", "folds", "pooled"} as in W/results.json (module docstring); a score
      set missing from some fold (an ADDA criterion that never picked) is pooled as
      {"missing_folds": [...]} for that seed.

    Raises:
      ValueError: folds with different seeds, results without per-image patient keys, or a
        patient tested in two folds.
    """
    folds = sorted(fold_results)
    seeds = sorted(fold_results[folds[0]])
    for fold in folds:
        if sorted(fold_results[fold]) != seeds:
            raise ValueError(f"fold {fold} has seeds {sorted(fold_results[fold])}, not {seeds}")
    patients: dict[str, dict[str, int]] = {}
    folds_section = {}
    for fold in folds:
        sets = score_sets(fold_results[fold][seeds[0]])
        some_set = next(iter(sets.values()))
        tested = some_set.get("test_per_image", {}).get("patient_key", [])
        for key in sorted(set(tested)):
            if key in patients:
                raise ValueError(
                    f"patient {key} is tested in folds {patients[key]['fold']} and {fold}"
                )
            patients[key] = {"fold": fold, "test_images": tested.count(key)}
        folds_section[str(fold)] = {
            "test_patients": sorted(set(tested)),
            "seeds": {
                str(seed): {
                    name: section["test"]
                    for name, section in score_sets(fold_results[fold][seed]).items()
                }
                for seed in seeds
            },
        }
    names = []
    for fold in folds:
        for seed in seeds:
            names += [name for name in score_sets(fold_results[fold][seed]) if name not in names]
    pooled = {}
    for name in names:
        per_seed = {}
        for seed in seeds:
            sections = {fold: score_sets(fold_results[fold][seed]).get(name) for fold in folds}
            missing = [fold for fold, section in sections.items() if section is None]
            per_seed[str(seed)] = {"missing_folds": missing} if missing else _pool_seed(sections)
        complete = [pool for pool in per_seed.values() if "missing_folds" not in pool]
        figures = [
            key
            for key, value in (complete[0] if complete else {}).items()
            if isinstance(value, float)
        ]
        pooled[name] = {
            "seeds": per_seed,
            "over_seeds": {
                figure: _mean_sd([pool[figure] for pool in complete]) for figure in figures
            },
            "per_patient": {
                key: _mean_sd(
                    [pool["patient_f1"][key] for pool in complete if key in pool["patient_f1"]]
                )
                for key in sorted(patients)
            },
        }
    return {"seeds": seeds, "patients": patients, "folds": folds_section, "pooled": pooled}


def _finished(run_dir: pathlib.Path, config: ml_collections.ConfigDict) -> bool:
    """Whether run_dir holds a finished run of exactly this config (nothing left to do)."""
    config_path = run_dir / workdir_lib.CONFIG_FILE
    return (run_dir / workdir_lib.RESULTS_FILE).is_file() and (
        config_path.is_file() and _read_json(config_path) == json.loads(config.to_json())
    )


def _fold_test_patients(config: ml_collections.ConfigDict) -> list[set[str]]:
    """Each fold's test patients as the index stores them (checks the fold count first).

    Raises:
      ConfigError: the index does not store `num_folds` folds (e.g. more folds than patients).
    """
    index = input_pipeline.open_index(config.data, progress=config.get("progress_bar", True))
    return [
        {
            key
            for key, split in input_pipeline.patient_splits(
                index, fold_config(config, i).data
            ).items()
            if split == "test"
        }
        for i in range(config.data.num_folds)
    ]


def run_all_folds(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    train_fn: Callable[[ml_collections.ConfigDict, pathlib.Path], Any],
    validate_fn: Callable[[ml_collections.ConfigDict], None],
    resumable_keys: Sequence[str] = (),
) -> dict:
    """Runs every fold of `config` into workdir/fold_<i>/ and pools them (module docstring).

    Args:
      config: a config with `data.num_folds` set and `data.fold` unset.
      workdir: the folds run's folder (created).
      train_fn: the experiment's train_and_evaluate(config, workdir).
      validate_fn: the experiment's validate_config(config), run on fold 0's config first so a
        bad config fails before anything is written or computed.
      resumable_keys: top-level config fields a resumed run may change (as the experiment's).

    Returns:
      What W/results.json holds.

    Raises:
      ConfigError: a bad config or fold count, a source checkpoint shared by every fold, or a
        workdir holding a run of another config; all before any training.
    """
    input_pipeline.validate_folds(config.data, all_folds=True)
    checkpoint = config.get("source_checkpoint")
    if checkpoint and FOLD_FIELD not in checkpoint:
        raise ConfigError(
            "config.source_checkpoint with config.data.num_folds: one source map would have "
            "trained on other folds' test patients; let each fold train its own, or name one per "
            f"fold with {FOLD_FIELD} (e.g. runs/seg_CT/fold_{FOLD_FIELD}, a segmentation folds "
            "run of the same data)"
        )
    num_folds = config.data.num_folds
    for fold in range(num_folds):  # every fold's source checkpoint, before anything runs
        validate_fn(fold_config(config, fold))
    test_patients = _fold_test_patients(config)
    workdir = pathlib.Path(workdir)
    primary = runtime.is_primary()
    workdir_lib.start(config, workdir, resumable_keys, primary)
    fold_results = {}
    for fold in range(num_folds):
        single, run_dir = fold_config(config, fold), fold_dir(workdir, fold)
        if _finished(run_dir, single):
            logging.info("fold %d of %d: finished in %s, skipped", fold, num_folds, run_dir)
        else:
            workdir_lib.report_line(
                f"fold {fold} of {num_folds} (test patients: {len(test_patients[fold])}) into "
                f"{run_dir}",
                config.get("progress_bar", True),
            )
            train_fn(single, run_dir)
        runtime.sync_hosts(f"fold {fold} done")
        fold_results[fold] = seed_results(run_dir)
    summary = pool_folds(fold_results)
    for fold, expected in enumerate(test_patients):
        tested = set(summary["folds"][str(fold)]["test_patients"])
        if not tested <= expected:
            raise RuntimeError(
                f"fold {fold} tested patients outside its fold: {sorted(tested - expected)}"
            )
    everyone = set().union(*test_patients)
    results = {
        "experiment": config.experiment,
        "num_folds": num_folds,
        **summary,
        "untested_patients": sorted(everyone - set(summary["patients"])),
        "fold_workdirs": [fold_dir(workdir, fold).name for fold in range(num_folds)],
        "wall_time_s": _summed_wall_time(fold_results),
    }
    if "scheme" in config:
        results["scheme"] = config.scheme
    if primary:
        workdir_lib.write_results(workdir, results, {"num_folds": num_folds})
        workdir_lib.report_line(summary_line(results, workdir), config.get("progress_bar", True))
    return results


def _summed_wall_time(fold_results: Mapping[int, Mapping[int, Mapping[str, Any]]]) -> float:
    """Wall time of the folds (seeds trained together share theirs: counted once per fold)."""
    total = 0.0
    for seeds in fold_results.values():
        first = next(iter(seeds.values()))
        total += float(first.get("train_wall_time_s", first.get("wall_time_s", 0.0)))
    return total


def summary_line(results: Mapping[str, Any], workdir: pathlib.Path) -> str:
    """One line: pooled test F1 per score set, mean ± sd over seeds, and over patients."""
    parts = []
    for name, pooled in results["pooled"].items():
        f1 = pooled["over_seeds"].get("f1")
        if not f1 or f1["mean"] is None:
            parts.append(f"{name} (missing in some folds)")
            continue
        over_seeds = f"{f1['mean']:.3f}" + (f" ± {f1['sd']:.3f}" if f1["sd"] is not None else "")
        patient = pooled["over_seeds"]["patient_f1_mean"]["mean"]
        parts.append(f"{name} {over_seeds} (per-patient mean {patient:.3f})")
    return (
        f"{results['num_folds']} folds, {len(results['patients'])} patients tested once, "
        f"{len(results['seeds'])} seed(s): test F1 (all patients' images; ± sd over seeds) "
        f"{'; '.join(parts)}; see {workdir / workdir_lib.RESULTS_FILE}"
    )
