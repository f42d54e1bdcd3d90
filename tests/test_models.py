"""Tests of alchemist_jax.models: the DiT, its text encoder, the rater, rectified flow, and the
pure parameter-pytree functions the meta-gradient engine relies on.

Compilation dominates the run time on 2 cores, so the tests share a few jitted functions of small
models (8x8 images, 8 tokens) instead of running op by op, and compile them unoptimised.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alchemist_jax.config import ModelConfig, RaterConfig
from alchemist_jax.data.tokenizer import END_ID, START_ID
from alchemist_jax.models import (
    PRESETS,
    TextEncoder,
    count_params,
    flow_matching_loss_at,
    init_proxy,
    init_rater,
    proxy_loss_fn,
    rater_score_fn,
    rater_weight_fn,
    resolve_model_config,
    sample,
)

# Every program here runs a few times on tiny inputs: skip XLA's backend optimisation, which is
# most of the compile time (a second-order program: 17 s -> 6 s on 2 cores).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

B, L, RES = 4, 8, 8
# Small enough to compile fast (XLA compilation dominates the run time), yet every layer kind is
# there. Shared sizes (32) let the eager initialisers reuse compiled programs across models.
SMALL = ModelConfig(
    preset="tiny",
    patch_size=4,
    width=32,
    depth=2,
    heads=2,
    mlp_ratio=2.0,
    text_width=32,
    text_depth=1,
    text_heads=2,
)
RATER = RaterConfig(width=32, hidden=32, batch_head=True)


def make_tokens(rng: np.random.RandomState, lengths) -> tuple[np.ndarray, np.ndarray]:
    """CLIP-like ids: start, random words, end, then padding with the end id."""
    tokens = np.full((len(lengths), L), END_ID, np.int32)
    mask = np.zeros((len(lengths), L), bool)
    for i, n in enumerate(lengths):
        tokens[i, 0] = START_ID
        tokens[i, 1 : n - 1] = rng.randint(0, 49000, n - 2)
        mask[i, :n] = True
    return tokens, mask


def make_batch(seed: int = 0, lengths=(3, 5, 8, 4)) -> dict:
    rng = np.random.RandomState(seed)
    tokens, mask = make_tokens(rng, lengths)
    return {
        "image": rng.uniform(-1, 1, (len(lengths), RES, RES, 1)).astype(np.float32),
        "tokens": tokens,
        "token_mask": mask,
    }


def perturb(params, seed: int, scale: float = 0.1):
    """Adds Gaussian noise to every leaf: makes the zero-initialised layers non-trivial.

    In numpy: eager JAX ops would compile once per leaf shape, which dominates on 2 cores.
    """
    rng = np.random.RandomState(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape).astype(x.dtype)),
        params,
    )


def max_abs(a) -> float:
    return float(np.abs(np.asarray(a)).max())


@pytest.fixture(scope="module")
def proxy():
    """(graphdef, params at init, rest, batch) of a small token-conditioned pixel DiT."""
    batch = make_batch()
    graphdef, params, rest = init_proxy(SMALL, batch, jax.random.key(0), L)
    return graphdef, params, rest, batch


@pytest.fixture(scope="module")
def trained_like(proxy):
    """Perturbed proxy params: every layer (also the zero-initialised ones) is active."""
    return perturb(proxy[1], 1)


@pytest.fixture(scope="module")
def apply(proxy):
    """Jitted v_pred = DiT(params)(x, t, batch, drop_text) of the small proxy."""
    graphdef, _, rest, _ = proxy
    return jit(
        lambda params, x, t, batch, drop: nnx.merge(graphdef, params, rest)(x, t, batch, drop)
    )


@pytest.fixture(scope="module")
def loss_at(proxy):
    graphdef, _, rest, _ = proxy
    return jit(
        lambda params, batch, t, eps, drop: flow_matching_loss_at(
            nnx.merge(graphdef, params, rest), batch, t, eps, drop
        )
    )


@pytest.fixture(scope="module")
def loss_fn(proxy):
    """The meta engine's view: loss_fn(params, batch, rng) -> (B,), caption dropout 0.5."""
    graphdef, _, rest, _ = proxy
    return proxy_loss_fn(graphdef, rest, 0.5)


@pytest.fixture(scope="module")
def jitted_loss(loss_fn):
    return jit(loss_fn)


