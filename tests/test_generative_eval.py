"""Evaluation of trained T2I models: Fréchet distance against closed forms and a reference
sqrtm, the cached feature classifier, the alignment identity on real images, and evaluate_model
on an untrained tiny DiT (metrics.json, samples.png, the unlabeled-data path)."""

import json

import jax
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from alchemist_jax import config as config_lib
from alchemist_jax import models
from alchemist_jax.evaluation import classifier as classifier_lib
from alchemist_jax.evaluation import generative
from alchemist_jax.evaluation.classifier import (
    UnlabeledDataError,
    feature_classifier,
    load_test_data,
)
from alchemist_jax.evaluation.generative import (
    evaluate_model,
    fcd,
    frechet_distance,
    try_feature_classifier,
)
from alchemist_jax.training import Trained

OVERRIDES = [
    "data.pool.train_size=200",
    "data.pool.validation_size=800",
    "data.pool.test_size=200",
    "data.max_text_length=16",
    "model.patch_size=7",
    "model.text_trainable=false",
    "evaluate.classifier_steps=250",
    "evaluate.sample_steps=3",
    "evaluate.loss_draws=2",
    "evaluate.grid_captions=4",
    "evaluate.grid_samples=3",
]


# ----------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------


def _reference_frechet(mu1, cov1, mu2, cov2):
    cross = scipy.linalg.sqrtm(cov1 @ cov2).real
    return np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * cross)


