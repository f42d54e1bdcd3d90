"""Evaluating a trained text-to-image model on the clean held-out test set (docs/METHOD.md §7):

  test loss   mean flow-matching loss at fixed (t, noise) draws (`training.validation_loss`,
              `evaluate.loss_draws` draws per example)
  FCD         Fréchet distance between the feature classifier's penultimate features of the
              real test images and of one generated image per test caption (an FID analogue)
  alignment   the classifier's accuracy on those generated images against the class named in
              each caption, i.e. the test label (a CLIP-score analogue)
  samples     a PNG grid: `evaluate.grid_captions` distinct captions (one per class where
              possible) x `evaluate.grid_samples` samples, the caption text as row label

On a latent test set (`alchemist-jax encode`) generated and test latents are decoded to pixels
by the VAE of `evaluate.vae_path` for every metric but the test loss (without it: the test loss
only, the others null with the reason). With `evaluate.clip_path` (a local HF CLIP folder) it
also reports `clip_fd`, the Fréchet distance of generated and test images in CLIP image
features, and `clip_score`, the mean cosine similarity of each generated image with its caption
(`evaluation.pixels`).

Generation: `models.sample` (Euler, classifier-free guidance) jitted once, batches padded to a
fixed size. Outputs: `metrics.json` and `samples.png` in the output folder, written atomically.

Size: the evaluation of one trained model (test loss, sampling, FCD, alignment, sample grid)
written once for `evaluate` and the pipeline.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageDraw, ImageFont

from alchemist_jax import config as config_lib
from alchemist_jax import models, training
from alchemist_jax.data import load_test
from alchemist_jax.data.sources import ArraySource
from alchemist_jax.data.tokenizer import Tokenizer
from alchemist_jax.evaluation import pixels as pixels_lib
from alchemist_jax.evaluation.classifier import (
    Classifier,
    UnlabeledDataError,
    feature_classifier,
    load_test_data,
    source_arrays,
)
from alchemist_jax.runtime import parallel, progress
from alchemist_jax.runtime.io import atomic_write_bytes, pool_positions

log = logging.getLogger("alchemist_jax.evaluation")

MAX_EVAL_BATCH_SIZE = 256  # rows per jitted generation / loss call
# samples.png: each image is scaled up by an integer factor to at least GRID_MIN_TILE pixels;
# tiles and the label column are separated by GRID_GAP pixels.
GRID_MIN_TILE = 56
GRID_GAP = 2
GRID_LABEL_WIDTH = 200
GRID_FONT_SIZE = 13


# ==============================================================================================
# Fréchet distance
# ==============================================================================================


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues
    below 0 from rounding are taken as 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2):

        |mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2)).

    tr((cov1 cov2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S cov2 S, S = cov1^(1/2) (similar to cov1 cov2), in float64: no
    complex parts and no failure on singular covariances. Rounding can leave a result just
    below 0; it is clipped at 0.

    Args:
      mu1, mu2: (F,) means.
      cov1, cov2: (F, F) symmetric PSD covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu2.shape != (dim,) or cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
        raise ValueError(
            f"frechet_distance needs means (F,) and covariances (F, F) of one F; "
            f"got {mu1.shape}, {cov1.shape}, {mu2.shape}, {cov2.shape}"
        )
    root1 = _psd_sqrt((cov1 + cov1.T) / 2)
    middle = root1 @ cov2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = np.sum(np.square(mu1 - mu2)) + np.trace(cov1) + np.trace(cov2) - 2 * cross
    return float(max(distance, 0.0))


def fcd(real_features: np.ndarray, fake_features: np.ndarray) -> float:
    """Fréchet classifier distance: `frechet_distance` of the Gaussians fitted (mean, unbiased
    covariance) to real (N, F) and generated (M, F) features; N, M >= 2."""
    stats = []
    for name, features in (("real", real_features), ("generated", fake_features)):
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"fcd needs {name} features (N >= 2, F), got {features.shape}")
        stats += [features.mean(axis=0), np.cov(features, rowvar=False)]
    return frechet_distance(*stats)


# ==============================================================================================
# Generation
# ==============================================================================================


def _sample(
    graphdef: nnx.GraphDef,
    steps: int,
    shape: tuple[int, int, int],
    params: nnx.State,
    rest: nnx.State,
    captions: dict,
    rng: jax.Array,
    guidance_scale: jax.Array,
) -> jax.Array:
    model = nnx.merge(graphdef, params, rest)
    return jnp.clip(models.sample(model, captions, rng, steps, guidance_scale, shape), -1.0, 1.0)


@functools.lru_cache(maxsize=16)
def _sample_step(
    graphdef: nnx.GraphDef,
    steps: int,
    shape: tuple[int, int, int],
    model_key: tuple,
    rows: NamedSharding | None,
):
    """`_sample` jitted once per model, step count, shape and layout, with explicit shardings:
    the model's (params, rest) as they lie (`model_key`, a `parallel.sharding_key`), the
    caption rows and the images split by `rows`, the key and guidance scale replicated (None:
    shardings follow the inputs, for arrays not on a mesh)."""
    step = functools.partial(_sample, graphdef, steps, shape)
    if rows is None:
        return jax.jit(step)
    replicated = NamedSharding(rows.mesh, P())
    params, rest = parallel.unkey_shardings(model_key)
    return jax.jit(
        step,
        in_shardings=(params, rest, rows, replicated, replicated),
        out_shardings=rows,
    )


def generate(
    trained: training.Trained,
    captions: dict,
    rng: jax.Array,
    steps: int,
    guidance_scale: float,
    shape: tuple[int, int, int],
) -> jax.Array:
    """Images for a batch of captions (`models.sample`: `steps` Euler steps, classifier-free
    guidance `guidance_scale`), clipped to [-1, 1]; jitted once per (model, steps, shape,
    batch size).

    Args:
      trained: the model.
      captions: `tokens` (B, L) + `token_mask` (B, L), or `text_embedding` (B, L, Dt); other
        fields are ignored.
      rng: key of the initial noise.
      shape: (H, W, C) of the images.
    Returns:
      (B, H, W, C) float32 in [-1, 1].
    """
    inputs = {k: v for k, v in captions.items() if k in parallel.CAPTION_INPUTS}
    rows = getattr(jax.tree.leaves(inputs)[0], "sharding", None)
    rows = rows if isinstance(rows, NamedSharding) else None
    step = _sample_step(
        trained.graphdef,
        steps,
        tuple(shape),
        parallel.sharding_key((trained.params, trained.rest)) if rows is not None else None,
        rows,
    )
    return step(trained.params, trained.rest, inputs, rng, jnp.float32(guidance_scale))


def eval_batch_size(size: int) -> int:
    """Rows per jitted evaluation call for a set of `size` examples: up to MAX_EVAL_BATCH_SIZE,
    a multiple of the device count."""
    devices = jax.device_count()
    return -(-min(size, MAX_EVAL_BATCH_SIZE) // devices) * devices


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` (n, ...) with its last row repeated up to `rows` rows."""
    return np.concatenate([array, np.repeat(array[-1:], rows - len(array), axis=0)])


