"""The feature classifier: a small CNN trained on clean labelled images, whose penultimate
features define the Fréchet classifier distance (FCD, an FID analogue) and whose predictions
score text alignment (a CLIP-score analogue) of generated images (docs/METHOD.md §7).

It is trained on the clean validation split (`data.load_splits(cfg.data).validation`): the
trusted labelled set of a run, which never holds injected defects and is disjoint from the test
split it is measured on. (The training pool is larger but may hold defects, and the test split
is what the classifier judges.) Its accuracy on the clean test split tells how far FCD and
alignment can be trusted; both are reported with it.

A classifier is trained once per (recipe version, validation set name, ids and labels,
resolution, channels, `evaluate.classifier_steps`, `evaluate.seed`) and cached in
`<data cache>/classifiers/<key>/` (`params.npz`, then `metadata.json`, each written
atomically): later calls load it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alchemist_jax import config as config_lib
from alchemist_jax.data import load_splits, load_test, pipeline, preprocess
from alchemist_jax.data.cache import cache_dir
from alchemist_jax.data.sources import ArraySource, Source, Subset
from alchemist_jax.runtime import numerics, preemption, progress
from alchemist_jax.runtime.io import atomic_write_bytes

log = logging.getLogger("alchemist_jax.evaluation")

# Part of the cache key: bump when the architecture or the training recipe changes.
RECIPE_VERSION = 2
CONV_WIDTHS = (16, 32, 64)  # stride-2 3x3 convolutions
MAX_MAP_SIDE = 4  # the last feature map is flattened at up to 4 x 4 positions
FEATURE_DIM = 64  # penultimate features (the FCD space)
TRAIN_BATCH_SIZE = 128
PEAK_LEARNING_RATE = 3e-3  # Adam, cosine decay to 5% of the peak
MAX_SHIFT_FRACTION = 1 / 14  # augmentation: random shifts up to this fraction of the side
INFERENCE_BATCH_SIZE = 256  # rows per jitted inference call (inputs are padded to it)
MAX_BAD_STEPS = 10  # consecutive non-finite (skipped) training steps before training stops


class UnlabeledDataError(ValueError):
    """The clean validation set has no labels, so no feature classifier can be trained."""


# ==============================================================================================
# The model
# ==============================================================================================


def _map_side(resolution: int) -> int:
    """Side of the feature map that is flattened: that of the last convolution (ceil(R / 8)),
    at most MAX_MAP_SIDE."""
    return min(-(-resolution // 2 ** len(CONV_WIDTHS)), MAX_MAP_SIDE)


class ConvClassifier(nnx.Module):
    """(B, R, R, C) images in [-1, 1] -> three stride-2 3x3 convolutions with ReLU -> the map,
    downsized to at most MAX_MAP_SIDE^2 positions, flattened (position matters: a global pool
    learns several times slower here) -> dense + ReLU: features (B, FEATURE_DIM) -> linear
    head: logits (B, classes)."""

    def __init__(self, channels: int, resolution: int, classes: int, *, rngs: nnx.Rngs):
        widths = (channels, *CONV_WIDTHS)
        self.convs = nnx.List(
            [nnx.Conv(a, b, (3, 3), strides=2, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]
        )
        self.map_side = _map_side(resolution)
        self.dense = nnx.Linear(self.map_side**2 * widths[-1], FEATURE_DIM, rngs=rngs)
        self.head = nnx.Linear(FEATURE_DIM, classes, rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        x = images
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        if x.shape[1] != self.map_side:
            x = jax.image.resize(
                x, (x.shape[0], self.map_side, self.map_side, x.shape[3]), "linear", antialias=True
            )
        return jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.features(images))


@functools.partial(jax.jit, static_argnums=(0,))
def _features_and_labels(
    graphdef: nnx.GraphDef, params: nnx.State, images: jax.Array
) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, params)
    features = model.features(images)
    return features, jnp.argmax(model.head(features), axis=-1)


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A trained feature classifier and its metadata (see `feature_classifier`)."""

    graphdef: nnx.GraphDef
    params: nnx.State
    metadata: dict[str, Any]

    def _apply(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features (N, F) float32 and predicted labels (N,) int64, in jitted calls of
        INFERENCE_BATCH_SIZE rows (the last one padded), so any N compiles one program."""
        images = np.asarray(images, np.float32)
        features, labels = [], []
        for start in range(0, len(images), INFERENCE_BATCH_SIZE):
            chunk = images[start : start + INFERENCE_BATCH_SIZE]
            padded = np.zeros((INFERENCE_BATCH_SIZE, *images.shape[1:]), np.float32)
            padded[: len(chunk)] = chunk
            f, y = jax.device_get(_features_and_labels(self.graphdef, self.params, padded))
            features.append(f[: len(chunk)])
            labels.append(y[: len(chunk)])
        if not features:
            return (np.zeros((0, FEATURE_DIM), np.float32), np.zeros((0,), np.int64))
        return np.concatenate(features), np.concatenate(labels).astype(np.int64)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate features (N, FEATURE_DIM) float32 of images (N, H, W, C) in [-1, 1]."""
        return self._apply(images)[0]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predicted class (N,) int64 of images (N, H, W, C) in [-1, 1]."""
        return self._apply(images)[1]

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Fraction of images (N, H, W, C) whose predicted class is `labels` (N,)."""
        return float(np.mean(self.predict(images) == np.asarray(labels)))


# ==============================================================================================
# Training (a pure step, jitted once; the loop around it)
# ==============================================================================================


def random_shifts(images: jax.Array, rng: jax.Array, max_shift: int) -> jax.Array:
    """Shifts each image (B, H, W, C) by its own random offset in [-max_shift, max_shift]^2,
    filling the uncovered border with the edge pixels (the background)."""
    if max_shift == 0:
        return images
    height, width = images.shape[1:3]
    padded = jnp.pad(
        images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge"
    )
    offsets = jax.random.randint(rng, (images.shape[0], 2), 0, 2 * max_shift + 1)
    return jax.vmap(
        lambda image, offset: jax.lax.dynamic_slice(
            image, (offset[0], offset[1], 0), (height, width, images.shape[3])
        )
    )(padded, offsets)


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    steps: int,
    seed: int,
    max_bad_steps: int = MAX_BAD_STEPS,
) -> tuple[nnx.GraphDef, nnx.State, float]:
    """Trains a `ConvClassifier` on images (N, H, W, C) in [-1, 1] with labels (N,) in
    [0, classes) (classes = max label + 1): `steps` Adam steps on batches of TRAIN_BATCH_SIZE
    drawn with replacement, randomly shifted (MAX_SHIFT_FRACTION of the side). A step whose loss
    or gradient is not finite is skipped (the parameters keep their last finite values).

    Returns:
      (graphdef, params, mean cross-entropy of the last 50 finite steps).
    Raises:
      numerics.NonFiniteError: `max_bad_steps` consecutive non-finite steps.
      preemption.Preempted: SIGTERM / SIGINT arrived (nothing is cached: a rerun retrains).
    """
    if steps < 1:
        raise config_lib.ConfigError(f"evaluate.classifier_steps must be >= 1, got {steps}")
    init_key, loop_key = jax.random.split(jax.random.key(seed))
    model = ConvClassifier(
        images.shape[-1], images.shape[1], int(labels.max()) + 1, rngs=nnx.Rngs(init_key)
    )
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = optax.adam(optax.cosine_decay_schedule(PEAK_LEARNING_RATE, steps, alpha=0.05))
    max_shift = max(1, round(images.shape[1] * MAX_SHIFT_FRACTION))

    def train_step(params, opt_state, all_images, all_labels, step):
        index_key, shift_key = jax.random.split(jax.random.fold_in(loop_key, step))
        rows = jax.random.randint(index_key, (TRAIN_BATCH_SIZE,), 0, all_images.shape[0])
        batch = random_shifts(all_images[rows], shift_key, max_shift)

        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(batch)
            return optax.softmax_cross_entropy_with_integer_labels(logits, all_labels[rows]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        ok = numerics.all_finite((loss, grads))
        params, opt_state = numerics.keep_if(
            ok, (optax.apply_updates(params, updates), new_opt_state), (params, opt_state)
        )
        return params, opt_state, loss, ok

    step_fn = jax.jit(train_step, donate_argnums=(0, 1))
    guard = numerics.BadStepGuard(
        "feature classifier",
        max_bad_steps,
        "the validation images (data.validation_source) hold extreme or non-finite values, or "
        f"evaluate.classifier_steps={steps} is too short for the schedule",
    )
    opt_state = optimizer.init(params)
    device_images, device_labels = jnp.asarray(images, jnp.float32), jnp.asarray(labels)
    losses, pending = [], []
    bar = progress.bar(range(steps), desc="feature classifier", unit="step", leave=False)
    with preemption.guard() as stop:
        for step in bar:
            params, opt_state, loss, ok = step_fn(
                params, opt_state, device_images, device_labels, np.int32(step)
            )
            pending.append((step + 1, loss, ok))
            if (step + 1) % 50 == 0 or step == steps - 1 or stop.requested:
                for number, value, finite in jax.device_get(pending):
                    if guard.check(number, finite, {"loss": value}):
                        losses.append(float(value))
                pending = []
            if stop.requested:
                raise preemption.Preempted(
                    f"feature classifier stopped by {stop.signal_name} after step {step + 1} of "
                    f"{steps}; nothing was cached: rerun the same command"
                )
    return graphdef, params, float(np.mean(losses[-50:]))


# ==============================================================================================
# Data, cache and the entry point
# ==============================================================================================


def source_arrays(source: Source) -> dict[str, np.ndarray]:
    """Every numeric field of every example of `source`, stacked: (N, ...) per field."""
    batch = next(pipeline.eval_iterator(source, len(source)))
    batch.pop("mask")
    return batch


def load_test_data(cfg: config_lib.Config) -> ArraySource:
    """The clean test set evaluated (`data.load_test(cfg.data, cfg.evaluate.test_source)`, its
    first `evaluate.test_size` examples when set), preprocessed into memory."""
    test = load_test(cfg.data, cfg.evaluate.test_source)
    if cfg.evaluate.test_size is not None:
        if cfg.evaluate.test_size < 1:
            raise config_lib.ConfigError(
                f"evaluate.test_size must be >= 1, got {cfg.evaluate.test_size}"
            )
        test = Subset(test, np.arange(min(cfg.evaluate.test_size, len(test))), "evaluated")
    return preprocess.materialize(test, preprocess.Preprocessor.for_config(cfg.data))


def classifier_cache_root() -> Path:
    """Folder of the cached classifiers: `<data cache>/classifiers`."""
    return cache_dir() / "classifiers"


def classifier_key(training: Source, cfg: config_lib.Config, variant: str = "") -> str:
    """The cache key of the classifier trained on `training` under `cfg`: a hash of the recipe
    version, the source name, ids and labels, resolution, channels, classifier steps and seed
    (and `variant`, when given: how latents became images)."""
    settings = [
        RECIPE_VERSION,
        training.name,
        cfg.data.resolution,
        cfg.data.channels,
        cfg.evaluate.classifier_steps,
        cfg.evaluate.seed,
    ]
    digest = hashlib.sha256(json.dumps(settings + ([variant] if variant else [])).encode())
    digest.update(np.ascontiguousarray(training.ids, np.int64).tobytes())
    digest.update(np.ascontiguousarray(training.labels, np.int64).tobytes())
    return digest.hexdigest()[:20]


def _flat_params(params: nnx.State) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def save_classifier(directory: Path, classifier: Classifier) -> None:
    """Writes `params.npz` then `metadata.json` (its presence marks a complete entry)."""
    buffer = io.BytesIO()
    np.savez(buffer, **_flat_params(classifier.params))
    atomic_write_bytes(directory / "params.npz", buffer.getvalue())
    atomic_write_bytes(
        directory / "metadata.json", (json.dumps(classifier.metadata, indent=2) + "\n").encode()
    )


def load_classifier(directory: Path) -> Classifier:
    """The classifier saved in `directory` by `save_classifier`."""
    metadata = json.loads((directory / "metadata.json").read_text())
    model = ConvClassifier(
        metadata["channels"], metadata["resolution"], metadata["classes"], rngs=nnx.Rngs(0)
    )
    graphdef, like = nnx.split(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    with np.load(directory / "params.npz") as stored:
        names = [jax.tree_util.keystr(path) for path, _ in leaves]
        if sorted(names) != sorted(stored.files):
            raise ValueError(
                f"{directory / 'params.npz'} does not match the classifier "
                "architecture; delete the folder to retrain"
            )
        params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(stored[n]) for n in names])
    return Classifier(graphdef, params, metadata)


