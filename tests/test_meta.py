"""meta.meta_gradient: exactness vs finite differences, references and hand-computed updates."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alchemist_jax import meta, models


@pytest.fixture(autouse=True, scope="module")
def float64():
    """Exactness tests need float64. Enabled for this module only: a module-level
    `jax.config.update` runs at collection and would switch every other test file to x64 too."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


B, B_VAL, D_IN, HIDDEN = 6, 5, 3, 40

# Compilation dominates this file's run time (2-5 s per meta-gradient on 2 cores); these tiny
# problems run in milliseconds either way, so skip XLA's expensive CPU backend passes (~2x faster).
jit = functools.partial(
    jax.jit,
    compiler_options={
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
    },
)


# ----------------------------------------------------------------------------- tiny problem
# Test data comes from NumPy: every eagerly called jax.random function compiles (0.5-1.5 s each).


def init_mlp(np_rng, sizes, scale=0.7):
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"w{i}"] = jnp.asarray(scale * np_rng.normal(size=(n_in, n_out)) / np.sqrt(n_in))
        params[f"b{i}"] = jnp.asarray(0.1 * np_rng.normal(size=(n_out,)))
    return params


def mlp(params, x):
    n = len(params) // 2
    for i in range(n):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < n - 1:
            x = jnp.tanh(x)
    return x


def proxy_loss(params, batch, rng):
    """Regression with input noise drawn from rng: per-example squared error (B,)."""
    noise = 0.1 * jax.random.normal(rng, batch["x"].shape)
    pred = mlp(params, batch["x"] + noise)[:, 0]
    return (pred - batch["y"]) ** 2


def rater_weights(params, batch):
    """w = B · softmax(u), u = MLP([x, y])."""
    features = jnp.concatenate([batch["x"], batch["y"][:, None]], axis=-1)
    logits = mlp(params, features)[:, 0]
    return logits.shape[0] * jax.nn.softmax(logits)


def make_problem(k_steps, seed=0):
    """(rater, proxy, train_batches (K, B, ...), val_batch, rng) of a noisy regression task."""
    np_rng = np.random.default_rng(seed)
    proxy = init_mlp(np_rng, [D_IN, HIDDEN, 1])  # 201 params
    rater = init_mlp(np_rng, [D_IN + 1, 8, 1])  # 49 params
    x = np_rng.normal(size=(k_steps, B, D_IN))
    train = {"x": x, "y": np.sin(x.sum(-1)) + 0.3 * np_rng.normal(size=(k_steps, B))}
    vx = np_rng.normal(size=(B_VAL, D_IN))
    val = {"x": vx, "y": np.sin(vx.sum(-1)) + 0.05 * np_rng.normal(size=(B_VAL,))}
    as_jax = lambda tree: jax.tree.map(jnp.asarray, tree)
    return rater, proxy, as_jax(train), as_jax(val), jax.random.PRNGKey(seed)


def random_like(tree, seed):
    np_rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np_rng.normal(size=np.shape(x)), tree)


def shifted(tree, direction, t):
    return jax.tree.map(lambda p, v: np.asarray(p) + t * v, tree, direction)


