"""The splits every command of a run agrees on: the training pool (with injected defects when
configured), the clean validation set and the clean test set.

    splits = load_splits(cfg.data, report_dir=workdir)
    splits.train, splits.validation, splits.truth, splits.caption_classes
    test = load_test(cfg.data, cfg.evaluate.test_source)

Validation set: `data.validation_source` if set; else the source's own `validation` split
(built-ins, TFDS datasets that have one); else a random `data.validation_fraction` of the source,
held out from the pool (seed `data.seed`). Defects are injected into the pool only, after the
split, so the validation set stays clean.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from alchemist_jax.config import DataConfig
from alchemist_jax.data import preprocess
from alchemist_jax.data.corrupt import corrupt
from alchemist_jax.data.loading import BUILTIN_SOURCES, load
from alchemist_jax.data.sources import Source, Subset

log = logging.getLogger("alchemist_jax.data")


@dataclasses.dataclass
class Splits:
    """The training pool and the validation set of a run.

    `truth` is the defect table of `corrupt` (one row per pool index: id, defect, source_id) or
    None without injected defects; `caption_classes` (N,) is the class each pool caption names
    (the label, or for a swapped caption the label of its donor), None without labels or defects.
    """

    train: Source
    validation: Source
    truth: pa.Table | None
    caption_classes: np.ndarray | None

    @property
    def defects(self) -> list[str | None] | None:
        """Defect kind per pool index (None = clean), or None without injected defects."""
        return None if self.truth is None else self.truth.column("defect").to_pylist()


def load_splits(config: DataConfig, report_dir: str | Path | None = None) -> Splits:
    """Opens the pool and validation set named by `config` (see the module docstring); writes
    `report_dir/defects.parquet` (and, for user data, the pool's skipped rows in
    `report_dir/bad_samples.parquet`, the validation source's in
    `report_dir/validation/bad_samples.parquet`) when given."""
    report_dir = None if report_dir is None else Path(report_dir)
    pool = _usable(load(config.source, config.split, config=config, report_dir=report_dir))
    if config.validation_source is not None:
        # Its own report folder: the pool's bad_samples.parquet must not be overwritten.
        validation = _usable(
            load(
                config.validation_source,
                "validation",
                config=config,
                report_dir=None if report_dir is None else report_dir / "validation",
            )
        )
    elif has_split(config.source, "validation"):
        validation = load(config.source, "validation", config=config)
    else:
        whole = pool
        pool, validation = random_split(pool, config.validation_fraction, config.seed)
        log.warning(
            "%s has no validation split and data.validation_source is unset: %d of its "
            "%d samples (data.validation_fraction=%g, seed %d) are held out as the "
            "validation set and are not in the pool that is rated, scored and "
            "selected; set data.validation_source to use every sample",
            whole.name,
            len(validation),
            len(whole),
            config.validation_fraction,
            config.seed,
        )
    if config.corrupt.fraction <= 0:
        return Splits(pool, validation, None, None)
    pool, truth = corrupt(
        pool,
        config.corrupt.fraction,
        config.corrupt.kinds,
        seed=config.corrupt.seed,
        truth_path=None if report_dir is None else report_dir / "defects.parquet",
    )
    return Splits(pool, validation, truth, _caption_classes(pool, truth))


@dataclasses.dataclass
class PreparedSplits:
    """The pool and validation set preprocessed for the models (`preprocess.prepared`: into
    memory, or streamed when larger than `data.in_memory_limit`), and, when defects were
    injected, the truth (`defects` per pool index, None = clean) and the caption class of each
    pool sample (the label a swapped caption names), for AUROC."""

    pool: Source
    validation: Source
    defects: list[str | None] | None
    caption_classes: np.ndarray | None

    def fingerprint(self) -> dict[str, str]:
        """What a resumed run must find again: the `fingerprint` of both splits."""
        return {"pool": self.pool.fingerprint(), "validation": self.validation.fingerprint()}


def prepare_splits(config: DataConfig, report_dir: str | Path | None = None) -> PreparedSplits:
    """`load_splits`, then both splits preprocessed for the models (`Preprocessor.for_config`)."""
    splits = load_splits(config, report_dir=report_dir)
    transform = preprocess.Preprocessor.for_config(config)
    return PreparedSplits(
        preprocess.prepared(splits.train, transform, config.in_memory_limit),
        preprocess.prepared(splits.validation, transform, config.in_memory_limit),
        splits.defects,
        splits.caption_classes,
    )


def _usable(source: Source) -> Source:
    """`source`, unless it has no examples (an empty or all-bad manifest): then one line naming
    it, and how many rows were skipped as bad."""
    if len(source) == 0:
        bad = getattr(source, "bad_samples", None)
        detail = (
            f"all {bad.num_rows} rows are bad samples"
            if bad is not None and bad.num_rows
            else ("it has no rows")
        )
        raise ValueError(f"{source.name}: no usable samples: {detail}")
    return source


def load_test(config: DataConfig, test_source: str | None = None) -> Source:
    """The clean held-out test set: `test_source` (its `test` split if it is a dataset with
    splits), else the `test` split of `config.source`.

    Raises:
      ValueError: no test set — the source has no `test` split and none was given.
    """
    if test_source is not None:
        return load(test_source, "test", config=config)
    if not has_split(config.source, "test"):
        raise ValueError(
            f"data source {config.source!r} has no test split: set "
            "evaluate.test_source to a clean held-out set"
        )
    return load(config.source, "test", config=config)


def has_split(name_or_path: str, split: str) -> bool:
    """Whether the source has a named `split`: always for built-ins, for TFDS directories when
    they hold it, never for manifests and image folders (one split each)."""
    from alchemist_jax.data.tfds_dataset import is_tfds_dir

    if name_or_path in BUILTIN_SOURCES:
        return True
    path = Path(name_or_path)
    if not path.is_dir() or not is_tfds_dir(path):
        return False
    try:
        load(path, split)
    except ValueError:
        return False
    return True


def random_split(pool: Source, fraction: float, seed: int) -> tuple[Source, Source]:
    """(rest, held out): a random `fraction` of `pool` held out, both in index order."""
    if not 0 < fraction < 1:
        raise ValueError(f"data.validation_fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(pool))
    held_out = max(1, round(fraction * len(pool)))
    return (
        Subset(pool, np.sort(order[held_out:]), "pool"),
        Subset(pool, np.sort(order[:held_out]), "validation"),
    )


def _caption_classes(pool: Source, truth: pa.Table) -> np.ndarray | None:
    """The class each caption names: the sample's label, or for a swapped caption the label of
    the sample it was copied from (scores are normalised within caption classes)."""
    labels = pool.labels
    if labels is None:
        return None
    index_of = {int(i): n for n, i in enumerate(pool.ids)}
    classes = labels.copy()
    for n, (kind, donor) in enumerate(
        zip(truth.column("defect").to_pylist(), truth.column("source_id").to_pylist())
    ):
        if kind == "caption_swap":
            classes[n] = labels[index_of[donor]]
    return classes
