"""Ranking clusters of the pool: by label, by caption, by k-means over caption vectors.

    groups, names = cluster_groups(pool, "auto", clusters=20, seed=0, min_size=20)

Groupings (the names of `config.GROUPINGS`): `label` (source.labels), `caption` (identical caption
text), `kmeans` (k-means++ seeded weighted k-means over caption vectors: the mean-pooled
`text_embedding` when the examples carry one, else L2-normalised TF-IDF of the CLIP BPE tokens of
the *normalised* captions — lower case, punctuation and repeated spaces removed —; clusters of
fewer than `min_size` samples are then merged into the nearest other cluster, one at a time,
smallest first), `none` (one group) and `auto`:

  - the labels when the source has labels;
  - else the normalised caption text when every normalised caption is shared by at least
    `min_size` samples (templated captions: a caption *is* a class);
  - else kmeans. Free-text captions are never grouped by their exact text: a caption of one
    sample would be a cluster of one, kept or dropped by the rounding of its share, not its score.

Pure numpy/scipy apart from reading the captions.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from alchemist_jax.config import GROUPINGS
from alchemist_jax.data.sources import ArraySource, Source

# (grouping used — `auto` resolved —, groups int64 (N,) in 0..G-1, G cluster names)
Grouping = tuple[str, np.ndarray, list[str]]


def cluster_groups(
    source: Source, group_by: str, clusters: int, seed: int, min_size: int = 1
) -> tuple[np.ndarray, list[str]]:
    """The ranking clusters of every sample of `source`.

    Args:
      source: the pool.
      group_by: `label` (source.labels), `caption` (identical caption text), `kmeans` (k-means++
        seeded k-means over caption vectors: the mean-pooled `text_embedding` when the examples
        carry one, else L2-normalised TF-IDF of their normalised captions), `none` (one group)
        or `auto` (see the module docstring).
      clusters: k of kmeans (fewer when there are fewer distinct caption vectors).
      seed: seeds kmeans.
      min_size: kmeans clusters smaller than this are merged into their nearest neighbour; auto
        groups by normalised caption only when every such group is at least this large.
    Returns:
      (groups int64 (N,) in 0..G-1 in source order, names: G unique cluster names).
    Raises:
      ValueError: labels asked of a source without labels, captions of one without captions.
    """
    _, groups, names = resolve_grouping(source, group_by, clusters, seed, min_size)
    return groups, names


def resolve_grouping(
    source: Source, group_by: str, clusters: int, seed: int, min_size: int = 1
) -> Grouping:
    """(the grouping used — `auto` resolved —, groups, names); see `cluster_groups`."""
    if group_by not in GROUPINGS:
        raise ValueError(f"unknown select.group_by {group_by!r}; valid: {', '.join(GROUPINGS)}")
    if min_size < 1:
        raise ValueError(f"select.min_cluster_size must be at least 1, got {min_size}")
    return GROUPERS[group_by](_Pool(source, group_by, clusters, seed, min_size))


@dataclasses.dataclass(frozen=True)
class _Pool:
    """What a grouper reads: the source, the grouping asked for, kmeans' k, seed and the
    minimum cluster size."""

    source: Source
    group_by: str
    clusters: int
    seed: int
    min_size: int = 1

    @functools.cached_property
    def text(self) -> tuple[list[str] | None, np.ndarray | None]:
        """`_caption_fields` of the source, read once."""
        return _caption_fields(self.source)


def _by_none(pool: _Pool) -> Grouping:
    return "none", np.zeros(len(pool.source), np.int64), ["all"]


def _by_label(pool: _Pool) -> Grouping:
    labels = pool.source.labels
    if labels is None:
        raise ValueError(f"select.group_by=label: data source {pool.source.name!r} has no labels")
    values, groups = np.unique(labels, return_inverse=True)
    return "label", groups.astype(np.int64), [f"label {v}" for v in values]


def _by_caption(pool: _Pool) -> Grouping:
    captions, _ = pool.text
    if captions is None:
        raise ValueError(
            f"select.group_by=caption: data source {pool.source.name!r} has no captions"
        )
    values, groups = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
    return "caption", groups.astype(np.int64), [str(v) for v in values]


def _by_kmeans(pool: _Pool) -> Grouping:
    if pool.clusters < 1:
        raise ValueError(f"select.clusters must be at least 1, got {pool.clusters}")
    captions, embeddings = pool.text
    if embeddings is not None:
        rows, inverse, counts = np.unique(
            embeddings, axis=0, return_inverse=True, return_counts=True
        )
        features = rows
    elif captions is not None:
        texts, inverse, counts = np.unique(
            np.asarray([normalize_caption(c) for c in captions], dtype=object),
            return_inverse=True,
            return_counts=True,
        )
        features = tfidf([str(t) for t in texts], counts)
    else:
        raise ValueError(
            f"select.group_by={pool.group_by}: data source {pool.source.name!r} has "
            "neither captions nor text embeddings to cluster"
        )
    assignment = kmeans(features, pool.clusters, pool.seed, weights=counts)
    assignment = merge_small_clusters(features, assignment, counts, pool.min_size)
    groups = assignment[inverse.ravel()]
    return "kmeans", groups, _cluster_names(groups, captions)


def _auto(pool: _Pool) -> Grouping:
    if pool.source.labels is not None:
        return _by_label(pool)
    captions, _ = pool.text
    if captions is not None:
        normalized = np.asarray([normalize_caption(c) for c in captions], dtype=object)
        values, groups, counts = np.unique(normalized, return_inverse=True, return_counts=True)
        if counts.min() >= max(pool.min_size, 2):
            return "caption", groups.astype(np.int64), [str(v) for v in values]
    return _by_kmeans(pool)


def normalize_caption(caption: str) -> str:
    """Lower case, every run of characters other than letters and digits one space, stripped:
    "A photo of a Cat!!" -> "a photo of a cat"."""
    return " ".join(re.sub(r"[\W_]+", " ", caption.lower()).split())


def merge_small_clusters(
    features, assignment: np.ndarray, weights: np.ndarray | None, min_size: int
) -> np.ndarray:
    """Merges clusters lighter than `min_size` into their nearest neighbour, one at a time,
    lightest first, until every cluster weighs at least `min_size` or one is left.

    Args:
      features: float (U, D) rows (numpy or scipy.sparse), e.g. distinct caption vectors.
      assignment: int (U,) cluster of each row, values 0..G-1.
      weights: (U,) samples each row stands for; None: 1 each.
      min_size: the least total weight a cluster keeps.
    Returns:
      int64 (U,) the merged clusters, renumbered 0..G'-1 in order of their first appearance
      among the old cluster numbers.
    """
    import scipy.sparse

    assignment = np.asarray(assignment, np.int64).copy()
    weights = np.ones(len(assignment)) if weights is None else np.asarray(weights, np.float64)
    dense = features.toarray() if scipy.sparse.issparse(features) else np.asarray(features)
    while True:
        labels = np.unique(assignment)
        mass = np.array([weights[assignment == label].sum() for label in labels])
        if len(labels) <= 1 or mass.min() >= min_size:
            break
        small = labels[np.argmin(mass)]
        members = assignment == small
        others = labels[labels != small]
        centers = np.stack(
            [
                np.average(dense[assignment == o], axis=0, weights=weights[assignment == o])
                for o in others
            ]
        )
        center = np.average(dense[members], axis=0, weights=weights[members])
        assignment[members] = others[np.argmin(((centers - center) ** 2).sum(axis=1))]
    return np.unique(assignment, return_inverse=True)[1].astype(np.int64)


# Keyed by the names of `config.GROUPINGS` (a test checks that they agree).
GROUPERS: dict[str, Callable[[_Pool], Grouping]] = {
    "auto": _auto,
    "label": _by_label,
    "caption": _by_caption,
    "kmeans": _by_kmeans,
    "none": _by_none,
}


def _caption_fields(source: Source) -> tuple[list[str] | None, np.ndarray | None]:
    """(captions or None, float (N, D) mean-pooled text embeddings or None), in source order."""
    first = source[0] if len(source) else {}
    if isinstance(source, ArraySource) and "text_embedding" not in first:
        return source.captions, None
    if "caption" not in first and "text_embedding" not in first:
        return None, None
    captions, embeddings = [], []
    for index in tqdm(
        range(len(source)), desc=f"reading captions of {source.name}", unit="ex", leave=False
    ):
        example = source[index]
        if "caption" in first:
            captions.append(example["caption"])
        if "text_embedding" in first:
            embedding = np.asarray(example["text_embedding"], np.float64)
            embeddings.append(embedding.reshape(-1, embedding.shape[-1]).mean(axis=0))
    return (
        captions if "caption" in first else None,
        np.stack(embeddings) if "text_embedding" in first else None,
    )


def _cluster_names(groups: np.ndarray, captions: list[str] | None) -> list[str]:
    """`cluster j`, followed by the cluster's most frequent caption when there are captions."""
    if captions is None:
        return [f"cluster {j}" for j in range(groups.max() + 1)]
    common = [Counter() for _ in range(groups.max() + 1)]
    for group, caption in zip(groups, captions):
        common[group][caption] += 1
    return [f"cluster {j}: {c.most_common(1)[0][0]}" for j, c in enumerate(common)]