def generate_images(
    trained: training.Trained,
    captions: dict[str, np.ndarray],
    shape: tuple[int, int, int],
    seed: int,
    steps: int,
    guidance_scale: float,
    batch_size: int,
    desc: str = "generating",
) -> np.ndarray:
    """One image per caption row, generated in batches of `batch_size` rows (the last one
    padded, so every batch runs the same program); batch b uses the key fold_in(key(seed), b).

    Args:
      captions: caption fields (`parallel.CAPTION_INPUTS`) with N rows each; other fields are
        ignored.
      shape: (H, W, C) of the images.
    Returns:
      (N, H, W, C) float32 in [-1, 1].
    """

    captions = {k: np.asarray(v) for k, v in captions.items() if k in parallel.CAPTION_INPUTS}
    rows = len(next(iter(captions.values())))
    sharding = NamedSharding(parallel.make_mesh(), P(parallel.DATA_AXIS))
    key = jax.random.key(seed)
    images = []
    starts = range(0, rows, batch_size)
    for index, start in enumerate(progress.bar(starts, desc=desc, unit="batch", leave=False)):
        batch = {
            k: _pad_rows(v[start : start + batch_size], batch_size) for k, v in captions.items()
        }
        generated = generate(
            trained,
            jax.device_put(batch, sharding),
            jax.random.fold_in(key, index),
            steps,
            guidance_scale,
            shape,
        )
        images.append(np.asarray(generated)[: min(batch_size, rows - start)])
    return np.concatenate(images)


# ==============================================================================================
# The sample grid
# ==============================================================================================


