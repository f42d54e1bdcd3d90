"""Measuring a rater: how well its scores separate clean samples from injected defects."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alchemist_jax.runtime.stats import auroc, normalize_within_groups


def defect_auroc(
    scores: np.ndarray, defects: Sequence[str | None], groups: np.ndarray | None = None
) -> dict[str, float]:
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


def credit_kept_copies(
    defects: Sequence[str | None],
    ids: np.ndarray,
    eligible: np.ndarray,
    copied_from: dict[int, int],
) -> list[str | None]:
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
        if (
            c is not None
            and s is not None
            and labels[c] == "duplicate"
            and labels[s] is None
            and eligible[c]
            and not eligible[s]
        ):
            labels[c], labels[s] = None, "duplicate"
    return labels
