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
which `read_groups` reads back. `pair_metrics` measures the groups against injected copies.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from flax import nnx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from alchemist_jax import config as config_lib
from alchemist_jax import scoring
from alchemist_jax.data import load_splits, preprocess
from alchemist_jax.runtime.io import atomic_write_parquet
from alchemist_jax.data.corrupt import IMAGE_COPYING_KINDS
from alchemist_jax.data.sources import ArraySource
from alchemist_jax.runtime.parallel import model_inputs

log = logging.getLogger("alchemist_jax.dedup")

HASH_BITS = 64
DCT_SIZE = 32  # pHash: the image is resized to 32 x 32 before the DCT
HASH_SIDE = 8  # and the 8 x 8 lowest frequencies give the 64 bits
# Mean squared deviation (in [-1, 1] units) below which an image region counts as constant: the
# rounding residue of a constant float32 image is ~1e-14; one pixel one gray level off in a
# 28 x 28 image gives ~1e-7.
FLAT_ENERGY = 1e-10


# ==============================================================================================
# Fingerprints (pure, jitted)
# ==============================================================================================


def _dct_matrix(size: int) -> np.ndarray:
    """The orthonormal DCT-II matrix (size, size): `C @ x` transforms the columns of x."""
    k, n = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    matrix = np.sqrt(2.0 / size) * np.cos(np.pi * (2 * n + 1) * k / (2 * size))
    matrix[0] /= np.sqrt(2.0)
    return matrix.astype(np.float32)


@jax.jit
def canonicalize(images: jax.Array) -> jax.Array:
    """Brightness- and shift-normalised grayscale images, the input of both fingerprints.

    images: (B, H, W, C) in [-1, 1] -> (B, H, W) float32: the channel mean minus the background
    level (the median of the border pixels), resampled (bilinear, zero outside) so that the
    centre of mass of its absolute value lies at the image centre. Scaling the brightness scales
    the result; shifting the content (with the background filling in) leaves it unchanged. An
    image without content (all background) gives zeros.
    """
    gray = jnp.mean(images, axis=-1)
    height, width = gray.shape[1:]
    border = jnp.concatenate([gray[:, 0], gray[:, -1], gray[:, 1:-1, 0], gray[:, 1:-1, -1]],
                             axis=1)
    content = gray - jnp.median(border, axis=1)[:, None, None]
    mass = jnp.abs(content)
    total = jnp.sum(mass, axis=(1, 2))
    rows, columns = jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32)
    safe = jnp.where(total > 0, total, 1.0)
    centre_y = jnp.where(total > 0, jnp.einsum("bhw,h->b", mass, rows) / safe, (height - 1) / 2)
    centre_x = jnp.where(total > 0, jnp.einsum("bhw,w->b", mass, columns) / safe, (width - 1) / 2)
    grid_y, grid_x = jnp.meshgrid(rows, columns, indexing="ij")

    def recentre(image, dy, dx):
        coordinates = [grid_y + dy, grid_x + dx]
        return jax.scipy.ndimage.map_coordinates(image, coordinates, order=1, mode="constant")

    return jax.vmap(recentre)(content, centre_y - (height - 1) / 2, centre_x - (width - 1) / 2)


