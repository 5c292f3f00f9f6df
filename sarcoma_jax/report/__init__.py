"""Aggregates finished workdirs into the thesis' tables and figures: python -m sarcoma_jax.report.

`python -m sarcoma_jax.report W1 W2 ... --out R` reads each workdir's config.json, results.json,
metrics.jsonl and provenance.json, groups the runs, and writes into R:

  index.md                     links to everything, the workdirs used and their provenance
  segmentation.md / .tex       §15-4: F1, accuracy, AUC per modality (+ intensity-threshold
                               baseline, thesis numbers, §15-5 zero-ratio)
  da.md / .tex                 §15-6: before DA / ADDA / RESET (the recommended criterion, the
                               confusion stop) per pair and metric
  stopping.md / .tex           §15-7: every stopping criterion the runs have (highest peak
                               (oracle) / confusion / latest / best loss by default)
  digits.md                    §10-3
  patients_<kind>.md / .tex    cross-validated runs only: test F1 per patient (mean ± sd over
                               seeds), mean ± sd over patients, box plots per patient
  figures/                     §15-3 box plots, §17-1 curves per ADDA run, §15-4..6 before/after
                               overlays, a segmentation F1 box plot per modality

Grouping. Segmentation runs by (data source, modality), ADDA runs by (data source, pair) with
the scheme as a column, digits runs by dataset. Runs of one group whose configs differ in more than
seeds and cosmetic fields (runs.IGNORED_CONFIG_KEYS) are split into variants [A], [B], ..., listed
with the fields in which they differ (e.g. `num_epochs=10`), so runs of different budgets are never
averaged together. Every cell is mean ± sample sd over the runs (n shown); reported numbers are on
the test split.

Seeds and folds. A `num_seeds` run counts as its seeds' runs. A run of every fold
(`config.data.num_folds`, sarcoma_jax/folds.py) counts as one cross-validated run per seed whose
test numbers pool its folds' (every patient tested once; AUC the mean over folds), so its rows are
mean ± sd over seeds; the per-patient tables give the spread over patients. Its §17-1 curves are
its folds' and its overlays show its first fold's test slices.

runs.py      the runs: reading workdirs, kinds, variants
thesis.py    the thesis' numbers, as data
tables.py    §15-4, §15-6, §15-7 as markdown and LaTeX
plots.py     box plots and §17-1 curves
overlays.py  before/after overlays (restores the maps before DA and at the recommended
             criterion's pick of the lowest-seed run per pair and scheme, and loads its target
             data; `--no-overlays` skips that work)
digits.py    the §10-3 table
write.py     the report folder and the command line
"""

from sarcoma_jax.report.runs import ReportError, load_runs
from sarcoma_jax.report.write import main, write_report

__all__ = ["ReportError", "load_runs", "main", "write_report"]