@pytest.fixture(scope="module")
def variant():
    """A DiT on latents with precomputed caption embeddings (no text encoder), perturbed."""
    rng = np.random.RandomState(3)
    mask = np.array([[True] * 4 + [False] * 2] * B)
    batch = {
        "image": np.zeros((B, 32, 32, 3), np.float32),
        "latent": rng.randn(B, 4, 4, 4).astype(np.float32),
        "text_embedding": rng.randn(B, 6, 24).astype(np.float32),
        "token_mask": mask,
    }
    graphdef, params, rest = init_proxy(SMALL, batch, jax.random.key(2), L)
    forward = jit(
        lambda params, batch: nnx.merge(graphdef, params, rest)(
            batch["latent"], jnp.full((B,), 0.4), batch
        )
    )
    return params, batch, forward


ZERO_DROP = jnp.zeros((B,), bool)
T_MID = jnp.full((B,), 0.4)


# ----------------------------------------------------------------------------------------------
# Configuration and construction
# ----------------------------------------------------------------------------------------------


def test_resolve_model_config_fills_from_preset_and_overrides():
    resolved = resolve_model_config(
        ModelConfig(preset="base", depth=3, text_trainable=False, compute_dtype="bfloat16")
    )
    assert resolved == {
        **PRESETS["base"],
        "depth": 3,
        "text_trainable": False,
        "block_remat": "none",
        "dtype": jnp.bfloat16,
    }
    assert resolve_model_config(ModelConfig()) == {
        **PRESETS["tiny"],
        "text_trainable": True,
        "block_remat": "none",
        "dtype": None,  # float32: compute in the parameters' dtype
    }


def test_tiny_preset_parameter_counts():
    tokens, mask = make_tokens(np.random.RandomState(0), [5])
    batch = {
        "image": np.zeros((1, 28, 28, 1), np.float32),
        "tokens": np.pad(tokens, ((0, 0), (0, 32 - L)), constant_values=END_ID),
        "token_mask": np.pad(mask, ((0, 0), (0, 32 - L))),
    }
    key = jax.random.key(0)
    params = jax.eval_shape(lambda k: init_proxy(ModelConfig(), batch, k, 32)[1], key)
    assert count_params(params) == 3_430_352
    # Most of it is the text encoder's CLIP token table (49,408 x 64).
    assert params["text_encoder"]["token_embedding"].shape == (49_408, 64)
    rater = jax.eval_shape(lambda k: init_rater(RaterConfig(), batch, k, 32)[1], key)
    assert count_params(rater) == 6_466_688  # the instance head has no output bias


def test_output_shapes_pixels_latents_and_precomputed_text(proxy, trained_like, apply, variant):
    graphdef, params, rest, batch = proxy
    assert len(jax.tree.leaves(rest)) == 0  # every variable is a Param
    v = apply(trained_like, batch["image"], T_MID, batch, ZERO_DROP)
    assert v.shape == (B, RES, RES, 1) and v.dtype == jnp.float32

    variant_params, variant_batch, forward = variant
    assert "text_encoder" not in variant_params  # bypassed, so not built
    assert variant_params["patch_embed"]["kernel"].shape == (4 * 4 * 4, 32)  # latent channels
    v = forward(perturb(variant_params, 3), variant_batch)
    assert v.shape == (B, 4, 4, 4) and np.all(np.isfinite(np.asarray(v)))
    with pytest.raises(ValueError, match="precomputed"):
        apply(params, batch["image"], T_MID, variant_batch, ZERO_DROP)


# ----------------------------------------------------------------------------------------------
# adaLN-Zero, loss, conditioning
# ----------------------------------------------------------------------------------------------


def test_adaln_zero_init_output_is_zero_and_blocks_are_identity(proxy, apply):
    graphdef, params, rest, batch = proxy
    v = apply(params, batch["image"], T_MID, batch, ZERO_DROP)
    np.testing.assert_array_equal(np.asarray(v), 0.0)

    keys = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(keys[0], (B, 4, 32))
    c = jax.random.normal(keys[1], (B, 32))
    context = jax.random.normal(keys[2], (B, L, 32))
    # The blocks are stacked (depth, ...) along `layers`: block i is slice i of every parameter.
    block_def, stack = nnx.split(nnx.merge(graphdef, params, rest).blocks)
    assert {leaf.shape[0] for leaf in jax.tree.leaves(stack)} == {SMALL.depth}
    outputs = jit(
        lambda stack: [
            nnx.merge(block_def, jax.tree.map(lambda a: a[i], stack))(
                x, c, context, batch["token_mask"]
            )
            for i in range(SMALL.depth)
        ]
    )(stack)
    for out in outputs:
        np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_loss_at_init_equals_velocity_energy(proxy, loss_at):
    graphdef, params, rest, batch = proxy
    t = jnp.array([0.0, 0.3, 0.7, 1.0])
    eps = jax.random.normal(jax.random.key(7), batch["image"].shape)
    loss = loss_at(params, batch, t, eps, ZERO_DROP)
    expected = np.mean((np.asarray(eps) - batch["image"]) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-6)


