"""Cluster offsets (`selection.ranking`), reliability weights (`selection.fusion`), free-text
grouping and the minimum cluster size (`selection.clusters`), and the rankings end to end."""

import numpy as np
import pytest

from alchemist_jax import selection
from alchemist_jax.config import SelectConfig
from alchemist_jax.data.sources import ArraySource
from alchemist_jax.selection import clusters, fusion, ranking


def test_shrinkage_by_hand():
    # Two clusters of 3: means 1 and 5 (centre = median of the means = 3), pooled within
    # variance sigma² = (1 + 0 + 1 + 1 + 0 + 1) / (6 - 2) = 1, MAD of the means = 2 ->
    # spread 2.9652, tau² = 2.9652² - 1/3 = 8.4590.
    scores = np.array([0.0, 1.0, 2.0, 4.0, 5.0, 6.0])
    groups = np.array([0, 0, 0, 1, 1, 1])
    adjusted, offsets = ranking.shrunk_offsets(scores, groups)
    tau2 = (1.4826 * 2) ** 2 - 1 / 3
    assert offsets.center == 3.0 and offsets.sigma == pytest.approx(1.0)
    assert offsets.tau == pytest.approx(np.sqrt(tau2))
    # Sample 0: the other two members have mean 1.5; B = tau² / (tau² + 1 / 2).
    b = tau2 / (tau2 + 0.5)
    assert offsets.removed[0] == pytest.approx(b * (1.5 - 3))
    assert adjusted[0] == pytest.approx(0.0 - b * (1.5 - 3))
    np.testing.assert_allclose(offsets.shrinkage, b)  # a member's B: two others
    np.testing.assert_allclose(offsets.means, [-2.0, 2.0])
    # What a cluster reports as removed is what its members lost on average.
    np.testing.assert_allclose(
        offsets.cluster_removed, [offsets.removed[:3].mean(), offsets.removed[3:].mean()]
    )


def test_extreme_scores_keep_their_order_and_a_cluster_of_one_reports_nothing_removed():
    # Scores far beyond 10 robust z units: one cluster removes nothing, so `shrunk` ranks as
    # `global` does and keeps the 10 best, not the 10 that tie at a clipped value.
    rng = np.random.default_rng(4)
    scores = np.r_[rng.normal(size=85), np.arange(20.0, 35.0)]  # ids 85..99 are the best
    ids = np.arange(100)
    source = ArraySource("p", ids, None, None)
    for name in ("global", "shrunk"):
        config = SelectConfig(policy="topk", keep=0.1, group_by="none", ranking=name)
        chosen, _ = selection.select_for_source(config, {"r": (ids, scores)}, source)
        np.testing.assert_array_equal(chosen, np.arange(90, 100), err_msg=name)
    # A -1e9 score is just very low in the estimates: the other clusters' offsets stay finite.
    groups = np.r_[np.zeros(50, np.int64), np.ones(50, np.int64), 2]
    values = np.r_[rng.normal(size=50), rng.normal(size=50) + 1.0, 5.0]
    values[0] = -1e9
    adjusted, offsets = ranking.shrunk_offsets(values, groups)
    assert np.abs(offsets.means[:2]).max() < 10.0 and np.argmin(adjusted) == 0
    assert offsets.removed[-1] == 0.0 and offsets.cluster_removed[2] == 0.0
    assert offsets.shrinkage[2] == 0.0  # a cluster of one: B = 0


def test_a_cluster_of_one_keeps_its_own_score_and_a_large_cluster_loses_its_offset():
    rng = np.random.default_rng(0)
    style = rng.normal(0, 1.0, size=20)  # per-cluster style offsets
    groups = np.r_[np.repeat(np.arange(20), 200), 20]  # 20 clusters of 200, one of 1
    scores = np.r_[style.repeat(200) + rng.normal(0, 1.0, size=4000), 7.0]
    adjusted, offsets = ranking.shrunk_offsets(scores, groups)
    assert offsets.removed[-1] == 0.0 and adjusted[-1] == 7.0  # the global offset: none removed
    assert offsets.shrinkage[:20].min() > 0.99  # large clusters: B -> 1
    means = np.array([adjusted[groups == g].mean() for g in range(20)])
    assert np.abs(means - offsets.center).max() < 0.02  # their offsets are gone
    assert ranking.shrunk_offsets(scores, np.zeros(len(scores), np.int64))[1].tau == 0.0


def test_a_bad_cluster_can_lose_its_whole_share():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(11), 100)
    style = np.r_[rng.normal(0, 0.3, size=10), -6.0]  # cluster 10 is made of bad samples
    scores = style.repeat(100) + rng.normal(0, 1.0, size=1100)
    ids = np.arange(1100)
    for name, expected in (("within", 50), ("shrunk", 0)):
        config = SelectConfig(policy="topk", keep=0.5, group_by="label", ranking=name)
        source = ArraySource("p", ids, None, None, labels=groups)
        chosen, summary = selection.select_for_source(config, {"r": (ids, scores)}, source)
        kept_bad = int(np.isin(ids[groups == 10], chosen).sum())
        assert kept_bad == expected, name
        assert summary["ranking"] == name and summary["clusters"][0]["size"] == 100
    # The typical clusters' offsets are still removed: their keep rates stay near 0.55.
    rates = [c["keep_rate"] for c in summary["clusters"] if c["name"] != "label 10"]
    assert min(rates) > 0.35 and max(rates) < 0.75


