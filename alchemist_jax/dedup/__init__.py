"""Near-duplicate detection (`alchemist-jax dedup`): groups of exact and near copies in the pool.

    groups, counts = find_groups(ids, hashes, embeddings, cfg.dedup, exact_of, images)

A sample's copies (the same picture shifted by a pixel or two, brighter or darker, re-encoded)
end up in one group; selection keeps one representative per group. The steps:

  fingerprints  `canonicalize` the grayscale image (background level subtracted, re-centred on
                its centre of mass, so that a shift of the content moves nothing), then per
                sample a 64-bit DCT perceptual hash of it (`phash_bits`, packed to uint64 by
                `pack_bits`) and a unit-norm embedding: `pixel_embeddings` (the canonical image,
                blurred and downsampled; the default) or the image features of a rating run's
                rater (`rater_image_features`).
  exact         identical preprocessed pixels (`exact_duplicates`): grouped at once; only the
                first of each set enters the search below.
  candidates    sorted neighbourhoods (`sort_orders`): for each of several 64-bit keys the
                samples are sorted by key, and each is paired with the next `dedup.window` in
                that order. Keys: the pHash rotated so that each of `dedup.bands` bands leads
                (`rotated_hash_keys`), and random-hyperplane signatures of the embeddings
                (`simhash_keys`). Cost: a sort per key (N log N) and keys x window x N pairs,
                never all N^2 / 2.
  filter        pairs whose hashes differ in at most `dedup.max_hamming` bits and whose
                embeddings have a cosine of at least `dedup.min_cosine` (`close_pairs`).
  verification  the pixel correlation of the two images at their best alignment (integer shifts
                up to `dedup.max_shift`, frame border left out) is at least
                `dedup.min_aligned_cosine` (`aligned_pairs`). Look-alikes (two handwritten
                "1"s) pass the filter; only copies pass this.
  groups        connected components of the exact and verified pairs (`group_ids`); a group's
                id is its smallest sample id, a sample without copies is its own group.

A constant (blank) image shows nothing that could have been copied: it is never grouped.

`run` is the command: it fingerprints the pool of `cfg.data` in batches and writes
`dedup.parquet` (columns id int64, group int64, group_size int32, in pool order; metadata: the
`dedup` settings as JSON, `config_sha256`, `source`, `count` and the counts of `find_groups`),

Modules: `features` (the fingerprints, jitted, and the batched pass over a pool), `search`
(candidates, filter, verification, groups: numpy), and this one (the command, the dedup file,
`pair_metrics`); the names other modules use are re-exported here (`dedup.find_groups`, ...).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from alchemist_jax import config as config_lib
from alchemist_jax.data import load_splits, preprocess
from alchemist_jax.data.corrupt import IMAGE_COPYING_KINDS
from alchemist_jax.dedup.features import (
    DCT_SIZE,
    FLAT_ENERGY,
    HASH_BITS,
    HASH_SIDE,
    aligned_cosine,
    alignment_images,
    canonicalize,
    fingerprints,
    gaussian_blur,
    hamming,
    pack_bits,
    phash_bits,
    pixel_embeddings,
    rater_image_features,
)
from alchemist_jax.dedup.search import (
    aligned_pairs,
    check_config,
    close_pairs,
    exact_duplicates,
    find_groups,
    group_ids,
    rotated_hash_keys,
    simhash_keys,
    sort_orders,
)
from alchemist_jax.runtime import io, preemption
from alchemist_jax.scoring.rating_run import RatingRun, open_rating_run

__all__ = [
    "DCT_SIZE",
    "FLAT_ENERGY",
    "HASH_BITS",
    "HASH_SIDE",
    "aligned_cosine",
    "aligned_pairs",
    "alignment_images",
    "canonicalize",
    "check_config",
    "close_pairs",
    "config_fingerprint",
    "dedup_settings",
    "exact_duplicates",
    "find_groups",
    "fingerprints",
    "gaussian_blur",
    "group_ids",
    "groups_table",
    "hamming",
    "pack_bits",
    "pair_metrics",
    "phash_bits",
    "pixel_embeddings",
    "rater_image_features",
    "read_groups",
    "rotated_hash_keys",
    "run",
    "simhash_keys",
    "sort_orders",
]

log = logging.getLogger("alchemist_jax.dedup")

GROUPS_COLUMNS = ("id", "group", "group_size")

# ==============================================================================================
# Against known copies (pools with injected defects)
# ==============================================================================================


def pair_metrics(
    ids: np.ndarray, groups: np.ndarray, truth: pa.Table, exact_of: np.ndarray | None = None
) -> dict[str, Any]:
    """How well `groups` recovers the copies that `corrupt` injected.

    A pair of samples in one predicted group is true when one is a copy
    (`corrupt.IMAGE_COPYING_KINDS`) of the
    other or both copy the same source.

    Args:
      ids, groups: (N,) int64 as `find_groups` returns them (pool order).
      truth: the defect table of `corrupt` (columns id, defect, source_id), rows in pool order.
      exact_of: (N,) `exact_duplicates` of the pool's images, or None. When given, pairs whose
        pictures are pixel-identical in the source data itself (duplicates the defect table
        does not know of) are counted apart as `identical_pairs`.
    Returns:
      {"recall_<kind>": fraction of the samples of each copying kind grouped with their source
      (None: no such sample), "missed_copies": copies not grouped with their source, "pairs":
      pairs within predicted groups (sum of size * (size - 1) / 2), "true_pairs",
      "pair_precision" (true / all, None without pairs)}, plus with `exact_of`
      "identical_pairs" (false pairs of identical pictures) and "pair_precision_identical"
      ((true + identical) / all).
    Raises:
      ValueError: the truth lists other ids than `ids`, or in another order.
    """
    truth_ids = truth.column("id").to_numpy()
    if not np.array_equal(truth_ids, ids):
        raise ValueError("the defect table and the groups list different ids")
    defects = np.asarray(truth.column("defect").to_pylist(), dtype=object)
    is_copy = np.isin(defects, IMAGE_COPYING_KINDS)
    sources = np.array(
        [-1 if s is None else s for s in truth.column("source_id").to_pylist()], np.int64
    )
    # The picture each sample shows, as a pool index: its source's for a copy, else its own.
    order = np.argsort(ids)
    original = np.where(
        is_copy, order[np.searchsorted(ids, sources, sorter=order)], np.arange(len(ids))
    )
    together = groups == groups[original]
    metrics: dict[str, Any] = {
        f"recall_{kind}": float(np.mean(together[defects == kind]))
        if np.any(defects == kind)
        else None
        for kind in IMAGE_COPYING_KINDS
    }
    pairs, true_pairs = _pairs_within(groups), _pairs_within(groups, original)
    metrics.update(
        missed_copies=int(np.sum(is_copy & ~together)),
        pairs=pairs,
        true_pairs=true_pairs,
        pair_precision=true_pairs / pairs if pairs else None,
    )
    if exact_of is not None:
        identical = _pairs_within(groups, np.asarray(exact_of)[original]) - true_pairs
        metrics.update(
            identical_pairs=identical,
            pair_precision_identical=((true_pairs + identical) / pairs if pairs else None),
        )
    return metrics


def _pairs_within(*labels: np.ndarray) -> int:
    """Number of unordered pairs of rows that agree on every label array."""
    _, counts = np.unique(np.stack(labels, 1), axis=0, return_counts=True)
    return int(np.sum(counts * (counts - 1) // 2))


# ==============================================================================================
# The command
# ==============================================================================================


def read_groups(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The (ids, groups) of a dedup.parquet, (N,) int64 each, in the file's (pool) order.

    Raises:
      ValueError: the file is unreadable, lacks the `id` / `group` columns, or they hold nulls
        or other than integers (names the file and column).
    """
    table = io.read_parquet(
        path,
        ("id", "group"),
        what="dedup file",
        types={"id": pa.types.is_integer, "group": pa.types.is_integer},
        hint="write one with `alchemist-jax dedup`",
    )
    return (
        table.column("id").to_numpy().astype(np.int64),
        table.column("group").to_numpy().astype(np.int64),
    )


