"""The models, and the pure functions of parameter pytrees that the meta-gradient engine calls.

- `DiT` (`dit.py`): the text-to-image rectified-flow model, used as proxy and downstream model; it
  owns a CLIP-style `TextEncoder` (`text_encoder.py`) unless captions come precomputed.
- `Rater` (`rater.py`): per-sample instance logits and training weights.
- `flow.py`: the per-example flow-matching loss and the guided Euler sampler.

Functional pattern (Flax NNX): `init_proxy` / `init_rater` build a module once and split it into
`(graphdef, params, rest)`; `params` (an `nnx.State` pytree of every `nnx.Param`) is what gets
differentiated, stacked (`jax.vmap` over a population) or cast (float64); `rest` holds any other
state and is passed through unchanged. The `*_fn` factories return pure functions that `nnx.merge`
inside, so they compose with `jax.grad` (also of `jax.grad`), `jax.vmap`, `jax.jit` and `lax.scan`:

    graphdef, params, rest = init_proxy(cfg.model, batch, jax.random.key(0), 77)
    loss_fn = proxy_loss_fn(graphdef, rest, cfg.model.caption_dropout)
    losses = loss_fn(params, batch, rng)  # (B,)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alchemist_jax.config import ModelConfig, RaterConfig
from alchemist_jax.models.dit import DiT, visual_input
from alchemist_jax.models.flow import (
    fixed_draws,
    flow_matching_loss,
    flow_matching_loss_at,
    sample,
    split_ids,
)
from alchemist_jax.models.rater import Rater
from alchemist_jax.models.text_encoder import TextEncoder

__all__ = [
    "DiT",
    "TextEncoder",
    "Rater",
    "PRESETS",
    "resolve_model_config",
    "compute_dtype",
    "init_proxy",
    "init_rater",
    "proxy_loss_fn",
    "CAPTION_FIELDS",
    "shuffled_captions",
    "caption_gap_loss_fn",
    "rater_weight_fn",
    "rater_score_fn",
    "count_params",
    "flow_matching_loss",
    "flow_matching_loss_at",
    "sample",
    "visual_input",
    "fixed_draws",
    "split_ids",
]

# Architecture sizes. tiny: the built-in demo on 2 CPU cores (28x28x1 images, 7x7 patches of 4);
# small: DiT-S-like; base: DiT-B with a CLIP ViT-B/32-sized text encoder; xl: DiT-XL/2.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        patch_size=4,
        width=64,
        depth=2,
        heads=4,
        mlp_ratio=2.0,
        text_width=64,
        text_depth=1,
        text_heads=4,
    ),
    "small": dict(
        patch_size=2,
        width=384,
        depth=12,
        heads=6,
        mlp_ratio=4.0,
        text_width=384,
        text_depth=6,
        text_heads=6,
    ),
    "base": dict(
        patch_size=2,
        width=768,
        depth=12,
        heads=12,
        mlp_ratio=4.0,
        text_width=512,
        text_depth=12,
        text_heads=8,
    ),
    # DiT-XL/2 (675M) with a CLIP ViT-L/14-sized text encoder (123M): a population of these
    # proxies with their Adam states does not fit one accelerator without FSDP
    # (tools/aot_memory.py, docs/BENCHMARKS.md).
    "xl": dict(
        patch_size=2,
        width=1152,
        depth=28,
        heads=16,
        mlp_ratio=4.0,
        text_width=768,
        text_depth=12,
        text_heads=12,
    ),
}

Params = nnx.State  # the `nnx.Param` part of a split module: the pytree that is differentiated

# `config.COMPUTE_DTYPES` -> the models' `dtype`: float32 computes in the parameters' dtype (None,
# so that float64 parameters under x64 compute in float64), bfloat16 in bfloat16.
_COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> jnp.dtype | None:
    """The `dtype` argument of the models for a `config.COMPUTE_DTYPES` name."""
    if name not in _COMPUTE_DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; valid: {', '.join(_COMPUTE_DTYPES)}")
    return _COMPUTE_DTYPES[name]


def resolve_model_config(cfg: ModelConfig) -> dict[str, Any]:
    """The DiT architecture: the preset's sizes, overridden by every field of `cfg` that is set.

    Returns a dict with patch_size, width, depth, heads, mlp_ratio, text_width, text_depth,
    text_heads, text_trainable, block_remat and dtype (keyword arguments of `DiT`).
    """
    resolved = dict(PRESETS[cfg.preset])
    for name in resolved:
        value = getattr(cfg, name)
        if value is not None:
            resolved[name] = value
    resolved["text_trainable"] = cfg.text_trainable
    resolved["block_remat"] = cfg.block_remat
    resolved["dtype"] = compute_dtype(cfg.compute_dtype)
    return resolved


def _text_embedding_dim(example_batch: dict) -> int | None:
    """Dt when captions come as precomputed `text_embedding` (B, L, Dt), else None (tokens)."""
    if "text_embedding" in example_batch:
        return int(np.shape(example_batch["text_embedding"])[-1])
    if "tokens" not in example_batch:
        raise ValueError(
            "the example batch has no caption: need `tokens` (+ `token_mask`) or `text_embedding`"
        )
    return None


def init_proxy(
    model_cfg: ModelConfig, example_batch: dict, rng: jax.Array, max_text_length: int
) -> tuple[nnx.GraphDef, Params, nnx.State]:
    """Builds a DiT for batches shaped like `example_batch` and splits it.

    Args:
      model_cfg: preset and overrides, block remat and compute dtype (`resolve_model_config`);
        the parameters are float32 whatever the compute dtype.
      example_batch: fixes the input channels (`latent` if present, else `image`) and the caption
        kind (precomputed `text_embedding`, else `tokens`).
      rng: a PRNG key for the initial parameters.
      max_text_length: the longest token sequence (text encoder position table). With
        precomputed captions the caption length is that of the example's `text_embedding`.
    Returns:
      (graphdef, params, rest): `params` holds every trainable `nnx.Param`; `rest` everything
      else, including a frozen text encoder (`model_cfg.text_trainable=False`), so that frozen
      weights get no gradient, no optimizer state and no meta-gradient work at all.
    """
    embedding_dim = _text_embedding_dim(example_batch)
    text_length = (
        max_text_length
        if embedding_dim is None
        else int(np.shape(example_batch["text_embedding"])[1])
    )
    model = DiT(
        channels=int(np.shape(visual_input(example_batch))[-1]),
        text_length=text_length,
        text_embedding_dim=embedding_dim,
        rngs=nnx.Rngs(rng),
        **resolve_model_config(model_cfg),
    )
    if model_cfg.text_trainable or model.text_encoder is None:
        return nnx.split(model, nnx.Param, ...)
    trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("text_encoder")))
    return nnx.split(model, trainable, ...)


def init_rater(
    rater_cfg: RaterConfig, example_batch: dict, rng: jax.Array, max_text_length: int
) -> tuple[nnx.GraphDef, Params, nnx.State]:
    """Builds a Rater for batches shaped like `example_batch` and splits it.

    `max_text_length` is accepted for symmetry with `init_proxy`: the rater pools captions with a
    masked mean (no position table), so it accepts any caption length. The temperature of
    `rater_cfg` is not part of the module (pass it to `rater_weight_fn`); its compute dtype is
    (float32 parameters, bfloat16 or parameter-dtype compute, float32 or parameter-dtype scores).
    Returns:
      (graphdef, params, rest) as in `init_proxy`.
    """
    del max_text_length
    model = Rater(
        channels=int(np.shape(visual_input(example_batch))[-1]),
        width=rater_cfg.width,
        hidden=rater_cfg.hidden,
        text_embedding_dim=_text_embedding_dim(example_batch),
        batch_head=rater_cfg.batch_head,
        dtype=compute_dtype(rater_cfg.compute_dtype),
        rngs=nnx.Rngs(rng),
    )
    return nnx.split(model, nnx.Param, ...)


def proxy_loss_fn(
    graphdef: nnx.GraphDef, rest: nnx.State, caption_dropout: float
) -> Callable[[Params, dict, jax.Array], jax.Array]:
    """`loss_fn(params, batch, rng) -> (B,)`: per-example flow-matching losses of the proxy with
    parameters `params` (`flow_matching_loss`); pure, deterministic given `rng`."""

    def loss_fn(params: Params, batch: dict, rng: jax.Array) -> jax.Array:
        return flow_matching_loss(nnx.merge(graphdef, params, rest), batch, rng, caption_dropout)

    return loss_fn


CAPTION_FIELDS = ("tokens", "token_mask", "text_embedding")  # a batch's caption, row-aligned
_PERMUTATION_SALT = 0x5EED  # the shuffle's key: fold_in(rng, salt), independent of the draws


def shuffled_captions(batch: dict, rng: jax.Array, fields=CAPTION_FIELDS) -> dict:
    """`batch` with its captions (`fields` present in it) moved to other rows by a random
    derangement.

    With `order` = a random permutation of the B rows (from `rng`), row order[i] gets the caption
    of row order[(i + 1) % B]: one B-cycle, so for B >= 2 no row keeps its own caption (rows
    with equal captions may still get an equal one). Images and every other field stay.

    Args:
      batch: (B, ...) arrays with `tokens` (+ `token_mask`) and/or `text_embedding`.
      rng: a PRNG key; same key, same shuffle.
      fields: the row-aligned fields that make up the condition (default `CAPTION_FIELDS`).
    Returns:
      a new dict, same shapes and dtypes.
    """
    fields = [key for key in fields if key in batch]
    if not fields:
        raise ValueError("the batch has no caption (`tokens` or `text_embedding`) to shuffle")
    rows = jnp.shape(batch[fields[0]])[0]
    order = jax.random.permutation(rng, rows)
    source = jnp.zeros_like(order).at[order].set(jnp.roll(order, -1))
    return {**batch, **{key: jnp.take(batch[key], source, axis=0) for key in fields}}


def caption_gap_loss_fn(
    loss_fn: Callable[[Params, dict, jax.Array], jax.Array],
    fields=CAPTION_FIELDS,
    plain_weight: float = 0.0,
) -> Callable[[Params, dict, jax.Array], jax.Array]:
    """`gap_fn(params, batch, rng) -> (B,)`: ℓ_i(true captions) − ℓ_i(shuffled captions), plus
    `plain_weight` · ℓ_i(true captions).

    Both terms use the same `rng` (the same flow times, noise and caption dropout: a paired
    difference); the shuffle (`shuffled_captions`) uses fold_in(rng, salt), so it is fixed for a
    fixed key (one meta-step's validation key). The mean is negative when the model uses the
    caption; as a meta-loss (`meta.meta_gradient(val_loss_fn=...)`, `rate.meta_loss=caption_gap`)
    it rewards training samples that make the true caption predict the image better than a wrong
    one: image–text fit, which the plain validation loss does not see. Pass a `loss_fn` without
    caption dropout (a dropped row contributes 0). Costs two loss evaluations per call.
    `fields`: the batch fields shuffled together (`shuffled_captions`). `plain_weight` > 0 adds
    the plain loss under the true captions (`rate.gap_plain_weight`), so the objective also keeps
    the image-quality signal of the plain meta-loss; the cost is unchanged.
    """

    def gap_fn(params: Params, batch: dict, rng: jax.Array) -> jax.Array:
        shuffled = shuffled_captions(batch, jax.random.fold_in(rng, _PERMUTATION_SALT), fields)
        true = loss_fn(params, batch, rng)
        return (1.0 + plain_weight) * true - loss_fn(params, shuffled, rng)

    return gap_fn


def rater_weight_fn(
    graphdef: nnx.GraphDef, rest: nnx.State, temperature: float
) -> Callable[[Params, dict], jax.Array]:
    """`rater_fn(params, batch) -> (B,)`: training weights B * softmax(u / temperature) * b."""

    def rater_fn(params: Params, batch: dict) -> jax.Array:
        return nnx.merge(graphdef, params, rest).weights(batch, temperature)

    return rater_fn


def rater_score_fn(graphdef: nnx.GraphDef, rest: nnx.State) -> Callable[[Params, dict], jax.Array]:
    """`score_fn(params, batch) -> (B,)`: instance logits u, independent of the batch's other rows
    (the stored rating of each sample)."""

    def score_fn(params: Params, batch: dict) -> jax.Array:
        return nnx.merge(graphdef, params, rest).scores(batch)

    return score_fn


def count_params(params: Params) -> int:
    """Total number of scalars in a parameter pytree."""
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
