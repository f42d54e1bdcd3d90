"""Defect injection: determinism, counts, only the marked examples differ, each defect's effect."""

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from alchemist_jax.config import DEFECT_KINDS
from alchemist_jax.data.corrupt import corrupt
from alchemist_jax.data.sources import ArraySource

SIZE = 200
FRACTION = 0.37  # 74 examples: 13 of two kinds, 12 of the other four


def make_source(size: int = SIZE, labeled: bool = True) -> ArraySource:
    rng = np.random.default_rng(123)
    labels = np.arange(size) % 4
    return ArraySource(
        "test", 1000 + np.arange(size), rng.integers(0, 256, (size, 28, 28, 1), dtype=np.uint8),
        [f"a photo of class {label}, variant {i}" for i, label in enumerate(labels)],
        labels=labels if labeled else None)


@pytest.fixture(scope="module")
def base():
    return make_source()


@pytest.fixture(scope="module")
def corrupted(base):
    return corrupt(base, FRACTION, seed=7)


def differs(a, b) -> bool:
    return not np.array_equal(a["image"], b["image"]) or a["caption"] != b["caption"]


def by_kind(truth):
    defects = truth["defect"].to_pylist()
    return {kind: [i for i, d in enumerate(defects) if d == kind] for kind in DEFECT_KINDS}


def test_truth_table_marks_the_right_count_evenly(base, corrupted):
    source, truth = corrupted
    assert truth.column_names == ["id", "defect", "source_id"]
    assert str(truth.schema.field("id").type) == "int64"
    assert str(truth.schema.field("source_id").type) == "int64"
    np.testing.assert_array_equal(truth["id"].to_numpy(), base.ids)
    counts = Counter(d for d in truth["defect"].to_pylist() if d is not None)
    assert sum(counts.values()) == round(FRACTION * SIZE)
    assert set(counts) == set(DEFECT_KINDS)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert list(source.defects) == truth["defect"].to_pylist()
    for defect, source_id in zip(truth["defect"].to_pylist(), truth["source_id"].to_pylist()):
        assert (source_id is not None) == (defect in ("caption_swap", "duplicate"))


def test_exactly_the_marked_examples_differ_and_clean_ones_are_identical(base, corrupted):
    source, truth = corrupted
    assert len(source) == len(base)
    np.testing.assert_array_equal(source.ids, base.ids)
    for index, defect in enumerate(truth["defect"].to_pylist()):
        clean, damaged = base[index], source[index]
        assert damaged["id"] == clean["id"]
        assert damaged["image"].shape == (28, 28, 1) and damaged["image"].dtype == np.uint8
        assert differs(damaged, clean) == (defect is not None), (index, defect)
        if defect is None:
            assert damaged["image"].tobytes() == clean["image"].tobytes()
            assert damaged["caption"] == clean["caption"]


def test_each_defect_has_its_effect(base, corrupted):
    source, truth = corrupted
    index_of_id = {int(i): n for n, i in enumerate(base.ids)}
    source_ids = truth["source_id"].to_pylist()
    kinds = by_kind(truth)
    for index in kinds["duplicate"]:
        donor = index_of_id[source_ids[index]]
        assert truth["defect"][donor].as_py() is None  # copied from a clean example
        np.testing.assert_array_equal(source[index]["image"], base[donor]["image"])
        assert source[index]["caption"] == base[donor]["caption"]
        assert source.labels[index] == base.labels[donor]  # the true class of the copied image
    for index in kinds["caption_swap"]:
        donor = index_of_id[source_ids[index]]
        assert source[index]["caption"] == base[donor]["caption"]
        assert base.labels[donor] != base.labels[index]
        np.testing.assert_array_equal(source[index]["image"], base[index]["image"])
        assert source.labels[index] == base.labels[index]  # the label stays the image's
    for index in kinds["blank"]:
        image = source[index]["image"]
        assert (image == image.flat[0]).all()
    for index in kinds["noise"] + kinds["blur"] + kinds["lowres"]:
        assert source[index]["caption"] == base[index]["caption"]
    for index in kinds["blur"] + kinds["lowres"]:
        # Smoothing and pixelating both lower the pixel-to-pixel variation of random images.
        step = lambda image: np.abs(np.diff(image[..., 0].astype(float), axis=1)).mean()  # noqa
        assert step(source[index]["image"]) < 0.7 * step(base[index]["image"])
    labels = source.labels
    clean = [i for i, d in enumerate(truth["defect"].to_pylist()) if d != "duplicate"]
    np.testing.assert_array_equal(labels[clean], base.labels[clean])