def grid_rows(labels: np.ndarray | None, tokens: np.ndarray, rows: int) -> np.ndarray:
    """Indices of up to `rows` examples with distinct captions (rows of `tokens` (N, L)): one per
    class, classes spread evenly over the sorted labels (N,), then further distinct captions in
    data order; without labels, the first distinct captions."""
    chosen: list[int] = []
    if labels is not None:
        classes = np.unique(labels)
        picked = classes[
            np.unique(np.linspace(0, len(classes) - 1, min(rows, len(classes))).round().astype(int))
        ]
        chosen = [int(np.flatnonzero(labels == c)[0]) for c in picked]
    seen = {tokens[i].tobytes() for i in chosen}
    for index in range(len(tokens)):
        if len(chosen) >= rows:
            break
        if tokens[index].tobytes() not in seen:
            seen.add(tokens[index].tobytes())
            chosen.append(index)
    return np.array(chosen, np.int64)


def caption_texts(tokens: np.ndarray, token_mask: np.ndarray) -> list[str]:
    """The caption text of CLIP token rows (B, L) with masks (B, L), special tokens removed."""
    return Tokenizer(max(2, tokens.shape[1])).decode(tokens, token_mask)


def _tile_side(resolution: int) -> int:
    """Side in pixels of one image in the grid: `resolution` times the smallest integer factor
    that reaches GRID_MIN_TILE (1 for large images)."""
    return resolution * max(1, math.ceil(GRID_MIN_TILE / resolution))


def grid_size(rows: int, columns: int, resolution: int) -> tuple[int, int]:
    """(width, height) in pixels of `sample_grid` for rows x columns images of side
    `resolution`."""
    tile = _tile_side(resolution)
    return (
        GRID_LABEL_WIDTH + columns * (tile + GRID_GAP) + GRID_GAP,
        rows * (tile + GRID_GAP) + GRID_GAP,
    )


def fit_text(
    text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int, lines: int
) -> str:
    """`text` wrapped at word boundaries into at most `lines` lines of at most `width` pixels in
    `font`; what does not fit is cut and marked with an ellipsis."""
    wrapped: list[str] = []
    for word in text.split():
        candidate = f"{wrapped[-1]} {word}" if wrapped else word
        if wrapped and font.getlength(candidate) <= width:
            wrapped[-1] = candidate
        else:
            wrapped.append(word)
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] += " …"
    return "\n".join(wrapped)


