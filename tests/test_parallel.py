"""runtime.parallel on one device: mesh sizes from the config, logical axes -> PartitionSpecs,
the models' sharding metadata. (Several devices: test_mesh.py.)"""

import dataclasses
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alchemist_jax import config, models
from alchemist_jax.models import sharding
from alchemist_jax.runtime import parallel


def _sizes(data=-1, fsdp=1, population=1, tensor=1):
    return SimpleNamespace(data=data, fsdp=fsdp, population=population, tensor=tensor)


def test_mesh_shape_fills_one_minus_one_and_names_bad_sizes():
    assert parallel.mesh_shape(_sizes(), 8) == (8, 1, 1, 1)
    assert parallel.mesh_shape(_sizes(data=2, fsdp=-1, population=2), 8) == (2, 2, 2, 1)
    assert parallel.mesh_shape(_sizes(data=4, fsdp=2), 8) == (4, 2, 1, 1)
    with pytest.raises(ValueError, match="at most one mesh size may be -1"):
        parallel.mesh_shape(_sizes(fsdp=-1), 8)
    with pytest.raises(ValueError, match="do not divide the 8 devices"):
        parallel.mesh_shape(_sizes(fsdp=3), 8)
    with pytest.raises(ValueError, match="holds 4 devices, not 8"):
        parallel.mesh_shape(_sizes(data=2, fsdp=2), 8)


def test_config_mesh_section_is_validated():
    cfg = config.load_config(None, ["mesh.fsdp=2", "mesh.rules.embed=[fsdp, tensor]"])
    assert cfg.mesh.fsdp == 2 and cfg.mesh.rules.embed == ("fsdp", "tensor")
    with pytest.raises(config.ConfigError, match="at most one mesh size may be -1"):
        config.load_config(None, ["mesh.fsdp=-1"])
    with pytest.raises(config.ConfigError, match="'mesh.tensor' must be >= 1, or -1"):
        config.load_config(None, ["mesh.tensor=0"])
    with pytest.raises(config.ConfigError, match="mesh.rules.mlp"):
        config.load_config(None, ["mesh.rules.mlp=[model]"])


def test_default_rules_are_the_configs():
    """One table: parallel's defaults (used without a config) equal config.ShardingRules'."""
    assert parallel.rules_table(config.ShardingRules()) == parallel.DEFAULT_RULES
    assert set(dataclasses.asdict(config.ShardingRules())) == {
        "batch",
        "population",
        *sharding.LOGICAL_AXES,
    }


def test_logical_spec_takes_free_axes_that_divide():
    mesh = SimpleNamespace(shape={"data": 2, "fsdp": 4, "population": 2, "tensor": 2})
    spec = parallel.logical_spec
    assert spec(("embed", "mlp"), mesh, shape=(64, 128)) == P("fsdp", "tensor")
    # fc2: the hidden dimension takes tensor and fsdp, the width finds fsdp taken.
    assert spec(("mlp", "embed"), mesh, shape=(128, 64)) == P(("tensor", "fsdp"))
    # 6 splits 2 ways, not 8: tensor kept, fsdp dropped; 3 splits no way.
    assert spec(("mlp",), mesh, shape=(6,)) == P("tensor")
    assert spec(("embed",), mesh, shape=(3,)) == P()
    assert spec(("population", None, "embed"), mesh, shape=(4, 3, 8)) == P(
        "population", None, "fsdp"
    )
    assert spec(("population", None, "batch"), mesh) == P("population", None, ("data", "fsdp"))


def test_every_parameter_has_logical_names():
    cfg = config.load_config("configs/demo.yaml", ["model.text_trainable=true"])
    batch = {
        "image": np.zeros((2, 28, 28, 1), np.float32),
        "tokens": np.zeros((2, 8), np.int32),
        "token_mask": np.ones((2, 8), bool),
    }
    trees = [
        models.init_proxy(cfg.model, batch, jax.random.key(0), 8)[1],
        models.init_rater(cfg.rater, batch, jax.random.key(0), 8)[1],
    ]
    for tree in trees:
        variables = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
        assert variables
        for variable in variables:
            names = parallel.logical_names(variable)
            assert len(names) == variable.get_value().ndim
            assert set(names) <= {None, *sharding.LOGICAL_AXES}


def test_logical_shardings_of_a_stacked_state():
    mesh = parallel.make_mesh()
    layer = nnx.Linear(4, 8, **sharding.linear("embed", "mlp"), rngs=nnx.Rngs(0))
    params = nnx.split(layer, nnx.Param)[1]
    stacked = jax.eval_shape(lambda: jax.tree.map(lambda x: np.stack([x, x]), params))
    shardings = parallel.logical_shardings(stacked, mesh, leading=("population",))
    assert shardings["kernel"].spec == P("population", "fsdp", "tensor")
    assert shardings["bias"].spec == P("population", ("tensor", "fsdp"))
    assert parallel.logical_shardings({"step": np.zeros(())}, mesh)["step"].spec == P()
    with pytest.raises(ValueError, match="unknown logical axes"):
        sharding.axes("width")


def test_check_batch_split_names_key_and_axes():
    mesh = SimpleNamespace(shape={"data": 2, "fsdp": 4})
    parallel.check_batch_split({"data.batch_size": 16}, mesh, ("data", "fsdp"))
    with pytest.raises(ValueError, match=r"data.batch_size=12 must be divisible by the 8 mesh"):
        parallel.check_batch_split({"data.batch_size": 12}, mesh, ("data", "fsdp"))
