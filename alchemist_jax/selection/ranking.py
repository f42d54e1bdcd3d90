"""Cluster offsets in the ranking: how much of a cluster's mean score is style, how much quality.

    adjusted, offsets = shrunk_offsets(robust_z(scores), groups)   # select.ranking=shrunk

A scorer's mean differs between clusters for two reasons: style (a meta-learned rater gives whole
caption classes higher scores, a transient curriculum signal, METHOD.md §8) and quality (a cluster
of junk captions or broken images really is worse). Ranking within clusters (`within`) removes
both and gives every cluster its share of the budget; ranking the raw scores (`global`) keeps
both. `shrunk` removes an offset only as far as it is evidence of style:

  s_i = c + a_g + e_i,   a_g ~ N(0, tau²) (style),   e_i ~ N(0, sigma²) (the sample's own part)

For sample i of cluster g (n_g members) the offset removed is the empirical-Bayes posterior mean of
a_g from the *other* members (leave one out, so a sample never normalises itself away),

  a_i = clip(B_i · (mean_{g without i} − c), −cap·tau, +cap·tau),
  B_i = tau² / (tau² + sigma² / (n_g − 1))

with c the median of the cluster means, sigma² the pooled within-cluster variance and tau² =
max(0, (1.4826 · MAD of the cluster means)² − median(sigma² / n_g)) (method of moments, robust:
one bad cluster does not make every offset look like style). Hence:
  - a cluster of one sample removes nothing (B = 0): the sample is ranked on its own score;
  - a large cluster whose offset is typical of the clusters' spread removes all of it (B → 1):
    the `within` behaviour, per-class loss offsets of a rater are gone;
  - an offset far outside that spread is removed only up to `cap`·tau: a cluster made of bad
    samples stays at the bottom of the one global ranking and can lose its whole share.
With a single cluster nothing is removed (tau = 0).
"""

from __future__ import annotations

import dataclasses

import numpy as np

STYLE_CAP = 3.0  # largest style offset removed, in units of tau (the spread of style offsets)
ESTIMATE_CLIP = 10.0  # scores count as at most +-this in the offsets' estimates (robust z units)
_MAD_TO_SD = 1.4826  # MAD of a normal sample -> its standard deviation


@dataclasses.dataclass(frozen=True)
class Offsets:
    """What `shrunk_offsets` removed, per cluster (G clusters, values index 0..G-1 of groups).

    removed: float (N,) the offset subtracted from each sample's score.
    sizes: int (G,); means: float (G,) each cluster's mean minus the centre c; shrinkage: (G,)
    B = tau² / (tau² + sigma² / (n_g − 1)) of a member (0 for a cluster of one);
    cluster_removed: (G,) the mean of its members' `removed` (what the cluster lost on average).
    center, tau, sigma: c, the style spread and the within-cluster spread (score units).
    """

    removed: np.ndarray
    sizes: np.ndarray
    means: np.ndarray
    shrinkage: np.ndarray
    cluster_removed: np.ndarray
    center: float
    tau: float
    sigma: float


def robust_z(scores: np.ndarray) -> np.ndarray:
    """(s − median) / (1.4826 · MAD) (N,); the std when the MAD is 0, and zeros when the scores
    are constant. Scorers speak on different scales (logits, log-probabilities, cosines); this
    puts them on one without letting a few extreme scores set the scale. Not clipped: the order
    of extreme scores is kept (`shrunk_offsets` bounds their weight in its estimates)."""
    scores = np.asarray(scores, np.float64)
    centered = scores - np.median(scores)
    scale = _MAD_TO_SD * np.median(np.abs(centered))
    if not scale > 0:
        scale = centered.std()
    if not scale > 0:
        return np.zeros_like(scores)
    return centered / scale


def shrunk_offsets(
    scores: np.ndarray, groups: np.ndarray | None, cap: float = STYLE_CAP
) -> tuple[np.ndarray, Offsets]:
    """The scores with each cluster's style offset removed (see the module docstring).

    Args:
      scores: float (N,), higher = better, on a robust z scale (`robust_z`): the offsets are
        estimated from the scores clipped to ±ESTIMATE_CLIP (a −1e9 score is just "very low"
        there) and subtracted from the scores themselves, so their order within a cluster stays.
      groups: int (N,) cluster of each sample with values 0..G-1, or None (one cluster).
      cap: the largest offset removed, in units of tau.
    Returns:
      (adjusted float (N,) = scores − removed, `Offsets`).
    """
    scores = np.asarray(scores, np.float64)
    estimated = np.clip(scores, -ESTIMATE_CLIP, ESTIMATE_CLIP)
    groups = np.zeros(len(scores), np.int64) if groups is None else np.asarray(groups, np.int64)
    count = int(groups.max(initial=-1)) + 1
    sizes = np.bincount(groups, minlength=count).astype(np.int64)
    sums = np.bincount(groups, weights=estimated, minlength=count)
    present = sizes > 0
    means = np.where(present, sums / np.maximum(sizes, 1), 0.0)
    residual = estimated - means[groups]
    degrees = len(scores) - int(present.sum())
    sigma2 = float((residual**2).sum() / degrees) if degrees > 0 else 0.0
    center = float(np.median(means[present])) if present.any() else 0.0
    tau2 = 0.0
    if present.sum() >= 2:
        spread = _MAD_TO_SD * np.median(np.abs(means[present] - center))
        tau2 = max(0.0, spread**2 - float(np.median(sigma2 / sizes[present])))
    tau = float(np.sqrt(tau2))
    others = sizes[groups] - 1  # members of the sample's cluster besides itself
    loo_mean = np.where(others > 0, (sums[groups] - estimated) / np.maximum(others, 1), center)
    member_shrink = np.where(  # B of a member: its cluster's other members
        sizes > 1, tau2 / np.maximum(tau2 + sigma2 / np.maximum(sizes - 1, 1), 1e-300), 0.0
    )
    removed = np.clip(member_shrink[groups] * (loo_mean - center), -cap * tau, cap * tau)
    return scores - removed, Offsets(
        removed=removed,
        sizes=sizes,
        means=means - center,
        shrinkage=member_shrink,
        cluster_removed=np.bincount(groups, weights=removed, minlength=count)
        / np.maximum(sizes, 1),
        center=center,
        tau=tau,
        sigma=float(np.sqrt(sigma2)),
    )
