"""Defect injection: determinism, counts, only the marked examples differ, each defect's effect."""

import io
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alchemist_jax.config import DEFECT_KINDS, HELDOUT_DEFECT_KINDS, ConfigError, load_config
from alchemist_jax.data.corrupt import (
    CAPTION_DEFECTS,
    IMAGE_DEFECTS,
    blend,
    boilerplate_caption,
    corrupt,
    keyword_stuffing,
    scale_brightness,
    shift,
    tiled_text_mask,
    truncated_caption,
    watermark,
)
from alchemist_jax.data.sources import ArraySource

SIZE = 200
FRACTION = 0.37  # 74 examples: 13 of two kinds, 12 of the other four


def make_source(size: int = SIZE, labeled: bool = True) -> ArraySource:
    rng = np.random.default_rng(123)
    labels = np.arange(size) % 4
    return ArraySource(
        "test",
        1000 + np.arange(size),
        rng.integers(0, 256, (size, 28, 28, 1), dtype=np.uint8),
        [f"a photo of class {label}, variant {i}" for i, label in enumerate(labels)],
        labels=labels if labeled else None,
    )


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
    base = ArraySource(
        "rgb", np.arange(4), rng.integers(0, 256, (4, 64, 48, 3), dtype=np.uint8), ["x"] * 4
    )
    source, _ = corrupt(base, 1.0, kinds=["blur", "lowres", "noise", "blank"], seed=0)
    for index in range(4):
        image = source[index]["image"]
        assert image.shape == (64, 48, 3) and image.dtype == np.uint8
        assert not np.array_equal(image, base[index]["image"])


def gain_interval(shifted: np.ndarray, image: np.ndarray) -> tuple[float, float]:
    """The gains g with clip(rint(shifted * g), 0, 255) == image at every pixel (lo > hi: none)."""
    lo, hi = 0.0, np.inf
    for s, v in zip(shifted.ravel().astype(float), image.ravel().astype(float)):
        if s == 0:
            if v != 0:
                return 1.0, 0.0
            continue
        lo = max(lo, (v - 0.5) / s)
        if v < 255:
            hi = min(hi, (v + 0.5) / s)
    return lo, hi


@pytest.mark.parametrize("channels", [1, 3])
def test_near_duplicate_is_a_shifted_brightened_clean_copy(channels):
    rng = np.random.default_rng(5)
    labels = np.arange(60) % 3
    base = ArraySource(
        "nd",
        500 + np.arange(60),
        rng.integers(0, 256, (60, 10, 12, channels), dtype=np.uint8),
        [f"caption {i}" for i in range(60)],
        labels=labels,
    )
    source, truth = corrupt(base, 0.25, kinds=["noise", "near_duplicate"], seed=4)
    defects, source_ids = truth["defect"].to_pylist(), truth["source_id"].to_pylist()
    near = [i for i, d in enumerate(defects) if d == "near_duplicate"]
    assert len(near) == 7 and all(
        defects[i] == "noise" or defects[i] is None for i in range(60) if i not in near
    )
    offsets = set()
    for index in near:
        donor = source_ids[index] - 500
        assert defects[donor] is None and donor != index
        example = source[index]
        assert example["caption"] == f"caption {donor}" and example["id"] == 500 + index
        assert source.labels[index] == labels[donor] and example["label"] == labels[donor]
        assert example["image"].shape == (10, 12, channels) and example["image"].dtype == np.uint8
        # Exactly one 1-2 px offset, with one gain in [0.9, 1.1], reproduces the pixels.
        matches = []
        for dy, dx in [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if dy or dx]:
            rows, cols = np.clip(np.arange(10) - dy, 0, 9), np.clip(np.arange(12) - dx, 0, 11)
            lo, hi = gain_interval(base[donor]["image"][rows][:, cols], example["image"])
            if max(lo, 0.9) <= min(hi, 1.1):
                matches.append((dy, dx))
        assert len(matches) == 1, (index, matches)
        offsets.add(matches[0])
        assert source[index]["image"].tobytes() == example["image"].tobytes()  # per-index seed
    assert len(offsets) > 3  # the direction is drawn per example


def test_shift_repeats_edges_and_brightness_rounds_and_clips():
    image = np.arange(12, dtype=np.uint8).reshape(3, 4, 1) * 20
    np.testing.assert_array_equal(
        shift(image, 1, -2)[..., 0], [[40, 60, 60, 60], [40, 60, 60, 60], [120, 140, 140, 140]]
    )
    np.testing.assert_array_equal(
        shift(image, -2, 1)[..., 0],
        [[160, 160, 180, 200], [160, 160, 180, 200], [160, 160, 180, 200]],
    )
    np.testing.assert_array_equal(
        scale_brightness(np.array([0, 10, 15, 240, 255], np.uint8), 1.1), [0, 11, 16, 255, 255]
    )  # 16.5 rounds to even
    np.testing.assert_array_equal(
        scale_brightness(np.array([5, 25, 255], np.uint8), 0.9), [4, 22, 230]
    )