def test_frechet_distance_closed_forms():
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [-0.5], [[0.25]]) == pytest.approx(1.5**2 + 1.5**2)
    # Diagonal covariances: the sum of the 1-D distances.
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 2.0, 0.1])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)  # 10 + 4.16
    assert frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(expected)
    # Full, non-commuting covariances (one singular): scipy's sqrtm as the reference.
    rng = np.random.default_rng(0)
    a, b, mu = rng.normal(size=(5, 5)), rng.normal(size=(5, 3)), rng.normal(size=5)
    cov1, cov2 = a @ a.T, b @ b.T
    assert frechet_distance(mu, cov1, np.zeros(5), cov2) == pytest.approx(
        _reference_frechet(mu, cov1, np.zeros(5), cov2), rel=1e-6
    )
    with pytest.raises(ValueError, match="means \\(F,\\) and covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_fcd_identity_and_translation():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    assert abs(fcd(features, features)) < 1e-8
    shift = np.array([3.0, -1.0, 0, 0, 0, 0, 0, 2.0])
    assert fcd(features, features + shift) == pytest.approx(14.0, abs=1e-6)  # |shift|^2
    with pytest.raises(ValueError, match="generated features"):
        fcd(features, features[:1])


# ----------------------------------------------------------------------------------------------
# The feature classifier (trained once for the module, in a temporary cache)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifiers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(classifier_lib, "classifier_cache_root", lambda: root)
        cfg = config_lib.load_config(None, OVERRIDES)
        test = load_test_data(cfg)
        classifier = feature_classifier(cfg, test)
        yield cfg, test, classifier, root


def test_classifier_is_accurate_and_cached(setup, monkeypatch):
    cfg, test, classifier, root = setup
    meta = classifier.metadata
    assert (meta["train_size"], meta["test_size"], meta["classes"]) == (800, 200, 20)
    assert meta["test_accuracy"] > 0.8
    arrays = classifier_lib.source_arrays(test)
    assert classifier.accuracy(arrays["image"], arrays["label"]) == meta["test_accuracy"]
    entry = root / classifier_lib.classifier_key(
        classifier_lib.load_splits(cfg.data).validation, cfg
    )
    assert json.loads((entry / "metadata.json").read_text()) == meta

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier was trained again")

    monkeypatch.setattr(classifier_lib, "classifier_cache_root", lambda: root)
    monkeypatch.setattr(classifier_lib, "train_classifier", no_training)
    cached = feature_classifier(cfg)
    features = classifier.features(arrays["image"])
    assert features.shape == (200, classifier_lib.FEATURE_DIM)
    np.testing.assert_array_equal(cached.features(arrays["image"]), features)
    # Another step count is another classifier.
    other = config_lib.load_config(None, [*OVERRIDES, "evaluate.classifier_steps=7"])
    assert (
        classifier_lib.classifier_key(classifier_lib.load_splits(cfg.data).validation, other)
        != entry.name
    )


def test_alignment_of_real_images_is_the_test_accuracy(setup):
    _, test, classifier, _ = setup
    arrays = classifier_lib.source_arrays(test)
    scores = generative.score_samples(classifier, arrays["image"], arrays["image"], arrays["label"])
    assert scores["alignment"] == scores["classifier_test_accuracy"]
    assert scores["alignment"] == classifier.metadata["test_accuracy"]
    assert abs(scores["fcd"]) < 1e-6
    unlabeled = generative.score_samples(classifier, arrays["image"], arrays["image"], None)
    assert unlabeled["alignment"] is None
    assert unlabeled["unavailable"]["alignment"] == "the test set has no labels"


def test_fcd_separates_real_from_noise(setup):
    _, test, classifier, _ = setup
    real = classifier.features(classifier_lib.source_arrays(test)["image"])
    noise = np.random.default_rng(0).uniform(-1, 1, (200, 28, 28, 1)).astype(np.float32)
    real_vs_half = fcd(real, real[::2])
    real_vs_noise = fcd(real, classifier.features(noise))
    assert real_vs_half < 0.05 * real_vs_noise, (real_vs_half, real_vs_noise)


# ----------------------------------------------------------------------------------------------
# evaluate_model on an untrained DiT
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untrained(setup):
    cfg, test, _, _ = setup
    example = {
        k: np.stack([v] * 2) for k, v in test[0].items() if k in ("image", "tokens", "token_mask")
    }
    return Trained(
        *models.init_proxy(cfg.model, example, jax.random.key(0), cfg.data.max_text_length)
    )


def test_evaluate_untrained_model(setup, untrained, tmp_path):
    cfg, test, classifier, _ = setup
    metrics = evaluate_model(cfg, untrained, test, classifier, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    # An untrained DiT predicts v = 0: the loss is E(eps - x0)^2 = 1 + mean(x0^2), and its
    # samples are the initial noise, clipped.
    images = classifier_lib.source_arrays(test)["image"]
    assert metrics["test_loss"] == pytest.approx(1 + np.mean(images**2), abs=0.02)
    real = classifier.features(images)
    assert metrics["fcd"] > 20 * fcd(real, real[::2])
    assert 0 <= metrics["alignment"] <= 0.3
    assert metrics["classifier_test_accuracy"] == classifier.metadata["test_accuracy"]
    assert (metrics["test_size"], metrics["sample_steps"], metrics["loss_draws"]) == (200, 3, 2)
    grid = Image.open(tmp_path / "samples.png")
    assert grid.size == generative.grid_size(4, 3, 28)  # 4 captions x 3 samples, tiles of 56
    assert grid.size == (200 + 3 * 58 + 2, 4 * 58 + 2)


def test_grid_rows_spread_over_classes():
    labels = np.repeat(np.arange(20), 3)
    tokens = labels[:, None].repeat(4, axis=1)
    np.testing.assert_array_equal(generative.grid_rows(labels, tokens, 4), [0, 18, 39, 57])
    # Fewer classes than rows: further distinct captions in data order.
    tokens = np.arange(60)[:, None].repeat(4, axis=1)
    np.testing.assert_array_equal(generative.grid_rows(labels % 2, tokens, 4), [0, 3, 1, 2])
    np.testing.assert_array_equal(generative.grid_rows(None, tokens[[0, 0, 1]], 4), [0, 2])


def test_unlabeled_data_reports_null_fcd_and_alignment(setup, untrained, tmp_path):
    cfg, test, _, _ = setup
    folder = tmp_path / "data"
    folder.mkdir()
    rows = ["image,caption"]
    for i in range(10):
        Image.fromarray(np.full((28, 28), 25 * i, np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,a gray square number {i}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    unlabeled = config_lib.load_config(
        None, [*OVERRIDES, f"data.source={folder}/manifest.csv", "data.validation_fraction=0.3"]
    )
    with pytest.raises(
        UnlabeledDataError,
        match="evaluate needs labelled clean data for FCD/alignment; the validation set",
    ):
        feature_classifier(unlabeled)
    classifier, reason = try_feature_classifier(unlabeled)
    assert classifier is None and reason.startswith("evaluate needs labelled clean data")

    metrics = evaluate_model(
        cfg, untrained, test, None, tmp_path / "eval", classifier_missing=reason
    )
    assert metrics["fcd"] is None and metrics["alignment"] is None
    assert metrics["unavailable"] == {
        "fcd": reason,
        "alignment": reason,
        "classifier_test_accuracy": reason,
    }
    assert np.isfinite(metrics["test_loss"])
    assert Image.open(tmp_path / "eval" / "samples.png").size == generative.grid_size(4, 3, 28)