def tree_dot(a, b):
    return sum(float(np.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_max_abs_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def tree_max_abs(a):
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(a))


def meta_fn(opt_name, **kwargs):
    return functools.partial(
        meta.meta_gradient,
        rater_fn=rater_weights,
        loss_fn=proxy_loss,
        inner_opt=INNER_OPTS[opt_name],
        **kwargs,
    )


@functools.cache
def jitted(opt_name, **kwargs):
    """One jitted meta_gradient per (optimizer, options): tests share compilations."""
    return jit(meta_fn(opt_name, **kwargs))


def assert_trees_close(a, b, atol=1e-10):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    err = tree_max_abs_diff(a, b)
    assert err <= atol * max(1.0, tree_max_abs(a)), err


# ----------------------------------------------------------------------------- exactness

INNER_OPTS = {
    "sgd": optax.sgd(0.1),
    "momentum": optax.sgd(0.05, momentum=0.9),
    "adam": optax.adam(0.01, eps=1e-6, eps_root=1e-12),
}


def warm_opt_state(opt_name, proxy):
    """Optimizer state after 3 updates with gradient-sized random gradients: a warm proxy.

    Adam's very first step is ≈ lr·sign(g) when eps is tiny; its meta-gradient is exact but its
    curvature is so large that finite differences need h ≲ 1e-7. A warm state has v ≫ eps².
    """
    grads = [jax.tree.map(lambda g: 0.3 * g, random_like(proxy, 50 + k)) for k in range(3)]
    return _warm_opt_state(opt_name, proxy, grads)


@functools.partial(jit, static_argnums=0)
def _warm_opt_state(opt_name, proxy, grads):
    inner_opt = INNER_OPTS[opt_name]
    state = inner_opt.init(proxy)
    for g in grads:
        _, state = inner_opt.update(g, state, proxy)
    return state


def directional_fd(f, h=1e-4):
    """Fourth-order central difference of a scalar function of one variable at 0."""
    return (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)


@pytest.mark.parametrize("k_steps", [1, 3])
@pytest.mark.parametrize("opt_name", list(INNER_OPTS))
def test_unrolled_matches_finite_differences(opt_name, k_steps):
    rater, proxy, train, val, rng = make_problem(k_steps)
    fn = jitted(opt_name)
    opt_state = warm_opt_state(opt_name, proxy)
    grads, aux = fn(rater, proxy, opt_state, train, val, rng)
    assert aux["weights"].shape == aux["inner_losses"].shape == (k_steps, B)
    np.testing.assert_allclose(aux["weights"].sum(-1), B, rtol=1e-12)

    for i in range(3):
        d = random_like(rater, 100 + i)
        meta_loss = lambda t: float(
            fn(shifted(rater, d, t), proxy, opt_state, train, val, rng)[1]["meta_loss"]
        )
        fd = directional_fd(meta_loss)
        analytic = tree_dot(grads, d)
        rel = abs(analytic - fd) / abs(fd)  # measured ≤ 3e-10
        assert rel <= 1e-6, (opt_name, k_steps, i, analytic, fd, rel)


def unrolled_reference(rater, proxy, opt_state, train, val, rng, inner_opt):
    """Plain Python loop, no scan, no remat, no custom VJP: (meta_grads, aux)."""
    k_steps = train["x"].shape[0]

    def meta_loss(phi):
        theta, s, weights, losses = proxy, opt_state, [], []
        for k in range(k_steps):
            batch = jax.tree.map(lambda x: x[k], train)
            key = jax.random.fold_in(rng, k)
            w = rater_weights(phi, batch)
            g, step_losses = jax.grad(
                lambda th: (jnp.mean(w * proxy_loss(th, batch, key)), proxy_loss(th, batch, key)),
                has_aux=True,
            )(theta)
            updates, s = inner_opt.update(g, s, theta)
            theta = optax.apply_updates(theta, updates)
            weights.append(w)
            losses.append(step_losses)
        loss = jnp.mean(proxy_loss(theta, val, jax.random.fold_in(rng, k_steps)))
        return loss, dict(
            meta_loss=loss,
            proxy_params=theta,
            inner_opt_state=s,
            weights=jnp.stack(weights),
            inner_losses=jnp.stack(losses),
        )

    return jax.grad(meta_loss, has_aux=True)(rater)


def test_unrolled_variants_agree():
    """remat none/full/dots, mixed mode, an unrolled scan and a Python-loop reference: one
    function, ≤ 1e-10."""
    opt_name, inner_opt = "adam", INNER_OPTS["adam"]
    rater, proxy, train, val, rng = make_problem(3)
    opt_state = warm_opt_state(opt_name, proxy)
    ref_grads, ref_aux = jit(unrolled_reference, static_argnums=6)(
        rater, proxy, opt_state, train, val, rng, inner_opt
    )
    variants = {
        "full": jitted(opt_name),
        "mixed": jitted(opt_name, mixed_mode=True),
        "none": jitted(opt_name, remat="none"),
        "dots": jitted(opt_name, remat="dots"),
        "unroll": jitted(opt_name, unroll=True),
        "unroll_mixed": jitted(opt_name, unroll=2, mixed_mode=True),
    }
    for fn in variants.values():
        grads, aux = fn(rater, proxy, opt_state, train, val, rng)
        assert_trees_close(ref_grads, grads)  # measured ≤ 3e-16 relative
        # The same real proxy steps and reports, whichever way the gradient is taken.
        for key, ref in ref_aux.items():
            assert_trees_close(ref, aux[key], atol=1e-12)


# ----------------------------------------------------------------------------- val objective

# The toy analogue of `rate.meta_loss=caption_gap`: the inputs x are the "caption" of the target
# y, and the objective is the validation loss under the true x minus under a derangement of them.
gap_loss = models.caption_gap_loss_fn(proxy_loss, fields=("x",))


def test_shuffled_captions_is_a_derangement_fixed_by_the_key():
    batch = {"x": jnp.arange(7.0)[:, None] * jnp.ones((1, 3)), "y": jnp.arange(7.0)}
    key = jax.random.PRNGKey(3)
    shuffled = models.shuffled_captions(batch, key, fields=("x",))
    moved = np.asarray(shuffled["x"][:, 0]).astype(int)
    assert sorted(moved) == list(range(7))  # a permutation of the rows
    assert np.all(moved != np.arange(7))  # no row keeps its own caption
    np.testing.assert_array_equal(shuffled["y"], batch["y"])  # only the caption moves
    again = models.shuffled_captions(batch, key, fields=("x",))
    np.testing.assert_array_equal(again["x"], shuffled["x"])


@pytest.mark.parametrize("variant", ["plain", "mixed", "lookahead"])
def test_val_loss_fn_caption_gap_matches_finite_differences(variant):
    """meta_gradient(val_loss_fn=gap): the meta-loss is the gap's mean at the proxy after the
    steps, and its gradient matches fourth-order finite differences in float64."""
    k_steps = 1 if variant == "lookahead" else 2
    rater, proxy, train, val, rng = make_problem(k_steps, seed=1)
    options = {"plain": {}, "mixed": {"mixed_mode": True}}.get(
        variant, {"mode": "lookahead", "lookahead_lr": 0.1}
    )
    fn = jitted("adam", val_loss_fn=gap_loss, **options)
    opt_state = warm_opt_state("adam", proxy)
    grads, aux = fn(rater, proxy, opt_state, train, val, rng)
    if variant != "lookahead":  # the meta-loss is the gap at the returned proxy
        val_key = jax.random.fold_in(rng, k_steps)
        direct = gap_loss(aux["proxy_params"], val, val_key)
        np.testing.assert_allclose(aux["val_losses"], direct, rtol=0, atol=1e-12)
        np.testing.assert_allclose(aux["meta_loss"], jnp.mean(direct), rtol=0, atol=1e-12)
    for i in range(3):
        d = random_like(rater, 200 + i)
        meta_loss = lambda t: float(
            fn(shifted(rater, d, t), proxy, opt_state, train, val, rng)[1]["meta_loss"]
        )
        fd = directional_fd(meta_loss)
        rel = abs(tree_dot(grads, d) - fd) / abs(fd)
        assert rel <= 1e-6, (variant, i, tree_dot(grads, d), fd, rel)


def test_val_loss_fn_defaults_to_loss_fn_and_leaves_the_proxy_steps_alone():
    rater, proxy, train, val, rng = make_problem(2)
    opt_state = warm_opt_state("adam", proxy)
    default = jitted("adam")(rater, proxy, opt_state, train, val, rng)
    explicit = jitted("adam", val_loss_fn=proxy_loss)(rater, proxy, opt_state, train, val, rng)
    gap = jitted("adam", val_loss_fn=gap_loss)(rater, proxy, opt_state, train, val, rng)
    assert_trees_close(default[0], explicit[0], atol=0.0)
    # Another objective changes the meta-gradient, never the real proxy steps or the weights.
    for key in ("proxy_params", "inner_opt_state", "weights", "inner_losses"):
        assert_trees_close(default[1][key], gap[1][key], atol=0.0)
    assert tree_max_abs_diff(default[0], gap[0]) > 1e-3 * tree_max_abs(default[0])


def test_nested_group_count_is_the_divisor_closest_to_sqrt_k():
    counts = {k: meta.nested_group_count(k) for k in (1, 2, 3, 4, 6, 8, 9, 12, 16, 18, 64)}
    assert counts == {1: 1, 2: 1, 3: 1, 4: 2, 6: 2, 8: 2, 9: 3, 12: 3, 16: 4, 18: 3, 64: 8}
    with pytest.raises(ValueError, match="K must be >= 1, got 0"):
        meta.nested_group_count(0)


def test_nested_remat_equals_full_and_holds_fewer_carries():
    """K = 16 in G = 4 checkpointed groups: the same function as remat="full" (≤ 1e-10, also with
    the mixed-mode VJP), and XLA's temporary buffers hold G + K/G = 8 carries instead of 16."""
    opt_name = "adam"
    rater, proxy, train, val, rng = make_problem(16)
    args = (rater, proxy, warm_opt_state(opt_name, proxy), train, val, rng)
    compiled = {
        name: jit(meta_fn(opt_name, **kwargs)).lower(*args).compile()
        for name, kwargs in [
            ("full", {}),
            ("nested", dict(remat="nested")),
            ("mixed", dict(remat="nested", mixed_mode=True)),
        ]
    }
    ref_grads, ref_aux = compiled["full"](*args)
    for name in ("nested", "mixed"):
        grads, aux = compiled[name](*args)
        assert_trees_close(ref_grads, grads)  # measured ≤ 1e-15
        for key, ref in ref_aux.items():
            assert_trees_close(ref, aux[key], atol=1e-12)
    temp = {name: c.memory_analysis().temp_size_in_bytes for name, c in compiled.items()}
    # Measured 96 KB (full) and 61 KB (nested, mixed); a carry (θ and Adam's two moments, 201
    # float64 each) is 4.8 KB.
    assert temp["nested"] <= 0.75 * temp["full"], temp
    assert temp["mixed"] <= 0.75 * temp["full"], temp


def test_lookahead_equals_unrolled_k1_sgd():
    lr = 0.1  # = INNER_OPTS["sgd"]: shares the unrolled compilation with the FD test
    rater, proxy, train, val, rng = make_problem(1)
    adam = INNER_OPTS["adam"]
    adam_state = warm_opt_state("adam", proxy)
    g_look, aux_look = jitted("adam", mode="lookahead", lookahead_lr=lr)(
        rater, proxy, adam_state, train, val, rng
    )
    sgd = INNER_OPTS["sgd"]
    g_unr, aux_unr = jitted("sgd")(rater, proxy, sgd.init(proxy), train, val, rng)
    assert_trees_close(g_unr, g_look)
    assert abs(float(aux_look["meta_loss"] - aux_unr["meta_loss"])) <= 1e-12

    @jit
    def real_step(rater, proxy, adam_state, train, rng):
        """One step of the caller's optimizer on the same, constant-weight gradient."""
        batch, key = jax.tree.map(lambda x: x[0], train), jax.random.fold_in(rng, 0)
        w = rater_weights(rater, batch)
        g = jax.grad(lambda th: jnp.mean(w * proxy_loss(th, batch, key)))(proxy)
        updates, s = adam.update(g, adam_state, proxy)
        return optax.apply_updates(proxy, updates), s, w

    proxy_1, s, w = real_step(rater, proxy, adam_state, train, rng)
    assert_trees_close(proxy_1, aux_look["proxy_params"], atol=1e-12)
    assert_trees_close(s, aux_look["inner_opt_state"], atol=1e-12)
    np.testing.assert_allclose(aux_look["weights"], w[None], rtol=1e-12)
    assert aux_look["inner_losses"].shape == (1, B)


# ----------------------------------------------------------------------------- penalty


def toy_loss(params, batch, rng):
    del rng
    return (params["theta"] - batch["x"]) ** 2


def toy_rater(params, batch):
    return batch["x"].shape[0] * jax.nn.softmax(params["phi"] * batch["x"])


def toy_penalty(rater, proxy, train, val, lam, lr=0.1):
    opt = optax.sgd(lr)
    return meta.meta_gradient(
        rater,
        proxy,
        opt.init(proxy),
        train,
        val,
        jax.random.PRNGKey(0),
        rater_fn=toy_rater,
        loss_fn=toy_loss,
        inner_opt=opt,
        mode="penalty",
        penalty_lambda=lam,
    )


def test_penalty_one_step_by_hand():
    # x = (1, 3), φ = ln(3)/2 -> softmax (1/4, 3/4), w = (0.5, 1.5); θ0 = 0, val v = (2, 4).
    # Proxy:  ∇θ [λ·mean(θ−v)² + (1−λ)·mean w(θ−x)²] at 0 = 0.25·(−6) + 0.75·(−5) = −5.25,
    #         θ1 = 0 − 0.1·(−5.25) = 0.525.  meta_loss = mean((0.525−2)², (0.525−4)²) = 7.125625.
    # Rater:  ℓ(θ0) = (1, 9), x̄_w = 2.5, d/dφ mean w_i ℓ_i = ½ Σ w_i (x_i − x̄_w) ℓ_i
    #         = ½ (0.5·(−1.5)·1 + 1.5·0.5·9) = 3.0.  rater_loss = mean(0.5·1, 1.5·9) = 7.0.
    rater = {"phi": jnp.array(np.log(3.0) / 2)}
    proxy = {"theta": jnp.array(0.0)}
    grads, aux = toy_penalty(
        rater, proxy, {"x": jnp.array([[1.0, 3.0]])}, {"x": jnp.array([2.0, 4.0])}, lam=0.25
    )
    np.testing.assert_allclose(grads["phi"], 3.0, rtol=1e-12)
    np.testing.assert_allclose(aux["proxy_params"]["theta"], 0.525, rtol=1e-12)
    np.testing.assert_allclose(aux["meta_loss"], 7.125625, rtol=1e-12)
    np.testing.assert_allclose(aux["rater_loss"], 7.0, rtol=1e-12)
    np.testing.assert_allclose(aux["weights"], [[0.5, 1.5]], rtol=1e-12)
    np.testing.assert_allclose(aux["inner_losses"], [[1.0, 9.0]], rtol=1e-12)


def test_penalty_two_steps_closed_form():
    phi, lam, lr = 0.3, 0.6, 0.1
    xs = [(1.0, 3.0), (-1.0, 2.0)]
    v = (2.0, 4.0)
    theta, rater_grads, rater_losses = 0.0, [], []
    for x1, x2 in xs:
        e1, e2 = np.exp(phi * x1), np.exp(phi * x2)
        w1, w2 = 2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)
        xbar = (e1 * x1 + e2 * x2) / (e1 + e2)
        l1, l2 = (theta - x1) ** 2, (theta - x2) ** 2
        rater_grads.append(0.5 * (w1 * (x1 - xbar) * l1 + w2 * (x2 - xbar) * l2))
        rater_losses.append(0.5 * (w1 * l1 + w2 * l2))
        grad_val = (2 * (theta - v[0]) + 2 * (theta - v[1])) / 2
        grad_train = (w1 * 2 * (theta - x1) + w2 * 2 * (theta - x2)) / 2
        theta -= lr * (lam * grad_val + (1 - lam) * grad_train)
    grads, aux = toy_penalty(
        {"phi": jnp.array(phi)},
        {"theta": jnp.array(0.0)},
        {"x": jnp.array(xs)},
        {"x": jnp.array(v)},
        lam=lam,
        lr=lr,
    )
    np.testing.assert_allclose(grads["phi"], np.mean(rater_grads), rtol=1e-12)
    np.testing.assert_allclose(aux["rater_loss"], np.mean(rater_losses), rtol=1e-12)
    np.testing.assert_allclose(aux["proxy_params"]["theta"], theta, rtol=1e-12)
    np.testing.assert_allclose(
        aux["meta_loss"], ((theta - 2) ** 2 + (theta - 4) ** 2) / 2, rtol=1e-12
    )


