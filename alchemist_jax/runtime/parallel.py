"""Devices: the named mesh every step is jitted on, logical-axis shardings, batch fields.

The mesh has four named axes (`MESH_AXES`), sized by the config's `mesh` section (one size may be
-1: the devices left over):

  data        batch rows split, everything else replicated (pure data parallelism)
  fsdp        batch rows split AND parameters / optimizer states split (fully sharded data
              parallelism: each device holds 1/fsdp of every state, gathered per layer)
  population  the rating proxies split: device group p holds proxies p*P/n .. (p+1)*P/n - 1
              (`jax.vmap(..., spmd_axis_name=...)`); in steps without proxies it splits rows
  tensor      hidden features of MLPs and attention heads split (optional, default 1)

Parameters name their dimensions with logical axes (`models.sharding`: embed, mlp, heads,
vocab, layers); a rules table (`config.ShardingRules`, MaxText style) maps each logical name to
mesh axes, and `logical_shardings` turns an abstract state into `NamedSharding`s. A dimension
takes the axes of its rule that the same array has not used yet and whose product divides its
size (so small layers of the tiny model replicate where a split would not divide).

Axis types are Auto, deliberately: the steps are written as whole-array math (vmap of
meta-gradients through scans of optimizer steps, weighted means over the batch). Under Explicit
axes every contraction over a sharded dimension must be annotated (jax >= 0.10's `make_mesh`
default: a weighted loss over a data-sharded batch fails with "Contracting dimensions are
sharded"); under Auto the shardings of the steps' inputs and outputs are fixed by the jitted
steps' `in_shardings` / `out_shardings` and GSPMD places everything in between.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
POPULATION_AXIS = "population"
TENSOR_AXIS = "tensor"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, POPULATION_AXIS, TENSOR_AXIS)
# Logical names of activations (the parameters' names live in `models.sharding`).
BATCH = "batch"
POPULATION = "population"
# Rules used when none are given: everything but the batch replicated, batch over all devices.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    BATCH: (DATA_AXIS, FSDP_AXIS),
    POPULATION: (POPULATION_AXIS,),
    "embed": (FSDP_AXIS,),
    "mlp": (TENSOR_AXIS, FSDP_AXIS),
    "heads": (TENSOR_AXIS, FSDP_AXIS),
    "vocab": (TENSOR_AXIS, FSDP_AXIS),
    "layers": (),  # stacked blocks: every device holds every layer (of its slice)
}
# The caption fields of a batch (token ids + mask, or precomputed text embeddings).
CAPTION_INPUTS = ("tokens", "token_mask", "text_embedding")
# Batch fields the models read; everything else (ids, labels, masks) stays on the host.
MODEL_INPUTS = ("image", "latent", *CAPTION_INPUTS)

Rules = Mapping[str, Sequence[str]]


# ----------------------------------------------------------------------------------------------
# The mesh
# ----------------------------------------------------------------------------------------------


def mesh_shape(mesh_cfg: Any, devices: int) -> tuple[int, ...]:
    """The sizes of `MESH_AXES` for `devices` devices: the config's `data`, `fsdp`, `population`,
    `tensor` (attributes of `mesh_cfg`), one -1 replaced by the devices left over.

    Raises:
      ValueError: more than one -1, or sizes whose product is not `devices` (names the sizes).
    """
    sizes = [int(getattr(mesh_cfg, axis)) for axis in MESH_AXES]
    named = ", ".join(f"mesh.{axis}={size}" for axis, size in zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh size may be -1 (the remaining devices): {named}")
    fixed = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if devices % fixed:
            raise ValueError(f"{named}: the fixed sizes do not divide the {devices} devices")
        sizes[sizes.index(-1)] = devices // fixed
    if math.prod(sizes) != devices:
        raise ValueError(f"{named}: the mesh holds {math.prod(sizes)} devices, not {devices}")
    return tuple(sizes)


def make_mesh(
    mesh_cfg: Any = None, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """The mesh of `mesh_cfg` (a `config.MeshConfig`; None: every device on `data`) over
    `devices` (default: all), axes `MESH_AXES`, Auto axis types (see the module docstring)."""
    devices = list(jax.devices() if devices is None else devices)
    if mesh_cfg is None:
        shape = (len(devices), 1, 1, 1)
    else:
        shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def local_mesh() -> jax.sharding.Mesh:
    """This process's devices alone, all on `data` (the other axes of size 1): the mesh of
    work each process does on its own share (the scoring pass's chunks)."""
    return make_mesh(None, jax.local_devices())


def local_rows_sharding() -> NamedSharding:
    """Leading axis (rows) split over this process's devices (`local_mesh`), the rest whole."""
    return NamedSharding(local_mesh(), PartitionSpec(MESH_AXES))


def rules_table(rules: Any = None) -> dict[str, tuple[str, ...]]:
    """Logical axis -> mesh axes, from a `config.ShardingRules` dataclass, a mapping, or None
    (`DEFAULT_RULES`)."""
    if rules is None:
        return dict(DEFAULT_RULES)
    if dataclasses.is_dataclass(rules):
        rules = dataclasses.asdict(rules)
    return {name: tuple(axes) for name, axes in rules.items()}


# ----------------------------------------------------------------------------------------------
# Logical axes -> shardings
# ----------------------------------------------------------------------------------------------


def logical_spec(
    names: Sequence[str | None],
    mesh: jax.sharding.Mesh,
    rules: Any = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """The `PartitionSpec` of an array whose dimensions have logical `names` (None: unsplit).

    Each dimension takes, in rule order, the mesh axes of its name's rule that no earlier
    dimension of the array took; with `shape` given, only the longest prefix of those whose
    sizes multiply to a divisor of the dimension (a dimension of 3 on `fsdp`=2 stays whole).
    """
    table, used, spec = rules_table(rules), set(), []
    for i, name in enumerate(names):
        free = [a for a in table.get(name, ()) if a not in used] if name is not None else []
        if shape is not None:
            while free and shape[i] % math.prod(mesh.shape[a] for a in free):
                free.pop()
        used.update(free)
        spec.append(None if not free else free[0] if len(free) == 1 else tuple(free))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def logical_names(leaf: Any) -> tuple[str | None, ...]:
    """The logical axis names of an `nnx.Variable` (its `out_sharding` metadata), () for an
    array or a variable without them."""
    if isinstance(leaf, nnx.Variable):
        return tuple(leaf.get_metadata().get("out_sharding") or ())
    return ()


def logical_shardings(
    tree: Any, mesh: jax.sharding.Mesh, rules: Any = None, leading: Sequence[str | None] = ()
) -> Any:
    """`NamedSharding`s for every array of `tree` (arrays, `jax.ShapeDtypeStruct`s, or nnx states
    of them, e.g. from `jax.eval_shape`), from the logical names of its `nnx.Variable`s.

    Args:
      tree: a pytree; `nnx.Variable` nodes carry names (see `models.sharding`), other leaves
        (step counters, keys, optax counts) have none and are replicated.
      leading: names of leading axes every leaf of `tree` has in front of its own, e.g.
        ("population",) for proxies stacked by `jax.vmap` (their optimizer states included).
    Returns:
      A tree of `NamedSharding`s shaped like `tree`, a variable mapped to one sharding (a prefix
      of the tree: what `jax.jit`'s `in_shardings` / `out_shardings` take).
    """

    def sharding(leaf: Any) -> NamedSharding:
        shape = np.shape(jax.tree.leaves(leaf)[0]) if jax.tree.leaves(leaf) else ()
        own = logical_names(leaf)
        names = (*leading, *own)
        names = names + (None,) * (len(shape) - len(names))
        return NamedSharding(mesh, logical_spec(names[: len(shape)], mesh, rules, shape))

    return jax.tree.map(sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharding_key(tree: Any) -> tuple:
    """The shardings of the arrays of `tree` as a hashable (treedef, shardings) pair, to key a
    cache of steps jitted for those shardings (`unkey_shardings` rebuilds the tree)."""
    leaves, treedef = jax.tree.flatten(jax.tree.map(lambda x: x.sharding, tree))
    return treedef, tuple(leaves)


def unkey_shardings(key: tuple) -> Any:
    """The tree of shardings of a `sharding_key`."""
    treedef, leaves = key
    return jax.tree.unflatten(treedef, leaves)


def axes_of(name: str, mesh: jax.sharding.Mesh, rules: Any = None) -> tuple[str, ...]:
    """The mesh axes logical axis `name` maps to (those of `mesh`), e.g. the batch's."""
    return tuple(a for a in rules_table(rules).get(name, ()) if a in mesh.shape)


def row_axes(mesh: jax.sharding.Mesh, rules: Any = None) -> tuple[str, ...]:
    """The mesh axes batch rows split over in a step without proxies (downstream training):
    the `batch` rule's axes, then the `population` rule's, which have no proxies to hold there."""
    batch = axes_of(BATCH, mesh, rules)
    return batch + tuple(a for a in axes_of(POPULATION, mesh, rules) if a not in batch)


def split_size(name: str, mesh: jax.sharding.Mesh, rules: Any = None) -> int:
    """How many ways logical axis `name` is split on `mesh` (product of its axes' sizes)."""
    return math.prod(mesh.shape[a] for a in axes_of(name, mesh, rules))


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fields of a batch the models read (`MODEL_INPUTS`); ids, labels, masks stay out."""
    return {key: value for key, value in batch.items() if key in MODEL_INPUTS}


def check_batch_split(
    sizes: dict[str, int], mesh: jax.sharding.Mesh | None = None, axes: Sequence[str] = ()
) -> None:
    """Each size (config key -> size) must split evenly over mesh `axes` (their sizes' product;
    no mesh: over every device).

    Raises:
      ValueError: names the first key whose size does not divide, and the axes.
    """
    if mesh is None:
        ways, over = jax.device_count(), "devices of the mesh"
    else:
        ways = math.prod(mesh.shape[a] for a in axes)
        over = "mesh axes " + " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
    for key, size in sizes.items():
        if size % ways:
            raise ValueError(f"{key}={size} must be divisible by the {ways} {over}")


def local_block(sharding: jax.sharding.Sharding, shape: Sequence[int]) -> tuple[slice, ...]:
    """The block of a global array of `shape` laid out by `sharding` that this process's
    devices hold: per dimension, the range [start, stop) their shards cover.

    Raises:
      ValueError: the process's shards of a dimension are not one contiguous range (a mesh
        whose device order interleaves processes); names the dimension.
    """
    shards = sharding.addressable_devices_indices_map(tuple(shape)).values()
    block = []
    for dim, size in enumerate(shape):
        spans = {range(size)[index[dim]] for index in shards}
        start, stop = min(s.start for s in spans), max(s.stop for s in spans)
        if sum(len(s) for s in spans) != stop - start:
            raise ValueError(
                f"the devices of process {jax.process_index()} hold a non-contiguous part of "
                f"dimension {dim} of {tuple(shape)} ({sharding}); order the mesh's devices "
                "so that each process's devices are adjacent"
            )
        block.append(slice(start, stop))
    return tuple(block)


def local_rows(sharding: jax.sharding.Sharding, batch_size: int) -> np.ndarray:
    """The rows of a (batch_size, ...) batch laid out by `sharding` that this process holds
    (`local_block` of its leading axis), e.g. the `rows` of `data.pipeline` iterators."""
    (rows,) = local_block(sharding, (batch_size,))
    return np.arange(rows.start, rows.stop)


def block_rows(block: Sequence[slice], shape: Sequence[int]) -> np.ndarray:
    """The flat (row-major) positions of the elements of `block` in an array of `shape`:
    e.g. the rows of a global draw of P * B examples, laid out (P, B), that this process reads
    when it holds proxies block[0] and batch rows block[1]."""
    grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in block], indexing="ij")
    return np.ravel_multi_index(tuple(g.ravel() for g in grids), tuple(shape))


def global_batch(
    local: dict[str, np.ndarray], sharding: jax.sharding.Sharding, leading: Sequence[int]
) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (`jax.make_array_from_process_local_data`).

    Args:
      local: fields (this process's block of the leading dims, ...): what it read.
      sharding: the step's sharding of the batch.
      leading: the global sizes of the leading dims that are split over processes (e.g. (B,)
        or (P, S, B)); the trailing dims are whole on every process.
    Returns:
      The same fields as global `jax.Array`s (leading, ...) laid out by `sharding`; with one
      process the same as `jax.device_put(local, sharding)`.
    """
    return {
        key: jax.make_array_from_process_local_data(
            sharding, value, (*leading, *np.shape(value)[len(leading) :])
        )
        for key, value in local.items()
    }
