"""Fusion of several ratings, collapse of duplicates and the summary (`selection.fusion`)."""

import numpy as np
import pytest

from alchemist_jax import selection

# Ten samples, ids 10..19; best first: 10, 15, 13, 17, 12, 18, 14, 16, 11, 19.
HAND_SCORES = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.0])
HAND_IDS = np.arange(10, 20)


def test_rank_normalize_within_clusters_by_hand():
    scores = np.array([3.0, 1.0, 3.0, 2.0, 0.5, -1.0, 7.0, 4.0])
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    # cluster 0: ascending ranks 1 -> 1, 2 -> 2, the two 3s share (3 + 4) / 2 = 3.5; minus 1/2,
    # over n = 4. cluster 1: ranks 2, 1, 3 over 3. cluster 2 has one sample: 1/2.
    expected = [3 / 4, 1 / 8, 3 / 4, 3 / 8, 1.5 / 3, 0.5 / 3, 2.5 / 3, 0.5]
    np.testing.assert_allclose(selection.rank_normalize(scores, groups), expected, atol=1e-15)
    # One group: ascending ranks -1 -> 1, 0.5 -> 2, 1 -> 3, 2 -> 4, the 3s 5.5, 4 -> 7, 7 -> 8.
    np.testing.assert_allclose(
        selection.rank_normalize(scores),
        np.array([5.0, 2.5, 5.0, 3.5, 1.5, 0.5, 7.5, 6.5]) / 8,
        atol=1e-15,
    )


def test_fusion_ignores_scales_and_per_cluster_offsets():
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(2, 40))
    groups = np.repeat([0, 1, 2, 3], 10)
    fused = selection.fuse([first, second], groups=groups)
    # A scorer on another scale with a different offset in every cluster fuses identically.
    rescaled = 1000 * second + 50 * groups
    np.testing.assert_allclose(selection.fuse([first, rescaled], groups=groups), fused, atol=1e-15)
    assert fused.min() > 0 and fused.max() < 1
    np.testing.assert_allclose(
        fused,
        np.sqrt(selection.rank_normalize(first, groups) * selection.rank_normalize(second, groups)),
        atol=1e-15,
    )


def test_weights_change_the_order_as_computed_by_hand():
    a = np.array([4.0, 3.0, 2.0, 1.0])  # percentiles 7/8, 5/8, 3/8, 1/8
    b = np.array([1.0, 2.0, 4.0, 3.0])  # percentiles 1/8, 3/8, 7/8, 5/8
    ids = np.arange(4)
    # Geometric means: (7·1, 5·3, 3·7, 1·5)^(1/2) / 8 = 0.331, 0.484, 0.573, 0.280.
    np.testing.assert_allclose(selection.fuse([a, b]), np.sqrt([7, 15, 21, 5]) / 8, atol=1e-15)
    # (a^3 b)^(1/4): (343, 375, 189, 5)^(1/4) / 8 = 0.538, 0.550, 0.464, 0.187.
    np.testing.assert_allclose(
        selection.fuse([a, b], [3, 1]), np.array([343, 375, 189, 5]) ** 0.25 / 8, atol=1e-15
    )
    # (a b^3)^(1/4): (7, 135, 1029, 125)^(1/4) / 8 = 0.203, 0.426, 0.708, 0.418.
    np.testing.assert_allclose(
        selection.fuse([a, b], [1, 3]), np.array([7, 135, 1029, 125]) ** 0.25 / 8, atol=1e-15
    )

    def top_half(weights):
        return selection.select(
            selection.fuse([a, b], weights), ids, policy="topk", keep=0.5, seed=0
        ).tolist()

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


def test_summary_by_hand():
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    summary = selection.summarize(
        HAND_SCORES, HAND_IDS, np.array([10, 15, 19]), groups, ["a", "b", "c"], {"drop": 0.25}
    )
    assert summary["count"] == 3 and summary["pool_size"] == 10
    assert summary["cluster_keep_rates"] == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 4})
    # global percentiles: 10 -> 0.0, 15 -> 0.1, 19 -> 0.9 (bins of width 0.05)
    counts = summary["rank_histogram"]["counts"]
    assert len(counts) == 20 and counts[0] == counts[2] == counts[18] == 1 and sum(counts) == 3
    assert summary["rank_histogram"]["edges"][:3] == [0.0, 0.05, 0.1]
    assert summary["params"] == {"drop": 0.25}