def test_penalty_lambda_schedule_has_no_floor():
    assert meta.penalty_lambda_at(0) == 1.0
    np.testing.assert_allclose(meta.penalty_lambda_at(10), 0.7)
    np.testing.assert_allclose(meta.penalty_lambda_at(34), -0.02)
    np.testing.assert_allclose(meta.penalty_lambda_at(2, start=0.5, decay=0.1), 0.3)
    np.testing.assert_allclose(jit(meta.penalty_lambda_at)(jnp.array(5)), 0.85)


# ----------------------------------------------------------------------------- default Adam


def embed_loss(params, batch, rng):
    """A one-hot (dense matmul) embedding lookup, as on TPUs.

    With a gather lookup (`emb[ids]`) the NaN that eps_root = 0 creates stays in the cotangents of
    the unused rows, which the transposed gather never reads, so the meta-gradient happens to stay
    finite; any dense op over the table (one-hot matmul, weight decay, a norm) spreads it.
    """
    del rng
    pred = jax.nn.one_hot(batch["ids"], params["emb"].shape[0]) @ params["emb"] @ params["w"]
    return (pred - batch["y"]) ** 2


def embed_rater(params, batch):
    logits = params["a"] * batch["y"] + params["c"][batch["ids"]]
    return batch["y"].shape[0] * jax.nn.softmax(logits)


