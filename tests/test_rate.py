"""Rating runs: files written, staggered resets, resume equals an uninterrupted run."""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from alchemist_jax import rating
from alchemist_jax.config import ConfigError, load_config
from alchemist_jax.runtime import checkpoints

TINY = [
    "data.pool.train_size=96",
    "data.pool.validation_size=32",
    "data.batch_size=8",
    "data.max_text_length=16",
    "data.corrupt.fraction=0.3",
    "model.width=32",
    "model.depth=1",
    "model.heads=2",
    "model.text_width=32",
    "model.patch_size=7",
    "model.text_trainable=false",
    "model.text_depth=1",
    "model.text_heads=2",
    "rater.width=16",
    "rater.hidden=32",
    "rate.population=2",
    "rate.inner_steps=2",
    "rate.steps=4",
    "rate.val_batch_size=16",
    "rate.checkpoint_every=2",
    "rate.log_every=1",
    "rate.reset_every=2",
]


def _final_rater(workdir):
    manager = checkpoints.manager(workdir / "checkpoints", read_only=True)
    restored = manager.restore(
        manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
    return manager.latest_step(), restored["state"]


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_staggered_resets():
    schedule = {step: rating._proxies_to_reset(step, 8, 4) for step in range(1, 17)}
    assert schedule[2] == [3] and schedule[4] == [2] and schedule[6] == [1]
    assert schedule[8] == [0] and schedule[16] == [0] and schedule[1] == []
    assert rating._proxies_to_reset(5, 0, 4) == []


def test_rate_writes_outputs_and_resumes_identically(tmp_path):
    cfg = load_config("configs/demo.yaml", TINY)
    full, split = tmp_path / "full", tmp_path / "split"
    final = rating.run(cfg, full)
    assert set(final) >= {"meta_loss", "proxy_loss", "weight_entropy", "auroc/all", "auroc/noise"}
    assert np.isfinite(final["meta_loss"]) and 0 <= final["weight_entropy"] <= 1
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for name in ("config.yaml", "defects.parquet", "curves.png"):
        assert (full / name).exists(), name
    assert list((full / "tensorboard").iterdir())

    rating.run(cfg, split, stop_after=3)  # interrupted after 3 meta-steps (checkpoint at 2)
    assert not (split / "curves.png").exists()
    rating.run(cfg, split)  # the same command again resumes and finishes
    assert rating.run(cfg, split) == pytest.approx(final, rel=1e-5)  # once more: nothing to do
    (step_a, state_a), (step_b, state_b) = _final_rater(full), _final_rater(split)
    assert step_a == step_b == 4
    for a, b in zip(_leaves(state_a), _leaves(state_b)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_rerun_with_other_config_is_refused(tmp_path):
    cfg = load_config("configs/demo.yaml", TINY + ["rate.steps=1"])
    rating.run(cfg, tmp_path)
    other = load_config("configs/demo.yaml", TINY + ["rate.steps=2", "rate.rater_lr=0.1"])
    with pytest.raises(ConfigError, match=r"holds a different config \(section rate\)"):
        rating.run(other, tmp_path)
    # Sections a rating run does not read may change: the finished run is found complete.
    unrelated = load_config("configs/demo.yaml", TINY + ["rate.steps=1", "train.steps=500"])
    assert rating.run(unrelated, tmp_path) == rating.run(cfg, tmp_path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("rate.mode=lookahead", "rate.mode=lookahead needs rate.inner_steps=1"),
        ("rate.meta_every=1", "rate.meta_every (1) must be >= rate.inner_steps (2)"),
        ("rate.population=0", "config key 'rate.population' must be >= 1, got 0"),
        ("rate.unroll=0", "config key 'rate.unroll' must be >= 1, got 0"),
    ],
)
def test_config_cross_checks(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/demo.yaml", TINY + [override])


def test_meta_step_on_8_device_mesh_equals_1_device(tmp_path):
    """The jitted meta-gradient and meta-step with the batch split over 8 (fake CPU) devices give
    the 1-device result: the shardings change where the work runs, not what is computed.

    Compared: the rater's meta-gradient before its optimizer and the step's metrics. Not the
    rater after the step: Adam's first update is g / (|g| + eps), so where g is round-off its
    sign (which depends on the reduction order) decides the update.

    Tolerances from float32 (eps = 1.2e-7): each gradient element sums P * K * B = 32 per-sample
    terms through layers of width <= 48, so a different summation order moves it by at most
    ~1e3 eps relative to the gradient's scale; we allow 1e-4 of the global norm per element
    (measured: ~1e-7). The metrics are means over <= 32 terms: rtol 1e-5 (~100 eps)."""
    import os
    import subprocess
    import sys

    results = []
    for devices in (1, 8):
        out = tmp_path / f"mesh{devices}.npz"
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
        subprocess.run(
            [sys.executable, "tests/mesh_meta_step.py", str(devices), str(out)], check=True, env=env
        )
        results.append(np.load(out))
    one, eight = results
    assert sorted(one.files) == sorted(eight.files)
    grads = [name for name in one.files if name.startswith("grad[")]
    metrics = [name for name in one.files if not name.startswith("grad[")]
    assert len(grads) > 2 and len(metrics) == 13  # 6 metrics of each call + the finite flag
    global_norm = np.sqrt(sum(float(np.sum(one[name].astype(np.float64) ** 2)) for name in grads))
    assert global_norm > 0
    np.testing.assert_allclose(float(one["metric/rater_grad_norm"]), global_norm, rtol=1e-5)
    for name in grads:
        np.testing.assert_allclose(
            eight[name], one[name], rtol=1e-3, atol=1e-4 * global_norm, err_msg=name
        )
    for name in metrics:
        np.testing.assert_allclose(eight[name], one[name], rtol=1e-5, atol=1e-7, err_msg=name)
    # meta_gradient reports what meta_step applies.
    for name in metrics:
        if name.startswith("grad_metric/"):
            np.testing.assert_allclose(
                one[name], one["metric/" + name.split("/", 1)[1]], rtol=1e-6, err_msg=name
            )


def test_penalty_mode_with_warm_start_and_extra_proxy_steps(tmp_path):
    """The released scheme through the loop: λ follows 1 - 0.03 per validation epoch; warm-start
    steps and meta_every > K run the plain proxy steps (uniform, then rater-weighted)."""
    cfg = load_config(
        "configs/demo.yaml",
        TINY
        + [
            "rate.mode=penalty",
            "rate.meta_every=3",
            "rate.warm_start_steps=2",
            "rate.steps=3",
            "rate.checkpoint_every=3",
        ],
    )
    final = rating.run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # 16 validation samples per meta-step over a 32-sample validation set: half an epoch each.
    assert [r["penalty_lambda"] for r in rows] == pytest.approx([1.0, 0.985, 0.97])
    assert np.isfinite(final["meta_loss"]) and "auroc/all" in final


def test_caption_gap_meta_loss_is_true_minus_shuffled_captions(tmp_path):
    """rate.meta_loss=caption_gap: the validation objective is the proxy loss (no caption
    dropout) under the true captions minus under a derangement of the batch's captions, paired
    draws; a rating run with it logs that gap as its meta-loss."""
    import jax

    from alchemist_jax import config as config_lib
    from alchemist_jax import models
    from alchemist_jax.data import prepare_splits
    from alchemist_jax.runtime.parallel import model_inputs

    assert set(config_lib.META_LOSSES) == {"plain", "caption_gap"}
    cfg = load_config("configs/demo.yaml", TINY + ["rate.meta_loss=caption_gap", "rate.steps=2"])
    validation = prepare_splits(cfg.data).validation
    batch = model_inputs({k: np.stack([validation[i][k] for i in range(8)]) for k in validation[0]})
    graph, params, rest = models.init_proxy(
        cfg.model, batch, jax.random.key(0), cfg.data.max_text_length
    )
    assert rating.meta_loss_fn("plain", graph, rest) is None  # meta's default
    gap = rating.meta_loss_fn("caption_gap", graph, rest)
    with_plain = rating.meta_loss_fn("caption_gap", graph, rest, plain_weight=0.5)
    with pytest.raises(ValueError, match="unknown rate.meta_loss 'cfg'"):
        rating.meta_loss_fn("cfg", graph, rest)
    key = jax.random.key(1)
    loss = models.proxy_loss_fn(graph, rest, 0.0)
    shuffled = models.shuffled_captions(batch, jax.random.fold_in(key, models._PERMUTATION_SALT))
    assert not np.array_equal(shuffled["tokens"], batch["tokens"])
    np.testing.assert_array_equal(shuffled["image"], batch["image"])
    # float32 losses of O(1): the same computation up to fusion order, ~1e-6.
    np.testing.assert_allclose(
        gap(params, batch, key),
        loss(params, batch, key) - loss(params, shuffled, key),
        rtol=0,
        atol=1e-5,
    )
    # rate.gap_plain_weight adds that multiple of the loss under the true captions.
    np.testing.assert_allclose(
        with_plain(params, batch, key),
        1.5 * loss(params, batch, key) - loss(params, shuffled, key),
        rtol=0,
        atol=1e-5,
    )

    final = rating.run(cfg, tmp_path)
    assert np.isfinite(final["meta_loss"]) and "auroc/caption_swap" in final
    assert "meta_loss: caption_gap" in (tmp_path / "config.yaml").read_text()
