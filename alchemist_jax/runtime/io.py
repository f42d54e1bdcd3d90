"""Files: atomic writes, readers whose errors name the file, id joins, complete-artefact checks.

Every output of the project is written through a temporary file in the same folder and a rename,
so a killed job never leaves a partial file under the final name, and a rerun finds either the
old complete file or the new one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file and a rename (never a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as error:
        raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, value: Any) -> None:
    """Writes `value` as indented JSON (newline-terminated) to `path`, atomically."""
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def atomic_write_parquet(path: Path, table) -> None:
    """Writes a pyarrow table to `path` as Parquet, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def atomic_save_figure(path: Path, figure, dpi: int) -> None:
    """Saves a matplotlib figure to `path` as PNG, atomically, and closes it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def read_json(path: Path) -> Any:
    """The JSON value in `path`; ValueError naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def read_parquet(
    path: Path,
    columns: Sequence[str] = (),
    *,
    what: str = "",
    types: Mapping[str, Callable[[Any], bool]] | None = None,
    hint: str = "",
):
    """The pyarrow table of a Parquet file that has every one of `columns` without nulls.

    Args:
      path: the file.
      columns: names that must be present and hold no null values.
      what: how the message calls the file, e.g. "ratings file" (default: just the path).
      types: column name -> a `pyarrow.types` predicate its type must pass (e.g.
        `pa.types.is_integer`).
      hint: appended to the message of a missing column (e.g. how to write such a file).
    Raises:
      ValueError: an unreadable file, a missing column, null values or a column of another
        type (names the file and column).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"{what} {path}".strip()
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise ValueError(f"cannot read {name}: {error}") from None
    for column in columns:
        if column not in table.column_names:
            raise ValueError(
                f"{name} has no column {column!r} (columns: "
                f"{', '.join(table.column_names) or 'none'}){f'; {hint}' if hint else ''}"
            )
        if table.column(column).null_count:
            raise ValueError(
                f"{name}: column {column!r} has {table.column(column).null_count} null values"
            )
    for column, accepts in (types or {}).items():
        if not accepts(table.column(column).type):
            raise ValueError(f"{name}: column {column!r} has type {table.column(column).type}")
    return table


def read_metadata(path: Path) -> dict[str, str]:
    """The key/value metadata of a Parquet file's schema, as strings."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in metadata.items()}


def check_unique_ids(ids: np.ndarray, origin: str) -> np.ndarray:
    """`ids` as int64 (N,); ValueError naming `origin` when an id appears more than once."""
    ids = np.asarray(ids, np.int64)
    values, counts = np.unique(ids, return_counts=True)
    repeated = counts > 1
    if repeated.any():
        raise ValueError(
            f"{origin}: id {int(values[repeated][0])} appears {int(counts[repeated][0])} times"
        )
    return ids


def pool_positions(
    ids: np.ndarray, pool_ids: np.ndarray, origin: str, *, cover: bool = False
) -> np.ndarray:
    """The pool index (int64 (M,)) of each of `ids`, read from file `origin`.

    Args:
      ids: (M,) ids listed by the file, unique.
      pool_ids: (N,) the pool's ids, unique.
      origin: the file, for messages.
      cover: the file must list every pool id (e.g. ratings used as sampling weights).
    Raises:
      ValueError: a repeated id, an id not in the pool, or (cover) a pool id missing; the
        message names `origin` and an example id.
    """
    ids, pool_ids = check_unique_ids(ids, origin), np.asarray(pool_ids, np.int64)
    order = np.argsort(pool_ids, kind="stable")
    found = np.minimum(np.searchsorted(pool_ids[order], ids), max(len(pool_ids) - 1, 0))
    known = (pool_ids[order][found] == ids) if len(pool_ids) else np.zeros(len(ids), bool)
    if not known.all():
        raise ValueError(
            f"{origin}: {int((~known).sum())} of its ids are not in the pool "
            f"(e.g. id {int(ids[~known][0])})"
        )
    if cover and len(ids) < len(pool_ids):
        missing = np.setdiff1d(pool_ids, ids)
        raise ValueError(
            f"{origin}: {len(missing)} pool ids are missing (e.g. id "
            f"{int(missing[0])}); every pool id needs a row"
        )
    return order[found]


def fingerprint(value: Any) -> str:
    """sha256 of the canonical JSON of `value` (sorted keys): what an artefact depends on."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def complete_table(path: Path, ids: np.ndarray, metadata: dict[str, str], columns: Sequence[str]):
    """The table in `path` if it is a finished artefact of exactly `ids` (in order, column `id`)
    under `metadata` (every key/value present in the file's schema metadata) with `columns`;
    None when it is missing, unreadable, or of another pool or configuration (to be made again).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
        stored = read_metadata(path)
    except (OSError, KeyError, pa.ArrowException):
        return None
    if any(stored.get(key) != value for key, value in metadata.items()):
        return None
    if list(table.column_names) != list(columns) or not np.array_equal(
        table.column("id").to_numpy(), ids
    ):
        return None
    return table
