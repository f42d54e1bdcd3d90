"""User data: Parquet/CSV manifests and image folders, checked once when opened.

A **manifest** is a `.parquet` or `.csv` file with one row per example:
  - an image-path column (`ManifestConfig.image_column`), relative to the manifest's folder or
    absolute,
  - a caption column (`caption_column`), text; in CSV it is read as bytes so that a caption that
    is not UTF-8 is caught row by row,
  - optionally an integer id column (`id_column`); without one the id is the 0-based row index,
  - optionally (Parquet only) precomputed `latent` and/or `text_embedding` columns, list<float>
    holding each array flattened. Their shapes live in the schema metadata under
    `SHAPES_METADATA_KEY` as JSON, e.g. `{"latent": [4, 8, 8]}`; a column without a shape there
    is 1-D. With `latent` the image column may be absent, with `text_embedding` the caption
    column may be absent.

An **image folder** holds image files (`IMAGE_EXTENSIONS`, searched recursively), each with its
caption in a sidecar text file of the same stem (`cat.png` -> `cat.txt`). Files are ordered by
relative path and the id of a file is its index in that order.

Every row is checked once at construction (the image fully decoded). A bad row is skipped with one
warning line, or raises `BadSampleError` with `on_bad_sample="error"`; skipped rows are listed in
`bad_samples` and, given a `report_dir`, in `<report_dir>/bad_samples.parquet`. The reasons are
the fixed strings below. A problem with the manifest itself (missing or unreadable file, missing
column) raises `ManifestError`.

Size: the manifest and image-folder sources share every per-row check (decoding, modes,
sizes, captions, ids) and the bad-sample report; splitting them would duplicate those checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image, ImageFile, ImageOps

from alchemist_jax.config import ManifestConfig
from alchemist_jax.data.sources import Source
from alchemist_jax.runtime import progress
from alchemist_jax.runtime.io import atomic_write_parquet

logger = logging.getLogger("alchemist_jax.data")

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
PRECOMPUTED_COLUMNS = ("latent", "text_embedding")
SHAPES_METADATA_KEY = b"alchemist_jax.shapes"
BAD_SAMPLES_FILE = "bad_samples.parquet"
BAD_SAMPLES_SCHEMA = pa.schema(
    [
        ("file", pa.string()),  # the manifest, or the image folder
        ("row", pa.int64()),  # 0-based row in the manifest / index in the folder listing
        ("path", pa.string()),  # the image path as written (relative to the manifest or folder)
        ("reason", pa.string()),
    ]
)

# Reasons a sample is bad (plus "null <column>" and "<column> size does not match its shape"
# for the precomputed columns).
MISSING_FILE = "missing file"
EMPTY_FILE = "empty file"
NOT_AN_IMAGE = "unreadable or not an image"
TRUNCATED_IMAGE = "truncated image"
ZERO_SIZE_IMAGE = "zero-size image"
IMAGE_TOO_LARGE = "image too large"
UNSUPPORTED_MODE = "unsupported image mode"
NULL_IMAGE_PATH = "null image path"
NULL_CAPTION = "null caption"
NULL_LABEL = "null label"
EMPTY_CAPTION = "empty caption"
NON_UTF8_CAPTION = "non-UTF-8 caption"
MISSING_CAPTION_FILE = "missing caption file"
UNREADABLE_CAPTION_FILE = "unreadable caption file"
NULL_ID = "null id"
DUPLICATE_ID = "duplicate id"

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ManifestError(ValueError):
    """The manifest or image folder itself is unusable; the one-line message names the file."""


class BadSampleError(ValueError):
    """A sample is bad and `on_bad_sample` is "error": "<file>: row <row>: <path>: <reason>"."""


class _Rejected(Exception):
    """Internal: a sample failed a check; `args[0]` is one of the reason strings."""

    @property
    def reason(self) -> str:
        return self.args[0]


# ----------------------------------------------------------------------------------------------
# Images and captions
# ----------------------------------------------------------------------------------------------


def _load_rgb(path: Path, max_pixels: int) -> np.ndarray:
    """Decodes an image file into uint8 (H, W, 3) RGB.

    Grayscale and palette images are expanded to RGB, transparent images are composited onto
    white, 16-bit images keep their top 8 bits (I;16 value >> 8) and CMYK is converted.

    Raises:
      _Rejected: with one of the reason strings when the file is missing, empty, not an image,
        truncated, of zero size, larger than `max_pixels` (checked from the header before
        decoding) or in a mode that cannot become RGB.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _Rejected(MISSING_FILE) from None
    except OSError:
        raise _Rejected(NOT_AN_IMAGE) from None
    if size == 0:
        raise _Rejected(EMPTY_FILE)
    with _open_image(path) as image:
        width, height = image.size
        if width == 0 or height == 0:
            raise _Rejected(ZERO_SIZE_IMAGE)
        if width * height > max_pixels:
            raise _Rejected(IMAGE_TOO_LARGE)
        try:
            image.load()
        except Exception:  # PIL's decoders raise OSError, SyntaxError, ValueError, ...
            raise _Rejected(TRUNCATED_IMAGE) from None
        try:
            return _to_rgb(image)
        except (ValueError, OSError):
            raise _Rejected(UNSUPPORTED_MODE) from None