@jax.jit
def phash_bits(canonical: jax.Array) -> jax.Array:
    """The 64-bit DCT perceptual hash (pHash) of each image, as bits.

    canonical: (B, H, W) grayscale (`canonicalize`) -> (B, 64) bool: the image is resized to
    32 x 32 (bilinear), transformed by the orthonormal 2-D DCT-II, and bit 8 u + v is whether
    coefficient (u, v), u, v < 8, exceeds the median of those 64 coefficients. Invariant to a
    positive scaling of the image; an all-zero image hashes to all False.
    """
    resized = jax.image.resize(canonical, (canonical.shape[0], DCT_SIZE, DCT_SIZE), "linear")
    dct = jnp.asarray(_dct_matrix(DCT_SIZE))
    coefficients = jnp.einsum("uh,bhw,vw->buv", dct, resized, dct)
    low = coefficients[:, :HASH_SIDE, :HASH_SIDE].reshape(canonical.shape[0], -1)
    return low > jnp.median(low, axis=1, keepdims=True)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """(N, 64) bool -> (N,) uint64, bit 0 the most significant."""
    packed = np.packbits(np.asarray(bits, bool), axis=1)  # (N, 8) uint8, big-endian bits
    return packed.view(">u8")[:, 0].astype(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between packed hashes: uint64 (...) x uint64 (...) -> int (...)."""
    return np.bitwise_count(np.bitwise_xor(a, b))


def _unit(vectors: jax.Array) -> jax.Array:
    """(B, D) rows scaled to unit L2 norm; all-zero rows stay zero."""
    norms = jnp.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / jnp.where(norms > 0, norms, 1.0)


def _blur_matrix(size: int, std: float) -> np.ndarray:
    """(size, size) Gaussian blur along one axis, truncated at 3 std, zero padding: `M @ x`
    blurs the columns of x."""
    radius = np.ceil(3 * std)
    kernel_sum = np.exp(-0.5 * (np.arange(-radius, radius + 1) / std) ** 2).sum()
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
    taps = np.exp(-0.5 * (offsets / std) ** 2) * (np.abs(offsets) <= radius)
    return (taps / kernel_sum).astype(np.float32)


def gaussian_blur(images: jax.Array, std: float) -> jax.Array:
    """(B, H, W) blurred by a Gaussian of `std` pixels (truncated at 3 std, zero padding, as
    two matrix products); unchanged for std 0."""
    if std <= 0:
        return images
    rows = jnp.asarray(_blur_matrix(images.shape[1], std))
    columns = jnp.asarray(_blur_matrix(images.shape[2], std))
    return jnp.einsum("yh,bhw,xw->byx", rows, images, columns)


@functools.partial(jax.jit, static_argnames=("size", "blur"))
def pixel_embeddings(canonical: jax.Array, size: int, blur: float) -> jax.Array:
    """The default embedding: the canonical image, blurred, downsampled, normalised.

    canonical: (B, H, W) (`canonicalize`) -> (B, size * size) float32 with unit L2 norm (zero
    for an image without content): a Gaussian blur of std `blur` pixels (0: none), an
    antialiased bilinear resize to size x size, then the mean removed. The blur and the resize
    make the cosine of two copies tolerant to sub-pixel differences in their re-centring.
    """
    canonical = gaussian_blur(canonical, blur)
    small = jax.image.resize(canonical, (canonical.shape[0], size, size), "linear",
                             antialias=True)
    flat = small.reshape(small.shape[0], -1)
    has_content = jnp.any(canonical != 0, axis=(1, 2))[:, None]
    return _unit(jnp.where(has_content, flat - flat.mean(axis=1, keepdims=True), 0.0))


def rater_image_features(run: scoring.RatingRun, example: dict[str, np.ndarray]
                         ) -> Callable[[dict[str, np.ndarray]], jax.Array]:
    """The learned embedding: `features(batch) -> (B, Dr)` unit-norm image features f of the EMA
    rater of a rating run (`Rater.features`, mean-pooled convolutions: tolerant to shifts).
    `example` is one preprocessed example of the pool (fixes the input shapes)."""
    graphdef, ema, rest = scoring.ema_rater(run, example)
    width = run.config.rater.width

    @jax.jit
    def features(params, batch):
        return _unit(nnx.merge(graphdef, params, rest).features(batch)[:, :width])

    return lambda batch: features(ema, model_inputs(batch))


@functools.partial(jax.jit, static_argnames=("size", "blur"))
def alignment_images(images: jax.Array, size: int, blur: float) -> jax.Array:
    """The images the final check compares: (B, H, W, C) in [-1, 1] -> (B, h, w) float32, the
    channel mean, shrunk (antialiased) so that no side exceeds `size`, blurred by `blur` px."""
    gray = jnp.mean(images, axis=-1)
    scale = min(1.0, size / max(gray.shape[1:]))
    if scale < 1:
        shape = (gray.shape[0], max(1, round(gray.shape[1] * scale)),
                 max(1, round(gray.shape[2] * scale)))
        gray = jax.image.resize(gray, shape, "linear", antialias=True)
    return gaussian_blur(gray, blur)


@functools.partial(jax.jit, static_argnames=("max_shift", "border"))
def aligned_cosine(first: jax.Array, second: jax.Array, max_shift: int, border: int
                   ) -> jax.Array:
    """How well two images match at their best alignment: the final check of a pair.

    first, second: (M, H, W) -> (M,) in [-1, 1]: the largest, over integer shifts (dy, dx)
    with |dy|, |dx| <= max_shift, of the cosine of the mean-removed pixels of first[y, x] and
    second[y + dy, x + dx] over the pixels at least `border` px inside both frames (the band a
    shift or a re-crop fills in). Pearson correlation: invariant to brightness gain and offset;
    0 where a side is constant (`FLAT_ENERGY`). A copy shifted by whole pixels scores ~1 exactly.
    """
    height, width = first.shape[1:]
    best = jnp.full(first.shape[0], -1.0)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            top, bottom = max(border, border - dy), min(height - border, height - border - dy)
            left, right = max(border, border - dx), min(width - border, width - border - dx)
            if bottom - top < 2 or right - left < 2:
                continue
            a = first[:, top:bottom, left:right]
            b = second[:, top + dy:bottom + dy, left + dx:right + dx]
            a = a - a.mean(axis=(1, 2), keepdims=True)
            b = b - b.mean(axis=(1, 2), keepdims=True)
            energy_a, energy_b = jnp.sum(a * a, axis=(1, 2)), jnp.sum(b * b, axis=(1, 2))
            # Below FLAT_ENERGY a side is constant but for float rounding: no picture to match.
            varied = jnp.minimum(energy_a, energy_b) > FLAT_ENERGY * a[0].size
            norms = jnp.where(varied, jnp.sqrt(energy_a * energy_b), 1.0)
            best = jnp.maximum(best, jnp.where(varied, jnp.sum(a * b, axis=(1, 2)) / norms, 0.0))
    return best


# ==============================================================================================
# Exact duplicates, candidates, verification, groups (numpy)
# ==============================================================================================


def exact_duplicates(rows: np.ndarray) -> np.ndarray:
    """For each row, the index of the first row identical to it (byte for byte).

    rows: (N, ...) any dtype -> (N,) int64; `out[i] == i` for the first of each set of copies
    and for every constant row (a blank image shows nothing that could have been copied).
    """
    flat = np.ascontiguousarray(rows).reshape(len(rows), -1)
    keys = flat.view(np.dtype((np.void, flat.dtype.itemsize * flat.shape[1])))[:, 0]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    constant = np.all(flat == flat[:, :1], axis=1)
    return np.where(constant, np.arange(len(rows)), first[inverse]).astype(np.int64)


def rotated_hash_keys(hashes: np.ndarray, bands: int) -> np.ndarray:
    """Sort keys that bring hashes sharing a band together: (N,) uint64 -> (bands, N) uint64.

    Key b is the hash rotated left by b * 64 // bands bits, so that band b is the most
    significant: hashes that agree on that band sort into one run, ordered by the other bits.
    Two hashes at Hamming distance below `bands` agree on at least one band.
    """
    hashes = np.asarray(hashes, np.uint64)
    keys = []
    for band in range(bands):
        turn = np.uint64(band * HASH_BITS // bands)
        keys.append(hashes if turn == 0 else
                    (hashes << turn) | (hashes >> (np.uint64(HASH_BITS) - turn)))
    return np.stack(keys)


def simhash_keys(embeddings: np.ndarray, tables: int, seed: int, chunk: int = 65536
                 ) -> np.ndarray:
    """Random-hyperplane signatures of the embeddings: (N, D) -> (tables, N) uint64.

    Bit j of key t is whether the embedding, minus the mean embedding, lies on the positive side
    of the random hyperplane (t, j) (normal directions drawn from N(0, 1) with `seed`). Two
    embeddings at angle theta differ in each bit with probability theta / pi, so near copies
    share long key prefixes and sort close together.
    """
    embeddings = np.asarray(embeddings, np.float32)
    planes = np.random.default_rng(seed).standard_normal(
        (embeddings.shape[1], tables * HASH_BITS)).astype(np.float32)
    mean = embeddings.mean(axis=0)
    keys = np.empty((tables, len(embeddings)), np.uint64)
    for start in range(0, len(embeddings), chunk):
        bits = (embeddings[start:start + chunk] - mean) @ planes > 0
        keys[:, start:start + chunk] = pack_bits(
            bits.reshape(len(bits) * tables, HASH_BITS)).reshape(-1, tables).T
    return keys


def sort_orders(keys: np.ndarray) -> Iterator[np.ndarray]:
    """The sort orders that define the candidate pairs, one per key.

    keys: (K, N) -> yields K times order (N,) int64, the stable argsort of one key (ties keep
    index order). With a window W the candidates are the pairs (order[i], order[i + o]),
    1 <= o <= W: at most K * W * N pairs in all, with repeats across keys.
    """
    for key in keys:
        yield np.argsort(key, kind="stable")


def close_pairs(orders: Iterator[np.ndarray], window: int, hashes: np.ndarray,
                embeddings: np.ndarray, max_hamming: int, min_cosine: float,
                progress: tqdm | None = None, block: int = 32768
                ) -> tuple[np.ndarray, dict[str, int]]:
    """The candidate pairs whose fingerprints are close: Hamming(hash) <= max_hamming and
    cosine(embedding) >= min_cosine (embeddings of unit norm: the dot product).

    Args:
      orders: sort orders as `sort_orders` yields them; each sample is paired with the next
        `window` samples of each order.
      hashes: (N,) uint64 packed hashes.
      embeddings: (N, D) unit-norm rows (zero rows never pass: cosine 0).
      progress: updated by one per order.
      block: positions of an order handled together: their fingerprints are gathered once
        (in sort order, so that every offset reads contiguous rows that stay in cache).
    Returns:
      ((M, 2) int64 distinct pairs (i < j), sorted; {"compared": candidate pairs examined (with
      repeats), "hash_close": those within the Hamming distance}).
    """
    found, compared, hash_close = [], 0, 0
    for order in orders:
        for start in range(0, max(len(order) - 1, 0), block):
            rows = order[start:start + block + window]
            block_hashes, block_embeddings = hashes[rows], embeddings[rows]
            for offset in range(1, min(window, len(rows) - 1) + 1):
                count = min(block, len(rows) - offset)
                compared += count
                close = np.flatnonzero(hamming(block_hashes[:count],
                                               block_hashes[offset:offset + count]) <= max_hamming)
                hash_close += len(close)
                cosine = np.einsum("md,md->m", block_embeddings[close],
                                   block_embeddings[close + offset])
                kept = close[cosine >= min_cosine]
                a, b = rows[kept], rows[kept + offset]
                found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], 1))
        if progress is not None:
            progress.update(1)
    pairs_found = np.unique(np.concatenate([np.zeros((0, 2), np.int64), *found]), axis=0)
    return pairs_found.astype(np.int64), {"compared": compared, "hash_close": hash_close}


def aligned_pairs(images: np.ndarray, pairs: np.ndarray, cfg: config_lib.DedupConfig,
                  batch_size: int = 1024, progress: tqdm | None = None) -> np.ndarray:
    """The pairs that match pixel for pixel at their best alignment: `aligned_cosine` of their
    `alignment_images` >= `cfg.min_aligned_cosine`.

    images: (N, H, W, C) in [-1, 1]; pairs: (M, 2) indices -> (K, 2), the pairs kept. Pairs
    go in fixed-shape batches of `batch_size` (the last padded), one compilation in all;
    `progress` is updated by the pairs of each batch.
    """
    keep = []
    for start in range(0, len(pairs), batch_size):
        count = min(batch_size, len(pairs) - start)
        take = np.minimum(np.arange(start, start + batch_size), len(pairs) - 1)
        gray = alignment_images(images[pairs[take].ravel()], cfg.align_size, cfg.align_blur)
        score = aligned_cosine(gray[0::2], gray[1::2], cfg.max_shift, cfg.border)
        keep.append(np.asarray(score)[:count] >= cfg.min_aligned_cosine)
        if progress is not None:
            progress.update(count)
    return pairs[np.concatenate([np.zeros(0, bool), *keep])]


def group_ids(ids: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Union of duplicate pairs into groups: the connected components of the graph.

    ids: (N,) int64 sample ids; pairs: (M, 2) indices into ids. Returns (N,) int64: the
    smallest id of each sample's component (its own id when it is in no pair).
    """
    count = len(ids)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])),
                       shape=(count, count))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max(initial=-1) + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(smallest, component, np.asarray(ids, np.int64))
    return smallest[component]