def rgb_and_gray_source(channels: int, size: int = 42) -> ArraySource:
    rng = np.random.default_rng(11)
    return ArraySource(
        "heldout",
        2000 + np.arange(size),
        rng.integers(0, 256, (size, 24, 20, channels), dtype=np.uint8),
        [f"a small picture of a cat number {i}" for i in range(size)],
        labels=np.arange(size) % 3,
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_heldout_family_damages_one_side_each_and_keeps_labels(channels):
    base = rgb_and_gray_source(channels)
    source, truth = corrupt(base, 0.5, kinds=["heldout"], seed=2)
    defects = truth["defect"].to_pylist()
    counts = Counter(d for d in defects if d is not None)
    assert set(counts) == set(HELDOUT_DEFECT_KINDS) and set(counts.values()) == {3}
    assert truth["source_id"].null_count == len(base)
    np.testing.assert_array_equal(source.labels, base.labels)
    for index, defect in enumerate(defects):
        clean, damaged = base[index], source[index]
        assert damaged["image"].shape == (24, 20, channels) and damaged["image"].dtype == np.uint8
        assert damaged["image"].tobytes() == source[index]["image"].tobytes()  # per-index seed
        image_same = np.array_equal(damaged["image"], clean["image"])
        assert image_same == (defect not in IMAGE_DEFECTS), (index, defect)
        assert (damaged["caption"] == clean["caption"]) == (defect not in CAPTION_DEFECTS)


def test_config_accepts_kinds_and_family_names_and_names_a_bad_entry(base):
    config = load_config(None, ["data.corrupt.kinds=[heldout, near_duplicate]"])
    assert config.data.corrupt.kinds == ("heldout", "near_duplicate")
    _, truth = corrupt(base, 0.4, kinds=config.data.corrupt.kinds, seed=0)
    assert set(truth["defect"].drop_null().to_pylist()) == {*HELDOUT_DEFECT_KINDS, "near_duplicate"}
    with pytest.raises(ConfigError, match=r"'data.corrupt.kinds\[1\]' must be one of 'noise'"):
        load_config(None, ["data.corrupt.kinds=[blur, smudge]"])


def test_tiled_text_mask_and_blend_are_exact():
    mask = tiled_text_mask((9, 16), "DEMO", (3, 2))  # PIL's bitmap font, from 3 px up, 2 px left
    assert ["".join("#" if v else "." for v in row) for row in mask] == [
        "##.########...#.",
        ".##.##....##.##.",
        ".##.####..##.##.",
        ".##.##....#####.",
        ".##.##.##.#.#.#.",
        "##.########.#.#.",
        "................",
        "................",
        "................",
    ]
    image = np.array([[[0], [100]], [[200], [255]]], np.uint8)
    stamp = np.array([[True, True], [False, True]])
    np.testing.assert_array_equal(blend(image, stamp, 255, 0.45)[..., 0], [[115, 170], [200, 255]])
    np.testing.assert_array_equal(blend(image, stamp, 0, 0.45)[..., 0], [[0, 55], [200, 140]])


def test_watermark_pixels_pinned():
    out = watermark(np.full((6, 10, 1), 40, np.uint8), np.random.default_rng(3))
    assert [
        "".join("#" if v == 136 else "." if v == 40 else "?" for v in row) for row in out[..., 0]
    ] == ["..........", "..........", "..........", "#.########", "##.##....#", "##.####..#"]
    bright = watermark(np.full((6, 10, 3), 200, np.uint8), np.random.default_rng(3))
    # The same draws (opacity 0.4465: 40 -> 136) in black ink on a bright image: 200 -> 111.
    np.testing.assert_array_equal(bright, np.where(out == 136, 111, 200).repeat(3, axis=-1))


def changed_by_one_of(candidates: dict, image: np.ndarray):
    """The keys of `candidates` whose image equals `image` exactly."""
    return [key for key, candidate in candidates.items() if np.array_equal(candidate, image)]


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_crop_and_letterbox_match_their_definition(channels):
    base = rgb_and_gray_source(channels, size=30)
    source, truth = corrupt(base, 1.0, kinds=["jpeg", "bad_crop", "letterbox"], seed=5)
    planes = lambda image: [
        Image.fromarray(np.ascontiguousarray(image[..., c]))  # noqa: E731
        for c in range(channels)
    ]
    qualities = set()
    for index, defect in enumerate(truth["defect"].to_pylist()):
        image, damaged = base[index]["image"], source[index]["image"]
        if defect == "jpeg":  # exactly a Pillow JPEG round trip at a quality in 5..15
            decoded = {}
            for quality in range(1, 40):
                encoded = io.BytesIO()
                Image.fromarray(image if channels == 3 else image[..., 0]).save(
                    encoded, format="JPEG", quality=quality
                )
                decoded[quality] = np.asarray(Image.open(encoded)).reshape(image.shape)
            found = changed_by_one_of(decoded, damaged)
            assert found and 5 <= min(found) and max(found) <= 15, found
            qualities.add(found[0])
        elif defect == "bad_crop":  # a corner window of 40-60% of each side, enlarged bilinear
            windows = {}
            for height, width in np.ndindex(25, 21):
                if 0.4 * 24 - 0.5 <= height <= 0.6 * 24 + 0.5 and 8 <= width <= 12:
                    for top, left in (
                        (0, 0),
                        (0, 20 - width),
                        (24 - height, 0),
                        (24 - height, 20 - width),
                    ):
                        windows[height, width, top, left] = np.stack(
                            [
                                np.asarray(
                                    p.crop((left, top, left + width, top + height)).resize(
                                        (20, 24), Image.BILINEAR
                                    )
                                )
                                for p in planes(image)
                            ],
                            axis=-1,
                        )
            assert len(changed_by_one_of(windows, damaged)) == 1
        else:  # letterbox: the image shrunk bilinear to 55-80% per side, centred on black / white
            frames = {}
            for height, width, level in np.ndindex(20, 17, 2):
                if height >= 13 and width >= 11:  # round(0.55 * 24), round(0.55 * 20)
                    framed = np.full_like(image, 255 * level)
                    y, x = (24 - height) // 2, (20 - width) // 2
                    framed[y : y + height, x : x + width] = np.stack(
                        [
                            np.asarray(p.resize((width, height), Image.BILINEAR))
                            for p in planes(image)
                        ],
                        axis=-1,
                    )
                    frames[height, width, level] = framed
            assert len(changed_by_one_of(frames, damaged)) == 1
    assert len(qualities) >= 3


def test_caption_defects_pinned():
    rng = lambda: np.random.default_rng(1)  # noqa: E731
    caption = "digit 1, handwritten in white ink"
    assert boilerplate_caption(caption, rng()) == "untitled-5118"
    assert [boilerplate_caption(caption, np.random.default_rng(seed)) for seed in (4, 5, 11)] == [
        "photo by user9430 on flickr",
        "click to enlarge",
        "DSC01285.JPG",
    ]
    assert truncated_caption(caption, rng()) == "digit 1"
    assert truncated_caption("a silhouette of a elephant", rng()) == "a sil"
    assert truncated_caption("x", rng()) == "x"
    assert keyword_stuffing(caption, rng()) == (
        "digit, handwritten, picture, popular, 1, white, wallpaper, png, free, top, amazing, "
        "background, photo, 2019, cute, ink"
    )
    stuffed = keyword_stuffing("a silhouette of a elephant", rng()).split(", ")
    assert len(stuffed) == len(set(stuffed)) == 13 and {"silhouette", "elephant"} <= set(stuffed)


def test_parquet_truth_reads_back_equal(base, tmp_path):
    path = tmp_path / "run" / "defects.parquet"
    _, truth = corrupt(base, 0.25, seed=3, truth_path=path)
    assert pq.read_table(path).equals(truth)
    assert [p.name for p in path.parent.iterdir()] == ["defects.parquet"]


def test_zero_fraction_changes_nothing(base):
    source, truth = corrupt(base, 0.0)
    assert truth["defect"].null_count == SIZE
    assert all(source[i]["image"].tobytes() == base[i]["image"].tobytes() for i in range(SIZE))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"fraction": 0.1, "kinds": ["noise", "smudge"]},
            "unknown defect kind 'smudge'; valid kinds: noise, blur, blank",
        ),
        ({"fraction": 0.1, "kinds": []}, "one or more distinct kinds"),
        ({"fraction": 0.1, "kinds": ["tuned", "blur"]}, "one or more distinct kinds"),
        ({"fraction": 1.0, "kinds": ["near_duplicate"]}, "`near_duplicate` needs clean examples"),
        ({"fraction": 1.5}, r"fraction must be in \[0, 1\], got 1.5"),
        ({"fraction": -0.1}, r"fraction must be in \[0, 1\]"),
        ({"fraction": 1.0, "kinds": ["duplicate"]}, "needs clean examples"),
    ],
)
def test_invalid_arguments_are_rejected(base, kwargs, message):
    with pytest.raises(ValueError, match=message):
        corrupt(base, **kwargs)


def test_precomputed_sources_are_rejected():
    latents = ArraySource(
        "latents",
        np.arange(3),
        None,
        ["a", "b", "c"],
        extra={"latent": np.zeros((3, 4, 4, 4), np.float32)},
    )
    with pytest.raises(ValueError, match="needs examples with `image`"):
        corrupt(latents, 0.5)
