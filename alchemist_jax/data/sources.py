"""Random-access sources of examples.

An **example** is a dict with at least
  - `id`: int64 scalar, unique within the source and stable across runs and machines,
  - `image`: uint8 array (H, W, C),
  - `caption`: str,
and optionally `label` (int64 class index), `source` (str, where it came from), `latent`
(float32 array, precomputed by the user's VAE) and `text_embedding` (float32 array, precomputed by
the user's text encoder). Precomputed sources may omit `image` and/or `caption` (docs/DATA.md).

A **source** has `__len__` and `__getitem__(index) -> example` (so grain can read it with random
access), plus `ids` (int64 (N,), the id of every index) and `labels` (int64 (N,) or None).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

# Rows of each column that `ArraySource.fingerprint` reads (besides every id).
FINGERPRINT_SAMPLE = 4096


class Source:
    """Base class of every source: random access to examples by index in [0, len)."""

    name: str = "source"

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def ids(self) -> np.ndarray:
        """int64 (N,): the id of the example at each index (reads every example by default)."""
        return np.array([self[i]["id"] for i in range(len(self))], dtype=np.int64)

    @property
    def labels(self) -> np.ndarray | None:
        """int64 (N,) class labels, or None when the source has none."""
        return None

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} of length {len(self)}")
        return index

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {len(self)} examples>"


def fingerprint_rows(count: int, sample: int = FINGERPRINT_SAMPLE) -> np.ndarray:
    """The sorted positions (at most `sample`, evenly spaced over 0..count-1) whose contents a
    source's `fingerprint` hashes."""
    return np.unique(np.linspace(0, max(count - 1, 0), min(sample, count)).astype(np.int64))


class ArraySource(Source):
    """A source held in memory as arrays, one row per example.

    Args:
      name: a short description (e.g. "pool/train").
      ids: int64 (N,), unique.
      images: uint8 (N, H, W, C).
      captions: N strings.
      labels: optional int64 (N,).
      origins: optional N strings, the `source` field of each example.
      extra: optional dict of arrays with a leading axis N (e.g. `latent`, `text_embedding`).
    """

    def __init__(
        self,
        name: str,
        ids: np.ndarray,
        images: np.ndarray | None,
        captions: Sequence[str] | None,
        labels: np.ndarray | None = None,
        origins: Sequence[str] | None = None,
        extra: dict[str, np.ndarray] | None = None,
    ):
        self.name = name
        self._ids = np.asarray(ids, dtype=np.int64)
        n = len(self._ids)
        if len(np.unique(self._ids)) != n:
            raise ValueError(f"{name}: ids are not unique")
        if images is not None:
            images = np.asarray(images)
            if images.dtype != np.uint8 or images.ndim != 4 or len(images) != n:
                raise ValueError(
                    f"{name}: images must be uint8 (N, H, W, C) with N={n}, "
                    f"got {images.dtype} {images.shape}"
                )
        self._images = images
        self._captions = list(captions) if captions is not None else None
        self._labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self._origins = list(origins) if origins is not None else None
        self._extra = dict(extra or {})
        for key, column in [
            ("captions", self._captions),
            ("labels", self._labels),
            ("origins", self._origins),
            *self._extra.items(),
        ]:
            if column is not None and len(column) != n:
                raise ValueError(f"{name}: {key} has {len(column)} rows, ids have {n}")

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        example: dict[str, Any] = {"id": self._ids[index]}
        if self._images is not None:
            example["image"] = self._images[index]
        if self._captions is not None:
            example["caption"] = self._captions[index]
        if self._labels is not None:
            example["label"] = self._labels[index]
        if self._origins is not None:
            example["source"] = self._origins[index]
        for key, column in self._extra.items():
            example[key] = column[index]
        return example

    @property
    def ids(self) -> np.ndarray:
        return self._ids

    @property
    def labels(self) -> np.ndarray | None:
        return self._labels

    @property
    def images(self) -> np.ndarray | None:
        """uint8 (N, H, W, C), or None for a precomputed source without pixels."""
        return self._images

    @property
    def captions(self) -> list[str] | None:
        return self._captions

    @property
    def extra(self) -> dict[str, np.ndarray]:
        """The other per-example arrays (leading axis N), e.g. `latent`, `text_embedding`, or the
        preprocessed `image` / `tokens` / `token_mask` of `preprocess.materialize`."""
        return dict(self._extra)

    def fingerprint(self, sample: int = FINGERPRINT_SAMPLE) -> str:
        """sha256 of what the source holds, cheap at any size: the count, every id in order, and
        every array column and caption of up to `sample` rows at evenly spaced positions (a
        resumed run compares it to refuse data that changed under it)."""
        digest = hashlib.sha256(str(len(self)).encode())
        digest.update(np.ascontiguousarray(self._ids).tobytes())
        rows = fingerprint_rows(len(self), sample)
        columns = {"image": self._images, "label": self._labels, **self._extra}
        for key in sorted(k for k, v in columns.items() if v is not None):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(np.asarray(columns[key])[rows]).tobytes())
        if self._captions is not None:
            digest.update("\n".join(self._captions[i] for i in rows).encode())
        return digest.hexdigest()

    def take(self, indices: np.ndarray, name: str | None = None) -> ArraySource:
        """A new ArraySource with the rows at `indices` (in that order)."""
        indices = np.asarray(indices, dtype=np.int64)
        pick = lambda seq: None if seq is None else [seq[i] for i in indices]  # noqa: E731
        return ArraySource(
            name or self.name,
            self._ids[indices],
            None if self._images is None else self._images[indices],
            pick(self._captions),
            None if self._labels is None else self._labels[indices],
            pick(self._origins),
            {k: v[indices] for k, v in self._extra.items()},
        )


def concatenate(name: str, parts: Sequence[ArraySource]) -> ArraySource:
    """Joins ArraySources with the same image shape and fields into one (ids must stay unique)."""

    def column(get):
        values = [get(p) for p in parts]
        if any(v is None for v in values):
            if all(v is None for v in values):
                return None
            raise ValueError(f"{name}: cannot concatenate sources with and without a field")
        return values

    images = column(lambda p: p.images)
    captions = column(lambda p: p.captions)
    labels = column(lambda p: p.labels)
    origins = column(lambda p: p._origins)
    return ArraySource(
        name,
        np.concatenate([p.ids for p in parts]),
        None if images is None else np.concatenate(images),
        None if captions is None else sum(captions, []),
        None if labels is None else np.concatenate(labels),
        None if origins is None else sum(origins, []),
    )


class Subset(Source):
    """The examples of `base` at `indices`, in that order."""

    def __init__(self, base: Source, indices: np.ndarray, part: str):
        self.base, self.indices = base, np.asarray(indices, np.int64)
        self.name = f"{base.name}[{part}]"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.base[int(self.indices[self._check_index(index)])]

    @property
    def ids(self) -> np.ndarray:
        return self.base.ids[self.indices]

    @property
    def labels(self) -> np.ndarray | None:
        labels = self.base.labels
        return None if labels is None else labels[self.indices]