def _open_image(path: Path) -> Image.Image:
    """Reads the header of an image file (pixels are decoded later by `load`)."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError:
        raise _Rejected(IMAGE_TOO_LARGE) from None
    except Exception:  # PIL raises many exception types on malformed headers
        raise _Rejected(NOT_AN_IMAGE) from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) pixels of a decoded image of any mode (see `_load_rgb`), upright as its
    EXIF orientation tag says (phone photos)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        gray = (values >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def _caption_text(raw: str | bytes | None) -> str:
    """The stripped caption; bytes are decoded as UTF-8 (a leading byte-order mark is dropped)."""
    if raw is None:
        raise _Rejected(NULL_CAPTION)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise _Rejected(NON_UTF8_CAPTION) from None
    text = raw.strip()
    if not text:
        raise _Rejected(EMPTY_CAPTION)
    return text


@contextlib.contextmanager
def _truncated_images_rejected() -> Iterator[None]:
    """Makes PIL raise on truncated files for the duration (LOAD_TRUNCATED_IMAGES is global)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


# ----------------------------------------------------------------------------------------------
# Checked sources
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Kept:
    """A row that passed every check."""

    row: int
    id: int
    path: str | None  # None: no image column (precomputed latents)
    caption: str | None  # None: no caption column (precomputed text embeddings)