def find_groups(ids: np.ndarray, hashes: np.ndarray, embeddings: np.ndarray,
                cfg: config_lib.DedupConfig, exact_of: np.ndarray | None = None,
                images: np.ndarray | None = None, show_progress: bool = True
                ) -> tuple[np.ndarray, dict[str, int]]:
    """Groups of duplicates from precomputed fingerprints (see the module docstring).

    Args:
      ids: (N,) int64 sample ids.
      hashes: (N,) uint64 perceptual hashes.
      embeddings: (N, D) float32 unit-norm embeddings.
      cfg: thresholds, keys and window.
      exact_of: (N,) int64 index of the first exact copy of each sample (`exact_duplicates`),
        or None when there are none to know of; only the first of each set is searched.
      images: (N, H, W, C) in [-1, 1] for the final `aligned_pairs` check, or None to group
        the pairs with close fingerprints without it.
      show_progress: tqdm bars over the sort keys and the verified pairs.
    Returns:
      ((N,) int64 group ids, the smallest id of each group; counts {"exact_pairs": exact
      copies joined to their first, "compared": candidate pairs examined, "hash_close",
      "embedding_close": distinct pairs with close hashes and embeddings, "near_pairs": pairs
      verified, joined}).
    """
    check_config(cfg)
    count = len(ids)
    exact_of = np.arange(count) if exact_of is None else np.asarray(exact_of, np.int64)
    unique = np.flatnonzero(exact_of == np.arange(count))
    copies = np.flatnonzero(exact_of != np.arange(count))
    if len(copies):  # only the first of each set of exact copies is searched
        hashes, embeddings = hashes[unique], embeddings[unique]
    keys = np.concatenate([rotated_hash_keys(hashes, cfg.bands),
                           simhash_keys(embeddings, cfg.projection_tables, cfg.seed)])
    progress = tqdm(total=len(keys), desc="dedup candidates", unit="key",
                    disable=not show_progress)
    close, stats = close_pairs(sort_orders(keys), cfg.window, hashes, embeddings,
                               cfg.max_hamming, cfg.min_cosine, progress)
    progress.close()
    near = unique[close]
    if images is not None:
        progress = tqdm(total=len(near), desc="dedup verification", unit="pair",
                        unit_scale=True, disable=not show_progress)
        near = aligned_pairs(images, near, cfg, progress=progress)
        progress.close()
    pairs = np.concatenate([near, np.stack([copies, exact_of[copies]], 1)])
    return group_ids(ids, pairs), {"exact_pairs": len(copies), **stats,
                                   "embedding_close": len(close), "near_pairs": len(near)}