def test_noise_scorer_gets_no_weight_and_fusion_is_not_below_its_best_member():
    rng = np.random.default_rng(2)
    defective = rng.random(4000) < 0.3
    good = rng.normal(size=4000) - 3.0 * defective  # flags the defects
    noise = rng.uniform(size=4000)  # pure noise of another shape
    gaussian_noise = rng.normal(size=4000)
    weights, values = fusion.reliability_weights([good, noise, gaussian_noise])
    # The share more than 2 upper-half spreads below the median, less the normal tail: the
    # median is -0.511 and (q90 - q50) / 1.2816 = 1.250, so P(s < -3.011) = 0.1465, - 0.0228.
    median, upper = np.quantile(good, [0.5, 0.9])
    spread = (upper - median) / 1.2815515655446004
    assert median == pytest.approx(-0.511, abs=1e-3) and spread == pytest.approx(1.250, abs=1e-3)
    assert values[0] == pytest.approx(np.mean(good < median - 2 * spread) - 0.0227501319)
    assert values[0] == pytest.approx(0.1238, abs=1e-4)
    assert values[1] == 0.0 and values[2] < 0.01
    assert weights[0] > 0.95 and weights.sum() == pytest.approx(1.0)
    ids = np.arange(4000)
    source = ArraySource("p", ids, None, None)
    picks = {}
    for name, files in (
        ("good", {"g": (ids, good)}),
        ("fused", {"g": (ids, good), "n": (ids, noise)}),
    ):
        config = SelectConfig(policy="topk", keep=0.5, group_by="none")
        chosen, summary = selection.select_for_source(config, files, source)
        picks[name] = 1 - defective[np.isin(ids, chosen)].mean()
    assert picks["fused"] >= picks["good"] - 1e-9 and picks["good"] > 0.95
    assert summary["weights"][1] == 0.0 and summary["reliability"]["n"] == 0.0
    equal, _ = selection.select_for_source(
        SelectConfig(policy="topk", keep=0.5, group_by="none", fusion="equal"),
        {"g": (ids, good), "n": (ids, noise)},
        source,
    )
    assert 1 - defective[np.isin(ids, equal)].mean() < picks["fused"] - 0.05
    # Two scorers that see different defects both get weight.
    kinds = rng.integers(0, 2, size=4000)
    first = rng.normal(size=4000) - 4.0 * (defective & (kinds == 0))
    second = rng.normal(size=4000) - 4.0 * (defective & (kinds == 1))
    weights, _ = fusion.reliability_weights([first, second])
    assert weights == pytest.approx([0.5, 0.5], abs=0.1)
    assert fusion.reliability_weights([noise, noise])[0].tolist() == [0.5, 0.5]  # no signal


FREE_TEXT = [
    "a photo of a cat on a mat",
    "A cat, sleeping.",
    "cat picture 123",
    "a dog running in the park",
    "the DOG runs!",
    "dog photo 77",
]


def test_auto_never_groups_free_text_by_exact_caption_and_honours_the_minimum_size():
    rng = np.random.default_rng(3)
    captions = [f"{FREE_TEXT[i]} #{n}" for n, i in enumerate(rng.integers(0, 6, size=300))]
    source = ArraySource("web", np.arange(300), None, captions)
    used, groups, names = clusters.resolve_grouping(source, "auto", 8, 0, min_size=40)
    assert used == "kmeans" and len(names) < len(set(captions))
    sizes = np.bincount(groups)
    assert sizes.min() >= 40 and len(sizes) == len(names)
    # Cat captions and dog captions never share a cluster (TF-IDF of normalised text).
    cat = np.array(["cat" in c.lower() for c in captions])
    assert all(len(set(cat[groups == g])) == 1 for g in range(len(names)))
    # Templated captions that differ only in case and punctuation are one class ...
    templated = ["A cat.", "a cat", "A DOG!", "a dog"] * 25
    used, groups, names = clusters.resolve_grouping(
        ArraySource("t", np.arange(100), None, templated), "auto", 8, 0, min_size=20
    )
    assert used == "caption" and names == ["a cat", "a dog"]
    np.testing.assert_array_equal(groups, [0, 0, 1, 1] * 25)
    # ... but not when one normalised caption is rarer than the minimum size: k-means then.
    assert (
        clusters.resolve_grouping(
            ArraySource("t", np.arange(101), None, templated + ["a unique caption"]),
            "auto",
            8,
            0,
            min_size=20,
        )[0]
        == "kmeans"
    )
    assert clusters.normalize_caption("  Photo: A Cat!!  on_a  mat ") == "photo a cat on a mat"
    with pytest.raises(ValueError, match="select.min_cluster_size must be at least 1, got 0"):
        clusters.resolve_grouping(source, "auto", 8, 0, min_size=0)


def test_merge_small_clusters_by_hand():
    features = np.array([[0.0], [1.0], [10.0], [11.0], [6.0]])
    merged = clusters.merge_small_clusters(features, np.array([0, 0, 1, 1, 2]), None, 2)
    assert merged.tolist() == [0, 0, 1, 1, 1]  # 6 is nearer 10.5 than 0.5
    weights = np.array([1.0, 1.0, 1.0, 1.0, 3.0])
    assert clusters.merge_small_clusters(
        features, np.array([0, 0, 1, 1, 2]), weights, 2
    ).tolist() == [
        0,
        0,
        1,
        1,
        2,
    ]
