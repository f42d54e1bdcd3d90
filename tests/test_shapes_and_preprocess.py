"""Procedural shapes and the example -> model-input transform."""

import numpy as np
import pytest

from alchemist_jax import data
from alchemist_jax.config import DataConfig, ShapesConfig
from alchemist_jax.data import preprocess, shapes


def test_shapes_deterministic_and_captions_match_pixels():
    config = DataConfig(shapes=ShapesConfig(size=50, resolution=32, seed=3))
    first, again = (
        data.load("shapes", "train", config=config),
        shapes.ShapesSource("train", config.shapes),
    )
    assert len(first) == 50
    for i in (0, 17, 49):
        a, b = first[i], again[i]
        assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    for i in range(50):
        example = first[i]
        words = example["caption"].split()
        size, color, shape = words[1], words[2], words[3]
        background = words[-2]
        image = example["image"]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert shape == shapes.SHAPES[example["label"]]
        # Corner pixel (far from any shape) shows the background colour.
        assert np.abs(image[0, 0].astype(int) - shapes.COLORS[background]).max() <= 1
        # The named colour covers a small or large area as the caption says.
        fg = np.all(np.abs(image.astype(int) - shapes.COLORS[color]) <= 1, axis=-1).mean()
        assert (0.02 < fg < 0.12) if size == "small" else (0.08 < fg < 0.35), (i, fg)
        # The shape sits in the named part of the image.
        ys, xs = np.nonzero(np.all(np.abs(image.astype(int) - shapes.COLORS[color]) <= 1, -1))
        if "left" in words:
            assert xs.mean() < 16
        if "bottom" in words:
            assert ys.mean() > 16


def test_shapes_ids_per_split_and_seed():
    train = shapes.ShapesSource("train", ShapesConfig(size=5))
    test = shapes.ShapesSource("test", ShapesConfig(size=5))
    assert train.ids.tolist() == [0, 1, 2, 3, 4]
    assert test.ids.tolist() == [2_000_000_000 + i for i in range(5)]
    assert train[0]["caption"] != test[0]["caption"] or not np.array_equal(
        train[0]["image"], test[0]["image"]
    )
    other_seed = shapes.ShapesSource("train", ShapesConfig(size=5, seed=1))
    assert [train[i]["caption"] for i in range(5)] != [other_seed[i]["caption"] for i in range(5)]
    assert train.labels.tolist() == [train[i]["label"] for i in range(5)]


def test_resize_center_crop():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 5:35] = 200  # the centre, wider than the crop (bicubic rings at edges)
    out = preprocess.resize_center_crop(image, 10, 3)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert (out == 200).all()  # the crop keeps only the centre square
    gray = preprocess.resize_center_crop(np.full((28, 28, 1), 77, np.uint8), 28, 3)
    assert gray.shape == (28, 28, 3) and (gray == 77).all()
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    assert preprocess.resize_center_crop(rgb, 4, 1)[0, 0, 0] == 76  # ITU-R 601 luma of red
    up = preprocess.resize_center_crop(np.full((7, 7, 1), 9, np.uint8), 28, 1)
    assert up.shape == (28, 28, 1) and (up == 9).all()


def test_preprocessor_output():
    transform = preprocess.Preprocessor(resolution=16, channels=1, max_text_length=12)
    example = {
        "id": np.int64(7),
        "image": np.array([[[0], [255]], [[255], [0]]], np.uint8),
        "caption": "a photo of a cat",
        "label": np.int64(2),
        "source": "x",
        "latent": np.ones((2, 2, 4), np.float64),
    }
    out = transform(example)
    assert set(out) == {"id", "image", "tokens", "token_mask", "label", "latent"}
    assert out["image"].shape == (16, 16, 1) and out["image"].dtype == np.float32
    assert out["image"].min() >= -1.0 and out["image"].max() <= 1.0
    assert preprocess.to_unit_range(np.array([0, 255], np.uint8)).tolist() == [-1.0, 1.0]
    assert out["tokens"].tolist()[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert out["tokens"].shape == (12,) and int(out["token_mask"].sum()) == 7
    assert out["latent"].dtype == np.float32 and out["id"] == 7 and out["label"] == 2


@pytest.mark.parametrize("split", ["val", "dev"])
def test_shapes_bad_split(split):
    with pytest.raises(ValueError, match="valid splits: train, validation, test"):
        shapes.ShapesSource(split)


def test_materialize_equals_per_example_preprocessing():
    source = data.load("pool", "validation")
    transform = preprocess.Preprocessor(resolution=20, channels=1, max_text_length=16)
    arrays = preprocess.materialize(source, transform, chunk=300)
    assert len(arrays) == len(source) and np.array_equal(arrays.ids, source.ids)
    assert np.array_equal(arrays.labels, source.labels)
    for i in (0, 299, 300, len(source) - 1):
        expected, got = transform(source[i]), arrays[i]
        assert set(got) == set(expected)
        for key in expected:
            assert np.array_equal(got[key], expected[key]), key
