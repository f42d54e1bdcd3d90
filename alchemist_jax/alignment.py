"""Caption–image alignment: does a sample's caption describe its image? (`score.scorer=alignment`)

A validation-loss meta-gradient cannot see a caption that belongs to another image (METHOD.md §8:
AUROC ≈ 0.5 in every meta mode), so this scorer asks the question directly, with models trained
on the clean validation set only (no downloaded weights). Two methods (`score.alignment_method`):

  contrastive  a small CLIP-like pair of encoders trained with the symmetric InfoNCE loss on the
               validation pairs (with light augmentation: shifts of a few pixels, brightness and
               contrast jitter); images: three convolutions and a Linear; captions: a bag of
               tokens (masked mean of a learned token table, then a Linear), or a Linear of
               precomputed `text_embedding`s. Score: the log-softmax of the image's similarity to
               its own caption among its own and the reference captions.
  diffusion    a diffusion-classifier margin: a proxy DiT trained on the validation set (as for
               the `loss` scorer); score: the mean over the reference captions of the image's
               flow-matching loss under that caption, minus its loss under its own caption, at
               the same fixed (t, noise) draws (`models.fixed_draws`), t rescaled to
               [`score.alignment_t_min`, 1].

On the built-in pool the contrastive model separates swapped captions far better (AUROC 0.989
against 0.772 within caption class) at a fifth of the time: it is the default (docs/RESULTS.md).

Reference captions (`reference_captions`): up to `score.alignment_references` distinct captions
of the validation set (token sequences), drawn with `score.seed`. A reference identical to a
sample's own caption is left out of that sample's score. Higher score = the caption fits better.
Every score is a pure function of the sample (its image, caption and id), never of its batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alchemist_jax import models
from alchemist_jax.data.tokenizer import VOCAB_SIZE
from alchemist_jax.models.dit import caption_features, visual_input
from alchemist_jax.models.text_encoder import masked_mean
from alchemist_jax.runtime import numerics, preemption, progress

CAPTION_FIELDS = ("tokens", "token_mask", "text_embedding")  # what a reference caption holds


# ==============================================================================================
# Reference captions
# ==============================================================================================


def reference_captions(
    captions: dict[str, np.ndarray], count: int, seed: int
) -> dict[str, np.ndarray]:
    """Up to `count` distinct captions of a set, the ones each sample is compared against.

    Args:
      captions: caption fields of N examples (`tokens` int32 (N, L) with `token_mask` bool
        (N, L), and/or `text_embedding` (N, L, Dt)).
      count: the most references to keep; more distinct captions than this: a random subset.
      seed: picks the subset.
    Returns:
      The same fields for K <= count distinct captions (K, ...), in order of first occurrence
      (of the subset).
    Raises:
      ValueError: no caption field, or count < 1.
    """
    fields = {k: np.asarray(v) for k, v in captions.items() if k in CAPTION_FIELDS}
    if not fields:
        raise ValueError("reference captions need `tokens` or `text_embedding` fields")
    if count < 1:
        raise ValueError(f"score.alignment_references must be >= 1, got {count}")
    n = len(next(iter(fields.values())))
    rows = np.concatenate(
        [fields[k].reshape(n, -1).astype(np.float64) for k in sorted(fields)], axis=1
    )
    _, first = np.unique(rows, axis=0, return_index=True)
    first = np.sort(first)
    if len(first) > count:
        first = np.sort(np.random.default_rng(seed).choice(first, count, replace=False))
    return {k: v[first] for k, v in fields.items()}


def _same_caption(batch: dict, references: dict) -> jax.Array:
    """bool (B, K): reference k is exactly the caption of row b (left out of its score)."""
    same = None
    for key in CAPTION_FIELDS:
        if key in references:
            mine, theirs = batch[key], references[key]
            equal = jnp.all(
                (mine[:, None] == theirs[None]).reshape(mine.shape[0], theirs.shape[0], -1), axis=-1
            )
            same = equal if same is None else same & equal
    return same


# ==============================================================================================
# (a) The diffusion-classifier margin
# ==============================================================================================


def diffusion_margin_fn(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    references: dict,
    *,
    draws: int,
    seed: int,
    t_min: float,
) -> Callable[..., jax.Array]:
    """The jitted `margin(params, batch, id_low, id_high) -> (B,)` of a proxy DiT.

    For each sample and each of `draws` fixed draws (t, eps) (`models.fixed_draws`, t mapped to
    t_min + (1 - t_min) t), L_c is the flow-matching loss under caption c (mean over H, W, C of
    (v_pred - (eps - x0))^2, no caption dropout). The margin is
        mean over draws of [ mean over references k != own of L_k  -  L_own ],
    positive when the own caption explains the image better than the others do.

    Args:
      graphdef, rest: the proxy (`models.init_proxy` split); its params are the call's first
        argument.
      references: caption fields (K, ...) (`reference_captions`).
      draws: fixed draws averaged per sample.
      seed: key of the draws.
      t_min: in [0, 1): the draws' flow times are t_min + (1 - t_min) U(0, 1). On the built-in
        pool the noisier half (t >= 0.5) carries the class information: at low t the image is
        nearly given and every caption predicts its velocity about as well (docs/RESULTS.md).
    `batch` holds the model inputs (`rate.MODEL_INPUTS`); `id_low` / `id_high` (B,) uint32 are
    the halves of the sample ids (`models.split_ids`).
    """
    if not 0 <= t_min < 1:
        raise ValueError(f"score.alignment_t_min must be in [0, 1), got {t_min}")
    references = {k: jnp.asarray(v) for k, v in references.items()}
    count = len(next(iter(references.values())))

    def margin(params, batch, id_low, id_high):
        model = nnx.merge(graphdef, params, rest)
        x0 = visual_input(batch)
        others = ~_same_caption(batch, references)  # (B, K)

        def one_draw(draw):
            t, eps = models.fixed_draws(seed, draw, id_low, id_high, x0.shape[1:])
            t = t_min + (1 - t_min) * t
            own = models.flow_matching_loss_at(model, batch, t, eps)

            def under_reference(k):
                caption = {
                    key: jnp.broadcast_to(value[k], batch[key].shape)
                    for key, value in references.items()
                }
                return models.flow_matching_loss_at(model, {**batch, **caption}, t, eps)

            reference_losses = jax.lax.map(under_reference, jnp.arange(count)).T  # (B, K)
            mean_other = jnp.sum(jnp.where(others, reference_losses, 0.0), axis=1) / jnp.maximum(
                jnp.sum(others, axis=1), 1
            )
            return mean_other - own

        return jnp.mean(jax.lax.map(one_draw, jnp.arange(draws)), axis=0)

    return jax.jit(margin)


# ==============================================================================================
# (b) The contrastive image–text model
# ==============================================================================================


class ContrastiveModel(nnx.Module):
    """Image and caption embeddings in one space, unit norm, and a learned logit scale.

    Args:
      channels: C of the images (or latents).
      resolution: (H, W) of the images.
      width: channels of the three 3x3 convolutions (width / 2, width, width; strides 2, 2, 1).
      dim: D, the embedding size.
      text_embedding_dim: None: captions are token ids (a learned table over the CLIP
        vocabulary); an int Dt: precomputed `text_embedding` (B, L, Dt).
      vocab_size: token vocabulary (CLIP: 49,408).
    """

    def __init__(
        self,
        *,
        channels: int,
        resolution: tuple[int, int],
        width: int,
        dim: int,
        text_embedding_dim: int | None = None,
        rngs: nnx.Rngs,
        vocab_size: int = VOCAB_SIZE,
    ):
        # Stride 2 first: a full-resolution first layer made training 4x slower on the CPU.
        self.conv1 = nnx.Conv(channels, width // 2, (3, 3), strides=2, rngs=rngs)
        self.conv2 = nnx.Conv(width // 2, width, (3, 3), strides=2, rngs=rngs)
        self.conv3 = nnx.Conv(width, width, (3, 3), rngs=rngs)
        cells = math.ceil(resolution[0] / 4) * math.ceil(resolution[1] / 4)
        self.image_proj = nnx.Linear(cells * width, dim, rngs=rngs)
        if text_embedding_dim is None:
            self.token_embedding = nnx.Param(
                nnx.initializers.normal(dim**-0.5)(rngs.params(), (vocab_size, dim))
            )
            caption_width = dim
        else:
            self.token_embedding = None
            caption_width = text_embedding_dim
        self.text_proj = nnx.Linear(caption_width, dim, rngs=rngs)
        self.log_scale = nnx.Param(jnp.asarray(math.log(10.0)))  # CLIP starts at log(1 / 0.07)

    def embed_images(self, images: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, D), unit norm; each row from its own image only."""
        x = jax.nn.silu(self.conv1(images))
        x = jax.nn.silu(self.conv2(x))
        x = jax.nn.silu(self.conv3(x))
        return unit_rows(self.image_proj(x.reshape(x.shape[0], -1)))

    def embed_captions(self, captions: dict) -> jax.Array:
        """Caption fields (B, ...) -> (B, D), unit norm: a bag of tokens (word order is not
        seen) or the masked mean of precomputed `text_embedding`, then a Linear."""
        features, mask = caption_features(self.token_embedding, captions, "contrastive model")
        return unit_rows(self.text_proj(masked_mean(features, mask)))

    def scale(self) -> jax.Array:
        """The logit scale exp(log_scale), capped at 100 as in CLIP."""
        return jnp.minimum(jnp.exp(self.log_scale[...]), 100.0)


