"""Run logs: metrics.jsonl (one JSON object per line, with `step`) + TensorBoard, and readers."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alchemist_jax.runtime import distributed
from alchemist_jax.runtime.io import atomic_save_figure, atomic_write_bytes

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Metrics to `workdir/metrics.jsonl` (appended; a resumed run continues it) and
    `workdir/tensorboard`. In a multi-process run only process 0 writes (every process logs the
    same global values); the others' `write` does nothing."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / METRICS_FILE
        self.writer = None
        if distributed.is_leader():
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Appends one line; a non-finite value is written as null (JSON has no NaN) and left
        out of TensorBoard."""
        if self.writer is None:
            return
        values = {k: float(v) if math.isfinite(float(v)) else None for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}, allow_nan=False) + "\n")
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def last(self) -> dict[str, float]:
        """The last metrics written (empty if none)."""
        rows = read_metrics(self.path) if self.path.exists() else []
        return {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, in file order; ValueError naming the line when one is not
    valid JSON."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}: line {number} is not valid JSON") from None
    return rows


def last_values(path: Path, keys: Sequence[str]) -> dict[str, float]:
    """The last value logged of each of `keys` in a metrics.jsonl."""
    values: dict[str, float] = {}
    for row in read_metrics(path):
        values.update({key: row[key] for key in keys if key in row})
    return values


def series(path: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps int64, values float64) of `key` in a metrics.jsonl, one point per step (a resumed
    run's repeat wins), by step."""
    points = {
        int(row["step"]): float(row[key]) for row in read_metrics(path) if row.get(key) is not None
    }
    steps = np.array(sorted(points), np.int64)
    return steps, np.array([points[s] for s in steps], np.float64)


def forget_after(path: Path, step: int) -> None:
    """Drops the lines past `step` (written after the checkpoint a run resumes from), and a
    partial line a killed run may have left. Process 0's job in a multi-process run."""
    path = Path(path)
    if not distributed.is_leader() or not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) < len(lines):
        atomic_write_bytes(path, "".join(kept).encode())


def _step_of(line: str) -> int | None:
    """The `step` of a metrics line; None for a partial line (cut by a kill) or a blank one."""
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def plot_curves(
    metrics_path: Path, out: Path, panels: Sequence[Sequence[str]], xlabel: str
) -> None:
    """One PNG with a panel per group of keys, each curve over the step. A key ending in "/"
    stands for every logged key with that prefix (e.g. "auroc/"); keys absent from the log are
    left out and empty panels dropped. Process 0's job in a multi-process run."""
    if not distributed.is_leader():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list({r["step"]: r for r in read_metrics(metrics_path)}.values())  # resumes repeat
    logged = list(dict.fromkeys(k for r in rows for k in r))

    def expand(key: str) -> list[str]:
        return (
            [k for k in logged if k.startswith(key)]
            if key.endswith("/")
            else ([key] if key in logged else [])
        )

    panels = [tuple(k for key in keys for k in expand(key)) for keys in panels]
    panels = [p for p in panels if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, keys in zip(np.atleast_1d(axes), panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(out, fig, dpi=100)
