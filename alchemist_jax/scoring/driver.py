"""The chunked, resumable, atomic scoring pass: `score_pool`.

`score_pool` splits the pool (in index order) into chunks of `score.chunk_size` samples (rounded
up to whole batches), scores each in fixed-shape batches (`data.pipeline.padded_batches`, the
last one padded) and writes it atomically as `.<out>.chunks/<chunk>.parquet`; a rerun skips the
finished chunks (same ids, same metadata: `runtime.io.complete_table`), and the last step joins
them into `out` (columns id int64, score float32, pool order) with the run's metadata in the
Parquet schema, then removes the chunk folder. Every scorer scores each row on its own, so
scores do not depend on the batch size, and a resumed run writes the same file as an
uninterrupted one.

Several processes (`runtime.distributed`): chunk i is scored by process i % process_count, each
on its own devices (the batch rows split over them, `parallel.local_mesh`), and written by it;
when every process is done, process 0 joins the chunks (all processes must see the output's
folder: a shared filesystem), so the file is the one a single process writes. No chunk is
scored twice, and a rerun skips the chunks any process finished.

Failure paths: a chunk (or the pool) with NaN / Inf scores is not written unless
`allow_nonfinite` (`score.allow_nonfinite`): one line names the scorer, how many and an example
id. SIGTERM / SIGINT stop the pass at the next chunk boundary (the finished chunks are kept) with
`preemption.Preempted`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pyarrow as pa
from jax.sharding import NamedSharding

from alchemist_jax.data.pipeline import numeric_fields, padded_batches
from alchemist_jax.data.preprocess import StreamedSource
from alchemist_jax.data.sources import ArraySource
from alchemist_jax.runtime import distributed, io, parallel, preemption, progress

log = logging.getLogger("alchemist_jax.scoring")

ScoreBatch = Callable[[dict[str, np.ndarray]], Any]  # batch -> (B,) scores (numpy or jax)

RATINGS_COLUMNS = ("id", "score")


def chunk_folder(out: Path) -> Path:
    """Where `score_pool` keeps the finished chunks of `out` until it is complete."""
    return out.parent / f".{out.name}.chunks"


def ratings_table(ids: np.ndarray, scores: np.ndarray, metadata: dict[str, str]) -> pa.Table:
    """Columns id int64, score float32, with `metadata` in the schema."""
    table = pa.table({"id": pa.array(ids, pa.int64()), "score": pa.array(scores, pa.float32())})
    return table.replace_schema_metadata(metadata)


def finished_scores(path: Path, ids: np.ndarray, metadata: dict[str, str]) -> np.ndarray | None:
    """The scores stored in `path` if it holds exactly `ids` (in order) under `metadata`, else
    None (missing, unreadable, other ids or another configuration: to be scored again)."""
    table = io.complete_table(path, ids, metadata, RATINGS_COLUMNS)
    return None if table is None else table.column("score").to_numpy().astype(np.float32)


def score_pool(
    score_batch: ScoreBatch,
    source: ArraySource | StreamedSource,
    out: Path,
    *,
    batch_size: int,
    chunk_size: int,
    metadata: dict[str, str],
    desc: str = "score",
    allow_nonfinite: bool = False,
) -> np.ndarray:
    """Scores every example of `source` and writes `out` (resumable; see the module docstring).

    Args:
      score_batch: batch -> (B,) scores, numpy or (better: not yet computed) jax arrays. The
        batch is a dict of numpy arrays of `batch_size` rows, laid out like
        `pipeline.eval_iterator` batches: the numeric fields of the examples, `id` int64 and
        `mask` bool; padding rows repeat the last real row with `id` -1 and `mask` False, and
        their scores are discarded.
      source: the preprocessed pool (`preprocess.prepared`: in memory or streamed), scored in
        index order.
      out: the ratings Parquet file: columns id int64, score float32, one row per example.
      batch_size: rows per call of `score_batch`.
      chunk_size: samples per chunk file (the unit of resuming), rounded up to a multiple of
        `batch_size` so that only the pool's last batch is padded.
      metadata: string key/values stored in the schema of `out` and of every chunk; a chunk
        written under other metadata is scored again.
      desc: progress bar label.
      allow_nonfinite: write NaN / Inf scores (otherwise refused, see the module docstring).
    Returns:
      (N,) float32 scores in pool order (as written).
    Raises:
      ValueError: non-finite scores (without `allow_nonfinite`); nothing more is written.
      preemption.Preempted: SIGTERM / SIGINT arrived; the chunks finished so far are kept.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(
            f"score.batch_size and score.chunk_size must be >= 1, got {batch_size} and {chunk_size}"
        )
    if len(source) == 0:
        raise ValueError(f"{source.name} is empty: there is nothing to score")
    if batch_size % jax.local_device_count():
        raise ValueError(
            f"score.batch_size={batch_size} must be divisible by the "
            f"{jax.local_device_count()} devices of each process"
        )
    out = Path(out)
    ids = source.ids
    done = finished_scores(out, ids, metadata)
    if done is not None:
        log.info("%s is complete (%d scores)", out, len(done))
        return done
    folder = chunk_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    chunk_size = -(-chunk_size // batch_size) * batch_size  # whole batches: no padding inside
    starts = range(0, len(source), chunk_size)
    paths = [folder / f"{index:05d}.parquet" for index in range(len(starts))]
    parts = [
        finished_scores(path, ids[start : start + chunk_size], metadata)
        for path, start in zip(paths, starts)
    ]
    bar = progress.bar(
        total=len(source),
        desc=desc,
        unit="sample",
        unit_scale=True,
        initial=sum(len(p) for p in parts if p is not None),
    )
    scorer = metadata.get("scorer", desc)
    process, processes = jax.process_index(), jax.process_count()
    rows_sharding = parallel.local_rows_sharding()
    with preemption.guard() as stop:
        for index, start in enumerate(starts):
            if parts[index] is None and index % processes == process:
                rows = pool_columns(source, start, start + chunk_size)
                # Every batch is dispatched before the first result is read back (async
                # dispatch).
                pending = [
                    (score_batch(_on_devices(batch, rows_sharding)), batch["mask"])
                    for batch in padded_batches(rows, batch_size)
                ]
                parts[index] = _collect(pending, bar)
                if not allow_nonfinite:
                    check_finite(parts[index], rows["id"], scorer, paths[index])
                io.atomic_write_parquet(
                    paths[index], ratings_table(rows["id"], parts[index], metadata)
                )
            if stop.requested and index + 1 < len(starts):
                raise preemption.Preempted(
                    f"{desc} stopped by {stop.signal_name} after chunk {index + 1} of "
                    f"{len(starts)}; finished chunks kept in {folder}: rerun the same command "
                    "to resume"
                )
    bar.close()
    distributed.barrier(f"scored {out}")
    if distributed.is_leader():
        parts = [
            part
            if part is not None
            else finished_scores(path, ids[start : start + chunk_size], metadata)
            for part, path, start in zip(parts, paths, starts)
        ]
        missing = [str(path) for part, path in zip(parts, paths) if part is None]
        if missing:
            raise ValueError(
                f"{desc}: chunks missing or unreadable after every process finished: "
                + ", ".join(missing[:3])
            )
        scores = np.concatenate(parts)
        if not allow_nonfinite:
            check_finite(scores, ids, scorer, out)
        io.atomic_write_parquet(out, ratings_table(ids, scores, metadata))
        shutil.rmtree(folder)
    distributed.barrier(f"joined {out}")
    if not distributed.is_leader():
        scores = finished_scores(out, ids, metadata)
    return scores


def _on_devices(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, Any]:
    """The numeric fields of `batch` on this process's devices, rows split over them (the
    batch size must divide by the local device count); `id` and `mask` stay on the host."""
    return {
        key: value if key in ("id", "mask") else jax.device_put(value, sharding)
        for key, value in batch.items()
    }


def check_finite(scores: np.ndarray, ids: np.ndarray, scorer: str, path: Path) -> None:
    """Raises a one-line ValueError when `scores` (n,) hold NaN or Inf: how many, the first
    such id of `ids` (n,), the scorer and the file that is not written."""
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(
            f"score.scorer={scorer}: {int(bad.sum())} of {len(scores)} scores are NaN or Inf "
            f"(e.g. id {int(ids[np.argmax(bad)])}), not writing {path}: the scorer's model "
            "diverged (check its run), or set score.allow_nonfinite=true to write them anyway"
        )


def pool_columns(
    source: ArraySource | StreamedSource, start: int, stop: int
) -> dict[str, np.ndarray]:
    """Rows start..stop-1 of the numeric fields of `source` (those `pipeline.numeric_fields`
    keeps of its examples). From a pool in memory (`ArraySource`), array slices: reading
    examples one by one (~130 us each through grain) costs more than the demo rater's forward
    pass (~50 us per sample on 2 CPU cores; docs/BENCHMARKS.md). From a streamed pool, the rows
    read and preprocessed now (only this chunk is held)."""
    if isinstance(source, ArraySource):
        columns = {
            "id": source.ids,
            "image": source.images,
            "label": source.labels,
            **source.extra,
        }
        return {key: column[start:stop] for key, column in columns.items() if column is not None}
    return numeric_fields(source.rows(start, stop))


def _collect(pending: list, bar: Any) -> np.ndarray:
    """Waits for the scores of a chunk's batches: (rows,) float32, padding dropped, in order;
    `bar` (a `progress.bar`) advances by the rows of each."""
    scores = []
    for batch_scores, mask in pending:
        scores.append(np.asarray(batch_scores, np.float32)[mask])
        bar.update(len(scores[-1]))
    return np.concatenate(scores)
