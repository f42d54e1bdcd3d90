"""Choosing the training subset from ratings (`alchemist-jax select`).

    selected = select(scores, ids, policy="filter", keep=0.5, seed=0, groups=groups, drop=0.25)
    fused = fuse([meta_scores, alignment_scores], weights=[1.0, 1.0], groups=groups)
    eligible = best_of_duplicates(fused, ids, duplicate_groups)
    groups, names = cluster_groups(pool, "auto", clusters=20, seed=0)
    selected, summary = select_for_source(cfg.select, {"ratings.parquet": (ids, scores)}, pool)
    summary = run(cfg, [Path("meta.parquet"), Path("alignment.parquet")], Path("selection.parquet"),
                  dedup=Path("dedup.parquet"))

Scores are higher = better. Within a group of n samples, samples are ranked best first (ties
broken by id) and the rank percentile of the sample at rank r (0-based) is u = r / n, in [0, 1),
0 = best. Every policy runs inside each group (caption class, exact caption or k-means cluster of
caption embeddings; one group = global ranking) and every group keeps its share of the pool: the
round(keep * N) samples are allocated to the groups in proportion to their sizes by the largest
remainder method (ties to the earlier group), so the total is exact. Policies (METHOD.md §4, §8):

  filter         drop the lowest-scored `drop` fraction, then draw the group's share uniformly at
                 random from the rest (the measured best rule, within clusters)
  shift_gsample  drop the top `head` fraction (None: min(0.25, 0.95 - keep)), then draw the share
                 without replacement with probability ∝ exp(-(u - mu)² / 2 sigma²), u computed
                 over the whole group before the drop (Gumbel top-k: exact counts)
  gsample        the same Gaussian draw without the drop
  topk, bottomk  the best / worst share
  random         a uniformly random share
  block          the contiguous rank window of the share's size starting at percentile `start`
  threshold      every sample with score >= `threshold`; None: per group, the score of its
                 share's last sample (the group's keep quantile)
  weighted       draw the share without replacement with probability ∝ exp(z / temperature),
                 z = the score's z-score within its group (Gumbel top-k)
  cdf_accept     accept each sample independently with probability min(1, c·F^(1/temperature)),
                 F = the empirical CDF of its score within its group, c calibrated so the group's
                 expected count is its share (needs no global sort: runs shard by shard)

Exactly round(keep * N) ids come out of every policy but two: `threshold` gives the number of
scores >= the threshold (with None: each group's share plus ties at its cut), `cdf_accept` a random
count whose expectation is exactly round(keep * N). Everything is deterministic from `seed`; each
group draws from its own generator seeded by (seed, group position), and results do not depend on
the order of the input rows.

Fusion (several ratings files and a dedup file, METHOD.md §8): each file's scores become rank
percentiles within the ranking clusters (`rank_normalize`), combined as a weighted geometric
mean (`select.weights`, one per file; equal by default) into the fused score in (0, 1); with one file
the policy ranks its own scores (the same order within every cluster) and the fused score is
their percentile. Duplicates are then collapsed: of each dedup group only the member with the
highest fused score (ties: the smallest id) stays eligible (`best_of_duplicates`). The budget is still round(keep * N) of the whole pool;
it is shared among the clusters in proportion to their eligible members, and the policy chooses
among those.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from alchemist_jax.config import POLICIES, Config, SelectConfig
from alchemist_jax.runtime.io import atomic_write_bytes, atomic_write_parquet
from alchemist_jax.data.sources import ArraySource, Source
from alchemist_jax.runtime.stats import normalize_within_groups

# The parameters of each policy (SelectConfig fields) and their defaults.
POLICY_PARAMETERS: dict[str, tuple[str, ...]] = {
    "filter": ("drop",),
    "shift_gsample": ("head", "mu", "sigma"),
    "gsample": ("mu", "sigma"),
    "topk": (),
    "bottomk": (),
    "random": (),
    "block": ("start",),
    "threshold": ("threshold",),
    "weighted": ("temperature",),
    "cdf_accept": ("temperature",),
}
PARAMETER_DEFAULTS: dict[str, Any] = {
    name: getattr(SelectConfig(), name)
    for name in sorted({n for names in POLICY_PARAMETERS.values() for n in names})
}
GROUPINGS = ("auto", "label", "caption", "kmeans", "none")
HISTOGRAM_BINS = 20
PARQUET_METADATA_KEY = b"alchemist_jax.selection"
# The summary keys a selection file records in its metadata: how it was made and from what.
RECIPE_KEYS = ("policy", "keep", "group_by", "params", "ratings", "weights", "dedup")
_TOLERANCE = 1e-9  # float slack when comparing fractions such as keep + drop to 1


# ==============================================================================================
# Selection (pure)
# ==============================================================================================


def resolve_params(policy: str, keep: float, **params: Any) -> dict[str, Any]:
    """The parameters `policy` uses, defaults filled in (SelectConfig's) and validated.

    `head=None` becomes max(0, min(0.25, 0.95 - keep)). Parameters of other policies are accepted
    and ignored, so a whole SelectConfig can be passed.

    Raises:
      ValueError: an unknown policy or parameter name, a value out of range, or a `drop` /
        `head` / `start` that leaves fewer than `keep` of the pool to choose from.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown selection policy {policy!r}; valid policies: "
                         f"{', '.join(POLICIES)}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"select.keep must be in (0, 1], got {keep}")
    unknown = sorted(set(params) - set(PARAMETER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown selection parameter {', '.join(map(repr, unknown))}; valid "
                         f"parameters: {', '.join(PARAMETER_DEFAULTS)}")
    values = {**PARAMETER_DEFAULTS, **params}
    resolved = {name: values[name] for name in POLICY_PARAMETERS[policy]}
    if "head" in resolved and resolved["head"] is None:
        resolved["head"] = max(0.0, min(0.25, 0.95 - keep))
    for name in ("drop", "head", "start"):
        if name in resolved:
            if not 0.0 <= resolved[name] < 1.0:
                raise ValueError(f"select.{name} must be in [0, 1), got {resolved[name]}")
            if keep > 1.0 - resolved[name] + _TOLERANCE:
                raise ValueError(
                    f"select.{name}={resolved[name]} leaves {1 - resolved[name]:.3g} of the pool "
                    f"to choose from, less than select.keep={keep}; need keep <= 1 - {name}")
    for name in ("sigma", "temperature"):
        if name in resolved and not resolved[name] > 0:
            raise ValueError(f"select.{name} must be > 0, got {resolved[name]}")
    return resolved


def allocate(total: int, sizes: np.ndarray) -> np.ndarray:
    """Splits `total` samples among groups of `sizes` (G,) in proportion to their sizes, by the
    largest remainder method (ties go to the earlier group). Returns int64 (G,) summing to
    `total`, each at most its group's size (given 0 <= total <= sizes.sum())."""
    sizes = np.asarray(sizes, np.int64)
    pool = int(sizes.sum())
    base, remainders = np.divmod(total * sizes, pool)
    shares = base.copy()
    shares[np.argsort(-remainders, kind="stable")[: total - int(base.sum())]] += 1
    return shares


def select(scores: np.ndarray, ids: np.ndarray, *, policy: str, keep: float, seed: int,
           groups: np.ndarray | None = None, eligible: np.ndarray | None = None,
           **params: Any) -> np.ndarray:
    """The ids chosen by `policy` (see the module docstring), sorted ascending.

    Args:
      scores: float (N,), higher = better.
      ids: int64 (N,), unique.
      policy: one of `config.POLICIES`.
      keep: fraction of the pool to keep, in (0, 1]: round(keep * N) ids (`threshold`,
        `cdf_accept`: see the module docstring).
      seed: seeds every random draw.
      groups: int (N,) cluster of each sample, or None for one global ranking.
      eligible: bool (N,) the samples that may be chosen (e.g. `best_of_duplicates`), or None
        for all. The budget round(keep * N) counts the whole pool; each cluster's share is
        allocated in proportion to its eligible members, and the policy ranks only those.
      **params: the policy's parameters, named like the SelectConfig fields (drop, head, mu,
        sigma, start, threshold, temperature); missing ones take SelectConfig's defaults.
    Returns:
      int64 (K,) selected ids, ascending.
    Raises:
      ValueError: see `resolve_params`; also mismatched lengths, duplicate ids, NaN or infinite
        scores, an empty pool, a keep that rounds to no sample or asks for more samples than
        are eligible.
    """
    scores, ids, groups = _check_inputs(scores, ids, groups)
    eligible = np.ones(len(ids), bool) if eligible is None else np.asarray(eligible, bool)
    if eligible.shape != ids.shape:
        raise ValueError(f"eligible {eligible.shape} must have the shape of ids {ids.shape}")
    resolved = resolve_params(policy, keep, **params)
    total = round(keep * len(ids))
    if total == 0:
        raise ValueError(f"select.keep={keep} of {len(ids)} samples keeps no sample")
    if total > eligible.sum():
        raise ValueError(f"select.keep={keep} asks for {total} samples but only "
                         f"{int(eligible.sum())} of {len(ids)} are eligible (the others are "
                         "duplicates of a better-scored sample)")
    by_id = np.argsort(ids, kind="stable")  # canonical order: results ignore the row order
    scores, ids, groups, eligible = scores[by_id], ids[by_id], groups[by_id], eligible[by_id]
    members_of = [members[eligible[members]] for members in _group_members(groups)]
    shares = allocate(total, np.array([len(m) for m in members_of]))
    chosen = [
        ids[members[_POLICIES[policy](scores[members], int(share),
                                      np.random.default_rng((seed, position)), **resolved)]]
        for position, (members, share) in enumerate(zip(members_of, shares))
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def cdf_acceptance(scores: np.ndarray, expected: int, temperature: float) -> np.ndarray:
    """Acceptance probabilities p (n,) = min(1, c·F(s)^(1/temperature)), F(s) = the fraction of
    `scores` (n,) that are <= s, with c chosen so that sum(p) = `expected` (0 <= expected <= n).
    Lower temperatures concentrate acceptance on the best scores; higher ones approach the same
    probability expected / n for every sample."""
    scores = np.asarray(scores, np.float64)
    n = len(scores)
    if expected == 0:
        return np.zeros(n)
    cdf = np.searchsorted(np.sort(scores), scores, side="right") / n
    weights = cdf ** (1.0 / temperature)
    # Water-filling: the j largest weights saturate at 1 and c·w sums to expected - j on the
    # rest; the valid j is the one whose c keeps the saturated >= 1 and the others <= 1.
    descending = np.sort(weights)[::-1]
    tails = np.cumsum(descending[::-1])[::-1]
    saturated = np.arange(min(expected, n))
    factors = (expected - saturated) / tails[saturated]
    below = factors * descending[saturated] <= 1 + _TOLERANCE
    above = np.r_[True, factors[1:] * descending[saturated[1:] - 1] >= 1 - _TOLERANCE]
    factor = factors[np.flatnonzero(below & above)[0]]
    return np.minimum(1.0, factor * weights)


def _check_inputs(scores, ids, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64)
    ids = np.asarray(ids)
    if scores.ndim != 1 or ids.ndim != 1 or len(scores) != len(ids):
        raise ValueError(f"scores {scores.shape} and ids {ids.shape} must be 1-D of one length")
    if len(ids) == 0:
        raise ValueError("there are no scores to select from")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    _check_unique(ids, "ids")
    _check_finite(scores, "scores")
    if groups is None:
        groups = np.zeros(len(ids), np.int64)
    groups = np.asarray(groups)
    if groups.shape != ids.shape:
        raise ValueError(f"groups {groups.shape} must have the shape of ids {ids.shape}")
    return scores, ids.astype(np.int64), groups


def _check_unique(ids: np.ndarray, what: str) -> None:
    values, counts = np.unique(ids, return_counts=True)
    if len(values) != len(ids):
        repeated = values[counts > 1]
        raise ValueError(f"{what}: {len(repeated)} ids occur more than once "
                         f"(e.g. id {int(repeated[0])})")


def _check_finite(scores: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(f"{what}: {int(np.isnan(scores).sum())} scores are NaN and "
                         f"{int(np.isinf(scores).sum())} infinite; every score must be finite")


def _group_members(groups: np.ndarray) -> list[np.ndarray]:
    """Positions of each group's members (ascending), groups in sorted order of their values."""
    values, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse, minlength=len(values)))[:-1])


def _best_first(scores: np.ndarray) -> np.ndarray:
    """Positions ordered best (highest score) first; ties keep position order."""
    return np.argsort(-scores, kind="stable")


def _gumbel_top_k(log_weights: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` positions drawn without replacement with probability ∝ exp(log_weights)."""
    keys = log_weights + rng.gumbel(size=len(log_weights))
    return np.argsort(-keys, kind="stable")[:count]


# Per-group policies: (scores (n,), share, rng, **params) -> positions (into the group) chosen.


def _filter(scores, share, rng, *, drop):
    ranking = _best_first(scores)
    dropped = min(round(drop * len(scores)), len(scores) - share)
    return rng.choice(ranking[: len(scores) - dropped], size=share, replace=False)


def _gaussian(scores, share, rng, *, mu, sigma, head=0.0):
    n = len(scores)
    ranking = _best_first(scores)
    skipped = min(round(head * n), n - share)
    percentiles = np.arange(skipped, n) / n
    log_weights = -((percentiles - mu) ** 2) / (2 * sigma**2)
    return ranking[skipped:][_gumbel_top_k(log_weights, share, rng)]


def _topk(scores, share, rng):
    return _best_first(scores)[:share]


def _bottomk(scores, share, rng):
    return _best_first(scores)[len(scores) - share:]


def _random(scores, share, rng):
    return rng.choice(len(scores), size=share, replace=False)


def _block(scores, share, rng, *, start):
    first = min(round(start * len(scores)), len(scores) - share)
    return _best_first(scores)[first: first + share]


def _threshold(scores, share, rng, *, threshold):
    if threshold is None:
        if share == 0:
            return np.zeros(0, np.int64)
        threshold = np.sort(scores)[::-1][share - 1]
    return np.flatnonzero(scores >= threshold)


def _weighted(scores, share, rng, *, temperature):
    return _gumbel_top_k(normalize_within_groups(scores, None) / temperature, share, rng)


def _cdf_accept(scores, share, rng, *, temperature):
    return np.flatnonzero(rng.random(len(scores)) < cdf_acceptance(scores, share, temperature))


_POLICIES: dict[str, Callable[..., np.ndarray]] = {
    "filter": _filter, "shift_gsample": _gaussian, "gsample": _gaussian, "topk": _topk,
    "bottomk": _bottomk, "random": _random, "block": _block, "threshold": _threshold,
    "weighted": _weighted, "cdf_accept": _cdf_accept,
}


# ==============================================================================================
# Fusion of several scorers and collapse of duplicates (pure)
# ==============================================================================================


def rank_normalize(scores: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Mid-rank percentile (N,) in (0, 1) of each score within its group, higher = better:
    (r - 1/2) / n, r the ascending rank among the group's n members, tied scores sharing the
    average of their ranks (so a group of one sample gets 1/2). Never 0, so that `fuse` can
    multiply percentiles.

    Args:
      scores: float (N,), higher = better.
      groups: int (N,) cluster of each sample, or None for one group.
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores, np.float64)
    groups = np.zeros(len(scores), np.int64) if groups is None else np.asarray(groups)
    percentiles = np.empty(len(scores))
    for members in _group_members(groups):
        percentiles[members] = (rankdata(scores[members]) - 0.5) / len(members)
    return percentiles


def fuse(scores: Sequence[np.ndarray], weights: Sequence[float] | None = None,
         groups: np.ndarray | None = None) -> np.ndarray:
    """The fused score (N,) in (0, 1), higher = better: the weighted geometric mean of the
    scorers' rank percentiles within the groups, exp(sum_f w_f · log u_f / sum_f w_f) with
    u_f = rank_normalize(scores_f, groups).

    Why a geometric mean: each scorer sees its own defects and is near chance on the others (the
    meta rater on caption swaps, the alignment scorer on duplicates), so a sample should rank low
    when any one scorer puts it low. An arithmetic mean halves the flagging scorer's vote with
    the other's chance-level one; a product keeps it (a percentile near 0 pulls the product near
    0). On the built-in pool (docs/RESULTS.md) the geometric mean of the meta rater and the
    alignment scorer separates clean from defective samples with AUROC 0.892 against 0.867 for
    the arithmetic mean.

    Why ranks: scorers speak on different scales (a rater's logit, a loss margin, a cosine) and
    carry per-class offsets (a meta-learned rater gives whole caption classes higher scores,
    METHOD.md §8), so a weighted sum of raw scores would let the widest scale or the largest
    offset decide. A percentile within the cluster removes both: each scorer contributes only
    the order it gives inside the cluster, and the weights mean what they say.

    Args:
      scores: F arrays (N,), one per scorer, aligned (the same sample at the same position).
      weights: (F,) non-negative, with a positive sum; None or empty: equal weights.
      groups: int (N,) cluster of each sample, or None for one group.
    Raises:
      ValueError: no scorer, arrays of different lengths, non-finite scores, a weight count
        other than F, negative weights or weights summing to 0.
    """
    if len(scores) == 0:
        raise ValueError("fuse needs the scores of at least one scorer")
    columns = [np.asarray(s, np.float64) for s in scores]
    if any(c.shape != columns[0].shape or c.ndim != 1 for c in columns):
        raise ValueError(f"fuse: scores of shapes {[c.shape for c in columns]} must be 1-D of "
                         "one length")
    for number, column in enumerate(columns):
        _check_finite(column, f"scorer {number}")
    if weights is None or len(weights) == 0:
        weights = np.ones(len(columns))
    weights = np.asarray(weights, np.float64)
    if weights.shape != (len(columns),):
        raise ValueError(f"select.weights has {weights.size} values for {len(columns)} "
                         "scorers; give one per ratings file, in order, or none for equal weights")
    if (weights < 0).any() or not weights.sum() > 0:
        raise ValueError(f"select.weights must be >= 0 with a positive sum, got "
                         f"{weights.tolist()}")
    log_fused = sum(w * np.log(rank_normalize(c, groups)) for w, c in zip(weights, columns))
    return np.exp(log_fused / weights.sum())


def best_of_duplicates(scores: np.ndarray, ids: np.ndarray,
                       duplicate_groups: np.ndarray) -> np.ndarray:
    """Which samples stay eligible when duplicates are collapsed: bool (N,), True for exactly
    one member of each duplicate group, the one with the highest score (ties: the smallest id).

    Args:
      scores: float (N,), higher = better (normally the fused score: comparable across clusters).
      ids: int64 (N,), unique.
      duplicate_groups: int (N,) duplicate group of each sample (a sample without duplicates is
        a group of its own).
    """
    scores, ids = np.asarray(scores, np.float64), np.asarray(ids)
    duplicate_groups = np.asarray(duplicate_groups)
    order = np.lexsort((ids, -scores, duplicate_groups))  # by group, best first, then by id
    ordered = duplicate_groups[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    eligible = np.zeros(len(ids), bool)
    eligible[order[first]] = True
    return eligible


# ==============================================================================================
# Summary (pure)
# ==============================================================================================


def rank_percentiles(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Global rank percentile (N,) of each sample in [0, 1), 0 = best; ties ranked by id."""
    scores, ids = np.asarray(scores, np.float64), np.asarray(ids)
    percentiles = np.empty(len(scores))
    percentiles[np.lexsort((ids, -scores))] = np.arange(len(scores)) / len(scores)
    return percentiles


def summarize(scores: np.ndarray, ids: np.ndarray, selected: np.ndarray,
              groups: np.ndarray | None, names: list[str] | None,
              policy_params: dict[str, Any]) -> dict[str, Any]:
    """What a selection kept.

    Args:
      scores, ids: (N,) the pool's scores and ids.
      selected: (K,) the chosen ids (a subset of `ids`).
      groups: int (N,) cluster of each sample (values index `names`), or None (one group).
      names: the cluster names, or None (named by their group values; "all" without groups).
      policy_params: recorded as `params`.
    Returns:
      {"count", "pool_size", "cluster_keep_rates": {name: kept / size},
       "rank_histogram": {"edges": 21 floats over [0, 1], "counts": 20 ints} of the chosen ids'
       global rank percentiles (0 = best), "params"}.
    """
    ids = np.asarray(ids)
    chosen = np.isin(ids, selected)
    if groups is None:
        groups, names = np.zeros(len(ids), np.int64), ["all"]
    groups = np.asarray(groups)
    rates = {}
    for value in np.unique(groups):
        members = groups == value
        name = str(value) if names is None else names[int(value)]
        rates[name] = float(chosen[members].mean())
    counts, edges = np.histogram(rank_percentiles(scores, ids)[chosen], bins=HISTOGRAM_BINS,
                                 range=(0.0, 1.0))
    return {
        "count": int(chosen.sum()),
        "pool_size": len(ids),
        "cluster_keep_rates": rates,
        "rank_histogram": {"edges": [round(float(e), 6) for e in edges],
                           "counts": [int(c) for c in counts]},
        "params": dict(policy_params),
    }


# ==============================================================================================
# Clusters of the pool
# ==============================================================================================


def cluster_groups(source: Source, group_by: str, clusters: int,
                   seed: int) -> tuple[np.ndarray, list[str]]:
    """The ranking clusters of every sample of `source`.

    Args:
      source: the pool.
      group_by: `label` (source.labels), `caption` (identical caption text), `kmeans` (k-means++
        seeded k-means over caption vectors: the mean-pooled `text_embedding` when the examples
        carry one, else L2-normalised TF-IDF of their CLIP BPE tokens), `none` (one group) or
        `auto` (label when the source has labels; else caption when there are at most N / 5
        distinct captions; else kmeans).
      clusters: k of kmeans (fewer when there are fewer distinct caption vectors).
      seed: seeds kmeans.
    Returns:
      (groups int64 (N,) in 0..G-1 in source order, names: G unique cluster names).
    Raises:
      ValueError: labels asked of a source without labels, captions of one without captions.
    """
    _, groups, names = _grouping(source, group_by, clusters, seed)
    return groups, names


def _grouping(source: Source, group_by: str, clusters: int,
              seed: int) -> tuple[str, np.ndarray, list[str]]:
    """(the grouping used — `auto` resolved —, groups, names); see `cluster_groups`."""
    if group_by not in GROUPINGS:
        raise ValueError(f"unknown select.group_by {group_by!r}; valid: {', '.join(GROUPINGS)}")
    size = len(source)
    if group_by == "none":
        return "none", np.zeros(size, np.int64), ["all"]
    if group_by == "label" or (group_by == "auto" and source.labels is not None):
        labels = source.labels
        if labels is None:
            raise ValueError(f"select.group_by=label: data source {source.name!r} has no labels")
        values, groups = np.unique(labels, return_inverse=True)
        return "label", groups.astype(np.int64), [f"label {v}" for v in values]
    captions, embeddings = _caption_fields(source)
    if group_by == "caption" or (group_by == "auto" and captions is not None
                                 and len(set(captions)) <= size / 5):
        if captions is None:
            raise ValueError(f"select.group_by=caption: data source {source.name!r} has no "
                             "captions")
        values, groups = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
        return "caption", groups.astype(np.int64), [str(v) for v in values]
    if clusters < 1:
        raise ValueError(f"select.clusters must be at least 1, got {clusters}")
    if embeddings is not None:
        rows, inverse, counts = np.unique(embeddings, axis=0, return_inverse=True,
                                          return_counts=True)
        features = rows
    elif captions is not None:
        texts, inverse, counts = np.unique(np.asarray(captions, dtype=object),
                                           return_inverse=True, return_counts=True)
        features = tfidf([str(t) for t in texts], counts)
    else:
        raise ValueError(f"select.group_by={group_by}: data source {source.name!r} has neither "
                         "captions nor text embeddings to cluster")
    groups = kmeans(features, clusters, seed, weights=counts)[inverse.ravel()]
    return "kmeans", groups, _cluster_names(groups, captions)


def _caption_fields(source: Source) -> tuple[list[str] | None, np.ndarray | None]:
    """(captions or None, float (N, D) mean-pooled text embeddings or None), in source order."""
    first = source[0] if len(source) else {}
    if isinstance(source, ArraySource) and "text_embedding" not in first:
        return source.captions, None
    if "caption" not in first and "text_embedding" not in first:
        return None, None
    captions, embeddings = [], []
    for index in tqdm(range(len(source)), desc=f"reading captions of {source.name}",
                      unit="ex", leave=False):
        example = source[index]
        if "caption" in first:
            captions.append(example["caption"])
        if "text_embedding" in first:
            embedding = np.asarray(example["text_embedding"], np.float64)
            embeddings.append(embedding.reshape(-1, embedding.shape[-1]).mean(axis=0))
    return (captions if "caption" in first else None,
            np.stack(embeddings) if "text_embedding" in first else None)


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
        (np.ones(len(rows)), (rows, columns)), shape=(len(texts), columns.max(initial=-1) + 1))
    present = term_counts.copy()
    present.data[:] = 1.0
    idf = np.log((1 + counts.sum()) / (1 + present.T @ counts)) + 1
    weighted = term_counts.multiply(idf[None, :]).tocsr()
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=1)).ravel())
    return scipy.sparse.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ weighted


def kmeans(features, k: int, seed: int, weights: np.ndarray | None = None,
           iterations: int = 100) -> np.ndarray:
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
    squared_norms = (np.asarray(features.multiply(features).sum(axis=1)).ravel()
                     if scipy.sparse.issparse(features) else (features**2).sum(axis=1))

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
        membership = scipy.sparse.csr_matrix((weights, (assignment, np.arange(size))),
                                             shape=(len(centers), size))
        mass = np.asarray(membership.sum(axis=1)).ravel()
        sums = dense(membership @ features)
        centers = np.where(mass[:, None] > 0, sums / np.maximum(mass, 1e-300)[:, None], centers)
        updated = squared_distances(centers).argmin(axis=1)
        if np.array_equal(updated, assignment):
            break
        assignment = updated
    return np.unique(assignment, return_inverse=True)[1].astype(np.int64)


# ==============================================================================================
# The `select` command
# ==============================================================================================


@dataclasses.dataclass(frozen=True)
class RankingScores:
    """What a selection from the pool ranks, one entry per pool sample, in pool order.

    ids: int64 (N,) the pool's ids.
    scores: float64 (N,) higher = better: the ratings file's own scores when there is one file,
      the fused score (`fuse`) when there are several, zeros when there is none.
    eligible: bool (N,) False for the duplicates collapsed into a better member of their group.
    groups: int64 (N,) ranking cluster; names: the cluster names; grouping: the `group_by`
      used (`auto` resolved).
    ratings, weights, dedup: the inputs: ratings names (files), the weight of each, the dedup
      name or None.
    """

    ids: np.ndarray
    scores: np.ndarray
    eligible: np.ndarray
    groups: np.ndarray
    names: list[str]
    grouping: str
    ratings: list[str]
    weights: list[float]
    dedup: str | None


def ranking_scores(config: SelectConfig, ratings: Mapping[str, tuple[np.ndarray, np.ndarray]],
                   source: Source, *,
                   duplicates: tuple[str, tuple[np.ndarray, np.ndarray]] | None = None
                   ) -> RankingScores:
    """Joins ratings files (and a dedup file) on the pool's ids and fuses them (see the module
    docstring).

    Args:
      config: the `select` section (group_by, clusters, seed, weights).
      ratings: name (the file; errors and the record use it) -> (ids int64 (N,), scores float
        (N,)), each covering the pool's ids exactly once, in any order; empty: constant scores
        (for policies that read none, such as `random`).
      source: the pool.
      duplicates: (name, (ids int64 (N,), duplicate group int (N,))) of a dedup file covering the
        pool's ids, or None.
    Raises:
      ValueError: a file whose ids are not exactly the pool's (named, with an example id),
        non-finite scores, weights that do not match the files, bad config values.
    """
    pool_ids = np.asarray(source.ids, np.int64)
    if config.weights and len(config.weights) != len(ratings):
        raise ValueError(f"select.weights has {len(config.weights)} values for "
                         f"{len(ratings)} ratings files ({', '.join(ratings)}); give one per "
                         "file, in order, or none for equal weights")
    columns = []
    for name, (ids, scores) in ratings.items():
        origin = f"ratings file {name}"
        scores = np.asarray(scores, np.float64)
        _check_finite(scores, origin)
        aligned = np.empty(len(pool_ids))
        aligned[_pool_positions(np.asarray(ids, np.int64), pool_ids, origin)] = scores
        columns.append(aligned)
    grouping, groups, names = _grouping(source, config.group_by, config.clusters, config.seed)
    weights = list(config.weights) or [1.0] * len(columns)
    if columns:
        fused = fuse(columns, weights, groups)
        scores = columns[0] if len(columns) == 1 else fused
    else:
        fused = scores = np.zeros(len(pool_ids))
    eligible = np.ones(len(pool_ids), bool)
    if duplicates is not None:
        name, (ids, duplicate_groups) = duplicates
        grouped = np.empty(len(pool_ids), np.int64)
        grouped[_pool_positions(np.asarray(ids, np.int64), pool_ids, f"dedup file {name}")] = \
            duplicate_groups
        eligible = best_of_duplicates(fused, pool_ids, grouped)
    return RankingScores(pool_ids, scores, eligible, groups, names, grouping, list(ratings),
                         weights, None if duplicates is None else duplicates[0])


def select_for_source(config: SelectConfig, ratings: Mapping[str, tuple[np.ndarray, np.ndarray]],
                      source: Source, *,
                      duplicates: tuple[str, tuple[np.ndarray, np.ndarray]] | None = None
                      ) -> tuple[np.ndarray, dict[str, Any]]:
    """Selects from the ratings of the pool `source` as `config` says.

    Args:
      config: the `select` section.
      ratings, source, duplicates: see `ranking_scores`.
    Returns:
      (selected ids int64 ascending, the summary: `summarize`'s dict of the ranked scores plus
      "policy", "keep", "group_by" — the grouping used, `auto` resolved —, "ratings",
      "weights", "dedup" and "duplicates_collapsed", the number of samples made ineligible).
    Raises:
      ValueError: see `ranking_scores`; also bad policy parameters or a keep larger than the
        eligible part of the pool.
    """
    params = resolve_params(config.policy, config.keep, **{
        name: getattr(config, name) for name in POLICY_PARAMETERS[config.policy]})
    ranked = ranking_scores(config, ratings, source, duplicates=duplicates)
    selected = select(ranked.scores, ranked.ids, policy=config.policy, keep=config.keep,
                      seed=config.seed, groups=ranked.groups, eligible=ranked.eligible, **params)
    summary = summarize(ranked.scores, ranked.ids, selected, ranked.groups, ranked.names,
                        {**params, "seed": config.seed})
    return selected, {"policy": config.policy, "keep": config.keep, "group_by": ranked.grouping,
                      "ratings": ranked.ratings, "weights": ranked.weights,
                      "dedup": ranked.dedup,
                      "duplicates_collapsed": int((~ranked.eligible).sum()), **summary}


def _pool_positions(ids: np.ndarray, pool_ids: np.ndarray, origin: str) -> np.ndarray:
    """The pool index of each id of file `origin`; the file must cover the pool exactly once."""
    _check_unique(ids, origin)
    order = np.argsort(pool_ids, kind="stable")
    found = np.minimum(np.searchsorted(pool_ids[order], ids), len(pool_ids) - 1)
    known = pool_ids[order][found] == ids
    if not known.all():
        raise ValueError(f"{origin}: {int((~known).sum())} of its ids are not in the pool "
                         f"(e.g. id {int(ids[~known][0])})")
    if len(ids) < len(pool_ids):
        missing = np.setdiff1d(pool_ids, ids)
        raise ValueError(f"{origin}: {len(missing)} pool ids are missing (e.g. id "
                         f"{int(missing[0])})")
    return order[found]


def read_ratings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 (N,), scores float64 (N,)) of a ratings.parquet (columns `id`, `score`).

    Raises:
      ValueError: a missing or unreadable file, a missing or non-numeric column, null values.
    """
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise ValueError(f"cannot read ratings file {path}: {e}") from None
    columns = {}
    for name, kind in (("id", pa.types.is_integer), ("score", pa.types.is_floating)):
        if name not in table.column_names:
            raise ValueError(f"ratings file {path} has no column {name!r} (columns: "
                             f"{', '.join(table.column_names)})")
        column = table.column(name)
        if not kind(column.type):
            raise ValueError(f"ratings file {path}: column {name!r} has type {column.type}")
        if column.null_count:
            raise ValueError(f"ratings file {path}: column {name!r} has {column.null_count} "
                             "null values")
        columns[name] = column.to_numpy()
    return columns["id"].astype(np.int64), columns["score"].astype(np.float64)


def write_selection(out: Path, selected: np.ndarray, summary: dict[str, Any]) -> None:
    """Writes `out` (Parquet, column `id` int64; the recipe — policy, keep, grouping,
    parameters and the inputs: ratings files, weights, dedup file — as JSON in the file
    metadata, those of them the summary has) and the summary as `out.with_suffix('.json')`,
    both atomically."""
    out = Path(out)
    recipe = {key: summary[key] for key in RECIPE_KEYS if key in summary}
    table = pa.table({"id": pa.array(np.asarray(selected, np.int64), pa.int64())})
    table = table.replace_schema_metadata({PARQUET_METADATA_KEY: json.dumps(recipe)})
    atomic_write_parquet(out, table)
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(summary, indent=2) + "\n").encode())


def run(cfg: Config, ratings: Path | Sequence[Path], out: Path,
        dedup: Path | None = None) -> dict[str, Any]:
    """`alchemist-jax select`: reads the ratings file(s) (and the dedup file), selects from the
    pool of `cfg.data` with `cfg.select`, writes `out` and its summary (`write_selection`),
    prints a short account and returns the summary."""
    from alchemist_jax.data import load_splits

    paths = [Path(ratings)] if isinstance(ratings, (str, Path)) else [Path(p) for p in ratings]
    if not paths:
        raise ValueError("select needs at least one ratings file")
    repeated = [p for n, p in enumerate(paths) if p in paths[:n]]
    if repeated:
        raise ValueError(f"ratings file {repeated[0]} is given twice; use select.weights to "
                         "weigh a file more")
    read = {str(path): read_ratings(path) for path in paths}
    duplicates = None
    if dedup is not None:
        from alchemist_jax.dedup import read_groups

        duplicates = (str(dedup), read_groups(Path(dedup)))
    pool = load_splits(cfg.data).train
    selected, summary = select_for_source(cfg.select, read, pool, duplicates=duplicates)
    write_selection(Path(out), selected, summary)
    rates = summary["cluster_keep_rates"].values()
    collapsed = (f", {summary['duplicates_collapsed']} duplicates collapsed"
                 if dedup is not None else "")
    print(f"selected {summary['count']} of {summary['pool_size']} samples "
          f"({summary['policy']}, keep {summary['keep']}, {len(paths)} ratings "
          f"file{'s' * (len(paths) > 1)}{collapsed}) in {len(rates)} clusters by "
          f"{summary['group_by']}: keep rate per cluster {min(rates):.3f}-{max(rates):.3f}; "
          f"wrote {out}")
    return summary
