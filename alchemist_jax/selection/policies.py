"""Selection policies (pure numpy): which ids of a scored pool to keep.

    selected = select(scores, ids, policy="filter", keep=0.5, seed=0, groups=groups, drop=0.25)

Scores are higher = better. Within a group of n samples, samples are ranked best first (ties
broken by id) and the rank percentile of the sample at rank r (0-based) is u = r / n, in [0, 1),
0 = best. Every policy runs inside each group (caption class, caption or k-means cluster of
caption embeddings, `selection.clusters`; one group = global ranking; the command passes the
clusters only for `select.ranking=within`, see `selection.ranking`) and every group keeps its
share of the pool: the round(keep * N) samples are allocated to the groups in proportion to their
sizes by the largest remainder method (ties to the earlier group), so the total is exact.
Policies (the names of `config.POLICIES`; METHOD.md §4, §8):

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

A new policy is a per-group function `(scores (n,), share, rng, **params) -> positions` added to
`POLICY_FUNCTIONS`, its parameters to `POLICY_PARAMETERS`, and its name to `config.POLICIES`
(tests check that the three agree). A policy that draws its share uniformly from a set the ranking
fixes is instead that set's function in `UNIFORM_CANDIDATES`; `inclusion_probabilities` then gives
each sample's exact chance of selection (what a ranking is worth, without the luck of one draw).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from alchemist_jax.config import POLICIES, SelectConfig
from alchemist_jax.runtime.io import check_unique_ids
from alchemist_jax.runtime.stats import group_members, normalize_within_groups

# The parameters of each policy (SelectConfig fields); their defaults are SelectConfig's.
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
_TOLERANCE = 1e-9  # float slack when comparing fractions such as keep + drop to 1


def resolve_params(policy: str, keep: float, **params: Any) -> dict[str, Any]:
    """The parameters `policy` uses, defaults filled in (SelectConfig's) and validated.

    `head=None` becomes max(0, min(0.25, 0.95 - keep)). Parameters of other policies are accepted
    and ignored, so a whole SelectConfig can be passed.

    Raises:
      ValueError: an unknown policy or parameter name, a value out of range, or a `drop` /
        `head` / `start` that leaves fewer than `keep` of the pool to choose from.
    """
    if policy not in POLICIES:
        raise ValueError(
            f"unknown selection policy {policy!r}; valid policies: {', '.join(POLICIES)}"
        )
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"select.keep must be in (0, 1], got {keep}")
    unknown = sorted(set(params) - set(PARAMETER_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown selection parameter {', '.join(map(repr, unknown))}; valid "
            f"parameters: {', '.join(PARAMETER_DEFAULTS)}"
        )
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
                    f"to choose from, less than select.keep={keep}; need keep <= 1 - {name}"
                )
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


def select(
    scores: np.ndarray,
    ids: np.ndarray,
    *,
    policy: str,
    keep: float,
    seed: int,
    groups: np.ndarray | None = None,
    eligible: np.ndarray | None = None,
    **params: Any,
) -> np.ndarray:
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
    resolved = resolve_params(policy, keep, **params)
    _, scores, ids, groups, eligible, total = _check_inputs(scores, ids, groups, eligible, keep)
    members_of, shares = _group_shares(groups, eligible, total)
    chosen = [
        ids[
            members[
                POLICY_FUNCTIONS[policy](
                    scores[members], int(share), np.random.default_rng((seed, position)), **resolved
                )
            ]
        ]
        for position, (members, share) in enumerate(zip(members_of, shares))
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def inclusion_probabilities(
    scores: np.ndarray,
    ids: np.ndarray,
    *,
    policy: str,
    keep: float,
    groups: np.ndarray | None = None,
    eligible: np.ndarray | None = None,
    **params: Any,
) -> np.ndarray:
    """Each sample's probability of being selected by `select` with the same arguments, over
    its random draw (exact; the seed does not matter). Measures what a ranking is worth without
    the luck of one draw: e.g. the expected clean share of the selection is
    (probabilities · clean) / probabilities.sum().

    Defined for the policies that draw their share uniformly from a set fixed by the ranking
    (`UNIFORM_CANDIDATES`: filter, topk, bottomk, random, block): share / |set| for the set's
    members, 0 elsewhere. Arguments as in `select`.

    Returns:
      float64 (N,) in [0, 1], in the order of `ids`, summing to round(keep * N).
    Raises:
      ValueError: a policy outside UNIFORM_CANDIDATES (named), or what `select` raises.
    """
    if policy not in UNIFORM_CANDIDATES:
        raise ValueError(
            f"inclusion_probabilities: policy {policy!r} draws by weight; exact probabilities "
            f"exist for {', '.join(UNIFORM_CANDIDATES)} (average `select` over seeds otherwise)"
        )
    resolved = resolve_params(policy, keep, **params)
    by_id, scores, _, groups, eligible, total = _check_inputs(scores, ids, groups, eligible, keep)
    in_id_order = np.zeros(len(scores))
    members_of, shares = _group_shares(groups, eligible, total)
    for members, share in zip(members_of, shares):
        candidates = members[UNIFORM_CANDIDATES[policy](scores[members], int(share), **resolved)]
        in_id_order[candidates] = share / max(len(candidates), 1)
    probabilities = np.empty(len(scores))
    probabilities[by_id] = in_id_order
    return probabilities


def _group_shares(
    groups: np.ndarray, eligible: np.ndarray, total: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """(each group's eligible positions, its share of `total`: `allocate` by eligible size)."""
    members_of = [members[eligible[members]] for members in group_members(groups)]
    return members_of, allocate(total, np.array([len(m) for m in members_of]))


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


def check_finite(scores: np.ndarray, what: str) -> None:
    """ValueError naming `what` and the NaN / infinite counts when a score (N,) is not finite."""
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(
            f"{what}: {int(np.isnan(scores).sum())} scores are NaN and "
            f"{int(np.isinf(scores).sum())} infinite; every score must be finite"
        )


def _check_inputs(
    scores, ids, groups, eligible, keep
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(by_id, scores, ids, groups, eligible, total): the inputs checked and put in id order
    (results ignore the row order; by_id the permutation that did it), with the total
    round(keep * N)."""
    scores = np.asarray(scores, np.float64)
    ids = np.asarray(ids)
    if scores.ndim != 1 or ids.ndim != 1 or len(scores) != len(ids):
        raise ValueError(f"scores {scores.shape} and ids {ids.shape} must be 1-D of one length")
    if len(ids) == 0:
        raise ValueError("there are no scores to select from")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    check_unique_ids(ids, "ids")
    check_finite(scores, "scores")
    groups = np.zeros(len(ids), np.int64) if groups is None else np.asarray(groups)
    if groups.shape != ids.shape:
        raise ValueError(f"groups {groups.shape} must have the shape of ids {ids.shape}")
    eligible = np.ones(len(ids), bool) if eligible is None else np.asarray(eligible, bool)
    if eligible.shape != ids.shape:
        raise ValueError(f"eligible {eligible.shape} must have the shape of ids {ids.shape}")
    total = round(keep * len(ids))
    if total == 0:
        raise ValueError(f"select.keep={keep} of {len(ids)} samples keeps no sample")
    if total > eligible.sum():
        raise ValueError(
            f"select.keep={keep} asks for {total} samples but only "
            f"{int(eligible.sum())} of {len(ids)} are eligible (the others are "
            "duplicates of a better-scored sample)"
        )
    by_id = np.argsort(ids, kind="stable")
    return by_id, scores[by_id], ids[by_id].astype(np.int64), groups[by_id], eligible[by_id], total


def _best_first(scores: np.ndarray) -> np.ndarray:
    """Positions ordered best (highest score) first; ties keep position order."""
    return np.argsort(-scores, kind="stable")


def _gumbel_top_k(log_weights: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` positions drawn without replacement with probability ∝ exp(log_weights)."""
    keys = log_weights + rng.gumbel(size=len(log_weights))
    return np.argsort(-keys, kind="stable")[:count]


# Per-group policies: (scores (n,), share, rng, **params) -> positions (into the group) chosen.


def _filter_candidates(scores, share, *, drop):
    dropped = min(round(drop * len(scores)), len(scores) - share)
    return _best_first(scores)[: len(scores) - dropped]


def _gaussian(scores, share, rng, *, mu, sigma, head=0.0):
    n = len(scores)
    ranking = _best_first(scores)
    skipped = min(round(head * n), n - share)
    percentiles = np.arange(skipped, n) / n
    log_weights = -((percentiles - mu) ** 2) / (2 * sigma**2)
    return ranking[skipped:][_gumbel_top_k(log_weights, share, rng)]


def _topk_candidates(scores, share):
    return _best_first(scores)[:share]


def _bottomk_candidates(scores, share):
    return _best_first(scores)[len(scores) - share :]


def _random_candidates(scores, share):
    return np.arange(len(scores))


def _block_candidates(scores, share, *, start):
    first = min(round(start * len(scores)), len(scores) - share)
    return _best_first(scores)[first : first + share]


def _uniform_draw(candidates: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """The per-group policy that draws its share uniformly from `candidates(scores, share,
    **params)` (all of them when there are exactly `share`)."""

    def draw(scores, share, rng, **params):
        chosen = candidates(scores, share, **params)
        return chosen if len(chosen) == share else rng.choice(chosen, size=share, replace=False)

    return draw


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


# Policies that draw their share uniformly from a set fixed by the ranking:
# (scores (n,), share, **params) -> positions of that set (`inclusion_probabilities`).
UNIFORM_CANDIDATES: dict[str, Callable[..., np.ndarray]] = {
    "filter": _filter_candidates,
    "topk": _topk_candidates,
    "bottomk": _bottomk_candidates,
    "random": _random_candidates,
    "block": _block_candidates,
}

# Keyed by the names of `config.POLICIES` (a test checks that they agree).
POLICY_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    **{name: _uniform_draw(candidates) for name, candidates in UNIFORM_CANDIDATES.items()},
    "shift_gsample": _gaussian,
    "gsample": _gaussian,
    "threshold": _threshold,
    "weighted": _weighted,
    "cdf_accept": _cdf_accept,
}