def tfidf(texts: list[str], counts: np.ndarray | None = None, max_length: int = 77):
    """L2-normalised TF-IDF vectors of `texts` over their CLIP BPE token ids.

    Args:
      texts: U captions (tokenized with `data.tokenizer.Tokenizer(max_length)`; the start and end
        tokens are not counted).
      counts: (U,) how many pool samples carry each text (document frequencies count samples);
        None: one each.
    Returns:
      scipy.sparse CSR float64 (U, V) over the V token ids that occur; idf = ln((1 + N) /
      (1 + df)) + 1 with N = sum(counts).
    """
    import scipy.sparse

    from alchemist_jax.data.tokenizer import END_ID, START_ID, Tokenizer

    counts = np.ones(len(texts)) if counts is None else np.asarray(counts, np.float64)
    tokens, mask = Tokenizer(max_length)(texts)
    content = mask & (tokens != START_ID) & (tokens != END_ID)
    rows = np.nonzero(content)[0]
    _, columns = np.unique(tokens[content], return_inverse=True)
    term_counts = scipy.sparse.csr_matrix(
        (np.ones(len(rows)), (rows, columns)), shape=(len(texts), columns.max(initial=-1) + 1)
    )
    present = term_counts.copy()
    present.data[:] = 1.0
    idf = np.log((1 + counts.sum()) / (1 + present.T @ counts)) + 1
    weighted = term_counts.multiply(idf[None, :]).tocsr()
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=1)).ravel())
    return scipy.sparse.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ weighted