def unit_rows(vectors: jax.Array) -> jax.Array:
    """(..., D) rows scaled to unit L2 norm; all-zero rows stay zero (the one row normaliser of
    the project: the contrastive model's embeddings here, dedup's embeddings)."""
    norms = jnp.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / jnp.where(norms > 0, norms, 1.0)


def init_contrastive(
    example_batch: dict, rng: jax.Array, *, width: int, dim: int
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """A `ContrastiveModel` for batches shaped like `example_batch`, split into
    (graphdef, params, rest) as `models.init_proxy` splits the DiT."""
    images = visual_input(example_batch)
    embedding_dim = (
        int(np.shape(example_batch["text_embedding"])[-1])
        if "text_embedding" in example_batch
        else None
    )
    model = ContrastiveModel(
        channels=int(images.shape[-1]),
        resolution=tuple(images.shape[1:3]),
        width=width,
        dim=dim,
        text_embedding_dim=embedding_dim,
        rngs=nnx.Rngs(rng),
    )
    return nnx.split(model, nnx.Param, ...)


def augment(images: jax.Array, rng: jax.Array, max_shift: int = 2) -> jax.Array:
    """Light augmentation of (B, H, W, C) images in [-1, 1]: each image shifted by up to
    `max_shift` pixels in each direction (edges repeated), its contrast scaled by U(0.9, 1.1)
    and its brightness offset by U(-0.1, 0.1), clipped to [-1, 1]."""
    b, h, w, _ = images.shape
    shift_key, scale_key, offset_key = jax.random.split(rng, 3)
    starts = jax.random.randint(shift_key, (b, 2), 0, 2 * max_shift + 1)
    padded = jnp.pad(
        images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge"
    )
    shifted = jax.vmap(
        lambda image, start: jax.lax.dynamic_slice(
            image, (start[0], start[1], 0), (h, w, image.shape[-1])
        )
    )(padded, starts)
    scale = jax.random.uniform(scale_key, (b, 1, 1, 1), minval=0.9, maxval=1.1)
    offset = jax.random.uniform(offset_key, (b, 1, 1, 1), minval=-0.1, maxval=0.1)
    return jnp.clip(shifted * scale + offset, -1.0, 1.0)


def contrastive_loss(model: ContrastiveModel, batch: dict) -> jax.Array:
    """Symmetric InfoNCE of a batch of B pairs: the mean of the image->caption and
    caption->image cross-entropies of the logits scale * <image_i, caption_j>, where every
    pair with exactly the same caption as row i counts as a positive of row i (its target mass is
    shared), so repeated captions are not pushed apart. Returns a scalar."""
    images = model.embed_images(visual_input(batch))
    captions = model.embed_captions(batch)
    logits = model.scale() * images @ captions.T  # (B, B)
    same = _same_caption(batch, batch)
    targets = same / jnp.sum(same, axis=1, keepdims=True)  # symmetric: rows and columns alike
    return 0.5 * (
        optax.softmax_cross_entropy(logits, targets).mean()
        + optax.softmax_cross_entropy(logits.T, targets).mean()
    )


@dataclasses.dataclass(frozen=True)
class ContrastiveTraining:
    """How the contrastive model is trained (`train_contrastive`)."""

    steps: int = 2000
    batch_size: int = 256
    learning_rate: float = 1e-3  # Adam peak, after a 5% linear warmup, cosine decay to 10%
    width: int = 32  # convolution channels
    dim: int = 128  # embedding size
    max_shift: int = 2  # augmentation: pixels of shift
    max_bad_steps: int = 10  # consecutive non-finite (skipped) steps before training stops


def train_contrastive(
    data: dict[str, np.ndarray], settings: ContrastiveTraining, seed: int, desc: str = "contrastive"
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Trains a `ContrastiveModel` on image–caption pairs with `contrastive_loss`.

    Args:
      data: the pairs as arrays of N rows: `image` (or `latent`) (N, H, W, C) and the caption
        fields (`tokens` + `token_mask`, or `text_embedding`), as `preprocess.materialize`
        gives them (the clean validation set).
      settings: steps, batch size, learning rate and sizes.
      seed: the initialisation, the batches (min(N, batch_size) pairs drawn without
        replacement per step) and the augmentation: the result is a function of it.
      desc: progress bar label.
    Returns:
      (graphdef, params, rest) of the trained model.
    Raises:
      numerics.NonFiniteError: `settings.max_bad_steps` consecutive steps with a non-finite
        loss or gradient (each one is skipped: the parameters keep their last finite values).
      preemption.Preempted: SIGTERM / SIGINT arrived (at the end of that step).
    """
    arrays = {
        k: jnp.asarray(v) for k, v in data.items() if k in ("image", "latent", *CAPTION_FIELDS)
    }
    n = len(next(iter(arrays.values())))
    batch_size = min(n, settings.batch_size)
    init_key, loop_key = jax.random.split(jax.random.key(seed))
    graphdef, params, rest = init_contrastive(
        {k: v[:1] for k, v in arrays.items()}, init_key, width=settings.width, dim=settings.dim
    )
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        settings.learning_rate,
        max(1, settings.steps // 20),
        max(2, settings.steps),
        end_value=0.1 * settings.learning_rate,
    )
    optimizer = optax.adam(schedule)
    image_key = "latent" if "latent" in arrays else "image"

    @jax.jit
    def step(params, opt_state, key):
        pick_key, augment_key = jax.random.split(key)
        rows = jax.random.choice(pick_key, n, (batch_size,), replace=False)
        batch = {k: v[rows] for k, v in arrays.items()}
        batch[image_key] = augment(batch[image_key], augment_key, settings.max_shift)
        loss, grads = jax.value_and_grad(
            lambda p: contrastive_loss(nnx.merge(graphdef, p, rest), batch)
        )(params)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        ok = numerics.all_finite((loss, grads))
        params, opt_state = numerics.keep_if(
            ok, (optax.apply_updates(params, updates), new_opt_state), (params, opt_state)
        )
        return params, opt_state, loss, ok

    guard = numerics.BadStepGuard(
        desc,
        settings.max_bad_steps,
        f"the contrastive model diverges on the validation pairs: check data.validation_source "
        f"for extreme values, or lower its learning rate ({settings.learning_rate:g})",
    )
    opt_state = optimizer.init(params)
    pending = []  # (step, loss, finite) not yet read back: one device sync per 50 steps
    bar = progress.bar(range(settings.steps), desc=desc, unit="step")
    with preemption.guard() as stop:
        for index in bar:
            params, opt_state, loss, ok = step(
                params, opt_state, jax.random.fold_in(loop_key, index)
            )
            pending.append((index + 1, loss, ok))
            if index % 50 == 0 or index == settings.steps - 1 or stop.requested:
                for number, value, finite in jax.device_get(pending):
                    guard.check(number, finite, {"loss": value})
                pending = []
                bar.set_postfix(loss=f"{float(loss):.4f}")
            if stop.requested:
                raise preemption.Preempted(
                    f"{desc} stopped by {stop.signal_name} after step {index + 1} of "
                    f"{settings.steps}; nothing was saved (it retrains in minutes): rerun the "
                    "same command"
                )
    bar.close()
    return graphdef, params, rest


def contrastive_margin_fn(
    graphdef: nnx.GraphDef, rest: nnx.State, references: dict
) -> Callable[[nnx.State, dict], jax.Array]:
    """The jitted `margin(params, batch) -> (B,)` of a trained contrastive model: the
    log-softmax of scale * <image, own caption> among the same logit for the own caption and for
    every reference caption that differs from it (`reference_captions`). At most 0; near 0 when
    no other caption fits the image as well as its own."""
    references = {k: jnp.asarray(v) for k, v in references.items()}

    def margin(params, batch):
        model = nnx.merge(graphdef, params, rest)
        images = model.embed_images(visual_input(batch))
        own = model.embed_captions({k: batch[k] for k in references})
        scale = model.scale()
        own_logit = scale * jnp.sum(images * own, axis=-1)  # (B,)
        reference_logits = scale * images @ model.embed_captions(references).T  # (B, K)
        reference_logits = jnp.where(_same_caption(batch, references), -jnp.inf, reference_logits)
        everything = jnp.concatenate([own_logit[:, None], reference_logits], axis=1)
        return own_logit - jax.nn.logsumexp(everything, axis=1)

    return jax.jit(margin)