def embed_problem():
    np_rng = np.random.default_rng(3)
    proxy = {
        "emb": jnp.asarray(np_rng.normal(size=(6, 4))),
        "w": jnp.asarray(np_rng.normal(size=4)),
    }
    rater = {"a": jnp.array(0.3), "c": jnp.asarray(0.1 * np_rng.normal(size=6))}
    # Rows 4 and 5 of the embedding never appear: their gradient is exactly zero.
    ids = jnp.array([[0, 1, 2, 3, 0, 1], [2, 3, 0, 1, 2, 3]])
    train = {"ids": ids, "y": jnp.asarray(np_rng.normal(size=ids.shape))}
    val = {"ids": jnp.array([0, 1, 2, 3]), "y": jnp.array([0.5, -0.5, 1.0, 0.0])}
    return rater, proxy, train, val


EMBED_OPTS = {
    "default": meta.inner_optimizer(0.05),
    "eps_root=0": optax.adam(0.05, eps=1e-3, eps_root=0.0),
}


@functools.cache
def embed_fn(opt_name, mixed_mode=False):
    return jit(
        functools.partial(
            meta.meta_gradient,
            rater_fn=embed_rater,
            loss_fn=embed_loss,
            inner_opt=EMBED_OPTS[opt_name],
            mixed_mode=mixed_mode,
        )
    )