def check_config(cfg: config_lib.DedupConfig) -> None:
    """Raises ValueError naming the `dedup.*` key whose value is out of range."""
    checks = {"max_hamming": 0 <= cfg.max_hamming <= HASH_BITS,
              "min_cosine": 0 < cfg.min_cosine <= 1,
              "min_aligned_cosine": 0 < cfg.min_aligned_cosine <= 1,
              "max_shift": cfg.max_shift >= 0, "border": cfg.border >= 0,
              "align_size": cfg.align_size >= 4, "align_blur": cfg.align_blur >= 0,
              "bands": 1 <= cfg.bands <= HASH_BITS, "projection_tables": cfg.projection_tables >= 0,
              "window": cfg.window >= 1, "embedding_size": cfg.embedding_size >= 1,
              "blur": cfg.blur >= 0, "batch_size": cfg.batch_size >= 1}
    for key, ok in checks.items():
        if not ok:
            raise ValueError(f"dedup.{key}={getattr(cfg, key)!r} is out of range "
                             "(see alchemist_jax/config.py DedupConfig)")


# ==============================================================================================
# Against known copies (pools with injected defects)
# ==============================================================================================


def pair_metrics(ids: np.ndarray, groups: np.ndarray, truth: pa.Table,
                 exact_of: np.ndarray | None = None) -> dict[str, Any]:
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
    sources = np.array([-1 if s is None else s for s in truth.column("source_id").to_pylist()],
                       np.int64)
    # The picture each sample shows, as a pool index: its source's for a copy, else its own.
    order = np.argsort(ids)
    original = np.where(is_copy, order[np.searchsorted(ids, sources, sorter=order)],
                        np.arange(len(ids)))
    together = groups == groups[original]
    metrics: dict[str, Any] = {
        f"recall_{kind}": float(np.mean(together[defects == kind])) if np.any(defects == kind)
        else None for kind in IMAGE_COPYING_KINDS}
    pairs, true_pairs = _pairs_within(groups), _pairs_within(groups, original)
    metrics.update(missed_copies=int(np.sum(is_copy & ~together)), pairs=pairs,
                   true_pairs=true_pairs, pair_precision=true_pairs / pairs if pairs else None)
    if exact_of is not None:
        identical = _pairs_within(groups, np.asarray(exact_of)[original]) - true_pairs
        metrics.update(identical_pairs=identical, pair_precision_identical=(
            (true_pairs + identical) / pairs if pairs else None))
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
      ValueError: the file lacks the `id` / `group` columns.
    """
    table = pq.read_table(path)
    missing = {"id", "group"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path} is not a dedup file: no column {', '.join(sorted(missing))} "
                         "(write one with `alchemist-jax dedup`)")
    return (table.column("id").to_numpy().astype(np.int64),
            table.column("group").to_numpy().astype(np.int64))


def groups_table(ids: np.ndarray, groups: np.ndarray, metadata: dict[str, str]) -> pa.Table:
    """Columns id int64, group int64, group_size int32 (samples sharing the group), with
    `metadata` in the schema."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    table = pa.table({"id": pa.array(ids, pa.int64()), "group": pa.array(groups, pa.int64()),
                      "group_size": pa.array(counts[inverse], pa.int32())})
    return table.replace_schema_metadata(metadata)