def test_random_loss_is_deterministic_and_uses_documented_draws(
    proxy, trained_like, loss_at, jitted_loss
):
    batch = proxy[3]
    a = jitted_loss(trained_like, batch, jax.random.key(3))
    np.testing.assert_array_equal(
        np.asarray(a), np.asarray(jitted_loss(trained_like, batch, jax.random.key(3)))
    )
    assert not np.allclose(a, jitted_loss(trained_like, batch, jax.random.key(4)))
    # split(rng, 3) -> t ~ U(0, 1), eps ~ N(0, 1), drop_text ~ Bernoulli(0.5).
    t_key, eps_key, drop_key = jax.random.split(jax.random.key(3), 3)
    t = jax.random.uniform(t_key, (B,))
    eps = jax.random.normal(eps_key, batch["image"].shape)
    drop = jax.random.bernoulli(drop_key, 0.5, (B,))
    np.testing.assert_allclose(
        np.asarray(a), np.asarray(loss_at(trained_like, batch, t, eps, drop)), rtol=1e-5
    )


def test_cross_attention_makes_output_depend_on_tokens_and_drop_text_does_not(
    proxy, trained_like, apply, variant
):
    _, _, _, batch = proxy
    other = dict(batch, tokens=make_batch(seed=9)["tokens"])
    drop = jnp.array([True, False, True, False])
    v1 = apply(trained_like, batch["image"], T_MID, batch, drop)
    v2 = apply(trained_like, batch["image"], T_MID, other, drop)
    for row in (0, 2):  # null caption: identical whatever the tokens
        np.testing.assert_array_equal(np.asarray(v1[row]), np.asarray(v2[row]))
    for row in (1, 3):
        assert max_abs(v1[row] - v2[row]) > 1e-4

    # Isolate cross-attention: caption embeddings with the same masked mean (hence the same
    # pooled conditioning) but different rows still change the output; masked rows do not.
    variant_params, variant_batch, forward = variant
    variant_params = perturb(variant_params, 3)
    emb = variant_batch["text_embedding"]
    shifted, padded_only = emb.copy(), emb.copy()
    shifted[:, 0] += 1.0
    shifted[:, 1] -= 1.0
    padded_only[:, 4:] = np.random.RandomState(1).randn(B, 2, 24)
    base = forward(variant_params, variant_batch)
    moved = forward(variant_params, dict(variant_batch, text_embedding=shifted))
    assert max_abs(base - moved) > 1e-4
    np.testing.assert_allclose(
        np.asarray(forward(variant_params, dict(variant_batch, text_embedding=padded_only))),
        np.asarray(base),
        atol=1e-6,
    )


# ----------------------------------------------------------------------------------------------
# Text encoder
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encode():
    """Jitted (features, pooled) of a 2-block text encoder."""
    graphdef, state = nnx.split(
        TextEncoder(width=32, depth=2, heads=2, max_length=L, rngs=nnx.Rngs(0))
    )
    return jit(lambda tokens, mask: nnx.merge(graphdef, state)(tokens, mask))


def test_text_encoder_is_causal(encode):
    batch = make_batch(lengths=(8, 8, 8, 8))
    features, _ = encode(batch["tokens"], batch["token_mask"])
    changed = batch["tokens"].copy()
    changed[:, 5] = (changed[:, 5] + 1000) % 49000
    features2, _ = encode(changed, batch["token_mask"])
    np.testing.assert_allclose(np.asarray(features2[:, :5]), np.asarray(features[:, :5]), atol=1e-6)
    assert np.abs(np.asarray(features2[:, 5:] - features[:, 5:])).max(axis=-1).min() > 1e-4