@pytest.mark.parametrize("mixed", [False, True])
def test_default_adam_is_finite_with_zero_gradients_and_eps_root_zero_is_not(mixed):
    rater, proxy, train, val = embed_problem()
    rng = jax.random.PRNGKey(0)
    # (the NaN is the same in mixed mode; one compilation of it is enough)
    cases = [("default", True)] if mixed else [("default", True), ("eps_root=0", False)]
    for opt_name, finite in cases:
        opt_state = EMBED_OPTS[opt_name].init(proxy)
        grads, aux = embed_fn(opt_name, mixed)(rater, proxy, opt_state, train, val, rng)
        assert np.isfinite(aux["meta_loss"])  # the forward pass is always fine...
        if finite:
            assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
            assert tree_max_abs(grads) > 0
        else:  # ...the meta-gradient is not without eps_root (0 · ∞ in d sqrt(v) at v = 0)
            assert bool(jnp.isnan(grads["a"]))


def test_default_adam_meta_gradient_matches_finite_differences():
    rater, proxy, train, val = embed_problem()
    fn, opt_state = embed_fn("default"), EMBED_OPTS["default"].init(proxy)
    rng = jax.random.PRNGKey(0)
    grads, _ = fn(rater, proxy, opt_state, train, val, rng)
    d = {"a": np.array(0.7), "c": np.linspace(-1.0, 1.0, 6)}
    loss = lambda t: float(
        fn(shifted(rater, d, t), proxy, opt_state, train, val, rng)[1]["meta_loss"]
    )
    np.testing.assert_allclose(tree_dot(grads, d), directional_fd(loss), rtol=1e-6)


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("mixed", [False, True])
def test_vmap_over_population_equals_separate_calls(mixed):
    opt_name = "adam"
    rater, proxy_a, train_a, val, rng = make_problem(3)
    _, proxy_b, train_b, _, _ = make_problem(3, seed=5)
    stack = lambda a, b: jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)
    states = [warm_opt_state(opt_name, proxy_a), warm_opt_state(opt_name, proxy_b)]
    kwargs = dict(mixed_mode=True) if mixed else {}
    pop = jit(jax.vmap(meta_fn(opt_name, **kwargs), in_axes=(None, 0, 0, 0, None, None)))(
        rater, stack(proxy_a, proxy_b), stack(*states), stack(train_a, train_b), val, rng
    )
    for i, (proxy, train) in enumerate([(proxy_a, train_a), (proxy_b, train_b)]):
        single = jitted(opt_name, **kwargs)(rater, proxy, states[i], train, val, rng)
        assert_trees_close(single, jax.tree.map(lambda x: x[i], pop))