def fingerprints(pool: ArraySource, cfg: config_lib.DedupConfig,
                 features: Callable[[dict[str, np.ndarray]], jax.Array] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """pHashes (N,) uint64 and embeddings (N, D) float32 of a preprocessed pool (`image`
    (N, H, W, C) in [-1, 1]), in fixed-shape batches of `cfg.batch_size` (the last padded).
    `features`: batch -> (B, D) unit-norm embeddings; None: `pixel_embeddings`."""
    columns = {"image": pool.extra["image"], **{key: pool.extra[key] for key in
                                                ("tokens", "token_mask") if key in pool.extra}}
    hashes, embeddings = [], []
    for start in tqdm(range(0, len(pool), cfg.batch_size), desc="dedup fingerprints",
                      unit="batch"):
        stop = min(start + cfg.batch_size, len(pool))
        take = np.minimum(np.arange(start, start + cfg.batch_size), stop - 1)
        batch = {key: column[take] for key, column in columns.items()}
        canonical = canonicalize(batch["image"])
        embedded = (pixel_embeddings(canonical, cfg.embedding_size, cfg.blur)
                    if features is None else features(batch))
        hashes.append(pack_bits(np.asarray(phash_bits(canonical)))[:stop - start])
        embeddings.append(np.asarray(embedded, np.float32)[:stop - start])
    return np.concatenate(hashes), np.concatenate(embeddings)


def config_fingerprint(cfg: config_lib.Config, rating_run: scoring.RatingRun | None) -> str:
    """sha256 of the JSON of what the groups depend on: `data`, `dedup` (without the batch
    size) and, for rater embeddings, the rating run's checkpoint and step."""
    parts: dict[str, Any] = {"data": config_lib.to_dict(cfg.data),
                             "dedup": dedup_settings(cfg.dedup)}
    if rating_run is not None:
        parts["rater"] = [str(rating_run.checkpoints), rating_run.step]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def dedup_settings(cfg: config_lib.DedupConfig) -> dict[str, Any]:
    """The `dedup` section the groups depend on (the batch size never changes them)."""
    settings = config_lib.to_dict(cfg)
    del settings["batch_size"]
    return settings


def run(cfg: config_lib.Config, out: Path, rater_dir: Path | None = None) -> dict[str, Any]:
    """`alchemist-jax dedup`: groups the duplicates of the pool of `cfg.data` into `out`.

    Nothing is recomputed when `out` already holds the groups of the same pool under the same
    configuration; the file is written atomically (never a partial file). The `rater`
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
        raise ValueError("dedup.embedding=rater needs the rating run: pass --rater-dir DIR (the "
                         "--workdir of `alchemist-jax rate`)")
    if kind != "rater" and rater_dir is not None:
        raise ValueError(f"--rater-dir is read by dedup.embedding=rater only, not by {kind}")
    rating_run = scoring.open_rating_run(rater_dir, cfg.data) if kind == "rater" else None
    splits = load_splits(cfg.data)
    if len(splits.train) == 0:
        raise ValueError(f"{splits.train.name} is empty: there is nothing to deduplicate")
    pool = preprocess.materialize(splits.train, preprocess.Preprocessor.for_config(cfg.data))
    if "image" not in pool.extra:
        raise ValueError(f"dedup needs pixel images; the pool {pool.name} has none "
                         "(precomputed latents)")
    metadata = {"config": json.dumps(dedup_settings(cfg.dedup), sort_keys=True),
                "config_sha256": config_fingerprint(cfg, rating_run), "source": pool.name,
                "count": str(len(pool))}
    stored = _complete(out, pool.ids, metadata)
    # Exact copies: for the search, and for the pair metrics when the defects are known.
    exact_of = (exact_duplicates(pool.extra["image"])
                if stored is None or splits.truth is not None else None)
    seconds = 0.0
    if stored is None:
        start = time.perf_counter()
        features = None if rating_run is None else rater_image_features(rating_run, pool[0])
        hashes, embeddings = fingerprints(pool, cfg.dedup, features)
        groups, counts = find_groups(pool.ids, hashes, embeddings, cfg.dedup, exact_of,
                                     images=pool.extra["image"])
        seconds = time.perf_counter() - start
        sizes = np.unique(groups, return_counts=True)[1]
        counts = {**counts, "groups": len(sizes), "grouped": int(np.sum(sizes[sizes > 1])),
                  "largest_group": int(sizes.max(initial=0))}
        atomic_write_parquet(out, groups_table(pool.ids, groups, {
            **metadata, **{key: str(value) for key, value in counts.items()}}))
    else:
        groups, counts = stored
    summary = {"path": str(out), "count": len(pool), **counts, "seconds": round(seconds, 3)}
    if splits.truth is not None:
        summary.update(pair_metrics(pool.ids, groups, splits.truth, exact_of))
    return summary


_COUNTS = ("groups", "grouped", "largest_group", "exact_pairs", "compared", "hash_close",
           "embedding_close", "near_pairs")


def _complete(out: Path, ids: np.ndarray, metadata: dict[str, str]
              ) -> tuple[np.ndarray, dict[str, int]] | None:
    """(groups, counts) stored in `out` when it holds exactly `ids` under `metadata`, else None
    (missing, unreadable, another pool or configuration: to be computed again)."""
    if not out.exists():
        return None
    try:
        stored = scoring.read_metadata(out)
        stored_ids, groups = read_groups(out)
        counts = {key: int(stored[key]) for key in _COUNTS}
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
    if any(stored.get(key) != value for key, value in metadata.items()) or not np.array_equal(
            stored_ids, ids):
        return None
    log.info("%s is complete (%d samples)", out, len(ids))
    return groups, counts