class _CheckedSource(Source):
    """A source whose rows are checked once, with the bad-sample policy of `ManifestConfig`.

    Subclasses set `name` and `_config`, implement `_check_row`, `_row_path` and `_resolve`, and
    call `_check_rows` at the end of `__init__`.
    """

    _config: ManifestConfig

    def _check_row(self, row: int) -> _Kept:
        """Checks one row; raises _Rejected when it is bad."""
        raise NotImplementedError

    def _row_path(self, row: int) -> str | None:
        """The image path written in a row (for reports)."""
        raise NotImplementedError

    def _resolve(self, path: str) -> Path:
        """Where the image path of a row points to."""
        raise NotImplementedError

    def _precomputed(self, row: int) -> dict[str, np.ndarray]:
        """The precomputed arrays of a row, by key."""
        return {}

    def _check_rows(self, num_rows: int, report_dir: str | os.PathLike | None) -> None:
        self._kept: list[_Kept] = []
        bad: list[tuple[int, str | None, str]] = []
        rows_bar = progress.bar(range(num_rows), desc=f"checking {self.name}", unit="sample")
        with _truncated_images_rejected(), rows_bar as rows:
            for row in rows:
                try:
                    self._kept.append(self._check_row(row))
                except _Rejected as rejected:
                    bad.append(self._reject(row, rejected.reason))
        self._ids = np.array([kept.id for kept in self._kept], dtype=np.int64)
        self._bad_samples = pa.table(
            {
                "file": [self.name] * len(bad),
                "row": [row for row, _, _ in bad],
                "path": [path for _, path, _ in bad],
                "reason": [reason for _, _, reason in bad],
            },
            schema=BAD_SAMPLES_SCHEMA,
        )
        self._summarize(num_rows, report_dir)

    def _where(self, row: int, path: str | None) -> str:
        return f"{self.name}: row {row}: " + (f"{path}: " if path is not None else "")

    def _reject(self, row: int, reason: str) -> tuple[int, str | None, str]:
        path = self._row_path(row)
        if self._config.on_bad_sample == "error":
            raise BadSampleError(self._where(row, path) + reason)
        logger.warning("%s%s (skipped)", self._where(row, path), reason)
        return row, path, reason

    def _summarize(self, num_rows: int, report_dir: str | os.PathLike | None) -> None:
        num_bad = self._bad_samples.num_rows
        message = f"{self.name}: {num_bad} bad samples skipped of {num_rows}"
        if report_dir is not None:
            report = Path(report_dir) / BAD_SAMPLES_FILE
            atomic_write_parquet(report, self._bad_samples)
            message += f"; see {report}"
        logger.log(logging.WARNING if num_bad else logging.INFO, message)

    def __len__(self) -> int:
        return len(self._kept)

    def __getitem__(self, index: int) -> dict[str, Any]:
        kept = self._kept[self._check_index(index)]
        example: dict[str, Any] = {"id": np.int64(kept.id)}
        if kept.path is not None:
            example["image"] = self._load_kept_image(kept)
            example["source"] = kept.path
        if kept.caption is not None:
            example["caption"] = kept.caption
        example.update(self._precomputed(kept.row))
        return example

    def _load_kept_image(self, kept: _Kept) -> np.ndarray:
        try:
            return _load_rgb(self._resolve(kept.path), self._config.max_image_pixels)
        except _Rejected as rejected:
            where = self._where(kept.row, kept.path)
            raise BadSampleError(f"{where}{rejected.reason} (changed since checked)") from None

    @property
    def ids(self) -> np.ndarray:
        """int64 (N,): the id of each kept example."""
        return self._ids

    @property
    def bad_samples(self) -> pa.Table:
        """The skipped rows, in `BAD_SAMPLES_SCHEMA` (file, row, path, reason)."""
        return self._bad_samples


# ----------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _PrecomputedColumn:
    """A list<float> column of flattened arrays, each reshaped to `shape` (None: 1-D)."""

    name: str
    values: pa.ChunkedArray
    shape: tuple[int, ...] | None

    def check(self, row: int) -> None:
        item = self.values[row]
        if not item.is_valid:
            raise _Rejected(f"null {self.name}")
        if self.shape is not None and len(item) != math.prod(self.shape):
            raise _Rejected(f"{self.name} size does not match its shape")

    def read(self, row: int) -> np.ndarray:
        flat = self.values[row].values.to_numpy(zero_copy_only=False).astype(np.float32)
        return flat.reshape(self.shape or (-1,))


