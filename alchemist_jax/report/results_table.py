"""The final method x metric table of results.json (pure; the pipeline prints the markdown
version, the page renders the same blocks as HTML)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Metric of results.json -> (column title, which way is better).
METRICS = {
    "test_loss": ("test loss ↓", "min"),
    "fcd": ("FCD ↓", "min"),
    "alignment": ("alignment ↑", "max"),
}
BUDGETS = ("steps", "epochs")

# (budget, column titles, lines of (cell text, is best)).
Block = tuple[str, list[str], list[list[tuple[str, bool]]]]


def results_table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The method x metric table of `rows` (results.json) as markdown, one block per budget.

    Each line is one run (arm at equal steps, or `<arm>-epochs` at equal epochs) with its seed
    count, steps, training-set size and, per metric, `mean ± std` over its seeds (std with
    ddof=1, the sample standard deviation; a single seed shows the mean alone). The best mean
    of each metric column within a block is bold (`**...**`): lowest test loss and FCD, highest
    alignment. A metric absent or null in every seed of a run shows `n/a`.

    Raises:
      ValueError: a row without `arm`, `run`, `budget` or `seed`, an unknown budget, or the
        same (run, budget, seed) twice.
    """
    parts = []
    for budget, header, body in result_blocks(rows):
        parts.append(f"**equal {budget}**\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "---|" * len(header))
        for cells in body:
            parts.append(
                "| " + " | ".join(f"**{text}**" if bold else text for text, bold in cells) + " |"
            )
        parts.append("")
    return "\n".join(parts)


def result_blocks(rows: Sequence[dict[str, Any]]) -> list[Block]:
    """(budget, column titles, lines of (cell text, is best)) per budget present in `rows`."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    seen = set()
    for number, row in enumerate(rows):
        for key in ("arm", "run", "budget", "seed"):
            if not isinstance(row, dict) or key not in row:
                raise ValueError(f"results.json row {number}: missing {key!r}")
        if row["budget"] not in BUDGETS:
            raise ValueError(
                f"results.json row {number}: budget {row['budget']!r} is not one of "
                f"{', '.join(BUDGETS)}"
            )
        key = (row["run"], row["budget"], row["seed"])
        if key in seen:
            raise ValueError(
                f"results.json row {number}: run {row['run']!r} budget "
                f"{row['budget']!r} seed {row['seed']!r} appears twice"
            )
        seen.add(key)
        runs.setdefault((row["budget"], row["run"]), []).append(row)

    blocks = []
    for budget in BUDGETS:
        lines = [(run, seeds) for (b, run), seeds in runs.items() if b == budget]
        if not lines:
            continue
        stats = {
            metric: [mean_std([s.get(metric) for s in seeds]) for _, seeds in lines]
            for metric in METRICS
        }
        best = {
            metric: _best([m for m, _ in stats[metric]], METRICS[metric][1]) for metric in METRICS
        }
        header = ["run", "seeds", "steps", "train size", *(title for title, _ in METRICS.values())]
        body = []
        for k, (run, seeds) in enumerate(lines):
            cells = [
                (run, False),
                (str(len(seeds)), False),
                (_distinct(s.get("steps") for s in seeds), False),
                (_distinct(s.get("train_size") for s in seeds), False),
            ]
            for metric in METRICS:
                mean, std = stats[metric][k]
                cells.append(
                    (format_mean_std(mean, std), mean is not None and mean == best[metric])
                )
            body.append(cells)
        blocks.append((budget, header, body))
    return blocks


def mean_std(values: list[Any]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1) of the non-null values; std None for fewer than two."""
    present = np.array([v for v in values if v is not None], np.float64)
    if len(present) == 0:
        return None, None
    return float(present.mean()), float(present.std(ddof=1)) if len(present) > 1 else None


def format_mean_std(mean: float | None, std: float | None) -> str:
    """`mean ± std` with four decimals; the mean alone without a std; `n/a` without a mean."""
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _best(means: list[float | None], direction: str) -> float | None:
    present = [m for m in means if m is not None and np.isfinite(m)]
    if not present:
        return None
    return min(present) if direction == "min" else max(present)


def _distinct(values) -> str:
    """The distinct values, in order, joined by '/' (seeds of one run normally agree)."""
    return "/".join(dict.fromkeys(str(v) for v in values if v is not None)) or "n/a"
