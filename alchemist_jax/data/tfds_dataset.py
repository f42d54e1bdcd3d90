"""TFDS array_record datasets: write any sources as one, and read one back as a `Source`.

Works without TensorFlow: datasets are written by a `GeneratorBasedBuilder` with
`Tensor`/`Scalar`/`Text` features in the array_record format and read with random access through
`as_data_source` (which is all TFDS supports without TensorFlow; `tfds.load`, `as_dataset` and the
`Image` feature need it).

A dataset written by `prepare_tfds` has the layout `<out_dir>/<name>/<version>/` holding the usual
TFDS files plus `alchemist_ids_<split>.npy` and, when the examples have labels,
`alchemist_labels_<split>.npy` (int64 (N,) each, in record order), so that `TfdsSource.ids` and
`.labels` load one small file instead of decoding every record.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered
from tensorflow_datasets.core.utils import tqdm_utils

from alchemist_jax.data.sources import ArraySource, Source
from alchemist_jax.runtime import progress

_INFO_FILE = "dataset_info.json"
_TEXT_KEYS = ("caption", "source")
_FLOAT_KEYS = ("latent", "latent_std", "text_embedding")
_BOOL_KEYS = ("token_mask",)  # the mask of a precomputed `text_embedding` (L,)
_READ_CHUNK = 1024


def _sidecar(dataset_dir: pathlib.Path, column: str, split: str) -> pathlib.Path:
    return dataset_dir / f"alchemist_{column}_{split}.npy"


# --------------------------------------------------------------------------------------- writing


def _features(splits: Mapping[str, Source]) -> tfds.features.FeaturesDict:
    """The features of the first example of the first split (see `prepare_tfds`)."""
    first_name, first = next(iter(splits.items()))
    example = first[0]
    if "id" not in example:
        raise ValueError(f"examples of split {first_name!r} have no 'id'")
    unknown = set(example) - {"id", "image", "label", *_TEXT_KEYS, *_FLOAT_KEYS, *_BOOL_KEYS}
    if unknown:
        raise ValueError(
            f"examples of split {first_name!r} have unsupported keys {sorted(unknown)}"
        )

    features: dict[str, tfds.features.FeatureConnector] = {"id": tfds.features.Scalar(np.int64)}
    if "image" in example:
        image = np.asarray(example["image"])
        if image.ndim != 3:
            raise ValueError(f"images must be (H, W, C), got shape {image.shape}")
        # A fixed shape only where it is known without reading every example.
        arrays = [
            s.images for s in splits.values() if isinstance(s, ArraySource) and s.images is not None
        ]
        shapes = {a.shape[1:] for a in arrays}
        if len(arrays) == len(splits) and len(shapes) == 1:
            shape = shapes.pop()
        else:
            shape = (None, None, image.shape[2])
        # zlib: lossless and needed for a dynamic shape; it also makes MNIST-like data smaller
        # and faster to read than no encoding.
        features["image"] = tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="zlib")
    if "label" in example:
        features["label"] = tfds.features.Scalar(np.int64)
    for key in _TEXT_KEYS:
        if key in example:
            features[key] = tfds.features.Text()
    for key in _FLOAT_KEYS:
        if key in example:
            features[key] = tfds.features.Tensor(shape=np.shape(example[key]), dtype=np.float32)
    for key in _BOOL_KEYS:
        if key in example:
            features[key] = tfds.features.Tensor(shape=np.shape(example[key]), dtype=np.bool_)
    return tfds.features.FeaturesDict(features)


def _encode(example: Mapping[str, Any], keys: frozenset[str], where: str) -> dict[str, Any]:
    if set(example) != keys:
        raise ValueError(
            f"{where} has keys {sorted(example)}, the first example had {sorted(keys)}"
        )
    out = dict(example)
    out["id"] = int(example["id"])
    if "image" in out:
        out["image"] = np.asarray(out["image"], dtype=np.uint8)
    if "label" in out:
        out["label"] = int(out["label"])
    for key in _FLOAT_KEYS:
        if key in out:
            out[key] = np.asarray(out[key], dtype=np.float32)
    for key in _BOOL_KEYS:
        if key in out:
            out[key] = np.asarray(out[key], dtype=np.bool_)
    return out


@contextlib.contextmanager
def _tfds_progress_bars_off() -> Iterator[None]:
    """Hides TFDS's own nested bars (they have no totals) while ours runs; restores the setting."""
    was_active = tqdm_utils._active  # noqa: SLF001 - TFDS has no getter for this switch
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(was_active)