def test_deterministic_in_the_seed(base, corrupted):
    source, truth = corrupted
    again, truth_again = corrupt(base, FRACTION, seed=7)
    assert truth.equals(truth_again)
    for index in range(SIZE):
        assert source[index]["image"].tobytes() == again[index]["image"].tobytes()
        assert source[index]["caption"] == again[index]["caption"]
        # Reading an index twice gives the same defect (noise is seeded by the index).
        assert source[index]["image"].tobytes() == source[index]["image"].tobytes()
    _, other = corrupt(base, FRACTION, seed=8)
    assert other["defect"].to_pylist() != truth["defect"].to_pylist()


def test_unlabeled_caption_swap_takes_a_different_caption():
    base = make_source(40, labeled=False)
    source, truth = corrupt(base, 0.5, kinds=["caption_swap"], seed=0)
    swapped = [i for i, d in enumerate(truth["defect"].to_pylist()) if d == "caption_swap"]
    assert len(swapped) == 20 and source.labels is None
    for index in swapped:
        assert source[index]["caption"] != base[index]["caption"]


def test_blur_and_lowres_keep_rgb_shape():
    rng = np.random.default_rng(0)
    base = ArraySource("rgb", np.arange(4), rng.integers(0, 256, (4, 64, 48, 3), dtype=np.uint8),
                       ["x"] * 4)
    source, _ = corrupt(base, 1.0, kinds=["blur", "lowres", "noise", "blank"], seed=0)
    for index in range(4):
        image = source[index]["image"]
        assert image.shape == (64, 48, 3) and image.dtype == np.uint8
        assert not np.array_equal(image, base[index]["image"])


def test_parquet_truth_reads_back_equal(base, tmp_path):
    path = tmp_path / "run" / "defects.parquet"
    _, truth = corrupt(base, 0.25, seed=3, truth_path=path)
    assert pq.read_table(path).equals(truth)
    assert [p.name for p in path.parent.iterdir()] == ["defects.parquet"]


def test_zero_fraction_changes_nothing(base):
    source, truth = corrupt(base, 0.0)
    assert truth["defect"].null_count == SIZE
    assert all(source[i]["image"].tobytes() == base[i]["image"].tobytes() for i in range(SIZE))


@pytest.mark.parametrize("kwargs, message", [
    ({"fraction": 0.1, "kinds": ["noise", "smudge"]},
     "unknown defect kind 'smudge'; valid kinds: noise, blur, blank"),
    ({"fraction": 0.1, "kinds": []}, "one or more distinct kinds"),
    ({"fraction": 1.5}, r"fraction must be in \[0, 1\], got 1.5"),
    ({"fraction": -0.1}, r"fraction must be in \[0, 1\]"),
    ({"fraction": 1.0, "kinds": ["duplicate"]}, "needs clean examples"),
])
def test_invalid_arguments_are_rejected(base, kwargs, message):
    with pytest.raises(ValueError, match=message):
        corrupt(base, **kwargs)


def test_precomputed_sources_are_rejected():
    latents = ArraySource("latents", np.arange(3), None, ["a", "b", "c"],
                          extra={"latent": np.zeros((3, 4, 4, 4), np.float32)})
    with pytest.raises(ValueError, match="needs examples with `image`"):
        corrupt(latents, 0.5)