def test_penalty_under_vmap_and_jit():
    rater = {"phi": jnp.array(0.3)}
    proxies = {"theta": jnp.array([0.0, 1.0])}
    train = {"x": jnp.array([[[1.0, 3.0], [-1.0, 2.0]], [[0.5, 0.0], [2.0, 2.0]]])}
    val = {"x": jnp.array([2.0, 4.0])}
    fn = functools.partial(toy_penalty, val=val, lam=0.6)
    pop = jit(jax.vmap(fn, in_axes=(None, 0, 0)))(rater, proxies, train)
    for i in range(2):
        member = lambda tree: jax.tree.map(lambda x: x[i], tree)
        single = fn(rater, member(proxies), member(train))
        assert_trees_close(single, jax.tree.map(lambda x: x[i], pop))


def test_nnx_state_params_and_typed_keys_in_mixed_mode():
    """nnx.State pytrees for both models and a new-style typed key through the custom VJP."""
    np_rng = np.random.default_rng(11)
    init = lambda key, shape, dtype: jnp.asarray(np_rng.normal(size=shape) / shape[0], dtype)
    linear = lambda n_in, n_out: nnx.Linear(
        n_in, n_out, kernel_init=init, bias_init=init, param_dtype=jnp.float64, rngs=nnx.Rngs(0)
    )
    proxy_model = nnx.Sequential(linear(D_IN, 8), jnp.tanh, linear(8, 1))
    rater_model = linear(D_IN + 1, 1)
    proxy_def, proxy_state = nnx.split(proxy_model, nnx.Param)
    rater_def, rater_state = nnx.split(rater_model, nnx.Param)

    def loss_fn(params, batch, rng):
        model = nnx.merge(proxy_def, params)
        x = batch["x"] + 0.1 * jax.random.normal(rng, batch["x"].shape)
        return (model(x)[:, 0] - batch["y"]) ** 2

    def rater_fn(params, batch):
        model = nnx.merge(rater_def, params)
        logits = model(jnp.concatenate([batch["x"], batch["y"][:, None]], -1))[:, 0]
        return logits.shape[0] * jax.nn.softmax(logits)

    _, _, train, val, _ = make_problem(2, seed=6)
    rng = jax.random.key(7)
    opt = meta.inner_optimizer(1e-2)
    fn = jit(
        functools.partial(
            meta.meta_gradient, rater_fn=rater_fn, loss_fn=loss_fn, inner_opt=opt, mixed_mode=True
        )
    )
    opt_state = opt.init(proxy_state)
    grads, aux = fn(rater_state, proxy_state, opt_state, train, val, rng)
    assert isinstance(grads, nnx.State) and isinstance(aux["proxy_params"], nnx.State)
    d = random_like(rater_state, 7)
    meta_loss = lambda t: float(
        fn(shifted(rater_state, d, t), proxy_state, opt_state, train, val, rng)[1]["meta_loss"]
    )
    np.testing.assert_allclose(tree_dot(grads, d), directional_fd(meta_loss), rtol=1e-6)