def kmeans(
    features, k: int, seed: int, weights: np.ndarray | None = None, iterations: int = 100
) -> np.ndarray:
    """Weighted k-means (Lloyd) with k-means++ initialisation.

    Args:
      features: float (N, D), a numpy array or a scipy.sparse matrix.
      k: clusters wanted; fewer come out when there are fewer distinct rows.
      seed: seeds the k-means++ draws.
      weights: (N,) positive sample weights (e.g. how often each distinct row occurs); None: 1.
      iterations: at most this many Lloyd steps (stops earlier when assignments settle).
    Returns:
      int64 (N,) cluster of each row, in 0..G-1 (G <= k, no empty cluster).
    """
    import scipy.sparse

    def dense(matrix):
        return matrix.toarray() if scipy.sparse.issparse(matrix) else np.asarray(matrix)

    rng = np.random.default_rng(seed)
    size = features.shape[0]
    weights = np.ones(size) if weights is None else np.asarray(weights, np.float64)
    squared_norms = (
        np.asarray(features.multiply(features).sum(axis=1)).ravel()
        if scipy.sparse.issparse(features)
        else (features**2).sum(axis=1)
    )

    def squared_distances(centers):  # (N, C)
        cross = dense(features @ centers.T)
        return np.maximum(squared_norms[:, None] - 2 * cross + (centers**2).sum(axis=1), 0.0)

    centers = dense(features[[rng.choice(size, p=weights / weights.sum())]])
    closest = squared_distances(centers)[:, 0]
    while len(centers) < k and (weights * closest).sum() > 0:
        mass = weights * closest
        center = dense(features[[rng.choice(size, p=mass / mass.sum())]])
        centers = np.concatenate([centers, center])
        closest = np.minimum(closest, squared_distances(center)[:, 0])
    assignment = squared_distances(centers).argmin(axis=1)
    for _ in range(iterations):
        membership = scipy.sparse.csr_matrix(
            (weights, (assignment, np.arange(size))), shape=(len(centers), size)
        )
        mass = np.asarray(membership.sum(axis=1)).ravel()
        sums = dense(membership @ features)
        centers = np.where(mass[:, None] > 0, sums / np.maximum(mass, 1e-300)[:, None], centers)
        updated = squared_distances(centers).argmin(axis=1)
        if np.array_equal(updated, assignment):
            break
        assignment = updated
    return np.unique(assignment, return_inverse=True)[1].astype(np.int64)
