"""The visual report of a pipeline run: one static HTML page and its PNGs, viewable offline.

    path = report.build(Path("runs/demo"))        # writes runs/demo/report/index.html

It reads the run folder written by `alchemist-jax pipeline` (config.yaml, defects.parquet,
ratings/, selections/, train/, eval/, results.json, rate/) and shows every part that exists:
the configuration, rating histograms coloured by defect kind, the AUROC of each rater per defect
kind, contact sheets of the best, middle, worst and pruned samples, the rank histograms of the
selections, validation-loss curves, the final method x metric table (also written as
report/results.md), the contribution of each component of the method (meta rater, + alignment,
+ dedup: test loss, FCD and AUROC per defect kind of the score each arm ranks by) and the rating
curves and generated samples. A part whose inputs are absent (no defects, fewer arms, a single
seed, a run still in progress) is left out and listed on the page under "Not in this run".
Malformed inputs (a Parquet file without its columns, duplicate ids, a results row without its
arm) stop the build with a one-line ValueError naming the file.
The page uses relative links and inline CSS only; every file is written atomically.

  run_folder     reading the run folder (config, defects, ratings, selections, results, curves,
                 the pool); notes of what is absent, one-line errors naming the file
  analysis       what the sections compute: rater and component AUROCs, contact sheets, kept
                 fractions, mean curves
  results_table  the final method x metric table (markdown for the pipeline, blocks for the page)
  figures        the matplotlib figures
  html           the sections, the page and `build`
"""

from alchemist_jax.report.analysis import COMPONENT_ARMS, SHEET_SIZE
from alchemist_jax.report.html import SECTIONS, STYLE, build
from alchemist_jax.report.results_table import BUDGETS, METRICS, results_table_markdown
from alchemist_jax.report.run_folder import CLEAN

__all__ = [
    "BUDGETS",
    "CLEAN",
    "COMPONENT_ARMS",
    "METRICS",
    "SECTIONS",
    "SHEET_SIZE",
    "STYLE",
    "build",
    "results_table_markdown",
]
