"""Helper for test_rate.py: the meta-gradient and one meta-step of the tiny rating program on a
mesh of N devices.

Run as `python tests/mesh_meta_step.py N OUT.npz` (N fake CPU devices, set before jax loads).
"""

import os
import sys

devices, out = int(sys.argv[1]), sys.argv[2]
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from alchemist_jax import rating  # noqa: E402
from alchemist_jax.config import load_config  # noqa: E402
from alchemist_jax.runtime import parallel  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_rate import TINY  # noqa: E402

cfg = load_config("configs/demo.yaml", TINY)
rng = np.random.default_rng(0)
b, length = cfg.data.batch_size, cfg.data.max_text_length
example = {
    "image": rng.uniform(-1, 1, (b, 28, 28, 1)).astype(np.float32),
    "tokens": rng.integers(0, 49406, (b, length)).astype(np.int32),
    "token_mask": np.ones((b, length), bool),
}
mesh = parallel.make_mesh()
assert mesh.devices.size == devices
program = rating.build_program(cfg, example, mesh)
state = program.init_state(jax.random.key(0))
population, k = cfg.rate.population, cfg.rate.inner_steps
train = {
    key: rng.permutation(
        np.broadcast_to(v, (population, k) + v.shape).reshape(-1, *v.shape[1:])
    ).reshape((population, k) + v.shape)
    for key, v in example.items()
}
val = {key: np.concatenate([v, v]) for key, v in example.items()}
grads, grad_metrics = program.meta_gradient(state, train, val, np.float32(1.0))
state, metrics = program.meta_step(state, train, val, np.float32(1.0))
assert state["proxy"]["final"]["linear"]["kernel"].get_value().sharding.mesh.devices.size == devices
# The rater's gradient before its optimizer (Adam's first step would turn round-off into signs)
# and the step's metrics: quantities the math defines, whatever the reduction order.
named = {
    jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(grads))
}
np.savez(
    out,
    **{f"grad{name}": leaf for name, leaf in named.items()},
    **{f"metric/{name}": np.asarray(value) for name, value in jax.device_get(metrics).items()},
    **{
        f"grad_metric/{name}": np.asarray(value)
        for name, value in jax.device_get(grad_metrics).items()
    },
)
