"""Statistics on per-sample scores (pure numpy): AUROC, within-group normalisation, ranks."""

from __future__ import annotations

import numpy as np


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > one of a random negative), ties
    counted one half (the Mann-Whitney U statistic over |pos|·|neg|).

    Args:
      positive: (n,) scores of the positive class (here: clean samples).
      negative: (m,) scores of the negative class (defective samples).
    """
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if len(positive) == 0 or len(negative) == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    values = np.concatenate([positive, negative])
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    # Average ranks over ties (1-based).
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2
    rank_sum = ranks[: len(positive)].sum()
    u = rank_sum - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def group_members(groups: np.ndarray) -> list[np.ndarray]:
    """Positions of each group's members (ascending), groups in sorted order of their values."""
    values, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse, minlength=len(values)))[:-1])


def normalize_within_groups(scores: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Z-scores `scores` (N,) within each group (N,) (a rater's per-class offsets are not
    quality); groups of one sample get 0. `groups=None` normalises globally."""
    scores = np.asarray(scores, np.float64)
    groups = np.zeros(len(scores), np.int64) if groups is None else np.asarray(groups)
    out = np.zeros_like(scores)
    for members in group_members(groups):
        values = scores[members]
        std = values.std()
        out[members] = (values - values.mean()) / std if std > 0 else 0.0
    return out


def rank_normalize(scores: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Mid-rank percentile (N,) in (0, 1) of each score within its group, higher = better:
    (r - 1/2) / n, r the ascending rank among the group's n members, tied scores sharing the
    average of their ranks (so a group of one sample gets 1/2). Never 0, so that percentiles can
    be multiplied.

    Args:
      scores: float (N,), higher = better.
      groups: int (N,) cluster of each sample, or None for one group.
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores, np.float64)
    groups = np.zeros(len(scores), np.int64) if groups is None else np.asarray(groups)
    percentiles = np.empty(len(scores))
    for members in group_members(groups):
        percentiles[members] = (rankdata(scores[members]) - 0.5) / len(members)
    return percentiles


def rank_percentiles(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Global rank percentile (N,) of each sample in [0, 1), 0 = best; ties ranked by id."""
    scores, ids = np.asarray(scores, np.float64), np.asarray(ids)
    percentiles = np.empty(len(scores))
    percentiles[np.lexsort((ids, -scores))] = np.arange(len(scores)) / len(scores)
    return percentiles
