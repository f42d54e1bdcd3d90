"""Batched grain pipelines over a `Source`: an endless shuffled training stream and a padded,
ordered evaluation pass; and `padded_batches`, the same padded fixed-shape batches cut from
columns already in memory (scoring, dedup).

Both take a `transform` (example dict -> dict of numpy arrays, e.g. decode the image to float32
and tokenize the caption; None means `numeric_fields`, which keeps the numeric fields) and return
an iterator of batches: dicts of numpy arrays whose leading axis is the batch. Every batch
carries `id` int64, the ids of its examples, whether or not the transform keeps it.

Global batches, read per process. `batch_size` is the GLOBAL batch: batch number s of a stream
holds the examples at positions s * batch_size .. (s + 1) * batch_size - 1 of one global order
(shuffled epochs for training, index order for evaluation), whatever the number of processes.
`rows` (default: all) are the positions within each global batch that this process reads; it
reads only those examples and yields (len(rows), ...) arrays, which
`runtime.parallel.global_batch` assembles into the global array
(`jax.make_array_from_process_local_data`). So a run on 2 processes sees exactly the batches of
a run on 1, and `runtime.parallel.local_rows` gives each process its rows from the step's
sharding.

`read_threads` (default 0) sets grain's prefetch threads; see `_read_options`.

The iterators resume exactly: `state = it.get_state()` (the number of global batches read,
the same in every process) after any number of batches, then `fresh.set_state(state)` on an
iterator built with the same arguments yields the same next batches.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from alchemist_jax.data.sources import Source

Example = dict[str, Any]
Transform = Callable[[Example], dict[str, np.ndarray]]


def numeric_fields(example: Example) -> dict[str, np.ndarray]:
    """The default transform: the example's numeric and boolean fields as numpy arrays.

    Strings (`caption`, `source`) are dropped, since they cannot be stacked into a jit input.
    """
    arrays = {key: np.asarray(value) for key, value in example.items()}
    return {key: array for key, array in arrays.items() if array.dtype.kind in "biuf"}


class GlobalBatches:
    """An iterator over this process's rows of consecutive global batches of a grain
    `MapDataset` of examples (random access by global position), prefetched by grain.

    Args:
      examples: position -> transformed example (with `id`), at least as long as the stream.
      batch_size: the global batch G.
      rows: sorted positions in [0, G) this process reads.
      batches: how many global batches the stream has (None: endless).
      read_threads: grain prefetch threads.
    State: {"batch": the number of global batches already yielded}.
    """

    def __init__(
        self,
        examples: grain.MapDataset,
        batch_size: int,
        rows: np.ndarray,
        batches: int | None,
        read_threads: int,
    ):
        self._examples, self._batch_size, self._rows = examples, batch_size, rows
        self._batches = sys.maxsize // (2 * batch_size) if batches is None else batches
        self._options = _read_options(read_threads)
        self._start(0)

    def _start(self, batch: int) -> None:
        count, examples, size, rows = len(self._rows), self._examples, self._batch_size, self._rows

        def local_example(position: int) -> dict[str, np.ndarray]:
            return examples[(position // count) * size + int(rows[position % count])]

        self._batch = batch
        self._iterator = iter(
            grain.MapDataset.range(batch * count, self._batches * count)
            .map(local_example)
            .to_iter_dataset(self._options)
            .batch(count, batch_fn=stack_examples)
        )

    def __iter__(self) -> GlobalBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self._batch += 1
        return batch

    def __len__(self) -> int:
        return self._batches

    def get_state(self) -> dict:
        return {"batch": self._batch}

    def set_state(self, state: dict) -> None:
        self._start(int(state["batch"]))


def train_iterator(
    source: Source,
    batch_size: int,
    *,
    seed: int,
    rows: Sequence[int] | None = None,
    transform: Transform | None = None,
    read_threads: int = 0,
) -> GlobalBatches:
    """An endless iterator of training batches: `rows` of each global batch of `batch_size`.

    The global order is the whole source shuffled with `seed` and repeated forever, reshuffled
    differently (but deterministically) in every epoch; when the source size is not a multiple
    of `batch_size`, a batch can straddle two epochs.

    Returns:
      A `GlobalBatches` of dicts: each field of `transform(example)` stacked to (len(rows),
      ...), plus `id` int64 (len(rows),).
    """
    rows = _check_rows(rows, batch_size)
    examples = (
        _dataset(source)
        .shuffle(seed=seed)  # shuffle before repeat: each epoch gets its own order
        .repeat()
        .map(_with_id(transform))
    )
    return GlobalBatches(examples, batch_size, rows, None, read_threads)


def eval_iterator(
    source: Source,
    batch_size: int,
    *,
    rows: Sequence[int] | None = None,
    transform: Transform | None = None,
    read_threads: int = 0,
) -> GlobalBatches:
    """One ordered pass over `source` in ceil(N / batch_size) global batches of fixed shape.

    Global position i is example i; the positions past the end pad the last batch: a padding row
    repeats the source's last example with `id` -1 and `mask` False, so metrics can be masked
    under jit. This process yields its `rows` of each global batch.

    Returns:
      A `GlobalBatches` of dicts: each field of `transform(example)` stacked to (len(rows),
      ...), plus `id` int64 and `mask` bool (len(rows),), True for real examples.
    """
    rows = _check_rows(rows, batch_size)
    examples = _dataset(source).map(_with_id(transform))
    count = len(examples)

    def row(position: int) -> dict[str, np.ndarray]:
        real = position < count
        example = examples[min(position, count - 1)]
        return {**example, "id": example["id"] if real else np.int64(-1), "mask": np.bool_(real)}

    batches = -(-count // batch_size)
    padded = grain.MapDataset.range(batches * batch_size).map(row)
    return GlobalBatches(padded, batch_size, rows, batches, read_threads)


def _check_rows(rows: Sequence[int] | None, batch_size: int) -> np.ndarray:
    """`rows` as sorted unique int64 positions in [0, batch_size) (None: all of them)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if rows is None:
        return np.arange(batch_size)
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 1 or not len(rows) or np.any(np.diff(rows) <= 0):
        raise ValueError(f"rows must be increasing positions in the batch, got {rows}")
    if rows[0] < 0 or rows[-1] >= batch_size:
        raise ValueError(f"rows must lie in [0, {batch_size}), got {rows[0]}..{rows[-1]}")
    return rows