def _builder_class(
    name: str,
    version: str,
    features: tfds.features.FeaturesDict,
    splits: Mapping[str, Source],
    columns: dict[str, dict[str, list[int]]],
):
    """A GeneratorBasedBuilder named `name` that writes `splits` in order and records, per split,
    the id (and label) of every record into `columns[split]`."""
    keys = frozenset(features.keys())

    with registered.skip_registration():  # a fresh class per call; keep the global registry clean

        class _Builder(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version(version)
            # No code folder (it only locates download checksums, and there are no downloads).
            # TFDS's default looks it up through `importlib_resources`, which tfds 4.9.10 only
            # installs for Python < 3.9, so it fails for a builder defined in a package.
            code_path = None

            def _info(self) -> tfds.core.DatasetInfo:
                return tfds.core.DatasetInfo(
                    builder=self,
                    description="Written by alchemist_jax.data.tfds_dataset.prepare_tfds from "
                    + ", ".join(f"{k}={s.name}" for k, s in splits.items()),
                    features=features,
                    disable_shuffling=True,  # record i is example i of the source
                )

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(split) for split in splits}

            def _generate_examples(self, split: str):
                source = splits[split]
                split_columns = columns.setdefault(split, {"id": [], "label": []})
                for i in progress.bar(range(len(source)), desc=f"{name}/{split}", unit="ex"):
                    example = _encode(source[i], keys, f"example {i} of split {split!r}")
                    split_columns["id"].append(example["id"])
                    if "label" in example:
                        split_columns["label"].append(example["label"])
                    yield i, example

    _Builder.name = name
    return _Builder


def prepare_tfds(
    splits: Mapping[str, Source],
    out_dir: str | pathlib.Path,
    name: str = "alchemist_dataset",
    version: str = "1.0.0",
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes sources as one TFDS dataset (array_record) and returns its directory.

    The features come from the first example of the first split: `id` int64 scalar; `image` uint8
    (H, W, C) — a fixed shape when every split is an `ArraySource` with the same image shape,
    else (None, None, C); `label` int64 scalar; `caption`, `source` text; `latent`,
    `latent_std`, `text_embedding` float32 and `token_mask` bool with the first example's shape.
    Keys an example lacks are not features; every example must have exactly the same keys.
    Records keep the source order, so record i of a split is example i of its source, with its id.

    The dataset is built in a hidden temporary folder inside `out_dir` and moved into place when
    complete, so an interrupted run leaves no half-written dataset behind.

    Args:
      splits: split name -> source, e.g. {"train": ..., "validation": ...}.
      out_dir: the TFDS data dir; the dataset goes to `out_dir/name/version`.
      name: the dataset name (lower snake_case).
      version: "MAJOR.MINOR.PATCH".
      overwrite: replace an existing `out_dir/name/version` instead of failing.

    Returns:
      `out_dir/name/version`, the directory `TfdsSource` and `tfds.builder_from_directory` read.

    Raises:
      FileExistsError: the target exists and `overwrite` is False.
      ValueError: bad name, no splits, an empty split, unsupported or inconsistent keys, or ids
        that repeat within a split.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"dataset name {name!r} must be lower snake_case, e.g. 'my_dataset'")
    if not splits:
        raise ValueError("no splits to write")
    empty = [split for split, source in splits.items() if len(source) == 0]
    if empty:
        raise ValueError(f"splits {empty} are empty; TFDS cannot store an empty split")
    out_dir = pathlib.Path(out_dir)
    target = out_dir / name / version
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )

    features = _features(splits)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-{version}.tmp-", dir=out_dir))
    try:
        columns: dict[str, dict[str, list[int]]] = {}
        builder = _builder_class(name, version, features, splits, columns)(
            data_dir=str(tmp / "data"), file_format="array_record"
        )
        with _tfds_progress_bars_off():
            builder.download_and_prepare(download_dir=str(tmp / "downloads"))
        built = pathlib.Path(builder.data_dir)
        for split, split_columns in columns.items():
            ids = np.asarray(split_columns["id"], dtype=np.int64)
            if len(np.unique(ids)) != len(ids):
                raise ValueError(f"split {split!r} has repeated ids")
            np.save(_sidecar(built, "ids", split), ids)
            if "label" in features:
                np.save(
                    _sidecar(built, "labels", split),
                    np.asarray(split_columns["label"], dtype=np.int64),
                )

        target.parent.mkdir(parents=True, exist_ok=True)
        old = tmp / "replaced"
        if target.exists():
            target.rename(old)
        try:
            built.rename(target)
        except BaseException:
            if old.exists():
                old.rename(target)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------- reading


def _candidates(path: pathlib.Path) -> list[pathlib.Path]:
    """Dataset directories (holding dataset_info.json) at `path` or one or two levels below it,
    skipping hidden folders and TFDS's `incomplete.*` build folders."""
    if (path / _INFO_FILE).is_file():
        return [path]
    found = []
    for pattern in (f"*/{_INFO_FILE}", f"*/*/{_INFO_FILE}"):
        for info in sorted(path.glob(pattern)):
            parts = info.relative_to(path).parts[:-1]
            if not any(p.startswith((".", "incomplete.")) for p in parts):
                found.append(info.parent)
    return found


