"""The search for duplicate pairs among precomputed fingerprints, and their groups (numpy).

exact         identical preprocessed pixels (`exact_duplicates`)
candidates    sorted neighbourhoods (`rotated_hash_keys`, `simhash_keys`, `sort_orders`)
filter        close hashes and embeddings (`close_pairs`)
verification  the pixel correlation at the best alignment (`aligned_pairs`)
groups        connected components (`group_ids`); `find_groups` runs the whole search
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from alchemist_jax import config as config_lib
from alchemist_jax.data.pipeline import padded_batches
from alchemist_jax.dedup.features import (
    HASH_BITS,
    aligned_cosine,
    alignment_images,
    hamming,
    pack_bits,
    passes,
)
from alchemist_jax.runtime import preemption


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
        keys.append(
            hashes if turn == 0 else (hashes << turn) | (hashes >> (np.uint64(HASH_BITS) - turn))
        )
    return np.stack(keys)


def simhash_keys(embeddings: np.ndarray, tables: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """Random-hyperplane signatures of the embeddings: (N, D) -> (tables, N) uint64.

    Bit j of key t is whether the embedding, minus the mean embedding, lies on the positive side
    of the random hyperplane (t, j) (normal directions drawn from N(0, 1) with `seed`). Two
    embeddings at angle theta differ in each bit with probability theta / pi, so near copies
    share long key prefixes and sort close together.
    """
    embeddings = np.asarray(embeddings, np.float32)
    planes = (
        np.random.default_rng(seed)
        .standard_normal((embeddings.shape[1], tables * HASH_BITS))
        .astype(np.float32)
    )
    mean = embeddings.mean(axis=0)
    keys = np.empty((tables, len(embeddings)), np.uint64)
    for start in range(0, len(embeddings), chunk):
        bits = (embeddings[start : start + chunk] - mean) @ planes > 0
        keys[:, start : start + chunk] = (
            pack_bits(bits.reshape(len(bits) * tables, HASH_BITS)).reshape(-1, tables).T
        )
    return keys


def sort_orders(keys: np.ndarray) -> Iterator[np.ndarray]:
    """The sort orders that define the candidate pairs, one per key.

    keys: (K, N) -> yields K times order (N,) int64, the stable argsort of one key (ties keep
    index order). With a window W the candidates are the pairs (order[i], order[i + o]),
    1 <= o <= W: at most K * W * N pairs in all, with repeats across keys.
    """
    for key in keys:
        yield np.argsort(key, kind="stable")


def close_pairs(
    orders: Iterator[np.ndarray],
    window: int,
    hashes: np.ndarray,
    embeddings: np.ndarray,
    max_hamming: int,
    min_cosine: float,
    progress: Any = None,
    block: int = 32768,
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
            rows = order[start : start + block + window]
            block_hashes, block_embeddings = hashes[rows], embeddings[rows]
            for offset in range(1, min(window, len(rows) - 1) + 1):
                count = min(block, len(rows) - offset)
                compared += count
                close = np.flatnonzero(
                    hamming(block_hashes[:count], block_hashes[offset : offset + count])
                    <= max_hamming
                )
                hash_close += len(close)
                cosine = np.einsum(
                    "md,md->m", block_embeddings[close], block_embeddings[close + offset]
                )
                kept = close[cosine >= min_cosine]
                a, b = rows[kept], rows[kept + offset]
                found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], 1))
        if progress is not None:
            progress.update(1)
    pairs_found = np.unique(np.concatenate([np.zeros((0, 2), np.int64), *found]), axis=0)
    return pairs_found.astype(np.int64), {"compared": compared, "hash_close": hash_close}


def aligned_pairs(
    images: np.ndarray,
    pairs: np.ndarray,
    cfg: config_lib.DedupConfig,
    batch_size: int = 1024,
    progress: Any = None,
) -> np.ndarray:
    """The pairs that match pixel for pixel at their best alignment: `aligned_cosine` of their
    `alignment_images` >= `cfg.min_aligned_cosine`.

    images: (N, H, W, C) in [-1, 1]; pairs: (M, 2) indices -> (K, 2), the pairs kept. Pairs
    go in fixed-shape batches of `batch_size` (the last padded), one compilation in all;
    `progress` is updated by the pairs of each batch.
    """
    keep = []
    for batch in padded_batches({"pair": pairs}, batch_size):
        gray = alignment_images(images[batch["pair"].ravel()], cfg.align_size, cfg.align_blur)
        score = aligned_cosine(gray[0::2], gray[1::2], cfg.max_shift, cfg.border)
        keep.append(np.asarray(score)[batch["mask"]] >= cfg.min_aligned_cosine)
        if progress is not None:
            progress.update(len(keep[-1]))
    return pairs[np.concatenate([np.zeros(0, bool), *keep])]


def group_ids(ids: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Union of duplicate pairs into groups: the connected components of the graph.

    ids: (N,) int64 sample ids; pairs: (M, 2) indices into ids. Returns (N,) int64: the
    smallest id of each sample's component (its own id when it is in no pair).
    """
    count = len(ids)
    graph = coo_matrix(
        (np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(count, count)
    )
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max(initial=-1) + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(smallest, component, np.asarray(ids, np.int64))
    return smallest[component]


def find_groups(
    ids: np.ndarray,
    hashes: np.ndarray,
    embeddings: np.ndarray,
    cfg: config_lib.DedupConfig,
    exact_of: np.ndarray | None = None,
    images: np.ndarray | None = None,
    show_progress: bool = True,
    stop: preemption.StopRequest | None = None,
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
      show_progress: progress bars over the sort keys and the verified pairs.
      stop: a `preemption.guard` request: `preemption.Preempted` at the next key or batch of
        pairs once it is set.
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
    keys = np.concatenate(
        [
            rotated_hash_keys(hashes, cfg.bands),
            simhash_keys(embeddings, cfg.projection_tables, cfg.seed),
        ]
    )
    progress = passes(
        total=len(keys), desc="dedup candidates", unit="key", show=show_progress, stop=stop
    )
    close, stats = close_pairs(
        sort_orders(keys), cfg.window, hashes, embeddings, cfg.max_hamming, cfg.min_cosine, progress
    )
    progress.close()
    near = unique[close]
    if images is not None:
        progress = passes(
            total=len(near),
            desc="dedup verification",
            unit="pair",
            unit_scale=True,
            show=show_progress,
            stop=stop,
        )
        near = aligned_pairs(images, near, cfg, progress=progress)
        progress.close()
    pairs = np.concatenate([near, np.stack([copies, exact_of[copies]], 1)])
    return group_ids(ids, pairs), {
        "exact_pairs": len(copies),
        **stats,
        "embedding_close": len(close),
        "near_pairs": len(near),
    }


def check_config(cfg: config_lib.DedupConfig) -> None:
    """The `dedup.*` ranges of `config.RANGES` (one place), for callers that build a DedupConfig
    directly; ConfigError naming the key."""
    config_lib.check_section(cfg, "dedup")
