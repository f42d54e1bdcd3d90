"""Selection policies (`selection.policies`): counts, cluster shares, determinism, the
distributions of the random policies against exact references, parameter errors, the budget after
duplicates are collapsed, and the dispatch against `config.POLICIES`."""

import numpy as np
import pytest

from alchemist_jax import selection
from alchemist_jax.config import POLICIES
from alchemist_jax.selection import policies

EXACT_POLICIES = [p for p in POLICIES if p not in ("threshold", "cdf_accept")]
RANDOM_POLICIES = ("filter", "shift_gsample", "gsample", "random", "weighted", "cdf_accept")


def _pool(size=203, groups=5, seed=0):
    """Scores, unique shuffled ids and uneven groups of a synthetic pool."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=size)
    ids = rng.permutation(10 * size)[:size].astype(np.int64)
    group_of = np.minimum(rng.integers(0, groups, size), rng.integers(0, groups, size))
    return scores, ids, group_of


# Ten samples, ids 10..19; best first: 10, 15, 13, 17, 12, 18, 14, 16, 11, 19.
HAND_SCORES = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.0])
HAND_IDS = np.arange(10, 20)


# ----------------------------------------------------------------------------------------------
# Counts, shares, determinism
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", EXACT_POLICIES)
def test_exact_count_and_cluster_shares(policy):
    scores, ids, groups = _pool()
    for keep in (0.1, 0.37, 0.5, 0.7):
        for group_of in (None, groups):
            chosen = selection.select(
                scores, ids, policy=policy, keep=keep, seed=3, groups=group_of
            )
            assert chosen.dtype == np.int64 and np.all(np.diff(chosen) > 0)
            assert len(chosen) == round(keep * len(ids)) and np.isin(chosen, ids).all()
            if group_of is not None:
                sizes = np.bincount(groups)
                kept = np.bincount(groups[np.isin(ids, chosen)], minlength=len(sizes))
                np.testing.assert_array_equal(kept, selection.allocate(len(chosen), sizes))


def test_largest_remainder_allocation_by_hand():
    assert selection.allocate(5, np.array([3, 3, 4])).tolist() == [2, 1, 2]
    assert selection.allocate(4, np.array([7, 2, 1])).tolist() == [3, 1, 0]
    assert selection.allocate(3, np.array([1, 1, 1, 1])).tolist() == [1, 1, 1, 0]
    assert selection.allocate(10, np.array([5, 3, 2])).tolist() == [5, 3, 2]
    # The shares decide the per-cluster counts of a real selection: 5 of 10, clusters 3/3/4.
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    chosen = selection.select(HAND_SCORES, HAND_IDS, policy="topk", keep=0.5, seed=0, groups=groups)
    # cluster 0 = ids 10-12 -> best two 10, 12; 1 = 13-15 -> best one 15; 2 = 16-19 -> 17, 18
    assert chosen.tolist() == [10, 12, 15, 17, 18]


@pytest.mark.parametrize("policy", RANDOM_POLICIES)
def test_deterministic_from_seed_and_row_order(policy):
    scores, ids, groups = _pool()
    first = selection.select(scores, ids, policy=policy, keep=0.4, seed=7, groups=groups)
    again = selection.select(scores, ids, policy=policy, keep=0.4, seed=7, groups=groups)
    shuffle = np.random.default_rng(1).permutation(len(ids))
    shuffled = selection.select(
        scores[shuffle], ids[shuffle], policy=policy, keep=0.4, seed=7, groups=groups[shuffle]
    )
    other = selection.select(scores, ids, policy=policy, keep=0.4, seed=8, groups=groups)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, shuffled)
    assert not np.array_equal(first, other)


# ----------------------------------------------------------------------------------------------
# Policies against exact expectations
# ----------------------------------------------------------------------------------------------


def test_deterministic_policies_by_hand():
    def pick(policy, keep=0.3, **params):
        return selection.select(
            HAND_SCORES, HAND_IDS, policy=policy, keep=keep, seed=0, **params
        ).tolist()

    assert pick("topk") == [10, 13, 15]
    assert pick("bottomk") == [11, 16, 19]
    assert pick("block", start=0.4) == [12, 14, 18]
    assert pick("block", keep=0.5, start=0.5) == [11, 14, 16, 18, 19]
    assert pick("threshold") == [10, 13, 15]  # None: the keep quantile
    assert pick("threshold", threshold=0.55) == [10, 13, 15, 17]  # every score >= 0.55
    ties = selection.select(
        np.array([1.0, 1.0, 1.0, 0.0]), np.array([4, 3, 2, 1]), policy="topk", keep=0.5, seed=0
    )
    assert ties.tolist() == [2, 3]  # ties ranked by id


def test_filter_never_picks_the_bottom_and_fills_uniformly():
    # Two clusters of 8, keep 1/2, drop 1/4: each cluster drops its 2 worst and keeps 4 of the
    # 6 others, each of them with probability exactly 4/6.
    rng = np.random.default_rng(0)
    scores = rng.normal(size=16)
    ids = np.arange(16)
    groups = np.repeat([0, 1], 8)
    worst = np.concatenate([g * 8 + np.argsort(scores[g * 8 : (g + 1) * 8])[:2] for g in (0, 1)])
    seeds = 2000
    frequency = np.zeros(16)
    for seed in range(seeds):
        chosen = selection.select(
            scores, ids, policy="filter", keep=0.5, seed=seed, groups=groups, drop=0.25
        )
        frequency[chosen] += 1 / seeds
    assert frequency[worst].max() == 0.0
    survivors = np.setdiff1d(ids, worst)
    assert np.abs(frequency[survivors] - 4 / 6).max() < 0.035  # 3.3 sd of a 2000-draw mean
    chi_square = ((frequency[survivors] * seeds - 4 / 6 * seeds) ** 2 / (4 / 6 * seeds)).sum()
    assert chi_square < 30.6  # chi2(11 dof) at p = 0.001 (with the 1-p correction: looser)


def test_gaussian_first_pick_follows_its_weights():
    # One pick of five (Gumbel top-1) is a categorical draw with p ∝ exp(-(u - mu)² / 2σ²).
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])  # id i has rank i, percentile i / 5
    weights = np.exp(-((np.arange(5) / 5 - 0.3) ** 2) / (2 * 0.2**2))
    counts = np.zeros(5)
    for seed in range(3000):
        counts[
            selection.select(
                scores, np.arange(5), policy="gsample", keep=0.2, seed=seed, mu=0.3, sigma=0.2
            )
        ] += 1
    np.testing.assert_allclose(counts / 3000, weights / weights.sum(), atol=0.03)


def test_weighted_first_pick_follows_softmax_of_z_scores():
    scores = np.array([0.0, 1.0, 2.0, 4.0])
    z = (scores - scores.mean()) / scores.std()
    expected = np.exp(z / 0.5) / np.exp(z / 0.5).sum()
    counts = np.zeros(4)
    for seed in range(3000):
        counts[
            selection.select(
                scores, np.arange(4), policy="weighted", keep=0.25, seed=seed, temperature=0.5
            )
        ] += 1
    np.testing.assert_allclose(counts / 3000, expected, atol=0.03)


def test_shift_gsample_skips_the_head_and_centres_on_mu():
    scores = np.random.default_rng(0).normal(size=1000)
    ids = np.arange(1000)
    percentile = selection.rank_percentiles(scores, ids)
    chosen = np.concatenate(
        [
            percentile[
                selection.select(
                    scores, ids, policy="shift_gsample", keep=0.2, seed=seed, mu=0.54, sigma=0.1
                )
            ]
            for seed in range(5)
        ]
    )
    assert chosen.min() >= 0.25  # head None at keep 0.2: min(0.25, 0.95 - 0.2)
    assert abs(chosen.mean() - 0.54) < 0.01 and abs(np.median(chosen) - 0.54) < 0.01
    assert chosen.std() < 0.15  # concentrated (uniform on [0.25, 1): 0.217)
    # gsample has no head; an explicit head drops exactly that top fraction.
    near_top = percentile[
        selection.select(scores, ids, policy="gsample", keep=0.2, seed=0, mu=0.1, sigma=0.1)
    ]
    assert near_top.min() < 0.05
    headless = percentile[
        selection.select(
            scores, ids, policy="shift_gsample", keep=0.2, seed=0, head=0.1, mu=0.1, sigma=0.1
        )
    ]
    assert headless.min() == 0.1
    assert selection.resolve_params("shift_gsample", 0.9)["head"] == pytest.approx(0.05)
    assert selection.resolve_params("shift_gsample", 0.5)["head"] == 0.25


def test_threshold_and_cdf_accept_counts():
    scores, ids, groups = _pool(size=400)
    for group_of in (None, groups):
        chosen = selection.select(
            scores, ids, policy="threshold", keep=0.5, seed=0, groups=group_of, threshold=0.3
        )
        assert len(chosen) == int((scores >= 0.3).sum())
    # cdf_accept: the probabilities of every cluster sum exactly to its share ...
    members = groups == 0
    for temperature in (0.1, 1.0, 10.0):
        p = selection.cdf_acceptance(scores[members], 17, temperature)
        assert p.sum() == pytest.approx(17) and p.max() <= 1
        assert np.all(np.diff(p[np.argsort(scores[members])]) >= 0)  # better, likelier
    assert selection.cdf_acceptance(np.arange(4.0), 4, 1.0).tolist() == [1, 1, 1, 1]
    # ... so the count averages round(keep * N) = 120; sd <= sqrt(120 * 0.7) / sqrt(300) = 0.53.
    counts = [
        len(selection.select(scores, ids, policy="cdf_accept", keep=0.3, seed=seed, groups=groups))
        for seed in range(300)
    ]
    assert abs(np.mean(counts) - 120) < 2.0
    # A low temperature concentrates acceptance on the best scores.
    percentile = selection.rank_percentiles(scores, ids)
    sharp, flat = (
        percentile[
            np.isin(
                ids,
                selection.select(scores, ids, policy="cdf_accept", keep=0.3, seed=0, temperature=t),
            )
        ].mean()
        for t in (0.1, 10.0)
    )
    assert sharp < 0.2 < 0.4 < flat


def test_errors_name_the_problem():
    scores, ids, _ = _pool(size=20)

    def call(**kwargs):
        arguments = {"policy": "filter", "keep": 0.5, "seed": 0, **kwargs}
        return selection.select(
            arguments.pop("scores", scores), arguments.pop("ids", ids), **arguments
        )

    with pytest.raises(ValueError, match=r"select.keep must be in \(0, 1\], got 0"):
        call(keep=0.0)
    with pytest.raises(ValueError, match="select.keep must be in"):
        call(keep=1.5)
    with pytest.raises(
        ValueError,
        match="unknown selection policy 'best'; valid policies: "
        "filter, shift_gsample, gsample, topk",
    ):
        call(policy="best")
    with pytest.raises(ValueError, match=r"scores \(19,\) and ids \(20,\)"):
        call(scores=scores[:19])
    with pytest.raises(ValueError, match=f"ids: id {ids[0]} appears 2 times"):
        call(ids=np.r_[ids[:19], ids[0]])
    with pytest.raises(ValueError, match="2 scores are NaN"):
        call(scores=np.r_[np.nan, np.nan, scores[2:]])
    with pytest.raises(ValueError, match="select.drop=0.6 leaves 0.4 of the pool"):
        call(drop=0.6)
    with pytest.raises(ValueError, match="select.head=0.6 leaves"):
        call(policy="shift_gsample", head=0.6)
    with pytest.raises(ValueError, match="select.start=0.7 leaves"):
        call(policy="block", start=0.7)
    with pytest.raises(ValueError, match="select.sigma must be > 0"):
        call(policy="gsample", sigma=0.0)
    with pytest.raises(ValueError, match="unknown selection parameter 'dorp'"):
        call(dorp=0.1)
    with pytest.raises(ValueError, match="groups"):
        call(groups=np.zeros(3))
    with pytest.raises(ValueError, match="keeps no sample"):
        call(keep=0.01)


@pytest.mark.parametrize("policy", EXACT_POLICIES)
def test_keep_count_exact_after_collapsing_and_never_two_duplicates(policy):
    scores, ids, groups = _pool(size=203)
    rng = np.random.default_rng(1)
    duplicates = rng.integers(0, 150, size=203)  # about 50 samples are somebody's duplicate
    eligible = selection.best_of_duplicates(scores, ids, duplicates)
    assert eligible.sum() == len(np.unique(duplicates))
    for keep in (0.2, 0.5, 0.55):
        chosen = selection.select(
            scores, ids, policy=policy, keep=keep, seed=3, groups=groups, eligible=eligible
        )
        assert len(chosen) == round(keep * 203)  # the budget counts the whole pool
        picked = np.isin(ids, chosen)
        assert not picked[~eligible].any()
        assert np.bincount(duplicates[picked]).max() == 1
        # Shares follow the eligible members of each cluster.
        kept = np.bincount(groups[picked], minlength=groups.max() + 1)
        np.testing.assert_array_equal(
            kept,
            selection.allocate(
                len(chosen), np.bincount(groups[eligible], minlength=groups.max() + 1)
            ),
        )
    with pytest.raises(
        ValueError,
        match=f"select.keep=0.7 asks for 142 samples but only {eligible.sum()} of 203 are eligible",
    ):
        selection.select(scores, ids, policy=policy, keep=0.7, seed=3, eligible=eligible)


def test_inclusion_probabilities_by_hand():
    # filter, keep 1/2, drop 1/5 of ten: the 2 worst (ids 11, 19) are out, the share of 5 is
    # drawn from the other 8: 5/8 each. topk: the best 5 exactly.
    probabilities = selection.inclusion_probabilities(
        HAND_SCORES, HAND_IDS, policy="filter", keep=0.5, drop=0.2
    )
    expected = np.full(10, 5 / 8)
    expected[[1, 9]] = 0.0
    np.testing.assert_array_equal(probabilities, expected)
    top = selection.inclusion_probabilities(HAND_SCORES, HAND_IDS, policy="topk", keep=0.5)
    np.testing.assert_array_equal(HAND_IDS[top == 1.0], [10, 12, 13, 15, 17])
    with pytest.raises(ValueError, match="policy 'gsample' draws by weight; exact probabilities"):
        selection.inclusion_probabilities(HAND_SCORES, HAND_IDS, policy="gsample", keep=0.5)


@pytest.mark.parametrize("policy", sorted(policies.UNIFORM_CANDIDATES))
def test_inclusion_probabilities_match_the_draws(policy):
    # Uneven clusters, collapsed duplicates and shuffled ids: the exact probabilities sum to the
    # budget, are 0 for the ineligible, and match the selection frequency over 300 seeds within
    # 4.5 binomial standard deviations (max over 203 samples; sd <= 0.029 per sample).
    scores, ids, groups = _pool(size=203)
    eligible = selection.best_of_duplicates(
        scores, ids, np.random.default_rng(1).integers(0, 180, size=203)
    )
    arguments = dict(policy=policy, keep=0.4, groups=groups, eligible=eligible, drop=0.3)
    probabilities = selection.inclusion_probabilities(scores, ids, **arguments)
    assert probabilities.sum() == pytest.approx(round(0.4 * 203), abs=1e-9)
    assert not probabilities[~eligible].any()
    seeds = 300
    frequency = (
        sum(np.isin(ids, selection.select(scores, ids, seed=s, **arguments)) for s in range(seeds))
        / seeds
    )
    deviation = np.sqrt(probabilities * (1 - probabilities) / seeds)
    assert (np.abs(frequency - probabilities) <= 4.5 * deviation + 1e-12).all()


def test_policy_dispatch_covers_exactly_the_configured_policies():
    assert sorted(policies.POLICY_FUNCTIONS) == sorted(POLICIES)
    assert sorted(policies.POLICY_PARAMETERS) == sorted(POLICIES)
    for policy in POLICIES:  # every policy runs with its defaults
        assert len(selection.select(*_pool(size=40)[:2], policy=policy, keep=0.5, seed=0)) > 0