def _read_options(read_threads: int) -> grain.ReadOptions:
    """Thread prefetch of transformed examples. 0 reads in the consumer's thread: fastest for
    in-memory sources and cheap transforms (on 2 cores grain's default of 16 threads was 18x
    slower than 0 on the built-in pool); raise it for transforms that decode files."""
    if read_threads < 0:
        raise ValueError(f"read_threads must be >= 0, got {read_threads}")
    return grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=max(1, 64 * read_threads)
    )


def _dataset(source: Source) -> grain.MapDataset:
    """`source` as a grain MapDataset (random access)."""
    if len(source) == 0:
        raise ValueError(f"{source!r} is empty")
    return grain.MapDataset.source(source)


def _with_id(transform: Transform | None) -> Callable[[Example], dict[str, np.ndarray]]:
    """`transform` (None: `numeric_fields`) followed by adding the example's `id` as int64."""
    transform = transform or numeric_fields

    def apply(example: Example) -> dict[str, np.ndarray]:
        return {**transform(example), "id": np.int64(example["id"])}

    return apply


def stack_examples(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks a list of flat dicts of arrays into one dict of arrays with a leading batch axis."""
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def padded_batches(rows: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape batches of in-memory columns, in order, padded as `eval_iterator` pads.

    Args:
      rows: equal-length arrays (N, ...), e.g. `id`, `image`, `tokens` of a pool chunk.
      batch_size: rows per batch.
    Yields:
      ceil(N / batch_size) dicts with every key of `rows` (batch_size, ...) plus `mask` bool
      (batch_size,), True for real rows. Full batches are slices of `rows`; the last batch is
      padded by repeating the last row, with `mask` False and (when `rows` has one) `id` -1.
      Nothing is yielded for N = 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    count = len(next(iter(rows.values()))) if rows else 0
    for start in range(0, count, batch_size):
        positions = np.arange(start, start + batch_size)
        mask = positions < count
        take = slice(start, start + batch_size) if mask[-1] else np.minimum(positions, count - 1)
        batch = {key: value[take] for key, value in rows.items()}
        if "id" in batch:
            batch["id"] = np.where(mask, batch["id"], -1)
        yield {**batch, "mask": mask}