def groups_table(ids: np.ndarray, groups: np.ndarray, metadata: dict[str, str]) -> pa.Table:
    """Columns id int64, group int64, group_size int32 (samples sharing the group), with
    `metadata` in the schema."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "group": pa.array(groups, pa.int64()),
            "group_size": pa.array(counts[inverse], pa.int32()),
        }
    )
    return table.replace_schema_metadata(metadata)


def config_fingerprint(cfg: config_lib.Config, rating_run: RatingRun | None) -> str:
    """`io.fingerprint` of what the groups depend on: `data`, `dedup` (without the batch
    size) and, for rater embeddings, the rating run's checkpoint and step."""
    parts: dict[str, Any] = {
        "data": config_lib.to_dict(cfg.data),
        "dedup": dedup_settings(cfg.dedup),
    }
    if rating_run is not None:
        parts["rater"] = [str(rating_run.checkpoints), rating_run.step]
    return io.fingerprint(parts)


def dedup_settings(cfg: config_lib.DedupConfig) -> dict[str, Any]:
    """The `dedup` section the groups depend on (the batch size never changes them)."""
    settings = config_lib.to_dict(cfg)
    del settings["batch_size"]
    return settings


def run(cfg: config_lib.Config, out: Path, rater_dir: Path | None = None) -> dict[str, Any]:
    """`alchemist-jax dedup`: groups the duplicates of the pool of `cfg.data` into `out`.

    Nothing is recomputed when `out` already holds the groups of the same pool under the same
    configuration; the file is written atomically (never a partial file). SIGTERM / SIGINT stop
    the pass at the next batch (`preemption.Preempted`; nothing is saved before `out`). The `rater`
    embedding reads the EMA rater of the rating run in `rater_dir`.

    Returns:
      {"path", "count" (samples), "groups", "grouped" (samples in groups of two or more),
      "largest_group", and the counts of `find_groups`: "exact_pairs", "compared",
      "hash_close", "embedding_close", "near_pairs"; "seconds" (0 when `out` was complete)},
      plus the `pair_metrics` of the groups when the pool has injected defects.
    """
    out = Path(out)
    check_config(cfg.dedup)
    kind = cfg.dedup.embedding
    if kind == "rater" and rater_dir is None:
        raise ValueError(
            "dedup.embedding=rater needs the rating run: pass --rater-dir DIR (the "
            "--workdir of `alchemist-jax rate`)"
        )
    if kind != "rater" and rater_dir is not None:
        raise ValueError(f"--rater-dir is read by dedup.embedding=rater only, not by {kind}")
    rating_run = open_rating_run(rater_dir, cfg.data) if kind == "rater" else None
    splits = load_splits(cfg.data)
    if len(splits.train) == 0:
        raise ValueError(f"{splits.train.name} is empty: there is nothing to deduplicate")
    pool = preprocess.materialize(splits.train, preprocess.Preprocessor.for_config(cfg.data))
    if "image" not in pool.extra:
        raise ValueError(
            f"dedup needs pixel images; the pool {pool.name} has none (precomputed latents)"
        )
    metadata = {
        "config": json.dumps(dedup_settings(cfg.dedup), sort_keys=True),
        "config_sha256": config_fingerprint(cfg, rating_run),
        "source": pool.name,
        "count": str(len(pool)),
    }
    stored = _complete(out, pool.ids, metadata)
    # Exact copies: for the search, and for the pair metrics when the defects are known.
    exact_of = (
        exact_duplicates(pool.extra["image"])
        if stored is None or splits.truth is not None
        else None
    )
    seconds = 0.0
    if stored is None:
        start = time.perf_counter()
        features = None if rating_run is None else rater_image_features(rating_run, pool[0])
        with preemption.guard() as stop:  # SIGTERM / SIGINT: Preempted at the next batch
            hashes, embeddings = fingerprints(pool, cfg.dedup, features, stop=stop)
            groups, counts = find_groups(
                pool.ids,
                hashes,
                embeddings,
                cfg.dedup,
                exact_of,
                images=pool.extra["image"],
                stop=stop,
            )
        seconds = time.perf_counter() - start
        sizes = np.unique(groups, return_counts=True)[1]
        counts = {
            **counts,
            "groups": len(sizes),
            "grouped": int(np.sum(sizes[sizes > 1])),
            "largest_group": int(sizes.max(initial=0)),
        }
        io.atomic_write_parquet(
            out,
            groups_table(
                pool.ids, groups, {**metadata, **{key: str(value) for key, value in counts.items()}}
            ),
        )
    else:
        groups, counts = stored
    summary = {"path": str(out), "count": len(pool), **counts, "seconds": round(seconds, 3)}
    if splits.truth is not None:
        summary.update(pair_metrics(pool.ids, groups, splits.truth, exact_of))
    return summary


_COUNTS = (
    "groups",
    "grouped",
    "largest_group",
    "exact_pairs",
    "compared",
    "hash_close",
    "embedding_close",
    "near_pairs",
)


def _complete(
    out: Path, ids: np.ndarray, metadata: dict[str, str]
) -> tuple[np.ndarray, dict[str, int]] | None:
    """(groups, counts) stored in `out` when it holds exactly `ids` under `metadata`
    (`io.complete_table`), else None (missing, unreadable, another pool or configuration: to be
    computed again)."""
    table = io.complete_table(out, ids, metadata, GROUPS_COLUMNS)
    if table is None:
        return None
    try:
        stored = io.read_metadata(out)
        counts = {key: int(stored[key]) for key in _COUNTS}
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
    log.info("%s is complete (%d samples)", out, len(ids))
    return table.column("group").to_numpy().astype(np.int64), counts
