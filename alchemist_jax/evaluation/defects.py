"""Measuring a rater: how well its scores separate clean samples from injected defects."""

from __future__ import annotations

from typing import Sequence

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


def normalize_within_groups(scores: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Z-scores `scores` (N,) within each group (N,) (a rater's per-class offsets are not
    quality); groups of one sample get 0. `groups=None` normalises globally."""
    scores = np.asarray(scores, np.float64)
    groups = np.zeros(len(scores), np.int64) if groups is None else np.asarray(groups)
    out = np.zeros_like(scores)
    for group in np.unique(groups):
        members = groups == group
        values = scores[members]
        std = values.std()
        out[members] = (values - values.mean()) / std if std > 0 else 0.0
    return out


def defect_auroc(scores: np.ndarray, defects: Sequence[str | None],
                 groups: np.ndarray | None = None) -> dict[str, float]:
    """AUROC of clean (positive, `defect` None) against each defect kind and against all defects.

    Args:
      scores: (N,) higher = better sample.
      defects: (N,) defect kind per sample, None for clean.
      groups: optional (N,) cluster per sample; scores are z-scored within clusters first.
    Returns:
      {"all": AUROC clean vs every defect, "<kind>": AUROC clean vs that kind, ...}.
    """
    normalized = normalize_within_groups(scores, groups)
    kinds = np.array([d if d is not None else "" for d in defects], dtype=object)
    clean = normalized[kinds == ""]
    result = {"all": auroc(clean, normalized[kinds != ""])}
    for kind in sorted(set(kinds) - {""}):
        result[kind] = auroc(clean, normalized[kinds == kind])
    return result


def credit_kept_copies(defects: Sequence[str | None], ids: np.ndarray, eligible: np.ndarray,
                       copied_from: dict[int, int]) -> list[str | None]:
    """`defects` with each kept exact copy and its collapsed source swapping labels.

    An exact `duplicate` is the same image and caption as its source under another id, so no
    scorer can tell which of the two is "the copy"; deduplication keeps one of them, by id when
    the scores tie. When it keeps the copy and collapses the source, the collapsed member is
    the redundant one: this labels the source `duplicate` and the copy clean, so that the AUROC
    of a deduplicated ranking measures the redundancy removed, not the order of ids.

    Args:
      defects: (N,) defect kind per sample, None for clean.
      ids: int (N,) pool ids, aligned with `defects` and `eligible`.
      eligible: bool (N,) False for the samples deduplication collapsed.
      copied_from: pool id of each exact `duplicate` -> the pool id it copies.
    """
    labels = list(defects)
    position = {int(i): k for k, i in enumerate(ids)}
    for copy, source in copied_from.items():
        c, s = position.get(copy), position.get(source)
        if (c is not None and s is not None and labels[c] == "duplicate" and labels[s] is None
                and eligible[c] and not eligible[s]):
            labels[c], labels[s] = None, "duplicate"
    return labels
