"""Reading a pipeline run folder for the report: config, defects, ratings, selections, results,
validation-loss curves and the pool the config names.

What is absent is noted in `RunFolder.missing` (listed on the page under "Not in this run");
what is malformed stops the build with a one-line ValueError naming the file.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np

from alchemist_jax import config as config_lib
from alchemist_jax.data.cache import DataUnavailableError
from alchemist_jax.data.sources import Source
from alchemist_jax.runtime import io, runlog

CLEAN = "clean"


@dataclasses.dataclass
class RunFolder:
    """What the report knows of a run folder; `missing` collects what it could not show."""

    workdir: Path
    out: Path
    cfg: config_lib.Config | None = None
    pool: Source | None = None  # the corrupted training pool, when it could be opened
    classes: dict[int, int] | None = None  # pool id -> caption class
    defects: dict[int, str] | None = None  # pool id -> defect kind or CLEAN
    copied_from: dict[int, int] = dataclasses.field(default_factory=dict)  # exact duplicates
    ratings: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    # arm -> the ranking its selection used (`analysis.arm_ranking`, None when unknown), once.
    rankings: dict[str, Any] = dataclasses.field(default_factory=dict)
    missing: list[str] = dataclasses.field(default_factory=list)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.workdir))

    def groups(self, ids: np.ndarray, where: str) -> np.ndarray | None:
        """(N,) caption class of each id of file `where`, or None when the classes are unknown."""
        if self.classes is None:
            return None
        return np.array(lookup(self.classes, ids, where, "the pool of config.yaml"))

    def kinds(self, ids: np.ndarray, where: str) -> list[str]:
        """Defect kind (or CLEAN) of each id of file `where`."""
        return lookup(self.defects, ids, where, "defects.parquet")


def lookup(mapping: dict[int, Any], ids: np.ndarray, where: str, known_in: str) -> list[Any]:
    """`mapping[id]` for each of `ids` (read from file `where`); a one-line ValueError when
    some id is not in `mapping` (built from `known_in`)."""
    unknown = [int(i) for i in ids if int(i) not in mapping]
    if unknown:
        raise ValueError(
            f"{where}: {len(unknown)} of {len(ids)} ids are not in {known_in} (first: {unknown[0]})"
        )
    return [mapping[int(i)] for i in ids]


def load_run(workdir: Path) -> RunFolder:
    """The config, defects, ratings and pool of `workdir`, and notes of what is absent."""
    run = RunFolder(workdir, workdir / "report")
    config_path = workdir / "config.yaml"
    if config_path.exists():
        try:
            run.cfg = config_lib.load_config(config_path)
        except config_lib.ConfigError as error:
            raise ValueError(f"{config_path}: {error}") from None
    else:
        run.missing.append(
            "config.yaml: no configuration summary, no caption classes and no "
            "contact sheets (they need the pool the config names)"
        )
    defects_path = workdir / "defects.parquet"
    if defects_path.exists():
        _read_defects(run, defects_path)
    else:
        run.missing.append(
            "defects.parquet: no injected defects, so no AUROC table and no defect colouring"
        )
    paths = sorted(
        (workdir / "ratings").glob("*.parquet"),
        key=lambda p: ({"exact": 0, "penalty": 1}.get(p.stem, 2), p.stem),
    )
    for path in paths:
        table = io.read_parquet(path, ("id", "score"))
        run.ratings[path.stem] = (
            io.check_unique_ids(table.column("id").to_numpy(), str(path)),
            table.column("score").to_numpy().astype(np.float64),
        )
    if not run.ratings:
        run.missing.append(
            "ratings/*.parquet: no ratings, so no rating histograms, AUROC "
            "table or samples by rating"
        )
    if run.cfg is not None:
        _open_pool(run)
    return run


def _read_defects(run: RunFolder, path: Path) -> None:
    """run.defects (id -> kind or CLEAN) and run.copied_from (exact copy -> its source)."""
    table = io.read_parquet(path, ("id",))
    if "defect" not in table.column_names:  # null for clean samples, so not checked for nulls
        raise ValueError(
            f"{path} has no column 'defect' (columns: {', '.join(table.column_names)})"
        )
    ids = io.check_unique_ids(table.column("id").to_numpy(), str(path))
    kinds = table.column("defect").to_pylist()
    run.defects = {int(i): kind or CLEAN for i, kind in zip(ids, kinds)}
    if "source_id" in table.column_names:
        run.copied_from = {
            int(i): int(source)
            for i, kind, source in zip(ids, kinds, table.column("source_id").to_pylist())
            if kind == "duplicate"
        }


def _open_pool(run: RunFolder) -> None:
    """Opens the corrupted training pool and its caption classes, or notes why it could not."""
    from alchemist_jax import data

    try:
        splits = data.load_splits(run.cfg.data)
    except (ValueError, OSError, DataUnavailableError) as error:
        run.missing.append(
            f"the pool {run.cfg.data.source!r} could not be opened ({error}): "
            "no contact sheets, no caption classes"
        )
        return
    run.pool = splits.train
    if splits.caption_classes is not None:
        run.classes = {int(i): int(c) for i, c in zip(splits.train.ids, splits.caption_classes)}


def read_selection(path: Path) -> np.ndarray:
    """The ids (int64, unique) of a selections/<arm>.parquet."""
    return io.check_unique_ids(io.read_parquet(path, ("id",)).column("id").to_numpy(), str(path))


def read_summaries(run: RunFolder) -> list[tuple[str, Any]]:
    """(arm, summary) of every selections/<arm>.json, by arm."""
    return [(p.stem, io.read_json(p)) for p in sorted((run.workdir / "selections").glob("*.json"))]


def read_selections(run: RunFolder) -> dict[str, np.ndarray]:
    """arm -> chosen ids of every selections/<arm>.parquet, by arm."""
    return {
        p.stem: read_selection(p) for p in sorted((run.workdir / "selections").glob("*.parquet"))
    }


def read_results(path: Path) -> list[dict]:
    """The rows of results.json; ValueError naming the file when it is not a list."""
    rows = io.read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of result rows")
    return rows


def seed_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(seed, folder) of every `seed<S>` folder of a train or eval run, by seed."""
    found = [
        (int(m.group(1)), p)
        for p in run_dir.iterdir()
        if p.is_dir() and (m := re.fullmatch(r"seed(\d+)", p.name))
    ]
    return sorted(found)


