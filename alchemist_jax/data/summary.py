"""A look at a source before using it: counts, image sizes, caption lengths, a contact sheet."""

from __future__ import annotations

import collections
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alchemist_jax.data.sources import Source
from alchemist_jax.data.tokenizer import Tokenizer
from alchemist_jax.runtime import progress
from alchemist_jax.runtime.io import atomic_save_figure, atomic_write_bytes


def summarize(source: Source, *, max_examples: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """Statistics of `source`, read from all examples or a seeded sample of `max_examples`.

    Returns a JSON-serialisable dict: `count` (exact), `examined`, `image_shapes` (shape string ->
    count), `pixel_mean` / `pixel_std` (uint8 scale), `caption_words` and `caption_tokens`
    (min / mean / max; tokens include start and end), `labels` (label -> count, if any),
    `origins` (the examples' `source` field -> count, if any).
    """
    indices = _sample_indices(len(source), max_examples, seed)
    tokenizer = Tokenizer()
    shapes, labels, origins = collections.Counter(), collections.Counter(), collections.Counter()
    words, tokens, pixel_sum, pixel_sq, pixel_count = [], [], 0.0, 0.0, 0
    for index in progress.bar(indices, desc=f"summarizing {source.name}", unit="ex", leave=False):
        example = source[int(index)]
        if "image" in example:
            image = np.asarray(example["image"], np.float64)
            shapes["x".join(map(str, image.shape))] += 1
            pixel_sum += image.sum()
            pixel_sq += np.square(image).sum()
            pixel_count += image.size
        if "caption" in example:
            words.append(len(example["caption"].split()))
            tokens.append(len(tokenizer.ids(example["caption"])))
        if "label" in example:
            labels[int(example["label"])] += 1
        if "source" in example:
            origins[str(example["source"])] += 1
    stats: dict[str, Any] = {"name": source.name, "count": len(source), "examined": len(indices)}
    if pixel_count:
        mean = pixel_sum / pixel_count
        stats.update(
            image_shapes=dict(shapes),
            pixel_mean=round(mean, 3),
            pixel_std=round(float(np.sqrt(pixel_sq / pixel_count - mean**2)), 3),
        )
    for key, values in (("caption_words", words), ("caption_tokens", tokens)):
        if values:
            stats[key] = {
                "min": int(min(values)),
                "mean": round(float(np.mean(values)), 2),
                "max": int(max(values)),
            }
    if labels:
        stats["labels"] = {str(k): v for k, v in sorted(labels.items())}
    if origins:
        stats["origins"] = dict(sorted(origins.items()))
    return stats


def contact_sheet(
    source: Source, path: str | Path, *, rows: int = 6, cols: int = 6, seed: int = 0
) -> Path:
    """Writes a PNG grid of `rows * cols` random examples with their captions (and id)."""
    indices = _sample_indices(len(source), rows * cols, seed)
    return contact_sheet_of(
        source,
        indices,
        path,
        rows=rows,
        cols=cols,
        title=f"{source.name}: {len(source)} examples (random sample, seed {seed})",
    )


def contact_sheet_of(
    source: Source,
    indices: Sequence[int],
    path: str | Path,
    *,
    title: str,
    notes: Sequence[str] | None = None,
    rows: int | None = None,
    cols: int = 6,
) -> Path:
    """Writes a PNG grid of the examples of `source` at `indices` (positions, shown in order).

    Each cell shows the image, `#id`, the wrapped caption and, when given, `notes[k]` (one short
    line per index, e.g. a score or a defect kind). `rows` defaults to as many as the indices
    need; `title` heads the figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if notes is not None and len(notes) != len(indices):
        raise ValueError(f"contact sheet: {len(notes)} notes for {len(indices)} examples")
    rows = rows or max(1, -(-len(indices) // cols))
    if len(indices) > rows * cols:
        raise ValueError(f"contact sheet: {len(indices)} examples do not fit {rows}x{cols}")
    row_height = 2.5 if notes is None else 2.9  # room for the extra title line
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.1, rows * row_height), squeeze=False)
    for ax in np.ravel(axes):
        ax.axis("off")
    for k, (ax, index) in enumerate(zip(np.ravel(axes), indices)):
        example = source[int(index)]
        if "image" in example:
            image = np.asarray(example["image"])
            ax.imshow(
                image[..., 0] if image.shape[-1] == 1 else image,
                cmap="gray",
                vmin=0,
                vmax=255,
                interpolation="nearest",
            )
        title_lines = [f"#{int(example['id'])}", textwrap.fill(example.get("caption", ""), 24)]
        if notes is not None:
            title_lines.append(notes[k])
        ax.set_title("\n".join(title_lines), fontsize=6.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_save_figure(path, fig, dpi=110)
    return path


def write_json(stats: dict[str, Any], path: str | Path) -> None:
    """Writes `stats` as indented JSON, atomically."""
    atomic_write_bytes(Path(path), (json.dumps(stats, indent=2) + "\n").encode())


def _sample_indices(n: int, k: int, seed: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
