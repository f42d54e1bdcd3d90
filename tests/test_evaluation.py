"""AUROC against a brute-force reference, group normalisation, per-defect AUROC."""

import numpy as np
import pytest

from alchemist_jax.evaluation.defects import credit_kept_copies, defect_auroc
from alchemist_jax.runtime.stats import auroc, normalize_within_groups


def _reference_auroc(pos, neg):
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    return float(np.mean(pairs))


def test_auroc_matches_pairwise_reference_with_ties():
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 6, size=37).astype(float)  # many ties
    neg = rng.integers(0, 5, size=23).astype(float)
    assert auroc(pos, neg) == pytest.approx(_reference_auroc(pos, neg), abs=1e-12)
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 1.0 and auroc([0.0], [1.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="at least one positive"):
        auroc([], [1.0])


def test_group_normalisation_removes_class_offsets():
    scores = np.array([10.0, 11.0, 12.0, -5.0, -4.0, -3.0, 7.0])
    groups = np.array([0, 0, 0, 1, 1, 1, 2])
    z = normalize_within_groups(scores, groups)
    assert np.allclose(z[:3], z[3:6]) and z[6] == 0.0
    assert np.allclose(z[:3], [-1.224744871, 0.0, 1.224744871])


def test_defect_auroc_per_kind():
    scores = np.array([5.0, 6.0, 7.0, 1.0, 6.5, 0.0])
    defects = [None, None, None, "noise", "blur", "noise"]
    result = defect_auroc(scores, defects)
    assert result["noise"] == 1.0
    assert result["blur"] == pytest.approx(1 / 3)
    assert result["all"] == pytest.approx(_reference_auroc([5, 6, 7], [1, 6.5, 0]))


def test_a_kept_copy_trades_labels_with_its_collapsed_source():
    ids = np.array([10, 11, 12, 13, 14, 15])
    defects = [None, "duplicate", None, "duplicate", "duplicate", "noise"]
    copied_from = {11: 10, 13: 12, 14: 12}
    # 11 kept, its source 10 collapsed: they trade. 12 kept: its copies stay duplicates.
    eligible = np.array([False, True, True, False, False, True])
    assert credit_kept_copies(defects, ids, eligible, copied_from) == [
        "duplicate",
        None,
        None,
        "duplicate",
        "duplicate",
        "noise",
    ]
    # 13 kept over its source 12 (14 collapsed too): 13 and 12 trade, 14 stays a duplicate.
    eligible = np.array([True, False, False, True, False, True])
    assert credit_kept_copies(defects, ids, eligible, copied_from) == [
        None,
        "duplicate",
        "duplicate",
        None,
        "duplicate",
        "noise",
    ]
    assert credit_kept_copies(defects, ids, np.ones(6, bool), copied_from) == defects