def val_loss_curves(run: RunFolder) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """train run -> seed -> (steps, val_loss) of train/<run>/seed<S>/metrics.jsonl, for the
    seeds that logged a validation loss."""
    curves = {}
    for run_dir in sorted(p for p in (run.workdir / "train").glob("*") if p.is_dir()):
        seeds = {
            seed: runlog.series(d / runlog.METRICS_FILE, "val_loss")
            for seed, d in seed_dirs(run_dir)
            if (d / runlog.METRICS_FILE).exists()
        }
        seeds = {seed: curve for seed, curve in seeds.items() if len(curve[0])}
        if seeds:
            curves[run_dir.name] = seeds
    return curves


def figure_files(run: RunFolder) -> list[tuple[str, str, list[tuple[Path, str]]]]:
    """(title, pattern, [(source PNG, name of its copy in report/)]) of the rating curves
    (rate/*/curves.png) and the generated samples (eval/*/seed*/samples.png)."""
    return [
        (
            "Rating curves",
            "rate/*/curves.png",
            [
                (p, f"rate_{p.parent.name}_curves.png")
                for p in sorted((run.workdir / "rate").glob("*/curves.png"))
            ],
        ),
        (
            "Generated samples",
            "eval/*/seed*/samples.png",
            [
                (d / "samples.png", f"eval_{run_dir.name}_seed{seed}.png")
                for run_dir in sorted(p for p in (run.workdir / "eval").glob("*") if p.is_dir())
                for seed, d in seed_dirs(run_dir)
                if (d / "samples.png").exists()
            ],
        ),
    ]