def is_tfds_dir(path: str | pathlib.Path) -> bool:
    """True if `path` is a TFDS dataset directory (holding dataset_info.json) or a folder with
    dataset directories one or two levels below it (`<name>/<version>/` or `<version>/`)."""
    path = pathlib.Path(path)
    return path.is_dir() and bool(_candidates(path))


def find_tfds_dir(path: str | pathlib.Path) -> pathlib.Path:
    """The one TFDS dataset directory at or below `path` (see `is_tfds_dir`).

    Raises:
      ValueError: `path` holds no TFDS dataset, or several (the message lists them).
    """
    path = pathlib.Path(path)
    found = _candidates(path) if path.is_dir() else []
    if not found:
        raise ValueError(
            f"{path} is not a TFDS dataset directory (no {_INFO_FILE} at it or in "
            f"<name>/<version>/ below it)"
        )
    if len(found) > 1:
        raise ValueError(
            f"{path} holds several TFDS datasets, pass one of: " + ", ".join(str(p) for p in found)
        )
    return found[0]


class TfdsSource(Source):
    """Random access to one split of a TFDS array_record dataset, as examples of our format.

    Any TFDS dataset readable without TensorFlow works, not only those `prepare_tfds` writes:
    `caption`/`source` (any Text feature) come back as str, tensors as numpy arrays of their
    feature dtype, `id` as np.int64 (the record index when the dataset has no `id` feature),
    `label` as np.int64, and a 2-D `image` gains a channel axis, (H, W) -> (H, W, 1).

    Args:
      path: the dataset directory (`<data_dir>/<name>/<version>`) or a folder with exactly one
        dataset directory one or two levels below it.
      split: e.g. "train".

    Raises:
      ValueError: `path` is not a TFDS dataset directory, or `split` is not one of its splits.
    """

    def __init__(self, path: str | pathlib.Path, split: str):
        self.dataset_dir = find_tfds_dir(path)
        builder = tfds.builder_from_directory(str(self.dataset_dir))
        available = list(builder.info.splits.keys())
        if split not in available:
            raise ValueError(
                f"split {split!r} not in TFDS dataset {self.dataset_dir}; "
                f"available: {', '.join(available)}"
            )
        self.name = f"{builder.info.name}/{split}"
        self.split = split
        self._data = builder.as_data_source(split)
        self._features = dict(builder.info.features.items())
        self._text_keys = {
            k for k, f in self._features.items() if isinstance(f, tfds.features.Text)
        }
        self._dtypes = {
            k: f.np_dtype
            for k, f in self._features.items()
            if isinstance(f, tfds.features.Tensor) and k not in self._text_keys
        }
        self._ids: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._data)

    def _convert(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
        example: dict[str, Any] = {}
        for key, value in record.items():
            if key in self._text_keys:
                value = value.decode("utf-8")
            elif key in self._dtypes:
                value = np.asarray(value, dtype=self._dtypes[key])
            example[key] = value
        example["id"] = np.int64(example["id"] if "id" in example else index)
        if "label" in example:
            example["label"] = np.int64(example["label"])
        if "image" in example and example["image"].ndim == 2:
            example["image"] = example["image"][..., None]
        return example

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        return self._convert(index, self._data[index])

    def _column(self, key: str) -> np.ndarray:
        """int64 (N,): feature `key` of every record, from the sidecar file if there is one."""
        sidecar = _sidecar(self.dataset_dir, f"{key}s", self.split)
        if sidecar.is_file():
            values = np.load(sidecar)
            if len(values) != len(self):
                raise ValueError(
                    f"{sidecar} has {len(values)} rows, split {self.split!r} has "
                    f"{len(self)}; the dataset directory was modified"
                )
            return values.astype(np.int64, copy=False)
        values = np.empty(len(self), dtype=np.int64)
        for start in progress.bar(
            range(0, len(self), _READ_CHUNK),
            desc=f"{self.name}: reading {key}s",
            unit="chunk",
            leave=False,
        ):
            indices = list(range(start, min(start + _READ_CHUNK, len(self))))
            values[start : start + len(indices)] = [
                r[key] for r in self._data.__getitems__(indices)
            ]
        return values

    @property
    def ids(self) -> np.ndarray:
        """int64 (N,): the id of every record (record indices when there is no `id` feature)."""
        if self._ids is None:
            self._ids = (
                self._column("id")
                if "id" in self._features
                else np.arange(len(self), dtype=np.int64)
            )
        return self._ids

    @property
    def labels(self) -> np.ndarray | None:
        """int64 (N,) labels, or None when the dataset has no `label` feature."""
        if self._labels is None and "label" in self._features:
            self._labels = self._column("label")
        return self._labels