def sample_grid(images: np.ndarray, labels: list[str]) -> Image.Image:
    """An RGB image of images (R, S, H, W, C) in [-1, 1], one row per caption, the caption text
    (wrapped) in a left column; size `grid_size(R, S, H)` (square images)."""
    rows, columns, height = images.shape[:3]
    tile = _tile_side(height)
    canvas = Image.new("RGB", grid_size(rows, columns, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=GRID_FONT_SIZE)
    line_height = GRID_FONT_SIZE + 3
    pixels = np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)
    for r in range(rows):
        top = GRID_GAP + r * (tile + GRID_GAP)
        text = fit_text(labels[r], font, GRID_LABEL_WIDTH - 8, max(1, tile // line_height))
        draw.multiline_text((4, top + 2), text, fill="black", font=font, spacing=3)
        for s in range(columns):
            image = pixels[r, s]
            image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
            image = image.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST)
            canvas.paste(image, (GRID_LABEL_WIDTH + GRID_GAP + s * (tile + GRID_GAP), top))
    return canvas


def write_sample_grid(
    path: Path,
    trained: training.Trained,
    test: dict[str, np.ndarray],
    eval_cfg: config_lib.EvaluateConfig,
    batch_size: int,
    *,
    decoder: pixels_lib.Decoder | None = None,
    captions: list[str] | None = None,
) -> None:
    """Generates `eval_cfg.grid_samples` images for each of `eval_cfg.grid_captions` distinct
    test captions (`grid_rows`) and writes their grid (`sample_grid`) to `path` as PNG.

    Args:
      test: the test set's fields (`source_arrays`): `image` (N, H, W, C), `tokens`,
        `token_mask` and optionally `label`; or `latent` (N, h, w, c) with `text_embedding`
        (N, L, D) (a latent test set: `decoder` and `captions` are needed).
      decoder: latents -> images, for a latent test set.
      captions: the N caption texts (None: decoded from `tokens`).
    """
    keys = test.get("tokens", test.get("text_embedding"))
    if keys is None:
        raise ValueError("the sample grid needs captions (`tokens` or `text_embedding`)")
    rows = grid_rows(test.get("label"), keys, eval_cfg.grid_captions)
    repeated = {
        k: np.repeat(test[k][rows], eval_cfg.grid_samples, axis=0)
        for k in parallel.CAPTION_INPUTS
        if k in test
    }
    images = generate_images(
        trained,
        repeated,
        models.visual_input(test).shape[1:],
        eval_cfg.seed + 1,
        eval_cfg.sample_steps,
        eval_cfg.guidance_scale,
        batch_size,
        desc="sample grid",
    )
    if decoder is not None:
        images = decoder(images)
    grid = sample_grid(
        images.reshape(len(rows), eval_cfg.grid_samples, *images.shape[1:]),
        [captions[i] for i in rows]
        if captions is not None
        else caption_texts(test["tokens"][rows], test["token_mask"][rows]),
    )
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


# ==============================================================================================
# Evaluation
# ==============================================================================================


CLASSIFIER_METRICS = ("fcd", "alignment", "classifier_test_accuracy")


def score_samples(
    classifier: Classifier, real: np.ndarray, generated: np.ndarray, labels: np.ndarray | None
) -> dict[str, Any]:
    """The classifier metrics of generated images against the real test images.

    Args:
      real: (N, H, W, C) real test images in [-1, 1].
      generated: (M, H, W, C) generated images; with labels, M = N and row i was generated from
        the caption of test example i.
      labels: (N,) the class each test caption names, or None.
    Returns:
      {"fcd": `fcd` of their features, "alignment": accuracy of the classifier on `generated`
      against `labels`, "classifier_test_accuracy": its accuracy on `real`}; without labels the
      last two are None and `unavailable` gives the reason.
    """
    scores: dict[str, Any] = {"fcd": fcd(classifier.features(real), classifier.features(generated))}
    if labels is None:
        reason = "the test set has no labels"
        return {
            **scores,
            "alignment": None,
            "classifier_test_accuracy": None,
            "unavailable": {"alignment": reason, "classifier_test_accuracy": reason},
        }
    return {
        **scores,
        "alignment": classifier.accuracy(generated, labels),
        "classifier_test_accuracy": classifier.accuracy(real, labels),
    }


def try_feature_classifier(
    cfg: config_lib.Config, test_data: ArraySource | None = None
) -> tuple[Classifier | None, str | None]:
    """(`feature_classifier(cfg, test_data)`, None), or (None, the reason) when the clean data
    has no labels, or `test_data` holds latents and `evaluate.vae_path` is unset (with it, the
    classifier is trained on the decoded validation latents; pass `test_data` for latents)."""
    try:
        if test_data is None or "latent" not in test_data.extra:
            return feature_classifier(cfg, test_data), None
        if cfg.evaluate.vae_path is None:
            return None, pixels_lib.NEEDS_VAE
        decoder = pixels_lib.Decoder(cfg.evaluate.vae_path)
        return feature_classifier(
            cfg,
            test_data,
            to_images=lambda arrays: decoder(arrays["latent"]),
            variant=f"vae:{Path(cfg.evaluate.vae_path).resolve()}",
        ), None
    except UnlabeledDataError as error:
        return None, str(error)


CLIP_METRICS = ("clip_fd", "clip_score")


def test_captions(
    cfg: config_lib.Config, test_data: ArraySource, real: dict[str, np.ndarray]
) -> list[str] | None:
    """The caption text of every test example: decoded from `tokens` when the test set was
    tokenized, else read from the test source (latent datasets keep `caption`); None when it
    has none."""
    if "tokens" in real:
        return caption_texts(real["tokens"], real["token_mask"])
    raw = load_test(cfg.data, cfg.evaluate.test_source)
    positions = pool_positions(test_data.ids, raw.ids, f"test set {raw.name}")
    captions = [raw[int(i)].get("caption") for i in positions]
    return None if any(c is None for c in captions) else [str(c) for c in captions]


def evaluate_model(
    cfg: config_lib.Config,
    trained: training.Trained,
    test_data: ArraySource,
    classifier: Classifier | None,
    out_dir: str | Path,
    *,
    classifier_missing: str | None = None,
) -> dict[str, Any]:
    """Evaluates `trained` on `test_data`; writes `out_dir/metrics.json` and
    `out_dir/samples.png`.

    Args:
      cfg: `evaluate` (loss_draws, sample_steps, guidance_scale, grid_captions, grid_samples,
        seed).
      trained: the model.
      test_data: the preprocessed clean test set (`load_test_data(cfg)`): `image`, caption
        fields and, for alignment, labels.
      classifier: the feature classifier (`feature_classifier(cfg)`), or None: FCD and
        alignment are reported as null with the reason `classifier_missing` (the second value
        of `try_feature_classifier`).
      out_dir: output folder (created).
    Returns:
      The metrics written: test_loss, fcd, alignment, classifier_test_accuracy (the classifier
      on the real test images: how far FCD and alignment can be trusted), test_size,
      sample_steps, guidance_scale, loss_draws, and `unavailable` {metric: reason} for the
      metrics that are null.
    """
    eval_cfg = cfg.evaluate
    if len(test_data) < 2:
        raise ValueError(f"evaluate needs at least 2 test examples, got {len(test_data)}")
    real = source_arrays(test_data)
    latent = "latent" in real
    if not latent and "image" not in real:
        raise ValueError("evaluate needs test images or latents (the test set holds neither)")
    decoder = pixels_lib.Decoder(eval_cfg.vae_path) if latent and eval_cfg.vae_path else None
    out_dir = Path(out_dir)
    batch_size = eval_batch_size(len(test_data))
    metrics: dict[str, Any] = {
        "test_loss": training.validation_loss(
            trained, test_data, batch_size, eval_cfg.seed, draws=eval_cfg.loss_draws
        ),
        **dict.fromkeys(CLASSIFIER_METRICS),
        "test_size": len(test_data),
        "sample_steps": eval_cfg.sample_steps,
        "guidance_scale": eval_cfg.guidance_scale,
        "loss_draws": eval_cfg.loss_draws,
    }
    if eval_cfg.clip_path is not None:
        metrics.update(dict.fromkeys(CLIP_METRICS))
    if latent and decoder is None:
        wanted = (*CLASSIFIER_METRICS, *(CLIP_METRICS if eval_cfg.clip_path else ()))
        metrics["unavailable"] = dict.fromkeys((*wanted, "samples.png"), pixels_lib.NEEDS_VAE)
        log.warning("evaluate: test loss only; %s", pixels_lib.NEEDS_VAE)
        atomic_write_bytes(
            out_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode()
        )
        return metrics
    images = decoder(real["latent"]) if latent else real["image"]
    captions = test_captions(cfg, test_data, real) if latent or eval_cfg.clip_path else None
    unavailable: dict[str, str] = {}
    generated = None
    if classifier is not None or eval_cfg.clip_path is not None:
        generated = generate_images(
            trained,
            real,
            models.visual_input(real).shape[1:],
            eval_cfg.seed,
            eval_cfg.sample_steps,
            eval_cfg.guidance_scale,
            batch_size,
        )
        if decoder is not None:
            generated = decoder(generated)
    if classifier is None:
        unavailable.update(
            dict.fromkeys(
                CLASSIFIER_METRICS, classifier_missing or "no feature classifier was given"
            )
        )
    else:
        scores = score_samples(classifier, images, generated, real.get("label"))
        unavailable.update(scores.pop("unavailable", {}))
        metrics.update(scores)
    if eval_cfg.clip_path is not None:
        judge = pixels_lib.ClipJudge(eval_cfg.clip_path)
        metrics["clip_fd"] = fcd(judge.features(images), judge.features(generated))
        if captions is None:
            unavailable["clip_score"] = "the test set has no captions"
        else:
            metrics["clip_score"] = float(np.mean(judge.scores(generated, captions)))
    if unavailable:
        metrics["unavailable"] = unavailable
    write_sample_grid(
        out_dir / "samples.png",
        trained,
        real,
        eval_cfg,
        batch_size,
        decoder=decoder,
        captions=captions,
    )
    atomic_write_bytes(out_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics


def run(cfg: config_lib.Config, model_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """`alchemist-jax evaluate`: evaluates the finished train run in `model_dir` on the clean
    test set of `cfg` (`load_test_data`) with the cached feature classifier; writes
    `out/metrics.json` and `out/samples.png` and returns the metrics (`evaluate_model`)."""
    trained = training.load_trained(cfg, model_dir)
    test_data = load_test_data(cfg)
    classifier, missing = try_feature_classifier(cfg, test_data)
    metrics = evaluate_model(cfg, trained, test_data, classifier, out, classifier_missing=missing)
    log.info("evaluation written to %s", out)
    return metrics
