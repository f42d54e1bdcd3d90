"""Selection policies (counts, shares, distributions against exact references), clusters of the
pool, summaries, and the `select` command end to end."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alchemist_jax import cli, selection
from alchemist_jax.config import POLICIES, SelectConfig, load_config
from alchemist_jax.data import load_splits
from alchemist_jax.data.sources import ArraySource

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
            chosen = selection.select(scores, ids, policy=policy, keep=keep, seed=3,
                                      groups=group_of)
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
    chosen = selection.select(HAND_SCORES, HAND_IDS, policy="topk", keep=0.5, seed=0,
                              groups=groups)
    # cluster 0 = ids 10-12 -> best two 10, 12; 1 = 13-15 -> best one 15; 2 = 16-19 -> 17, 18
    assert chosen.tolist() == [10, 12, 15, 17, 18]


@pytest.mark.parametrize("policy", RANDOM_POLICIES)
def test_deterministic_from_seed_and_row_order(policy):
    scores, ids, groups = _pool()
    first = selection.select(scores, ids, policy=policy, keep=0.4, seed=7, groups=groups)
    again = selection.select(scores, ids, policy=policy, keep=0.4, seed=7, groups=groups)
    shuffle = np.random.default_rng(1).permutation(len(ids))
    shuffled = selection.select(scores[shuffle], ids[shuffle], policy=policy, keep=0.4, seed=7,
                                groups=groups[shuffle])
    other = selection.select(scores, ids, policy=policy, keep=0.4, seed=8, groups=groups)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, shuffled)
    assert not np.array_equal(first, other)


# ----------------------------------------------------------------------------------------------
# Policies against exact expectations
# ----------------------------------------------------------------------------------------------


def test_deterministic_policies_by_hand():
    def pick(policy, keep=0.3, **params):
        return selection.select(HAND_SCORES, HAND_IDS, policy=policy, keep=keep, seed=0,
                                **params).tolist()

    assert pick("topk") == [10, 13, 15]
    assert pick("bottomk") == [11, 16, 19]
    assert pick("block", start=0.4) == [12, 14, 18]
    assert pick("block", keep=0.5, start=0.5) == [11, 14, 16, 18, 19]
    assert pick("threshold") == [10, 13, 15]  # None: the keep quantile
    assert pick("threshold", threshold=0.55) == [10, 13, 15, 17]  # every score >= 0.55
    ties = selection.select(np.array([1.0, 1.0, 1.0, 0.0]), np.array([4, 3, 2, 1]),
                            policy="topk", keep=0.5, seed=0)
    assert ties.tolist() == [2, 3]  # ties ranked by id


def test_filter_never_picks_the_bottom_and_fills_uniformly():
    # Two clusters of 8, keep 1/2, drop 1/4: each cluster drops its 2 worst and keeps 4 of the
    # 6 others, each of them with probability exactly 4/6.
    rng = np.random.default_rng(0)
    scores = rng.normal(size=16)
    ids = np.arange(16)
    groups = np.repeat([0, 1], 8)
    worst = np.concatenate([g * 8 + np.argsort(scores[g * 8:(g + 1) * 8])[:2] for g in (0, 1)])
    seeds = 2000
    frequency = np.zeros(16)
    for seed in range(seeds):
        chosen = selection.select(scores, ids, policy="filter", keep=0.5, seed=seed,
                                  groups=groups, drop=0.25)
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
        counts[selection.select(scores, np.arange(5), policy="gsample", keep=0.2, seed=seed,
                                mu=0.3, sigma=0.2)] += 1
    np.testing.assert_allclose(counts / 3000, weights / weights.sum(), atol=0.03)


def test_weighted_first_pick_follows_softmax_of_z_scores():
    scores = np.array([0.0, 1.0, 2.0, 4.0])
    z = (scores - scores.mean()) / scores.std()
    expected = np.exp(z / 0.5) / np.exp(z / 0.5).sum()
    counts = np.zeros(4)
    for seed in range(3000):
        counts[selection.select(scores, np.arange(4), policy="weighted", keep=0.25, seed=seed,
                                temperature=0.5)] += 1
    np.testing.assert_allclose(counts / 3000, expected, atol=0.03)


def test_shift_gsample_skips_the_head_and_centres_on_mu():
    scores = np.random.default_rng(0).normal(size=1000)
    ids = np.arange(1000)
    percentile = selection.rank_percentiles(scores, ids)
    chosen = np.concatenate([
        percentile[selection.select(scores, ids, policy="shift_gsample", keep=0.2, seed=seed,
                                    mu=0.54, sigma=0.1)] for seed in range(5)])
    assert chosen.min() >= 0.25  # head None at keep 0.2: min(0.25, 0.95 - 0.2)
    assert abs(chosen.mean() - 0.54) < 0.01 and abs(np.median(chosen) - 0.54) < 0.01
    assert chosen.std() < 0.15  # concentrated (uniform on [0.25, 1): 0.217)
    # gsample has no head; an explicit head drops exactly that top fraction.
    near_top = percentile[selection.select(scores, ids, policy="gsample", keep=0.2, seed=0,
                                           mu=0.1, sigma=0.1)]
    assert near_top.min() < 0.05
    headless = percentile[selection.select(scores, ids, policy="shift_gsample", keep=0.2,
                                           seed=0, head=0.1, mu=0.1, sigma=0.1)]
    assert headless.min() == 0.1
    assert selection.resolve_params("shift_gsample", 0.9)["head"] == pytest.approx(0.05)
    assert selection.resolve_params("shift_gsample", 0.5)["head"] == 0.25


def test_threshold_and_cdf_accept_counts():
    scores, ids, groups = _pool(size=400)
    for group_of in (None, groups):
        chosen = selection.select(scores, ids, policy="threshold", keep=0.5, seed=0,
                                  groups=group_of, threshold=0.3)
        assert len(chosen) == int((scores >= 0.3).sum())
    # cdf_accept: the probabilities of every cluster sum exactly to its share ...
    members = groups == 0
    for temperature in (0.1, 1.0, 10.0):
        p = selection.cdf_acceptance(scores[members], 17, temperature)
        assert p.sum() == pytest.approx(17) and p.max() <= 1
        assert np.all(np.diff(p[np.argsort(scores[members])]) >= 0)  # better, likelier
    assert selection.cdf_acceptance(np.arange(4.0), 4, 1.0).tolist() == [1, 1, 1, 1]
    # ... so the count averages round(keep * N) = 120; sd <= sqrt(120 * 0.7) / sqrt(300) = 0.53.
    counts = [len(selection.select(scores, ids, policy="cdf_accept", keep=0.3, seed=seed,
                                   groups=groups)) for seed in range(300)]
    assert abs(np.mean(counts) - 120) < 2.0
    # A low temperature concentrates acceptance on the best scores.
    percentile = selection.rank_percentiles(scores, ids)
    sharp, flat = (percentile[np.isin(ids, selection.select(
        scores, ids, policy="cdf_accept", keep=0.3, seed=0, temperature=t))].mean()
        for t in (0.1, 10.0))
    assert sharp < 0.2 < 0.4 < flat


def test_errors_name_the_problem():
    scores, ids, _ = _pool(size=20)

    def call(**kwargs):
        arguments = {"policy": "filter", "keep": 0.5, "seed": 0, **kwargs}
        return selection.select(arguments.pop("scores", scores), arguments.pop("ids", ids),
                                **arguments)

    with pytest.raises(ValueError, match=r"select.keep must be in \(0, 1\], got 0"):
        call(keep=0.0)
    with pytest.raises(ValueError, match="select.keep must be in"):
        call(keep=1.5)
    with pytest.raises(ValueError, match="unknown selection policy 'best'; valid policies: "
                                         "filter, shift_gsample, gsample, topk"):
        call(policy="best")
    with pytest.raises(ValueError, match=r"scores \(19,\) and ids \(20,\)"):
        call(scores=scores[:19])
    with pytest.raises(ValueError, match="ids: 1 ids occur more than once"):
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


# ----------------------------------------------------------------------------------------------
# Fusion of several ratings and collapse of duplicates
# ----------------------------------------------------------------------------------------------


def test_rank_normalize_within_clusters_by_hand():
    scores = np.array([3.0, 1.0, 3.0, 2.0, 0.5, -1.0, 7.0, 4.0])
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    # cluster 0: ascending ranks 1 -> 1, 2 -> 2, the two 3s share (3 + 4) / 2 = 3.5; minus 1/2,
    # over n = 4. cluster 1: ranks 2, 1, 3 over 3. cluster 2 has one sample: 1/2.
    expected = [3 / 4, 1 / 8, 3 / 4, 3 / 8, 1.5 / 3, 0.5 / 3, 2.5 / 3, 0.5]
    np.testing.assert_allclose(selection.rank_normalize(scores, groups), expected, atol=1e-15)
    # One group: ascending ranks -1 -> 1, 0.5 -> 2, 1 -> 3, 2 -> 4, the 3s 5.5, 4 -> 7, 7 -> 8.
    np.testing.assert_allclose(selection.rank_normalize(scores), np.array([
        5.0, 2.5, 5.0, 3.5, 1.5, 0.5, 7.5, 6.5]) / 8, atol=1e-15)


def test_fusion_ignores_scales_and_per_cluster_offsets():
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(2, 40))
    groups = np.repeat([0, 1, 2, 3], 10)
    fused = selection.fuse([first, second], groups=groups)
    # A scorer on another scale with a different offset in every cluster fuses identically.
    rescaled = 1000 * second + 50 * groups
    np.testing.assert_allclose(selection.fuse([first, rescaled], groups=groups), fused,
                               atol=1e-15)
    assert fused.min() > 0 and fused.max() < 1
    np.testing.assert_allclose(
        fused, np.sqrt(selection.rank_normalize(first, groups)
                       * selection.rank_normalize(second, groups)), atol=1e-15)


def test_weights_change_the_order_as_computed_by_hand():
    a = np.array([4.0, 3.0, 2.0, 1.0])  # percentiles 7/8, 5/8, 3/8, 1/8
    b = np.array([1.0, 2.0, 4.0, 3.0])  # percentiles 1/8, 3/8, 7/8, 5/8
    ids = np.arange(4)
    # Geometric means: (7·1, 5·3, 3·7, 1·5)^(1/2) / 8 = 0.331, 0.484, 0.573, 0.280.
    np.testing.assert_allclose(selection.fuse([a, b]), np.sqrt([7, 15, 21, 5]) / 8, atol=1e-15)
    # (a^3 b)^(1/4): (343, 375, 189, 5)^(1/4) / 8 = 0.538, 0.550, 0.464, 0.187.
    np.testing.assert_allclose(selection.fuse([a, b], [3, 1]),
                               np.array([343, 375, 189, 5]) ** 0.25 / 8, atol=1e-15)
    # (a b^3)^(1/4): (7, 135, 1029, 125)^(1/4) / 8 = 0.203, 0.426, 0.708, 0.418.
    np.testing.assert_allclose(selection.fuse([a, b], [1, 3]),
                               np.array([7, 135, 1029, 125]) ** 0.25 / 8, atol=1e-15)

    def top_half(weights):
        return selection.select(selection.fuse([a, b], weights), ids, policy="topk", keep=0.5,
                                seed=0).tolist()

    assert top_half(None) == [1, 2]
    assert top_half([3, 1]) == [0, 1]
    assert top_half([1, 3]) == [1, 2]
    assert top_half([1, 0]) == [0, 1]  # a zero weight silences its scorer
    with pytest.raises(ValueError, match="select.weights has 3 values for 2 scorers"):
        selection.fuse([a, b], [1, 1, 1])
    with pytest.raises(ValueError, match=r"select.weights must be >= 0 with a positive sum"):
        selection.fuse([a, b], [1, -1])


def test_a_duplicate_group_keeps_exactly_its_best_member():
    ids = np.arange(10, 18)
    scores = np.array([0.2, 0.9, 0.5, 0.1, 0.7, 0.7, 0.3, 0.3])
    duplicates = np.array([0, 0, 0, 1, 2, 2, 3, 3])
    # group 0: id 11 (0.9); group 1: id 13 alone; groups 2 and 3 tie: the smaller id, 14 and 16.
    expected = [False, True, False, True, True, False, True, False]
    assert selection.best_of_duplicates(scores, ids, duplicates).tolist() == expected
    shuffle = np.random.default_rng(0).permutation(8)
    shuffled = selection.best_of_duplicates(scores[shuffle], ids[shuffle], duplicates[shuffle])
    assert shuffled.tolist() == np.array(expected)[shuffle].tolist()


@pytest.mark.parametrize("policy", EXACT_POLICIES)
def test_keep_count_exact_after_collapsing_and_never_two_duplicates(policy):
    scores, ids, groups = _pool(size=203)
    rng = np.random.default_rng(1)
    duplicates = rng.integers(0, 150, size=203)  # about 50 samples are somebody's duplicate
    eligible = selection.best_of_duplicates(scores, ids, duplicates)
    assert eligible.sum() == len(np.unique(duplicates))
    for keep in (0.2, 0.5, 0.55):
        chosen = selection.select(scores, ids, policy=policy, keep=keep, seed=3, groups=groups,
                                  eligible=eligible)
        assert len(chosen) == round(keep * 203)  # the budget counts the whole pool
        picked = np.isin(ids, chosen)
        assert not picked[~eligible].any()
        assert np.bincount(duplicates[picked]).max() == 1
        # Shares follow the eligible members of each cluster.
        kept = np.bincount(groups[picked], minlength=groups.max() + 1)
        np.testing.assert_array_equal(kept, selection.allocate(
            len(chosen), np.bincount(groups[eligible], minlength=groups.max() + 1)))
    with pytest.raises(ValueError, match=f"select.keep=0.7 asks for 142 samples but only "
                                         f"{eligible.sum()} of 203 are eligible"):
        selection.select(scores, ids, policy=policy, keep=0.7, seed=3, eligible=eligible)


def test_collapse_before_the_budget_on_a_pool():
    # Ten samples in two labels, two scorers that agree, three copies of one sample (ids 0, 5, 7)
    # and a pair (ids 2, 3). Only the best copy competes, and the budget is 5 of all 10.
    source = ArraySource("p", np.arange(10), None, None, labels=np.array([0] * 5 + [1] * 5))
    first = np.array([9.0, 1.0, 8.0, 7.0, 2.0, 8.5, 3.0, 8.8, 4.0, 5.0])
    ratings = {"a.parquet": (np.arange(10), first),
               "b.parquet": (np.arange(10)[::-1], first[::-1] * 100)}
    duplicates = ("dedup.parquet", (np.arange(10), np.array([0, 1, 2, 2, 4, 0, 6, 0, 8, 9])))
    config = SelectConfig(policy="topk", keep=0.5)
    chosen, summary = selection.select_for_source(config, ratings, source, duplicates=duplicates)
    # Both files rank alike, so fused = the within-label percentile of `first`:
    #   label 0, ids 0-4: 1, 0, 3/4, 1/2, 1/4;  label 1, ids 5-9: 3/4, 0, 1, 1/4, 1/2.
    # Copies 0, 5, 7 score 1, 3/4, 1: the tie of 0 and 7 goes to id 0; of 2 and 3, 2 stays.
    # Eligible: 0, 1, 2, 4 (label 0) and 6, 8, 9 (label 1); shares of 5 by 4 and 3: 3 and 2.
    assert summary["duplicates_collapsed"] == 3
    assert chosen.tolist() == [0, 2, 4, 8, 9]
    assert summary["ratings"] == ["a.parquet", "b.parquet"] and summary["weights"] == [1.0, 1.0]
    assert summary["dedup"] == "dedup.parquet" and summary["count"] == 5
    without, _ = selection.select_for_source(config, ratings, source)
    assert without.tolist() == [0, 2, 3, 5, 7]


def test_mismatched_ids_and_weights_name_the_file():
    source = ArraySource("p", np.arange(10, 20), None, None, labels=np.zeros(10, np.int64))
    good = (np.arange(10, 20), np.arange(10.0))
    config = SelectConfig(keep=0.5)
    for ids, message in [(np.arange(11, 20), "b.parquet: 1 pool ids are missing (e.g. id 10)"),
                         (np.arange(11, 21), "b.parquet: 1 of its ids are not in the pool "
                                             "(e.g. id 20)")]:
        with pytest.raises(ValueError, match=re.escape(f"ratings file {message}")):
            selection.select_for_source(config, {"a.parquet": good,
                                                 "b.parquet": (ids, np.zeros(len(ids)))}, source)
        with pytest.raises(ValueError, match=re.escape(f"dedup file {message}")):
            selection.select_for_source(config, {"a.parquet": good}, source,
                                        duplicates=("b.parquet", (ids, ids)))
    with pytest.raises(ValueError, match=re.escape(
            "select.weights has 3 values for 2 ratings files (a.parquet, b.parquet)")):
        selection.select_for_source(SelectConfig(weights=(1.0, 2.0, 3.0)),
                                    {"a.parquet": good, "b.parquet": good}, source)


# ----------------------------------------------------------------------------------------------
# Clusters
# ----------------------------------------------------------------------------------------------


def test_kmeans_recovers_planted_clusters_from_text_embeddings():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    planted = rng.integers(0, 5, size=300)
    tokens = centers[planted][:, None, :] + 0.1 * rng.normal(size=(300, 3, 16))
    source = ArraySource("embedded", np.arange(300), None, None,
                         extra={"text_embedding": tokens.astype(np.float32)})
    groups, names = selection.cluster_groups(source, "auto", clusters=5, seed=0)
    assert names == [f"cluster {j}" for j in range(5)]
    table = np.zeros((5, 5), int)
    np.add.at(table, (planted, groups), 1)
    assert ((table > 0).sum(axis=0) == 1).all() and ((table > 0).sum(axis=1) == 1).all()


def test_tfidf_by_hand_and_identical_captions_cluster_together():
    vectors = selection.tfidf(["a cat", "a dog"]).toarray()
    idf_animal = np.log(3 / 2) + 1  # idf("a") = ln(3 / 3) + 1 = 1
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0)
    assert vectors[0] @ vectors[1] == pytest.approx(1 / (1 + idf_animal**2))
    texts = ["a photo of a cat", "a cat on a mat", "a dog running in the park", "a red car"]
    captions = [texts[i] for i in np.random.default_rng(0).integers(0, 4, size=40)]
    source = ArraySource("captioned", np.arange(40), None, captions)
    groups, names = selection.cluster_groups(source, "kmeans", clusters=4, seed=0)
    caption_index = np.array([texts.index(c) for c in captions])
    table = np.zeros((4, 4), int)
    np.add.at(table, (caption_index, groups), 1)
    assert ((table > 0).sum(axis=0) == 1).all() and ((table > 0).sum(axis=1) == 1).all()
    assert all(name.split(": ", 1)[1] in texts for name in names)


def test_auto_grouping_and_its_errors():
    captions = ["a cat", "a dog"] * 10
    labelled = ArraySource("l", np.arange(20), None, captions, labels=np.arange(20) % 3)
    groups, names = selection.cluster_groups(labelled, "auto", 4, 0)
    assert names == ["label 0", "label 1", "label 2"] and groups.tolist()[:4] == [0, 1, 2, 0]
    repeated = ArraySource("r", np.arange(20), None, captions)
    groups, names = selection.cluster_groups(repeated, "auto", 4, 0)
    assert names == ["a cat", "a dog"] and groups.tolist()[:3] == [0, 1, 0]
    distinct = ArraySource("d", np.arange(6), None, [f"a photo of {w}" for w in
                                                     "one two three four five six".split()])
    groups, names = selection.cluster_groups(distinct, "auto", 2, 0)
    assert len(names) == 2 and names[0].startswith("cluster 0: a photo of")
    assert selection.cluster_groups(distinct, "none", 2, 0)[1] == ["all"]
    with pytest.raises(ValueError, match="group_by=label: data source 'r' has no labels"):
        selection.cluster_groups(repeated, "label", 4, 0)
    with pytest.raises(ValueError, match="select.clusters must be at least 1, got 0"):
        selection.cluster_groups(distinct, "kmeans", 0, 0)
    no_text = ArraySource("n", np.arange(3), np.zeros((3, 2, 2, 1), np.uint8), None)
    with pytest.raises(ValueError, match="group_by=caption: data source 'n' has no captions"):
        selection.cluster_groups(no_text, "caption", 4, 0)


# ----------------------------------------------------------------------------------------------
# Summary and the command
# ----------------------------------------------------------------------------------------------


def test_summary_by_hand():
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    summary = selection.summarize(HAND_SCORES, HAND_IDS, np.array([10, 15, 19]), groups,
                                  ["a", "b", "c"], {"drop": 0.25})
    assert summary["count"] == 3 and summary["pool_size"] == 10
    assert summary["cluster_keep_rates"] == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 4})
    # global percentiles: 10 -> 0.0, 15 -> 0.1, 19 -> 0.9 (bins of width 0.05)
    counts = summary["rank_histogram"]["counts"]
    assert len(counts) == 20 and counts[0] == counts[2] == counts[18] == 1 and sum(counts) == 3
    assert summary["rank_histogram"]["edges"][:3] == [0.0, 0.05, 0.1]
    assert summary["params"] == {"drop": 0.25}


TINY = ["data.pool.train_size=200", "data.pool.validation_size=20", "data.pool.test_size=20",
        "select.keep=0.3"]


def _write_ratings(path, ids, scores):
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()),
                             "score": pa.array(scores, pa.float32())}), path)


def test_run_end_to_end_and_bad_ratings(tmp_path, capsys):
    cfg = load_config("configs/demo.yaml", TINY)
    pool = load_splits(cfg.data).train
    pool_ids = pool.ids
    rng = np.random.default_rng(0)
    order = rng.permutation(len(pool_ids))
    ratings, out = tmp_path / "ratings.parquet", tmp_path / "sel" / "alchemist.parquet"
    _write_ratings(ratings, pool_ids[order], rng.normal(size=len(pool_ids)))
    summary = selection.run(cfg, ratings, out)
    table = pq.read_table(out)
    chosen = table.column("id").to_numpy()
    assert table.schema.field("id").type == pa.int64()
    assert len(chosen) == 60 and np.isin(chosen, pool_ids).all()
    recipe = json.loads(table.schema.metadata[selection.PARQUET_METADATA_KEY])
    assert recipe == {"policy": "filter", "keep": 0.3, "group_by": "label",
                      "params": {"drop": 0.25, "seed": 0}, "ratings": [str(ratings)],
                      "weights": [1.0], "dedup": None}
    written = json.loads(out.with_suffix(".json").read_text())
    assert written == summary and written["count"] == 60 and written["pool_size"] == 200
    assert len(written["cluster_keep_rates"]) == 20
    assert sum(written["rank_histogram"]["counts"]) == 60
    sizes = np.bincount(pool.labels)
    shares = selection.allocate(60, sizes)
    assert written["cluster_keep_rates"] == pytest.approx(
        {f"label {label}": shares[label] / sizes[label] for label in range(20)})
    assert ("selected 60 of 200 samples (filter, keep 0.3, 1 ratings file) in 20 clusters by "
            "label") in capsys.readouterr().out

    # The command line runs the same function (--policy / --keep are config shortcuts).
    assert cli.main(["select", "--config", "configs/demo.yaml", *TINY, "--ratings",
                     str(ratings), "--out", str(tmp_path / "top.parquet"), "--policy", "topk",
                     "--keep", "0.25"]) == 0
    assert pq.read_table(tmp_path / "top.parquet").num_rows == 50

    bad = tmp_path / "bad.parquet"
    for ids, scores, message in [
        (pool_ids[1:], np.zeros(199), f"1 pool ids are missing (e.g. id {pool_ids[0]})"),
        (np.r_[pool_ids, 10**9], np.zeros(201), "1 of its ids are not in the pool (e.g. id "
                                                "1000000000)"),
        (np.r_[pool_ids, pool_ids[0]], np.zeros(201), "1 ids occur more than once"),
        (pool_ids, np.r_[np.nan, np.zeros(199)], "1 scores are NaN"),
    ]:
        _write_ratings(bad, ids, scores)
        with pytest.raises(ValueError, match=re.escape(f"ratings file {bad}: {message}")):
            selection.run(cfg, bad, tmp_path / "x.parquet")
    pq.write_table(pa.table({"id": pool_ids, "rating": np.zeros(200)}), bad)
    with pytest.raises(ValueError, match=re.escape(f"ratings file {bad} has no column 'score'")):
        selection.run(cfg, bad, tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_select_for_source_matches_select():
    scores, ids, _ = _pool(size=60)
    source = ArraySource("s", np.sort(ids), None, ["a cat", "a dog", "a car"] * 20,
                         labels=np.sort(ids) % 4)
    config = SelectConfig(policy="shift_gsample", keep=0.4, seed=5)
    chosen, summary = selection.select_for_source(config, {"r.parquet": (ids, scores)}, source)
    expected = selection.select(scores, ids, policy="shift_gsample", keep=0.4, seed=5,
                                groups=ids % 4, head=0.25, mu=0.54, sigma=0.25)
    np.testing.assert_array_equal(chosen, expected)
    assert summary["params"] == {"head": 0.25, "mu": 0.54, "sigma": 0.25, "seed": 5}
    assert summary["group_by"] == "label" and summary["policy"] == "shift_gsample"


def test_command_fuses_files_collapses_duplicates_and_records_its_inputs(tmp_path, capsys):
    cfg = load_config("configs/demo.yaml", TINY + ["select.weights=[2.0, 1.0]"])
    pool = load_splits(cfg.data).train
    pool_ids, labels = pool.ids, pool.labels
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(2, 200))
    paths = [tmp_path / "meta.parquet", tmp_path / "alignment.parquet"]
    _write_ratings(paths[0], pool_ids, first)
    order = rng.permutation(200)
    _write_ratings(paths[1], pool_ids[order], second[order])  # rows in another order
    duplicate_groups = np.r_[np.arange(40) // 2, 20 + np.arange(160)]  # 20 pairs
    dedup = tmp_path / "dedup.parquet"
    pq.write_table(pa.table({
        "id": pa.array(pool_ids, pa.int64()), "group": pa.array(duplicate_groups, pa.int64()),
        "group_size": pa.array(np.bincount(duplicate_groups)[duplicate_groups], pa.int32())}),
        dedup)
    out = tmp_path / "fused.parquet"
    # Overrides may follow the ratings files.
    assert cli.main(["select", "--config", "configs/demo.yaml", *TINY, "--ratings",
                     *map(str, paths), "select.weights=[2.0,1.0]", "--dedup", str(dedup),
                     "--out", str(out)]) == 0
    chosen = pq.read_table(out).column("id").to_numpy()
    fused = np.exp((2 * np.log(selection.rank_normalize(first.astype(np.float32), labels))
                    + np.log(selection.rank_normalize(second.astype(np.float32), labels))) / 3)
    eligible = selection.best_of_duplicates(fused, pool_ids, duplicate_groups)
    expected = selection.select(fused, pool_ids, policy="filter", keep=0.3, seed=0,
                                groups=labels, eligible=eligible, drop=0.25)
    np.testing.assert_array_equal(chosen, expected)
    assert len(chosen) == 60 and eligible.sum() == 180
    assert np.bincount(duplicate_groups[np.isin(pool_ids, chosen)]).max() == 1
    recipe = json.loads(pq.read_schema(out).metadata[selection.PARQUET_METADATA_KEY])
    assert recipe["ratings"] == list(map(str, paths)) and recipe["weights"] == [2.0, 1.0]
    assert recipe["dedup"] == str(dedup)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["duplicates_collapsed"] == 20
    assert "2 ratings files, 20 duplicates collapsed" in capsys.readouterr().out

    with pytest.raises(ValueError, match=re.escape(f"ratings file {paths[0]} is given twice")):
        selection.run(cfg, [paths[0], paths[0]], tmp_path / "x.parquet")
    pq.write_table(pa.table({"id": pool_ids, "cluster": pool_ids}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet is not a dedup file: no column group"):
        selection.run(cfg, paths, tmp_path / "x.parquet", dedup=tmp_path / "bad.parquet")
