"""The report's matplotlib figures (PNG, written atomically): rating histograms by defect kind,
rank histograms of the selections, validation-loss curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alchemist_jax import config as config_lib
from alchemist_jax.report.analysis import mean_curve
from alchemist_jax.report.run_folder import CLEAN, RunFolder
from alchemist_jax.runtime.io import atomic_save_figure


def ratings_figure(run: RunFolder, path: Path) -> None:
    """One histogram per rating file (three per row), stacked by defect kind when known."""
    plt = pyplot()
    names = list(run.ratings)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        ids, scores = run.ratings[name]
        edges = np.histogram_bin_edges(scores, bins=40)
        if run.defects is None:
            ax.hist(scores, bins=edges, color=kind_colour(CLEAN))
        else:
            kinds = np.array(run.kinds(ids, f"ratings/{name}.parquet"))
            present = kind_order(kinds)
            ax.hist(
                [scores[kinds == k] for k in present],
                bins=edges,
                stacked=True,
                color=[kind_colour(k) for k in present],
                label=present,
            )
            ax.legend(fontsize=6)
        ax.set_title(f"{name} ({len(scores)} samples)", fontsize=9)
        ax.set_xlabel("score (higher = better)", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path)


def rank_histograms_figure(histograms: list[tuple[str, dict]], path: Path) -> None:
    """One panel per (arm, rank_histogram of selections/<arm>.json).

    Raises:
      ValueError: a histogram whose edges are not one more than its counts (names the file).
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(histograms), figsize=(3.6 * len(histograms), 3), squeeze=False)
    for ax, (arm, histogram) in zip(axes.ravel(), histograms):
        edges, counts = np.asarray(histogram["edges"]), np.asarray(histogram["counts"])
        if len(edges) != len(counts) + 1:
            plt.close(fig)
            raise ValueError(
                f"selections/{arm}.json: rank_histogram has {len(edges)} "
                f"edges for {len(counts)} counts"
            )
        ax.stairs(counts, edges, fill=True, alpha=0.8)
        ax.set_title(arm, fontsize=9)
        ax.set_xlabel("rank percentile (0 = best)", fontsize=8)
    axes[0, 0].set_ylabel("chosen samples")
    fig.tight_layout()
    save(fig, path)


def val_loss_figure(
    curves: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]], path: Path
) -> None:
    """Validation loss over steps: thin lines per seed, thick their mean, dashed for the
    equal-epochs runs; one colour per train run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for k, (name, seeds) in enumerate(curves.items()):
        colour = colours(k % colours.N)
        style = "--" if name.endswith("-epochs") else "-"
        for steps, values in seeds.values():
            ax.plot(steps, values, style, color=colour, linewidth=0.7, alpha=0.5)
        common, mean = mean_curve(seeds)
        ax.plot(
            common,
            mean,
            style,
            color=colour,
            linewidth=2,
            label=f"{name} ({len(seeds)} seed{'s' * (len(seeds) > 1)})",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)


def kind_order(kinds: np.ndarray) -> list[str]:
    """CLEAN first, then the defect kinds present in the configured order."""
    present = set(kinds.tolist())
    known = [CLEAN, *config_lib.DEFECT_KINDS]
    return [k for k in known if k in present] + sorted(present - set(known))


def kind_colour(kind: str):
    """A fixed colour per kind: clean blue, each defect kind its own tab10 colour."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    if kind == CLEAN:
        return palette(0)
    kinds = config_lib.DEFECT_KINDS
    return palette(1 + kinds.index(kind)) if kind in kinds else palette(7)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    atomic_save_figure(path, fig, dpi=100)
