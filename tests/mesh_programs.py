"""Helper for test_mesh.py: every sharded step of the tiny model on one mesh, in one process.

Run as `python tests/mesh_programs.py DEVICES DATA FSDP POPULATION OUT [--save DIR] [--restore DIR]`
(DEVICES fake CPU devices, set before jax loads; mesh sizes over (data, fsdp, population)).
Writes OUT.npz with, per step, the quantities the math defines:
  grad/...        the rater's meta-gradient (before its optimizer) and metric/... its metrics
  proxy/...       the proxies after one rater-weighted inner Adam step (eps 1e-3, see test_mesh)
  score           the rater's scores of the validation batch
  train/loss      the downstream loss of the first train step, train/mu/... AdamW's first moment
                  after it (= 0.1 x the clipped gradient; the warmup's learning rate is 0 there)
  next/...        metrics of the meta-gradient of the saved (--save) or restored state
  restored/...    with --restore: every leaf of the restored state (and restored2/... on 2 devices)
Asserts the shardings of the outputs (PartitionSpecs below) and that `reset_proxy` compiles
without any collective. With --save: saves the rating state after the proxy step and a reset to
DIR, and the metrics of the meta-gradient of that state (next/...).
"""

import os
import sys

devices, data, fsdp, population, out = (*map(int, sys.argv[1:5]), sys.argv[5])
# The fake devices, and XLA's CPU backend without its expensive LLVM passes: compiling the
# meta-gradient dominates this test and takes half as long so; every process of a comparison
# compiles the same way, and the tolerances are float32's whatever the code generation.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={devices}"
    + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from alchemist_jax import rating, training  # noqa: E402
from alchemist_jax.config import load_config  # noqa: E402
from alchemist_jax.runtime import checkpoints, parallel  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_rate import TINY  # noqa: E402

