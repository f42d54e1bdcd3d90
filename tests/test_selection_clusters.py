"""Ranking clusters of the pool (`selection.clusters`): k-means, TF-IDF, `auto`, errors, and the
dispatch against `config.GROUPINGS`."""

import numpy as np
import pytest

from alchemist_jax import selection
from alchemist_jax.config import GROUPINGS
from alchemist_jax.data.sources import ArraySource
from alchemist_jax.selection import clusters


def test_kmeans_recovers_planted_clusters_from_text_embeddings():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    planted = rng.integers(0, 5, size=300)
    tokens = centers[planted][:, None, :] + 0.1 * rng.normal(size=(300, 3, 16))
    source = ArraySource(
        "embedded", np.arange(300), None, None, extra={"text_embedding": tokens.astype(np.float32)}
    )
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
    distinct = ArraySource(
        "d", np.arange(6), None, [f"a photo of {w}" for w in "one two three four five six".split()]
    )
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


def test_grouping_dispatch_covers_exactly_the_configured_groupings():
    assert sorted(clusters.GROUPERS) == sorted(GROUPINGS)
    source = ArraySource(
        "l", np.arange(20), None, ["a cat", "a dog"] * 10, labels=np.arange(20) % 3
    )
    used = {
        group_by: clusters.resolve_grouping(source, group_by, 2, 0)[0] for group_by in GROUPINGS
    }
    assert used == {
        "auto": "label",
        "label": "label",
        "caption": "caption",
        "kmeans": "kmeans",
        "none": "none",
    }
    with pytest.raises(ValueError, match="unknown select.group_by 'words'; valid: auto, label"):
        selection.cluster_groups(source, "words", 2, 0)
