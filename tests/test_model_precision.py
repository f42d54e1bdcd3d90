"""The scanned DiT blocks, their remat policies, and bfloat16 compute with float32 weights.

Small models on precomputed caption embeddings (no 49k-row token tables) keep every program here
a few seconds to compile on 2 cores.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alchemist_jax import config, meta, models
from alchemist_jax.models import stacked

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

B, L, RES, DT = 4, 6, 8, 24
MODEL = config.ModelConfig(
    preset="tiny", patch_size=4, width=32, depth=2, heads=2, mlp_ratio=2.0, caption_dropout=0.0
)
RATER = config.RaterConfig(width=16, hidden=16, batch_head=True)
U = 2.0**-8  # bfloat16's relative precision (8 significant bits)


def make_batch(seed: int, rows: int = B) -> dict:
    rng = np.random.RandomState(seed)
    return {
        "image": rng.uniform(-1, 1, (rows, RES, RES, 1)).astype(np.float32),
        "text_embedding": rng.randn(rows, L, DT).astype(np.float32),
        "token_mask": np.arange(L)[None] < rng.randint(2, L + 1, (rows, 1)),
    }


def perturb(params, seed: int, scale: float = 0.1):
    """Gaussian noise on every leaf (numpy: no per-shape compile), so that the zero-initialised
    adaLN layers are active."""
    rng = np.random.RandomState(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape).astype(x.dtype)),
        params,
    )


def rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def cosine(a, b) -> float:
    a, b = flat(a), flat(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def proxy(model_cfg: config.ModelConfig, batch: dict):
    """(graphdef, rest) of the DiT built for `batch`, and its parameters (perturbed)."""
    graphdef, params, rest = models.init_proxy(model_cfg, batch, jax.random.key(0), L)
    return graphdef, rest, perturb(params, 1)


T = np.array([0.1, 0.4, 0.7, 0.95], np.float32)
EPS = np.random.RandomState(9).randn(B, RES, RES, 1).astype(np.float32)


def loss_at(graphdef, rest):
    """(params, batch) -> (B,) flow-matching losses at the fixed draws T, EPS."""
    return lambda params, batch: models.flow_matching_loss_at(
        nnx.merge(graphdef, params, rest), batch, T, EPS
    )


# ----------------------------------------------------------------------------------------------
# Scanned blocks
# ----------------------------------------------------------------------------------------------


def test_block_remat_names_are_the_configs():
    assert set(stacked.REMAT_POLICIES) == set(config.BLOCK_REMAT)


def test_program_size_does_not_grow_with_depth():
    """The blocks are one scanned module: the forward program of 2 and of 6 blocks has the same
    number of operations (what makes compile time independent of depth)."""
    batch = make_batch(0)

    def size(depth):
        graphdef, params, rest = models.init_proxy(
            dataclasses.replace(MODEL, depth=depth), batch, jax.random.key(0), L
        )
        return len(jax.make_jaxpr(loss_at(graphdef, rest))(params, batch).jaxpr.eqns)

    assert size(2) == size(6)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_block_remat_gives_the_same_output_and_gradient(remat):
    """Recomputing a block in the backward pass changes memory, not numbers: the same float32
    operations, up to XLA fusing them differently (round-off ~1e-7 relative)."""
    batch = make_batch(0)
    graphdef, rest, params = proxy(MODEL, batch)
    remat_graphdef, remat_rest, _ = proxy(dataclasses.replace(MODEL, block_remat=remat), batch)

    def value_and_grad(graphdef, rest):
        loss = loss_at(graphdef, rest)
        return jit(jax.value_and_grad(lambda p: jnp.mean(loss(p, batch))))

    remat_loss = loss_at(remat_graphdef, remat_rest)
    program = jax.make_jaxpr(jax.grad(lambda p: jnp.mean(remat_loss(p, batch))))(params)
    assert "checkpoint" in str(program) or "remat" in str(program)  # the remat is there
    value, grads = value_and_grad(graphdef, rest)(params)
    remat_value, remat_grads = value_and_grad(remat_graphdef, remat_rest)(params)
    np.testing.assert_allclose(float(remat_value), float(value), rtol=1e-6)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads), strict=True):
        np.testing.assert_allclose(np.asarray(h), np.asarray(g), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# bfloat16 compute, float32 weights
# ----------------------------------------------------------------------------------------------

BF16 = dataclasses.replace(MODEL, compute_dtype="bfloat16")
RATER_BF16 = dataclasses.replace(RATER, compute_dtype="bfloat16")


def test_bfloat16_velocity_and_loss_agree_with_float32():
    """Tolerance from bfloat16's precision. Every matmul rounds its two operands to 8 significant
    bits (relative error <= u = 2^-8 each, ~u/sqrt(3) rms) and accumulates in float32: a term
    a_i b_i of a reduction of size n is off by ~sqrt(2/3) u |a_i b_i| rms, and for the independent
    signs of a layer's terms the n errors add in quadrature exactly like the terms themselves, so
    the result is off by ~u relative (rms), whatever n; rounding the output adds u/sqrt(3). The
    rounding errors of successive stages are independent, so after S stages the relative rms
    error is ~sqrt(S) u. Here S = 30 (patch and caption projections, 2 blocks of 11 matmuls, the
    final layer's 2, the LayerNorm and residual roundings folded into the factor): sqrt(30) u =
    0.021; we allow 4x that (gains of the layers above 1, correlated roundings in the bfloat16
    residual stream): 0.086.

    The loss is a mean of n = H W C squared errors e_i = v_i - target_i, computed in float32
    from the float32 velocities: |dL| = |mean(2 e dv + dv^2)| <= 2 rms(e) rms(dv) + rms(dv)^2
    (Cauchy-Schwarz), a bound that needs no independence (the independent case is sqrt(n) times
    smaller)."""
    batch = make_batch(0)
    graphdef, rest, params = proxy(MODEL, batch)
    g16, r16, _ = proxy(BF16, batch)
    forward = lambda g, r: jit(  # noqa: E731
        lambda p: nnx.merge(g, p, r)(
            batch["image"] * (1 - T[:, None, None, None]) + EPS * T[:, None, None, None], T, batch
        )
    )
    v32, v16 = forward(graphdef, rest)(params), forward(g16, r16)(params)
    assert v16.dtype == jnp.float32 and v32.dtype == jnp.float32
    dv = rms(v16 - v32)
    print(f"velocity: rms error {dv / rms(v32):.4f} of rms {rms(v32):.3f}")
    assert dv <= 4 * np.sqrt(30) * U * rms(v32)

    l32, l16 = jit(loss_at(graphdef, rest))(params, batch), jit(loss_at(g16, r16))(params, batch)
    assert l16.dtype == jnp.float32
    e = np.asarray(v32) - (EPS - batch["image"])
    per_row = lambda x: np.sqrt(np.mean(np.square(x), axis=(1, 2, 3)))  # noqa: E731
    dv_rows = per_row(np.asarray(v16 - v32))
    print(f"loss: error {np.abs(l16 - l32)} bound {2 * per_row(e) * dv_rows + dv_rows**2}")
    assert np.all(np.abs(np.asarray(l16 - l32)) <= 2 * per_row(e) * dv_rows + dv_rows**2 + 1e-7)


def test_bfloat16_train_step_keeps_float32_weights_and_adam_states():
    batch = make_batch(0)
    graphdef, rest, params = proxy(BF16, batch)
    loss_fn = models.proxy_loss_fn(graphdef, rest, 0.0)
    opt = optax.adam(1e-3)

    @jit
    def step(params, opt_state):
        grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch, jax.random.key(0))))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    new, opt_state, grads = step(params, opt.init(params))
    for tree in (new, opt_state, grads):
        floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
    assert not np.array_equal(flat(new), flat(params))  # the step moved the weights


def test_bfloat16_meta_gradient_points_where_the_float32_one_does():
    """A K=2 unrolled meta-gradient (Adam inner steps) through bfloat16 proxies and rater.

    Bound: the meta-gradient chains three passes (forward, backward, and the meta backward
    through the backward), each of ~S bfloat16 stages, so its relative error is ~sqrt(3) times
    the forward's (<= 0.086 above): eps <= 0.15. A relative error eps costs at most
    1 - sqrt(1 - eps^2) ~ eps^2 / 2 of cosine when it is orthogonal to the gradient: cos >= 0.98
    by that estimate; we require 0.9, leaving room for the rater's softmax, whose gradient is a
    difference of nearly equal terms at initialisation (relative error amplified)."""
    train = {k: np.stack([v, make_batch(1)[k]]) for k, v in make_batch(0).items()}
    val = make_batch(2)
    rng = jax.random.key(3)
    grads = {}
    for name, (model_cfg, rater_cfg) in {
        "float32": (MODEL, RATER),
        "bfloat16": (BF16, RATER_BF16),
    }.items():
        graphdef, rest, params = proxy(model_cfg, val)
        r_graphdef, r_params, r_rest = models.init_rater(rater_cfg, val, jax.random.key(1), L)
        opt = meta.inner_optimizer(1e-2)
        fn = jit(
            functools.partial(
                meta.meta_gradient,
                rater_fn=models.rater_weight_fn(r_graphdef, r_rest, 1.0),
                loss_fn=models.proxy_loss_fn(graphdef, rest, 0.0),
                inner_opt=opt,
            )
        )
        grads[name], aux = fn(r_params, params, opt.init(params), train, val, rng)
        assert aux["meta_loss"].dtype == jnp.float32
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads[name]))
        assert {g.dtype for g in jax.tree.leaves(grads[name])} == {jnp.dtype(jnp.float32)}
    similarity = cosine(grads["bfloat16"], grads["float32"])
    print(f"meta-gradient cosine similarity {similarity:.4f}")
    assert similarity > 0.9


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.block_remat=nested", "model.block_remat"),
        ("model.compute_dtype=float16", "model.compute_dtype"),
        ("rater.compute_dtype=bf16", "rater.compute_dtype"),
    ],
)
def test_new_model_keys_reject_bad_values_naming_the_key(override, key):
    with pytest.raises(config.ConfigError, match=rf"'{key}' must be one of .*got"):
        config.load_config(None, [override])


def test_new_model_keys_defaults_and_choices():
    cfg = config.load_config(None)
    assert (cfg.model.block_remat, cfg.model.compute_dtype, cfg.rater.compute_dtype) == (
        "none",
        "float32",
        "float32",
    )
    assert models.resolve_model_config(cfg.model)["dtype"] is None  # the parameters' dtype
    cfg = config.load_config(
        None,
        ["model.block_remat=dots", "model.compute_dtype=bfloat16", "rater.compute_dtype=bfloat16"],
    )
    assert models.resolve_model_config(cfg.model)["dtype"] == jnp.bfloat16
    assert models.compute_dtype(cfg.rater.compute_dtype) == jnp.bfloat16
