"""Rectified flow: the per-example training loss and the Euler sampler.

Path from data to noise: x_t = (1 - t) x0 + t eps, t in [0, 1], eps ~ N(0, I); its velocity
dx_t/dt = eps - x0 is what the model predicts. x0 is `visual_input(batch)` (latent if present,
else image). Sampling integrates dx/dt = v from t = 1 (noise) to t = 0 (data).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alchemist_jax.models.dit import DiT, visual_input


def flow_matching_loss_at(
    model: DiT, batch: dict, t: jax.Array, eps: jax.Array, drop_text: jax.Array | None = None
) -> jax.Array:
    """Per-example flow-matching loss at given draws (for evaluation at fixed t and noise).

    Args:
      model: the velocity model.
      batch: with `image` or `latent` x0 (B, H, W, C) and the caption fields.
      t: (B,) flow times in [0, 1].
      eps: (B, H, W, C) noise.
      drop_text: bool (B,), rows conditioned on the null caption; None: none.
    Returns:
      (B,) mean over (H, W, C) of (v_pred - (eps - x0))^2.
    """
    x0 = visual_input(batch)
    t = jnp.asarray(t, x0.dtype)
    tb = t[:, None, None, None]
    x_t = (1 - tb) * x0 + tb * eps
    v_pred = model(x_t, t, batch, drop_text)
    return jnp.mean(jnp.square(v_pred - (eps - x0)), axis=(1, 2, 3))


def split_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64 sample ids (B,) -> their (low, high) uint32 halves (jax runs in 32 bits)."""
    ids = np.asarray(ids, np.int64)
    return (ids & 0xFFFFFFFF).astype(np.uint32), (ids >> 32).astype(np.uint32)


@functools.partial(jax.jit, static_argnames=("shape",))
def fixed_draws(
    seed: int | jax.Array,
    draw: int | jax.Array,
    id_low: jax.Array,
    id_high: jax.Array,
    shape: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
    """Draw `draw` of each sample for evaluating at fixed (t, noise): t (B,) ~ U(0, 1) and
    eps (B, *shape) ~ N(0, I), float32, that depend only on (seed, draw, sample id) — not on the
    batch a sample is in, so per-sample losses and scores do not depend on the batch size.

    The key of the sample with id i is fold_in(fold_in(key(seed), draw), i) for ids below 2^32;
    a larger id folds in its high half next, so it does not collide with i mod 2^32.
    `id_low` / `id_high` (B,) uint32 are the halves of the ids (`split_ids`).
    """
    base = jax.random.fold_in(jax.random.key(seed), draw)

    def one(low, high):
        key = jax.random.fold_in(base, low)
        key = jax.lax.cond(high == 0, lambda: key, lambda: jax.random.fold_in(key, high))
        t_key, eps_key = jax.random.split(key)
        return jax.random.uniform(t_key, ()), jax.random.normal(eps_key, shape)

    return jax.vmap(one)(id_low, id_high)


def flow_matching_loss(
    model: DiT, batch: dict, rng: jax.Array, caption_dropout: float
) -> jax.Array:
    """Per-example flow-matching loss with random draws, all from `rng` (deterministic given it).

    t ~ U(0, 1) and eps ~ N(0, I) per example; each caption is replaced by the null caption with
    probability `caption_dropout`. Returns (B,).
    """
    x0 = visual_input(batch)
    t_key, eps_key, drop_key = jax.random.split(rng, 3)
    t = jax.random.uniform(t_key, x0.shape[:1], x0.dtype)
    eps = jax.random.normal(eps_key, x0.shape, x0.dtype)
    drop_text = jax.random.bernoulli(drop_key, caption_dropout, x0.shape[:1])
    return flow_matching_loss_at(model, batch, t, eps, drop_text)


def sample(
    model: DiT,
    batch: dict,
    rng: jax.Array,
    steps: int,
    guidance_scale: float,
    shape: tuple[int, int, int] | None = None,
) -> jax.Array:
    """Generates x0 for the captions of `batch` by Euler integration with classifier-free guidance.

    v = v_uncond + guidance_scale * (v_cond - v_uncond) (1: conditional only, 0: unconditional);
    the conditional and null-caption passes run as one forward pass of 2B rows. Jit-friendly
    (`lax.fori_loop`; `steps` and `shape` must be static, `guidance_scale` may be traced).

    Args:
      model: the velocity model.
      batch: the caption fields, B rows.
      rng: key for the initial noise x_1 ~ N(0, I).
      steps: number of Euler steps from t = 1 to t = 0.
      guidance_scale: the guidance weight g.
      shape: (H, W, C) to generate; None: that of `visual_input(batch)`.
    Returns:
      x0: (B, H, W, C), in the input's dtype (float32 when `shape` is given).
    """
    if shape is None:
        reference = visual_input(batch)
        shape, dtype = reference.shape[1:], reference.dtype
    else:
        dtype = jnp.float32
    captions = {k: batch[k] for k in ("tokens", "token_mask", "text_embedding") if k in batch}
    if not captions:
        raise ValueError("the batch has no caption (`tokens` or `text_embedding`)")
    rows = next(iter(captions.values())).shape[0]
    doubled = {k: jnp.concatenate([v, v]) for k, v in captions.items()}
    drop_text = jnp.arange(2 * rows) >= rows  # first half conditional, second half null caption
    dt = 1.0 / steps

    def euler_step(i, x):
        t = jnp.full((2 * rows,), 1.0 - i * dt, x.dtype)
        v = model(jnp.concatenate([x, x]), t, doubled, drop_text)
        v_cond, v_uncond = v[:rows], v[rows:]
        return (x - dt * (v_uncond + guidance_scale * (v_cond - v_uncond))).astype(x.dtype)

    x1 = jax.random.normal(rng, (rows, *shape), dtype)
    return jax.lax.fori_loop(0, steps, euler_step, x1)