# ----------------------------------------------------------------------------- validation


def test_argument_errors():
    rater, proxy, train, val, rng = make_problem(2)
    opt = optax.sgd(0.1)
    call = functools.partial(
        meta.meta_gradient,
        rater,
        proxy,
        opt.init(proxy),
        train,
        val,
        rng,
        rater_fn=rater_weights,
        loss_fn=proxy_loss,
        inner_opt=opt,
    )
    with pytest.raises(ValueError, match="unrolled, lookahead, penalty"):
        call(mode="exact")
    with pytest.raises(ValueError, match="none, full, dots, nested"):
        call(remat="everything")
    with pytest.raises(ValueError, match="mixed_mode"):
        call(mode="penalty", mixed_mode=True, penalty_lambda=1.0)
    with pytest.raises(ValueError, match="leading axis K"):
        call(mode="lookahead", lookahead_lr=0.1)
    with pytest.raises(ValueError, match="lookahead_lr"):
        meta.meta_gradient(
            rater,
            proxy,
            opt.init(proxy),
            jax.tree.map(lambda x: x[:1], train),
            val,
            rng,
            rater_fn=rater_weights,
            loss_fn=proxy_loss,
            inner_opt=opt,
            mode="lookahead",
        )
    with pytest.raises(ValueError, match="penalty_lambda"):
        call(mode="penalty")
    bad = {"x": train["x"], "y": train["y"][:1]}
    with pytest.raises(ValueError, match=r"leading axis K.*\['x'\]: 2.*\['y'\]: 1"):
        meta.meta_gradient(
            rater,
            proxy,
            opt.init(proxy),
            bad,
            val,
            rng,
            rater_fn=rater_weights,
            loss_fn=proxy_loss,
            inner_opt=opt,
        )
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        meta.meta_gradient(
            rater,
            proxy,
            opt.init(proxy),
            train,
            val,
            rng,
            rater_fn=rater_weights,
            inner_opt=opt,
            loss_fn=lambda p, b, r: proxy_loss(p, b, r)[:, None],
        )


def test_defaults():
    assert meta.DEFAULT_K == 4
    params = {"e": jnp.ones(3)}
    opt = meta.inner_optimizer(0.1)
    updates, _ = opt.update({"e": jnp.array([1.0, 1e-3, 0.0])}, opt.init(params), params)
    # First Adam step: -lr · g / (sqrt(g² + eps_root) + eps) with eps = 1e-3, eps_root = 1e-12.
    expected = [-0.1 / (1 + 1e-3), -0.1 * 1e-3 / (np.sqrt(1e-6 + 1e-12) + 1e-3), 0.0]
    np.testing.assert_allclose(updates["e"], expected, rtol=1e-12)