class ManifestSource(_CheckedSource):
    """Examples listed in a Parquet or CSV manifest (see the module docstring for the format).

    Each example has `id` (int64), `image` (uint8 (H, W, 3) RGB), `caption` (str, stripped) and
    `source` (the image path as written in the manifest); precomputed manifests add `latent`
    and/or `text_embedding` (float32, shaped as the schema metadata says) and may lack `image`
    (then also `source`) or `caption`.

    Args:
      path: the `.parquet` or `.csv` manifest.
      config: column names and the bad-sample policy.
      report_dir: if given, the skipped rows are written to `<report_dir>/bad_samples.parquet`
        (also when there are none).
    Raises:
      ManifestError: the manifest is missing, unreadable, of another type, or lacks a column.
      BadSampleError: a row is bad and `config.on_bad_sample` is "error".
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: ManifestConfig = ManifestConfig(),
        report_dir: str | os.PathLike | None = None,
    ):
        self.path = Path(path)
        self.name = str(path)
        self._config = config
        table = _read_manifest(self.path, config)
        shapes = self._shapes(table.schema)
        self._precomputed_columns = [
            _PrecomputedColumn(name, self._list_column(table, name), shapes.get(name))
            for name in PRECOMPUTED_COLUMNS
            if name in table.column_names
        ]
        keys = {column.name for column in self._precomputed_columns}
        self._paths = self._column(
            table,
            config.image_column,
            "image_column",
            _is_string,
            "strings (image paths)",
            optional="latent" in keys,
        )
        self._captions = self._column(
            table,
            config.caption_column,
            "caption_column",
            _is_text,
            "strings or bytes",
            optional="text_embedding" in keys,
        )
        self._row_ids = (
            list(range(table.num_rows))
            if config.id_column is None
            else self._column(table, config.id_column, "id_column", pa.types.is_integer, "integers")
        )
        self._row_labels = (
            None
            if config.label_column is None
            else self._column(
                table, config.label_column, "label_column", pa.types.is_integer, "integers"
            )
        )
        self._duplicate_rows = _later_duplicates(self._row_ids)
        self._check_rows(table.num_rows, report_dir)

    def _column(
        self,
        table: pa.Table,
        name: str,
        config_key: str,
        has_type,
        expected: str,
        optional: bool = False,
    ) -> list | None:
        """The values of a configured column, or None when it is optional and absent."""
        if name not in table.column_names:
            if optional:
                return None
            raise ManifestError(
                f"{self.name}: column {name!r} (data.manifest.{config_key}) not found; "
                f"columns are: {', '.join(table.column_names)}"
            )
        column = table.column(name)
        if not has_type(column.type):
            raise ManifestError(
                f"{self.name}: column {name!r} must hold {expected}, got {column.type}"
            )
        return column.to_pylist()

    def _list_column(self, table: pa.Table, name: str) -> pa.ChunkedArray:
        column = table.column(name)
        kind = column.type
        if not (_is_list(kind) and pa.types.is_floating(kind.value_type)):
            raise ManifestError(f"{self.name}: column {name!r} must hold list<float>, got {kind}")
        return column

    def _shapes(self, schema: pa.Schema) -> dict[str, tuple[int, ...]]:
        """Shapes of the precomputed columns from the schema metadata ({} when there are none)."""
        raw = (schema.metadata or {}).get(SHAPES_METADATA_KEY)
        if raw is None:
            return {}
        try:
            shapes = json.loads(raw)
            return {str(name): tuple(int(n) for n in shape) for name, shape in shapes.items()}
        except (ValueError, TypeError, AttributeError):
            raise ManifestError(
                f"{self.name}: schema metadata {SHAPES_METADATA_KEY.decode()} must be a JSON "
                f"mapping column -> shape list, got {raw[:100]!r}"
            ) from None

    def _check_row(self, row: int) -> _Kept:
        row_id = self._row_ids[row]
        if row_id is None:
            raise _Rejected(NULL_ID)
        if row in self._duplicate_rows:
            raise _Rejected(DUPLICATE_ID)
        path = self._row_path(row)
        if self._paths is not None and path is None:
            raise _Rejected(NULL_IMAGE_PATH)
        if self._row_labels is not None and self._row_labels[row] is None:
            raise _Rejected(NULL_LABEL)
        caption = None if self._captions is None else _caption_text(self._captions[row])
        for column in self._precomputed_columns:
            column.check(row)
        if path is not None:
            _load_rgb(self._resolve(path), self._config.max_image_pixels)
        return _Kept(row=row, id=row_id, path=path, caption=caption)

    def _row_path(self, row: int) -> str | None:
        """The image path of a row; None when it is null or empty (CSV has no nulls for text)."""
        return None if self._paths is None else self._paths[row] or None

    def _resolve(self, path: str) -> Path:
        return self.path.parent / path

    def _precomputed(self, row: int) -> dict[str, np.ndarray]:
        return {column.name: column.read(row) for column in self._precomputed_columns}

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = super().__getitem__(index)
        if self._row_labels is not None:
            example["label"] = np.int64(self._row_labels[self._kept[index].row])
        return example

    @property
    def labels(self) -> np.ndarray | None:
        """int64 (N,): the `data.manifest.label_column` value of each kept row, or None."""
        if self._row_labels is None:
            return None
        return np.array([self._row_labels[kept.row] for kept in self._kept], np.int64)


def _read_manifest(path: Path, config: ManifestConfig) -> pa.Table:
    """Reads a Parquet or CSV manifest; CSV captions as binary, image paths as strings."""
    kind = {".parquet": "Parquet", ".csv": "CSV"}.get(path.suffix.lower())
    if kind is None:
        raise ManifestError(
            f"{path}: unsupported manifest type {path.suffix!r}; expected .parquet or .csv"
        )
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    try:
        if kind == "Parquet":
            return pq.read_table(path)
        column_types = {config.image_column: pa.string(), config.caption_column: pa.binary()}
        for column in (config.id_column, config.label_column):
            if column is not None:
                column_types[column] = pa.int64()
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=column_types))
    except (pa.ArrowException, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ManifestError(f"{path}: cannot read {kind} manifest: {first_line}") from None


def _later_duplicates(ids: list[int | None]) -> set[int]:
    """Rows whose id already appeared on an earlier row (nulls are not duplicates)."""
    seen: set[int] = set()
    duplicates = set()
    for row, row_id in enumerate(ids):
        if row_id is None:
            continue
        if row_id in seen:
            duplicates.add(row)
        seen.add(row_id)
    return duplicates


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_text(kind: pa.DataType) -> bool:
    return _is_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _is_list(kind: pa.DataType) -> bool:
    return (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    )


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------


class ImageFolderSource(_CheckedSource):
    """Images in a folder (recursively), each captioned by a sidecar `<stem>.txt`.

    Files with an extension in `IMAGE_EXTENSIONS` are sorted by relative path; the id of a file is
    its index in that order, counted before bad files are skipped so ids stay stable when a file
    goes bad. Examples are as in `ManifestSource`, with `source` the path relative to the folder.
    In bad-sample reports `file` is the folder and `row` the index.

    Args:
      path: the folder.
      config: the bad-sample policy (`on_bad_sample`, `max_image_pixels`; column names unused).
      report_dir: as in `ManifestSource`.
    Raises:
      ManifestError: the folder is missing or holds no image files.
      BadSampleError: a file is bad and `config.on_bad_sample` is "error".
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: ManifestConfig = ManifestConfig(),
        report_dir: str | os.PathLike | None = None,
    ):
        self.path = Path(path)
        self.name = str(path)
        self._config = config
        if not self.path.is_dir():
            raise ManifestError(f"{path}: image folder not found")
        self._files = sorted(
            file.relative_to(self.path).as_posix()
            for file in self.path.rglob("*")
            if file.suffix.lower() in IMAGE_EXTENSIONS and file.is_file()
        )
        if not self._files:
            raise ManifestError(
                f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder"
            )
        self._check_rows(len(self._files), report_dir)

    def _check_row(self, row: int) -> _Kept:
        path = self._files[row]
        caption = _caption_text(_read_sidecar(self._resolve(path).with_suffix(".txt")))
        _load_rgb(self._resolve(path), self._config.max_image_pixels)
        return _Kept(row=row, id=row, path=path, caption=caption)

    def _row_path(self, row: int) -> str:
        return self._files[row]

    def _resolve(self, path: str) -> Path:
        return self.path / path


def _read_sidecar(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _Rejected(MISSING_CAPTION_FILE) from None
    except OSError:
        raise _Rejected(UNREADABLE_CAPTION_FILE) from None