save_dir = sys.argv[sys.argv.index("--save") + 1] if "--save" in sys.argv else None
restore_dir = sys.argv[sys.argv.index("--restore") + 1] if "--restore" in sys.argv else None
MESH = [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.population={population}"]
cfg = load_config("configs/demo.yaml", [*TINY, "train.batch_size=8", "train.warmup_steps=5", *MESH])
mesh = parallel.make_mesh(cfg.mesh)
assert dict(mesh.shape) == {"data": data, "fsdp": fsdp, "population": population, "tensor": 1}


def flat(prefix: str, tree) -> dict[str, np.ndarray]:
    return {
        prefix + jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
    }


def spec(array) -> P:
    return array.sharding.spec


# ---- inputs: the same numbers in every process -----------------------------------------------
rng = np.random.default_rng(0)
b, length = cfg.data.batch_size, cfg.data.max_text_length
# Precomputed caption embeddings: no text encoder and no 49k-row token tables, whose gradients
# and constants would dominate the compile time of every program without adding a sharding case.
example = {
    "image": rng.uniform(-1, 1, (b, 28, 28, 1)).astype(np.float32),
    "text_embedding": rng.standard_normal((b, length, 32)).astype(np.float32),
    "token_mask": np.ones((b, length), bool),
}
P_, K = cfg.rate.population, cfg.rate.inner_steps
train = {
    key: rng.permutation(np.broadcast_to(v, (P_, K) + v.shape).reshape(-1, *v.shape[1:])).reshape(
        (P_, K) + v.shape
    )
    for key, v in example.items()
}
val = {key: np.concatenate([v, v]) for key, v in example.items()}
one_step = {key: v[:, :1] for key, v in train.items()}
results: dict[str, np.ndarray] = {}

# ---- rating: meta-gradient, a proxy step, scores, reset --------------------------------------
program = rating.build_program(cfg, example, mesh)
state = program.init_state(jax.random.key(0))
proxy_kernel = state["proxy"]["blocks"]["mlp"]["fc1"]["kernel"]
assert proxy_kernel.sharding.mesh == mesh
# The DiT's blocks are stacked along `layers`, which the default rules replicate.
assert spec(proxy_kernel) == P("population", None, "fsdp", "tensor"), spec(proxy_kernel)
mu = state["proxy_opt"][0].mu["blocks"]["mlp"]["fc1"]["kernel"]
# FSDP shards Adam's moments too.
assert spec(mu) == P("population", None, "fsdp", "tensor"), spec(mu)
rater_proj = state["rater"]["image_proj"]["kernel"]
assert spec(rater_proj) == P(("tensor", "fsdp")), spec(rater_proj)
assert program.train_sharding.spec == P("population", None, ("data", "fsdp"))
assert program.val_sharding.spec == P(("data", "fsdp"))

grads, grad_metrics = program.meta_gradient(state, train, val, np.float32(1.0))
assert spec(grads["image_proj"]["kernel"]) == spec(rater_proj)
results |= flat("grad", grads) | {f"metric/{k}": v for k, v in flat("", grad_metrics).items()}

stepped, ok = program.proxy_steps(jax.tree.map(jnp.copy, state), one_step, True)
assert bool(ok)
assert spec(stepped["proxy"]["blocks"]["mlp"]["fc1"]["kernel"]) == spec(proxy_kernel)
results |= flat("proxy", stepped["proxy"])
results["score"] = np.asarray(program.score(state["rater"], val))

# Resetting a proxy is a select along the population axis: nothing is gathered or exchanged.
reset_proxy = program.reset_proxy.lower(state, jnp.int32(1)).compile()
reset_hlo = reset_proxy.as_text()
collectives = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
assert not any(op in reset_hlo for op in collectives), "reset_proxy moves data between devices"
reset = reset_proxy(stepped, jnp.int32(1))
assert spec(reset["proxy"]["blocks"]["mlp"]["fc1"]["kernel"]) == spec(proxy_kernel)
np.testing.assert_array_equal(
    np.asarray(reset["proxy"]["final"]["linear"]["kernel"])[1],
    np.asarray(state["warm_proxy"]["final"]["linear"]["kernel"])[1],
)

# ---- downstream training: one step --------------------------------------------------------
inputs = training.input_spec({k: v[0] for k, v in example.items()})
train_program = training.build_program(cfg, inputs, mesh, steps=20, seed=0)
train_state = train_program.initial_state
kernel = train_state["params"]["blocks"]["mlp"]["fc1"]["kernel"]
assert spec(kernel) == P(None, "fsdp", "tensor"), spec(kernel)
assert train_program.batch_sharding.spec == P(("data", "fsdp", "population"))
batch = jax.device_put(example, train_program.batch_sharding)
train_state, loss, ok = train_program.train_step(train_state, batch)
assert bool(ok)
moments = train_state["opt"][1][0].mu
assert spec(moments["blocks"]["mlp"]["fc1"]["kernel"]) == P(None, "fsdp", "tensor")
results["train/loss"] = np.asarray(loss)
results |= flat("train/mu", moments)

# ---- checkpoints: 8 devices -> 2 and 1 -----------------------------------------------------
if save_dir:  # the state after the proxy step and the reset (no further compile)
    manager = checkpoints.manager(save_dir)
    checkpoints.save(manager, 1, reset, {"devices": devices})
    results |= flat("saved", reset)
    _, next_metrics = program.meta_gradient(reset, train, val, np.float32(1.0))
    results |= {f"next/{k}": v for k, v in flat("", next_metrics).items()}
if restore_dir:
    manager = checkpoints.manager(restore_dir, read_only=True)
    restored, run_state = checkpoints.restore(manager, program.init_state(jax.random.key(1)))
    assert run_state["devices"] == 8
    kernel = restored["proxy"]["blocks"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.mesh == mesh and spec(kernel) == spec(proxy_kernel)
    results |= flat("restored", restored)
    _, next_metrics = program.meta_gradient(restored, train, val, np.float32(1.0))
    results |= {f"next/{k}": v for k, v in flat("", next_metrics).items()}
    if devices >= 2:  # the same checkpoint onto a 2-device mesh (fsdp=2) of this process
        small = parallel.make_mesh(
            load_config(None, ["mesh.data=1", "mesh.fsdp=2"]).mesh, jax.devices()[:2]
        )
        like = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=jax.sharding.NamedSharding(small, x.sharding.spec)
            ),
            program.init_state(jax.random.key(1)),
        )
        restored2, _ = checkpoints.restore(manager, like)
        kernel = restored2["proxy"]["blocks"]["mlp"]["fc1"]["kernel"]
        assert len(kernel.sharding.device_set) == 2
        results |= flat("restored2", restored2)

np.savez(out, **results)