def test_padding_after_end_token_changes_neither_pooled_nor_dit(encode, proxy, trained_like, apply):
    batch = proxy[3]
    garbage = batch["tokens"].copy()
    pad = ~batch["token_mask"]
    garbage[pad] = np.random.RandomState(1).randint(0, 49000, pad.sum())
    features, pooled = encode(batch["tokens"], batch["token_mask"])
    _, pooled2 = encode(garbage, batch["token_mask"])
    np.testing.assert_allclose(np.asarray(pooled2), np.asarray(pooled), atol=1e-6)
    # pooled = the features at the end-of-text position (the last True of the mask).
    end = batch["token_mask"].sum(1) - 1
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(features)[np.arange(B), end])

    v1 = apply(trained_like, batch["image"], T_MID, batch, ZERO_DROP)
    v2 = apply(trained_like, batch["image"], T_MID, dict(batch, tokens=garbage), ZERO_DROP)
    np.testing.assert_allclose(np.asarray(v2), np.asarray(v1), atol=1e-6)


def test_frozen_text_encoder_is_not_trained(proxy):
    batch = proxy[3]
    graphdef, params, rest = init_proxy(
        ModelConfig(**{**vars(SMALL), "text_trainable": False}), batch, jax.random.key(0), L
    )

    def caption_energy(params):  # the caption path only (smaller to compile than the loss)
        context, _, pooled = nnx.merge(graphdef, params, rest).encode_caption(batch, ZERO_DROP)
        return jnp.sum(context**2) + jnp.sum(pooled**2)

    grads = jit(jax.grad(caption_energy))(params)
    assert "text_encoder" not in params and "text_encoder" in rest  # not trainable at all
    # Split the plain way (every Param trainable), the frozen encoder still passes no gradient.
    full_graph, all_params, other = nnx.split(nnx.merge(graphdef, params, rest), nnx.Param, ...)

    def full_energy(all_params):
        model = nnx.merge(full_graph, all_params, other)
        return jnp.sum(model.encode_caption(batch, ZERO_DROP)[0] ** 2)

    full_grads = jit(jax.grad(full_energy))(all_params)
    assert all(max_abs(g) == 0 for g in jax.tree.leaves(full_grads["text_encoder"]))
    assert max_abs(grads["text_proj"]["kernel"][...]) > 0
    assert max_abs(grads["pooled_proj"]["kernel"][...]) > 0


# ----------------------------------------------------------------------------------------------
# Rater
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rater(proxy):
    """(graphdef, params, rest) of a rater with the batch head, and jitted score/weight fns."""
    graphdef, params, rest = init_rater(RATER, proxy[3], jax.random.key(0), L)
    return (
        graphdef,
        params,
        rest,
        jit(rater_score_fn(graphdef, rest)),
        jit(rater_weight_fn(graphdef, rest, 0.5)),
    )


def test_rater_scores_do_not_depend_on_the_batch(rater):
    _, params, _, scores, _ = rater
    batch = make_batch(lengths=(3, 5, 8, 4))
    other = make_batch(seed=2, lengths=(6, 2, 7, 3))
    alone = scores(params, jax.tree.map(lambda a: a[1:2], batch))[0]
    mixed = jax.tree.map(lambda a, b: np.concatenate([b[:3], a[1:2]]), batch, other)
    np.testing.assert_allclose(float(scores(params, batch)[1]), float(alone), atol=1e-6)
    np.testing.assert_allclose(float(scores(params, mixed)[3]), float(alone), atol=1e-6)


def test_rater_weights_sum_to_batch_size_and_batch_head_starts_at_one(rater):
    graphdef, params, rest, scores, weights = rater
    batch = make_batch()
    w = weights(params, batch)  # temperature 0.5; b = 2 sigmoid(0) = 1 at init
    assert w.shape == (B,) and np.all(np.asarray(w) > 0)
    np.testing.assert_allclose(float(w.sum()), B, rtol=1e-6)
    u = scores(params, batch)
    np.testing.assert_allclose(np.asarray(w), B * np.asarray(jax.nn.softmax(u / 0.5)), rtol=1e-5)

    moved = nnx.State({**params, "batch_head": perturb(params["batch_head"], 4, scale=0.05)})
    w, u = weights(moved, batch), scores(moved, batch)
    b = float(w.sum()) / B
    assert 0 < b < 2 and abs(b - 1) > 1e-3
    np.testing.assert_allclose(
        np.asarray(w), B * b * np.asarray(jax.nn.softmax(u / 0.5)), rtol=1e-5
    )

    # Without the batch head: the same weights without the factor b (sum exactly B).
    g2, p2, r2 = init_rater(RaterConfig(width=32, hidden=32), batch, jax.random.key(0), L)
    assert "batch_head" not in p2
    w2 = jit(rater_weight_fn(g2, r2, 0.5))(p2, batch)
    np.testing.assert_allclose(float(w2.sum()), B, rtol=1e-6)
    assert np.all(np.asarray(w2) > 0)


