"""The rater's gradient: exact unrolled meta-gradients, one-step lookahead, penalty baseline.

One pure function, `meta_gradient`, generic over any proxy loss / rater pair:

    loss_fn(proxy_params, batch, rng)  -> per-example losses  (B,)
    rater_fn(rater_params, batch)      -> per-example weights (B,)

Notation (the project's METHOD.md §2): K inner batches b_0..b_{K-1} (the leading axis of every
leaf of `train_batches`), a validation batch v, weights w = rater_fn(φ, b_k) and the inner objective

    L_in(θ, φ; b_k) = mean_i w_i · ℓ_i(θ; b_k, rng_k)        rng_k = jax.random.fold_in(rng, k)
    L_val(θ)        = mean_j m_j(θ; v, rng_val)               rng_val = jax.random.fold_in(rng, K)

where m = `val_loss_fn` (per-example validation objective (B_v,); default `loss_fn`, so that
L_val is the validation loss; e.g. `models.caption_gap_loss_fn` makes it the loss under the true
captions minus under shuffled ones). Every evaluation of the validation objective in one call
(the meta-loss; in `penalty` mode also the validation term of each proxy step, which is always
the mean of `loss_fn`) uses the same key rng_val, so modes and finite differences see one
deterministic function of φ.

The inner steps are the proxy's *real* training steps: `aux["proxy_params"]` and
`aux["inner_opt_state"]` are the state after them, for the caller to keep.

Modes (all three are product features, METHOD.md §2):

* ``"unrolled"`` (default, exact): θ_{k+1} = θ_k + inner_opt.update(∇θ L_in(θ_k, φ; b_k), s_k, θ_k)
  for k < K in a `lax.scan`, meta-loss L_val(θ_K), meta-gradient d L_val(θ_K) / dφ through all K
  steps (second order: it differentiates through ∇θ and through the optimizer state). Each step is
  rematerialised per `remat`; ``remat="nested"`` also keeps the scan's carry at only ~√K group
  boundaries (`nested_group_count`). ``mixed_mode=True`` gives the same numbers (to float64
  round-off) with a custom VJP of the inner step that never does reverse-over-reverse (MixFlow-MG,
  Kemaev et al. 2025): the Hessian-vector product and the mixed θ/φ term come from one
  forward-over-reverse linearisation (`jax.linearize` of `jax.grad`), the optimizer's part from
  `jax.vjp` of its update.
* ``"lookahead"`` (Ren et al. 2018): K must be 1. The meta-gradient is taken through ONE virtual
  SGD step θ' = θ − lookahead_lr · ∇θ L_in(θ, φ; b_0); meta-loss L_val(θ'). It equals ``unrolled``
  with K = 1 and ``inner_opt=optax.sgd(lookahead_lr)``. The returned proxy state is one real
  `inner_opt` step on the same gradient (weights held constant).
* ``"penalty"`` (the released Alchemist / SEAL first-order scheme; no meta-gradient): for each
  batch, with w = stop_gradient(rater_fn(φ, b_k)), one `inner_opt` step on
  λ·L_val(θ) + (1−λ)·L_in(θ; b_k); the rater gradient is
  mean_k ∇φ mean_i w_i(φ) · stop_gradient(ℓ_i(θ_k; b_k)) with ℓ at the proxy params *before* step
  k. Minimising it raises the weight of samples whose loss is below the batch's weighted mean
  (an easiness score, METHOD.md §8). Meta-loss: L_val after the K steps.

Stabilisers (a population of proxies, rater optimizer, clipping) belong to the caller: this
function is `jax.jit`-able and `jax.vmap`-able over a population axis of
proxy_params / inner_opt_state / train_batches (and rng).

Size: one pure function with its three modes, remat policies and custom VJPs; they share the
inner step and the argument checks, and splitting them would scatter one derivation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
RaterFn = Callable[[PyTree, PyTree], jax.Array]
LossFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]

MODES = ("unrolled", "lookahead", "penalty")
REMAT_POLICIES = ("none", "full", "dots", "nested")
DEFAULT_K = 4


def inner_optimizer(learning_rate: float, eps: float = 1e-3) -> optax.GradientTransformation:
    """The proxy's inner optimizer: ``optax.adam(lr, eps=eps, eps_root=1e-12)`` (METHOD.md §8);
    the one every caller uses (`rate.inner_lr`, `rate.inner_eps` in a rating run).

    `eps_root > 0` is required for unrolled meta-gradients: Adam divides by sqrt(v̂ + eps_root),
    and d sqrt(v)/dv is infinite at v = 0. A parameter with exactly zero gradient (an embedding row
    absent from the batch, an unused head) has v = 0 on its first steps, so reverse mode multiplies
    a zero cotangent by an infinite derivative: 0 · ∞ = NaN, and the NaN spreads to the whole
    meta-gradient. `eps = 1e-3` (not optax's 1e-8) because with a tiny eps Adam's first steps are
    ≈ lr · sign(g), whose derivative w.r.t. g (hence the per-sample signal) nearly vanishes on young
    proxies.
    """
    return optax.adam(learning_rate, eps=eps, eps_root=1e-12)


def penalty_lambda_at(validation_epoch, start: float = 1.0, decay: float = 0.03):
    """λ of the penalty mode after `validation_epoch` passes over the validation set.

    λ = start − decay · validation_epoch, with NO floor, as in the released Alchemist code: with the
    defaults λ turns negative from epoch 34 on (1 − 0.03·34 = −0.02), which makes the validation
    term a gradient *ascent* and weights the train term by 1 − λ > 1. Callers who want a floor
    apply it themselves (e.g. ``max(penalty_lambda_at(e), 0.0)``). Works on Python numbers and
    on (traced) arrays.
    """
    return start - decay * validation_epoch


# ----------------------------------------------------------------------------- validation


def _leading_axis(train_batches) -> int:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(train_batches)
    if not leaves:
        raise ValueError("train_batches has no array leaves; expected leaves with a leading axis K")
    sizes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"train_batches leaf {jax.tree_util.keystr(path)} is a scalar; every leaf needs a "
                "leading axis K (one batch per inner step)"
            )
        sizes[jax.tree_util.keystr(path)] = shape[0]
    if len(set(sizes.values())) != 1:
        detail = ", ".join(f"{k or '<root>'}: {v}" for k, v in sizes.items())
        raise ValueError(
            "train_batches leaves disagree on the leading axis K (one batch per inner step): "
            + detail
        )
    return next(iter(sizes.values()))


def _check_args(mode, remat, mixed_mode, lookahead_lr, penalty_lambda, k):
    if mode not in MODES:
        raise ValueError(f"unknown meta-gradient mode {mode!r}; valid modes: {', '.join(MODES)}")
    if remat not in REMAT_POLICIES:
        raise ValueError(
            f"unknown remat policy {remat!r}; valid policies: {', '.join(REMAT_POLICIES)}"
        )
    if mixed_mode and mode != "unrolled":
        raise ValueError(f"mixed_mode=True applies to mode='unrolled' only, got mode={mode!r}")
    if mode == "lookahead":
        if k != 1:
            raise ValueError(
                f"mode='lookahead' takes exactly one inner batch: the leading axis K of "
                f"train_batches must be 1, got {k}"
            )
        if lookahead_lr is None:
            raise ValueError("mode='lookahead' needs lookahead_lr (lr of the virtual SGD step)")
    if mode == "penalty" and penalty_lambda is None:
        raise ValueError(
            "mode='penalty' needs penalty_lambda (λ; see penalty_lambda_at for the schedule)"
        )


def _checked_losses(losses, name):
    if jnp.ndim(losses) != 1:
        raise ValueError(
            f"{name} must return per-example values of shape (B,), got shape {jnp.shape(losses)}"
        )
    return losses


def _checked_pair(weights, losses):
    _checked_losses(weights, "rater_fn")
    _checked_losses(losses, "loss_fn")
    if weights.shape != losses.shape:
        raise ValueError(
            f"rater_fn weights {weights.shape} and loss_fn losses {losses.shape} "
            "must have the same shape (B,)"
        )
    return weights, losses


def nested_group_count(k_steps: int) -> int:
    """G, the number of checkpointed groups of ``remat="nested"`` for K inner steps.

    The divisor of K closest to √K (the smaller one on a tie), so that the G saved group-boundary
    carries plus the K/G carries of the group being differentiated, G + K/G, is smallest:
    K = 4 -> 2, 8 -> 2, 12 -> 3, 16 -> 4. For a prime K that is G = 1, one group of K steps,
    which saves as much as ``remat="full"``.
    """
    if k_steps < 1:
        raise ValueError(f"the number of inner steps K must be >= 1, got {k_steps}")
    divisors = [g for g in range(1, k_steps + 1) if k_steps % g == 0]
    return min(divisors, key=lambda g: (abs(g - np.sqrt(k_steps)), g))


def _nested_scan(body, init, xs, groups, unroll):
    """`lax.scan(body, init, xs)` as an outer scan over `groups` checkpointed inner scans.

    Only the carry entering each group is saved for the backward pass; the backward pass of a
    group re-runs its inner scan forward, which saves the K/G carries inside that group only.
    Same values and derivatives as the flat scan. xs leaves have a leading axis K, divisible by
    `groups`; the stacked outputs keep the flat (K, ...) layout.
    """
    k_steps = jax.tree.leaves(xs)[0].shape[0]
    grouped = jax.tree.map(lambda x: x.reshape(groups, k_steps // groups, *x.shape[1:]), xs)

    # Inside the outer lax.scan CSE cannot merge the recomputation anyway (see `_remat`).
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def group(carry, group_xs):
        return jax.lax.scan(body, carry, group_xs, unroll=unroll)

    carry, ys = jax.lax.scan(group, init, grouped)
    return carry, jax.tree.map(lambda y: y.reshape(k_steps, *y.shape[2:]), ys)


def _remat(fn, remat, in_scan):
    if remat == "none":
        return fn
    policy = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "nested": jax.checkpoint_policies.nothing_saveable,  # each step; groups: `_nested_scan`
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[remat]
    # Inside lax.scan, CSE cannot merge the recomputation with the forward pass anyway, and
    # prevent_cse=True would only block optimisations (jax.checkpoint docs).
    return jax.checkpoint(fn, policy=policy, prevent_cse=not in_scan)


def _zero_cotangent(x):
    """A zero cotangent for any primal leaf (float0 for integer, bool and PRNG-key leaves)."""
    dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
    if jnp.issubdtype(dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


# ----------------------------------------------------------------------------- inner step


def _make_inner_step(loss_fn, inner_opt, mixed_mode):
    """step(w, θ, s, batch, key) -> (θ', s', ℓ (B,)) for the batch's precomputed weights w (B,).

    The returned ℓ is a report, not for AD."""

    def weighted_grad(theta, weights, batch, key):
        def inner_objective(th):
            losses = _checked_losses(loss_fn(th, batch, key), "loss_fn")
            return jnp.mean(weights * losses), losses

        return jax.grad(inner_objective, has_aux=True)(theta)

    def apply_opt(grads, opt_state, theta):
        updates, opt_state = inner_opt.update(grads, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state

    def step(weights, theta, opt_state, batch, key):
        grads, losses = weighted_grad(theta, weights, batch, key)
        _checked_pair(weights, losses)
        theta, opt_state = apply_opt(grads, opt_state, theta)
        return theta, opt_state, losses

    if not mixed_mode:
        return step

    # MixFlow-MG: a custom VJP whose residuals are the step's inputs only, and whose backward pass
    # differentiates ∇θ L_in forward-over-reverse instead of reverse-over-reverse.
    mixed_step = jax.custom_vjp(step)

    def mixed_fwd(weights, theta, opt_state, batch, key):
        residuals = (weights, theta, opt_state, batch, key)
        return step(*residuals), residuals

    def mixed_bwd(residuals, cotangents):
        weights, theta, opt_state, batch, key = residuals
        # The losses output is a report: the caller stop_gradients it, so its cotangent is always
        # zero and is ignored here.
        theta_bar, opt_state_bar, _ = cotangents

        def grad_and_losses(th):  # θ -> (∇θ L_in, ℓ), weights fixed
            return weighted_grad(th, weights, batch, key)

        # One forward-over-reverse linearisation gives both the HVP and the per-example JVP.
        (grads, losses), tangent_fn = jax.linearize(grad_and_losses, theta)
        _, opt_vjp = jax.vjp(apply_opt, grads, opt_state, theta)
        grads_bar, opt_state_bar_in, theta_bar_direct = opt_vjp((theta_bar, opt_state_bar))
        # HVP: H_θθ ḡ (the Hessian of L_in is symmetric, so its VJP is its JVP);
        # mixed term: ∂(∇θ L_in)/∂w_i · ḡ = ⟨∇θ ℓ_i, ḡ⟩ / B = (J_ℓ ḡ)_i / B.
        hvp, losses_jvp = tangent_fn(grads_bar)
        theta_bar_in = jax.tree.map(jnp.add, theta_bar_direct, hvp)
        weights_bar = (losses_jvp / losses.shape[0]).astype(weights.dtype)
        return (
            weights_bar,
            theta_bar_in,
            opt_state_bar_in,
            jax.tree.map(_zero_cotangent, batch),
            _zero_cotangent(key),
        )

    mixed_step.defvjp(mixed_fwd, mixed_bwd)
    return mixed_step


def _make_rate_batches(rater_fn, recompute):
    """rate(φ, train_batches) -> w (K, B): the weights of the K inner batches.

    The weights do not depend on θ, so the inner steps take them as inputs: the rater runs once
    over all K batches before the steps and is differentiated once after them, and no scan
    carries a cotangent of φ (for the CLIP-vocabulary embedding of `models.Rater`, 12 MiB that
    each step's backward pass would otherwise fill and add). Without `recompute` the rater's
    activations of all K batches are kept for the backward pass. With `recompute` (for
    ``remat="nested"``) a custom VJP rates the batches again one at a time after the inner steps'
    backward pass, accumulating φ̄ in a scan: one batch's rater activations are alive at a time.
    """
    rate = jax.vmap(rater_fn, in_axes=(None, 0))
    if not recompute:
        return rate

    @jax.custom_vjp
    def rate_batches(phi, batches):
        return rate(phi, batches)

    def rate_fwd(phi, batches):
        return rate(phi, batches), (phi, batches)

    def rate_bwd(residuals, weights_bar):
        phi, batches = residuals

        def accumulate(phi_bar, inputs):
            batch, batch_weights_bar = inputs
            _, rater_vjp = jax.vjp(lambda p: rater_fn(p, batch), phi)
            return jax.tree.map(jnp.add, phi_bar, rater_vjp(batch_weights_bar)[0]), None

        phi_bar, _ = jax.lax.scan(
            accumulate, jax.tree.map(jnp.zeros_like, phi), (batches, weights_bar)
        )
        return phi_bar, jax.tree.map(_zero_cotangent, batches)

    rate_batches.defvjp(rate_fwd, rate_bwd)
    return rate_batches


# ----------------------------------------------------------------------------- the modes


def _val_loss(val_loss_fn, theta, val_batch, key):
    """(L_val (), per-example values (B_v,)) of the validation objective `val_loss_fn`."""
    losses = _checked_losses(val_loss_fn(theta, val_batch, key), "val_loss_fn")
    return jnp.mean(losses), losses


def _unrolled(
    rater_params,
    proxy_params,
    opt_state,
    train_batches,
    val_batch,
    keys,
    val_key,
    *,
    rater_fn,
    loss_fn,
    val_loss_fn,
    inner_opt,
    remat,
    mixed_mode,
    unroll,
):
    rate_batches = _make_rate_batches(rater_fn, recompute=remat == "nested")
    step = _make_inner_step(loss_fn, inner_opt, mixed_mode)
    if not mixed_mode:
        # In mixed mode the custom VJP already keeps only the step's inputs: per-step remat adds
        # nothing (the group checkpoints of "nested" still apply).
        step = _remat(step, remat, in_scan=True)

    def meta_loss_fn(phi):
        def body(carry, xs):
            theta, s = carry
            weights, batch, key = xs
            theta, s, losses = step(weights, theta, s, batch, key)
            return (theta, s), jax.lax.stop_gradient(losses)

        weights = rate_batches(phi, train_batches)
        init, xs = (proxy_params, opt_state), (weights, train_batches, keys)
        if remat == "nested":
            groups = nested_group_count(keys.shape[0])
            (theta, s), losses = _nested_scan(body, init, xs, groups, unroll)
        else:
            (theta, s), losses = jax.lax.scan(body, init, xs, unroll=unroll)
        meta_loss, val_losses = _val_loss(val_loss_fn, theta, val_batch, val_key)
        return meta_loss, dict(
            meta_loss=meta_loss,
            val_losses=val_losses,
            proxy_params=theta,
            inner_opt_state=s,
            weights=jax.lax.stop_gradient(weights),
            inner_losses=losses,
        )

    return jax.grad(meta_loss_fn, has_aux=True)(rater_params)


def _lookahead(
    rater_params,
    proxy_params,
    opt_state,
    train_batches,
    val_batch,
    keys,
    val_key,
    *,
    rater_fn,
    loss_fn,
    val_loss_fn,
    inner_opt,
    remat,
    lookahead_lr,
):
    batch = jax.tree.map(lambda x: x[0], train_batches)
    key = keys[0]

    def virtual_step(phi, theta):
        weights = rater_fn(phi, batch)

        def inner_objective(th):
            losses = _checked_losses(loss_fn(th, batch, key), "loss_fn")
            return jnp.mean(weights * losses), losses

        grads, losses = jax.grad(inner_objective, has_aux=True)(theta)
        _checked_pair(weights, losses)
        theta_virtual = jax.tree.map(lambda p, g: p - lookahead_lr * g, theta, grads)
        return theta_virtual, grads, weights, losses

    virtual_step = _remat(virtual_step, remat, in_scan=False)

    def meta_loss_fn(phi):
        theta_virtual, grads, weights, losses = virtual_step(phi, proxy_params)
        meta_loss, val_losses = _val_loss(val_loss_fn, theta_virtual, val_batch, val_key)
        return meta_loss, dict(
            meta_loss=meta_loss,
            val_losses=val_losses,
            grads=grads,
            weights=weights,
            inner_losses=losses,
        )

    meta_grads, aux = jax.grad(meta_loss_fn, has_aux=True)(rater_params)
    # The real proxy step: same gradient (weights held constant), the caller's optimizer.
    updates, opt_state = inner_opt.update(aux.pop("grads"), opt_state, proxy_params)
    aux.update(
        proxy_params=optax.apply_updates(proxy_params, updates),
        inner_opt_state=opt_state,
        weights=aux["weights"][None],
        inner_losses=aux["inner_losses"][None],
    )
    return meta_grads, aux


def _penalty(
    rater_params,
    proxy_params,
    opt_state,
    train_batches,
    val_batch,
    keys,
    val_key,
    *,
    rater_fn,
    loss_fn,
    val_loss_fn,
    inner_opt,
    penalty_lambda,
):
    k_steps = keys.shape[0]
    lam = penalty_lambda

    def body(carry, xs):
        theta, s, rater_grad_sum, rater_loss_sum = carry
        batch, key = xs
        weights, rater_vjp = jax.vjp(lambda p: rater_fn(p, batch), rater_params)
        weights_const = jax.lax.stop_gradient(weights)

        def proxy_objective(th):
            val_loss, _ = _val_loss(loss_fn, th, val_batch, val_key)
            losses = _checked_losses(loss_fn(th, batch, key), "loss_fn")
            return lam * val_loss + (1.0 - lam) * jnp.mean(weights_const * losses), losses

        grads, losses = jax.grad(proxy_objective, has_aux=True)(theta)
        _checked_pair(weights, losses)
        losses = jax.lax.stop_gradient(losses)  # ℓ(θ_k), before this step
        # ∇φ mean_i w_i(φ) · sg(ℓ_i)
        (rater_grad,) = rater_vjp((losses / losses.shape[0]).astype(weights.dtype))
        updates, s = inner_opt.update(grads, s, theta)
        theta = optax.apply_updates(theta, updates)
        carry = (
            theta,
            s,
            jax.tree.map(jnp.add, rater_grad_sum, rater_grad),
            rater_loss_sum + jnp.mean(weights_const * losses),
        )
        return carry, (weights_const, losses)

    zeros = jax.tree.map(jnp.zeros_like, rater_params)
    init = (proxy_params, opt_state, zeros, jnp.zeros((), jnp.result_type(float)))
    (theta, s, rater_grad_sum, rater_loss_sum), (weights, losses) = jax.lax.scan(
        body, init, (train_batches, keys)
    )
    meta_grads = jax.tree.map(lambda g: g / k_steps, rater_grad_sum)
    meta_loss, val_losses = _val_loss(val_loss_fn, theta, val_batch, val_key)
    aux = dict(
        meta_loss=meta_loss,
        val_losses=val_losses,
        proxy_params=theta,
        inner_opt_state=s,
        weights=weights,
        inner_losses=losses,
        rater_loss=rater_loss_sum / k_steps,
    )
    return meta_grads, aux


def meta_gradient(
    rater_params,
    proxy_params,
    inner_opt_state,
    train_batches,
    val_batch,
    rng,
    *,
    rater_fn: RaterFn,
    loss_fn: LossFn,
    inner_opt: optax.GradientTransformation,
    val_loss_fn: LossFn | None = None,
    mode: str = "unrolled",
    remat: str = "full",
    mixed_mode: bool = False,
    unroll: int | bool = 1,
    lookahead_lr: float | None = None,
    penalty_lambda: float | None = None,
):
    """The rater's gradient from K inner proxy steps, and the proxy state after them.

    Args:
      rater_params: φ, any pytree (dict, `nnx.State`, ...).
      proxy_params: θ_0, any pytree.
      inner_opt_state: `inner_opt.init(proxy_params)` or the state carried from the last call.
      train_batches: a pytree whose leaves all have a leading axis K; `train_batches[k]` (the k-th
        slice of every leaf) is the batch of inner step k. Integer leaves are fine.
      val_batch: one validation batch (no K axis).
      rng: a PRNG key. Inner step k uses `fold_in(rng, k)`; every validation loss uses
        `fold_in(rng, K)`.
      rater_fn: (rater_params, batch) -> weights (B,). Typically B · softmax(u).
      loss_fn: (proxy_params, batch, rng) -> per-example losses (B,).
      inner_opt: the proxy's optax optimizer (see `inner_optimizer`).
      val_loss_fn: (proxy_params, val_batch, rng) -> per-example validation objective (B_v,);
        the meta-loss is its mean. None (default): `loss_fn`, the validation loss. Any other
        objective differentiable in proxy_params works, e.g. `models.caption_gap_loss_fn` (loss
        under the true captions minus under shuffled captions: the rater learns image–text
        fit). In "penalty" mode it is the reported meta_loss only: the proxies' validation
        term λ·L_val stays the mean of `loss_fn` (a gap would be maximised by unlearning).
      mode: "unrolled" | "lookahead" | "penalty" (module docstring).
      remat: rematerialisation of each inner step in the differentiated modes: "none" (store all
        residuals), "full" (`jax.checkpoint`, nothing saveable: keep only the step's inputs, i.e.
        K carries θ_k, s_k), "dots" (save matmul outputs without batch dims), "nested" ("full" per
        step, and the K steps run as G = `nested_group_count(K)` checkpointed groups of K/G: only
        G + K/G carries are held, for one more forward pass of each step, and the rater's
        activations are recomputed one batch at a time instead of kept). In every policy the
        rater runs once over the K batches before the steps and is differentiated once after
        them: no scan carries a rater-sized φ̄. Same numbers, different memory/compute. Ignored by
        "penalty" (nothing is differentiated through a step); mixed_mode ignores the per-step
        policy (its custom VJP already keeps only the step's inputs) but honours the groups of
        "nested". For K = 1 (and "lookahead") "nested" is "full"; docs/BENCHMARKS.md compares all.
      mixed_mode: "unrolled" only: custom VJP of the inner step with forward-over-reverse HVPs
        (MixFlow-MG). Equal results, no reverse-over-reverse. Being a `jax.custom_vjp`, it
        supports reverse-mode differentiation only (nobody needs `jax.jvp` of a meta-gradient).
      unroll: "unrolled" only: the `unroll` of the `lax.scan` over the K inner steps (True or K:
        one straight-line program, which XLA can schedule across steps — faster for small K,
        compile time and program size grow with K). Same numbers.
      lookahead_lr: "lookahead" only (required): lr of the virtual SGD step.
      penalty_lambda: "penalty" only (required): λ, a number or a scalar array
        (see `penalty_lambda_at`).

    Returns:
      (meta_grads, aux). meta_grads has the structure of rater_params: d meta-loss / dφ for
      "unrolled"/"lookahead", the penalty rater gradient for "penalty"; in every mode the
      caller's rater optimizer *minimises* it. aux is a dict:
        meta_loss ()        L_val(θ_K) ("lookahead": of the virtual SGD step, i.e. the quantity
                            meta_grads differentiates; "penalty": after the K real steps)
        val_losses (B_v,)   its per-example values (of `val_loss_fn`)
        proxy_params, inner_opt_state   after the K real steps (keep them)
        weights (K, B)      rater weights of each inner batch
        inner_losses (K, B) per-example train losses at θ_k (before step k)
        rater_loss ()       "penalty" only: mean_k mean_i w_i ℓ_i(θ_k)

    Raises:
      ValueError: unknown mode or remat; mixed_mode with a mode other than "unrolled"; leaves of
        train_batches with different leading axes; "lookahead" with K != 1; a missing
        lookahead_lr / penalty_lambda; rater/loss outputs not of shape (B,).
    """
    k_steps = _leading_axis(train_batches)
    _check_args(mode, remat, mixed_mode, lookahead_lr, penalty_lambda, k_steps)
    keys = jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(k_steps))
    val_key = jax.random.fold_in(rng, k_steps)
    common = dict(
        rater_fn=rater_fn,
        loss_fn=loss_fn,
        val_loss_fn=loss_fn if val_loss_fn is None else val_loss_fn,
        inner_opt=inner_opt,
    )
    args = (rater_params, proxy_params, inner_opt_state, train_batches, val_batch, keys, val_key)
    if mode == "unrolled":
        return _unrolled(*args, **common, remat=remat, mixed_mode=mixed_mode, unroll=unroll)
    if mode == "lookahead":
        return _lookahead(*args, **common, remat=remat, lookahead_lr=lookahead_lr)
    return _penalty(*args, **common, penalty_lambda=penalty_lambda)
