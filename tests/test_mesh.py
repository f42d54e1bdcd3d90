"""Named meshes on fake CPU devices: FSDP, the population axis and data parallelism change where
the work runs, not what is computed; outputs carry the intended shardings; checkpoints move
between meshes.

Each mesh runs in its own process (`tests/mesh_programs.py`: the fake device count must be set
before jax loads), computing every step at once: (data, fsdp, population) = (2, 2, 2) first (it
saves a checkpoint of its state after a proxy step and a reset), then (8, 1, 1), (4, 2, 1)
(restores the checkpoint on its 8 devices and on 2 of them) and 1 device (restores it there)
side by side. The helper
asserts the PartitionSpecs of the states, batches and outputs, and that `reset_proxy` compiles
to no collective (resetting a proxy gathers nothing); a failed assertion fails its process.

Tolerances come from float32 (eps = 1.2e-7) and the reduction sizes of the tiny model (widths
<= 64, P * K * B = 32 samples per meta-gradient, 8 per train step): a different summation order
moves a sum of n terms by <= ~n eps of its scale, so
  - gradients (the meta-gradient, AdamW's first moment = 0.1 x the clipped gradient) through the
    layers' sums of <= 64 x 32 terms: 1e-4 of the gradient's global norm per element (~1e3 eps;
    measured <= 1e-6), rtol 1e-3;
  - means over <= 32 samples (losses, metrics) and the rater's per-row scores: rtol 1e-5;
  - proxies after one inner Adam step (lr 1e-3, eps 1e-3): the update lr g / (|g| + eps) moves
    by <= (lr / eps) |dg| = |dg| <= 1e-4 |g| with |g| <= ~0.1 here, so atol 1e-5 (parameters
    themselves are O(0.1): rtol 1e-5);
  - a checkpoint restores bit-for-bit (same values, any mesh).
Never compared: values after Adam's first step of the rater (its update g / (|g| + 1e-8) turns
round-off into signs).
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

MESHES = ((8, 1, 1), (4, 2, 1), (2, 2, 2))


def _run(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "tests/mesh_programs.py", *args],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"mesh_programs.py {' '.join(args)}:\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{mesh: npz} of the 1-device run ("1") and of each 8-device mesh ("8,1,1" ...)."""
    folder = tmp_path_factory.mktemp("mesh")
    checkpoint = folder / "checkpoint"
    out = {"1": folder / "one.npz", **{m: folder / f"{'_'.join(map(str, m))}.npz" for m in MESHES}}
    _run(["8", "2", "2", "2", str(out[(2, 2, 2)]), "--save", str(checkpoint)])
    jobs = [
        ["8", "8", "1", "1", str(out[(8, 1, 1)])],
        ["8", "4", "2", "1", str(out[(4, 2, 1)]), "--restore", str(checkpoint)],
        ["1", "1", "1", "1", str(out["1"]), "--restore", str(checkpoint)],
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(_run, jobs))
    return {key: dict(np.load(path)) for key, path in out.items()}


def _global_norm(arrays: dict, prefix: str) -> float:
    return float(
        np.sqrt(
            sum(
                np.sum(v.astype(np.float64) ** 2) for k, v in arrays.items() if k.startswith(prefix)
            )
        )
    )


@pytest.mark.parametrize("mesh", MESHES)
def test_meta_gradient_equals_one_device(results, mesh):
    one, many = results["1"], results[mesh]
    grads = [k for k in one if k.startswith("grad[")]
    assert len(grads) > 5
    norm = _global_norm(one, "grad[")
    assert norm > 0
    for name in grads:
        np.testing.assert_allclose(many[name], one[name], rtol=1e-3, atol=1e-4 * norm, err_msg=name)
    for name in (k for k in one if k.startswith("metric/")):
        np.testing.assert_allclose(many[name], one[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("mesh", MESHES)
def test_proxy_step_and_scores_equal_one_device(results, mesh):
    one, many = results["1"], results[mesh]
    proxies = [k for k in one if k.startswith("proxy[")]
    assert len(proxies) > 5
    for name in proxies:
        np.testing.assert_allclose(many[name], one[name], rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(many["score"], one["score"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh", MESHES)
def test_train_step_equals_one_device(results, mesh):
    one, many = results["1"], results[mesh]
    np.testing.assert_allclose(many["train/loss"], one["train/loss"], rtol=1e-5)
    moments = [k for k in one if k.startswith("train/mu")]
    norm = _global_norm(one, "train/mu")
    assert len(moments) > 5 and norm > 0
    for name in moments:
        np.testing.assert_allclose(many[name], one[name], rtol=1e-3, atol=1e-4 * norm, err_msg=name)


def test_checkpoint_from_8_devices_restores_on_2_and_1(results):
    saved = {k[len("saved") :]: v for k, v in results[(2, 2, 2)].items() if k.startswith("saved")}
    assert len(saved) > 10
    for run, prefix in (("1", "restored"), ((4, 2, 1), "restored"), ((4, 2, 1), "restored2")):
        restored = {
            k[len(prefix) :]: v for k, v in results[run].items() if k.startswith(prefix + "[")
        }
        assert restored.keys() == saved.keys()
        for name, value in saved.items():
            np.testing.assert_array_equal(restored[name], value, err_msg=f"{run} {prefix}{name}")
    # The same next meta-step from the restored state (float32 means over 32 samples: rtol 1e-5).
    for name in (k for k in results["1"] if k.startswith("next/")):
        np.testing.assert_allclose(
            results["1"][name], results[(2, 2, 2)][name], rtol=1e-5, atol=1e-7, err_msg=name
        )