def feature_classifier(
    cfg: config_lib.Config,
    test_data: ArraySource | None = None,
    *,
    to_images: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
    variant: str = "",
) -> Classifier:
    """The feature classifier of `cfg`: loaded from the cache, else trained for
    `evaluate.classifier_steps` steps on the clean validation split and cached.

    Args:
      cfg: `data` (which validation split; resolution, channels) and `evaluate`
        (classifier_steps, seed; the test set its accuracy is measured on when trained).
      test_data: the preprocessed test set (`load_test_data(cfg)`) if already loaded.
      to_images: preprocessed fields (N, ...) -> images (N, H, W, C) in [-1, 1] (latent
        datasets: the VAE decoder of `evaluate.vae_path`); None: the `image` field.
      variant: part of the cache key, naming what `to_images` does (e.g. the VAE folder).
    Returns:
      The classifier; its `metadata` holds the training set, steps, the final training loss and
      `test_accuracy` (None when the test set has no labels).
    Raises:
      UnlabeledDataError: the validation split has no labels.
    """
    validation = load_splits(cfg.data).validation
    if validation.labels is None:
        raise UnlabeledDataError(
            "evaluate needs labelled clean data for FCD/alignment; the validation set "
            f"{validation.name} has no labels (set data.validation_source to a labelled set)"
        )
    directory = classifier_cache_root() / classifier_key(validation, cfg, variant)
    if (directory / "metadata.json").exists():
        return load_classifier(directory)
    started = time.perf_counter()
    train = source_arrays(
        preprocess.materialize(validation, preprocess.Preprocessor.for_config(cfg.data))
    )
    if to_images is not None:
        train["image"] = to_images(train)
    graphdef, params, loss = train_classifier(
        train["image"], train["label"], cfg.evaluate.classifier_steps, cfg.evaluate.seed
    )
    classifier = Classifier(graphdef, params, {})
    test = source_arrays(load_test_data(cfg) if test_data is None else test_data)
    if to_images is not None:
        test["image"] = to_images(test)
    test_accuracy = classifier.accuracy(test["image"], test["label"]) if "label" in test else None
    metadata = {
        "recipe_version": RECIPE_VERSION,
        "channels": int(train["image"].shape[-1]),
        "resolution": int(train["image"].shape[1]),
        "classes": int(train["label"].max()) + 1,
        "feature_dim": FEATURE_DIM,
        "steps": cfg.evaluate.classifier_steps,
        "seed": cfg.evaluate.seed,
        "train_source": validation.name,
        "train_size": len(validation),
        "final_train_loss": loss,
        "train_accuracy": classifier.accuracy(train["image"], train["label"]),
        "test_size": len(test["id"]),
        "test_accuracy": test_accuracy,
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    classifier = dataclasses.replace(classifier, metadata=metadata)
    save_classifier(directory, classifier)
    log.info(
        "feature classifier trained on %d images: test accuracy %s", len(validation), test_accuracy
    )
    return classifier