def test_rater_on_latents_and_precomputed_text(variant):
    batch = variant[1]
    graphdef, params, rest = init_rater(RATER, batch, jax.random.key(0), L)
    assert "token_embedding" not in params
    assert params["conv1"]["kernel"].shape == (3, 3, 4, 8)  # the latent's 4 channels -> width/4
    u = jit(rater_score_fn(graphdef, rest))(params, batch)
    assert u.shape == (B,) and np.all(np.isfinite(np.asarray(u)))


# ----------------------------------------------------------------------------------------------
# The functional API under transformations
# ----------------------------------------------------------------------------------------------


def test_second_order_meta_gradient_matches_finite_differences(proxy, rater):
    """d/dphi of val_loss(theta - lr * grad_theta mean(w(phi) * loss(theta))), in float64."""
    graphdef, params, rest, batch = proxy
    r_graphdef, r_params, r_rest, _, _ = rater
    with jax.enable_x64(True):

        def to64(tree):
            return jax.tree.map(
                lambda a: (
                    jnp.asarray(np.asarray(a, np.float64))
                    if jnp.issubdtype(a.dtype, jnp.floating)
                    else a
                ),
                tree,
            )

        theta, phi = to64(perturb(params, 1)), to64(perturb(r_params, 2))
        train, val = to64(batch), to64(make_batch(seed=5))
        loss_fn = proxy_loss_fn(graphdef, rest, 0.25)
        rater_fn = rater_weight_fn(r_graphdef, r_rest, 1.0)

        def meta_loss(phi):
            def inner(theta):
                return jnp.mean(rater_fn(phi, train) * loss_fn(theta, train, jax.random.key(0)))

            new = jax.tree.map(lambda p, g: p - 0.5 * g, theta, jax.grad(inner)(theta))
            return jnp.mean(loss_fn(new, val, jax.random.key(1)))

        value_and_grad = jit(jax.value_and_grad(meta_loss))
        value, grad = value_and_grad(phi)
        assert value.dtype == jnp.float64
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grad))
        direction = perturb(jax.tree.map(lambda p: np.zeros(p.shape), phi), 7, scale=1.0)
        analytic = sum(
            float(np.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))
        )
        h = 1e-5
        plus = value_and_grad(perturb(phi, 7, scale=h))[0]  # phi + h * direction
        minus = value_and_grad(perturb(phi, 7, scale=-h))[0]
        assert abs(analytic) > 1e-8
        np.testing.assert_allclose(analytic, float(plus - minus) / (2 * h), rtol=1e-6)


def test_vmap_over_stacked_proxies_equals_separate_calls(proxy, loss_fn, jitted_loss):
    graphdef, params, rest, batch = proxy
    population = [perturb(params, 1), perturb(params, 2)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *population)
    together = jit(jax.vmap(loss_fn, in_axes=(0, None, None)))(stacked, batch, jax.random.key(0))
    assert together.shape == (2, B)
    for i, p in enumerate(population):
        np.testing.assert_allclose(
            np.asarray(together[i]), np.asarray(jitted_loss(p, batch, jax.random.key(0))), rtol=1e-5
        )
    assert not np.allclose(together[0], together[1])


# ----------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------


def test_sampler_with_guidance_one_is_conditional_euler(proxy, trained_like, apply):
    graphdef, _, rest, batch = proxy
    steps = 4

    @jit
    def guided(params, rng, guidance_scale):
        return sample(nnx.merge(graphdef, params, rest), batch, rng, steps, guidance_scale)

    x0 = guided(trained_like, jax.random.key(0), 1.0)
    assert x0.shape == (B, RES, RES, 1) and np.all(np.isfinite(np.asarray(x0)))
    x = jax.random.normal(jax.random.key(0), (B, RES, RES, 1))
    for i in range(steps):
        x = x - apply(trained_like, x, jnp.full((B,), 1 - i / steps), batch, ZERO_DROP) / steps
    np.testing.assert_allclose(np.asarray(x0), np.asarray(x), atol=1e-5)
    assert max_abs(guided(trained_like, jax.random.key(0), 3.0) - x0) > 1e-4

    captions_only = {k: batch[k] for k in ("tokens", "token_mask")}
    shaped = jax.eval_shape(
        lambda p: sample(
            nnx.merge(graphdef, p, rest),
            captions_only,
            jax.random.key(0),
            2,
            2.0,
            shape=(16, 16, 1),
        ),
        trained_like,
    )
    assert shaped.shape == (B, 16, 16, 1)
