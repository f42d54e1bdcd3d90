"""Checkpoints: one orbax manager factory, and a state pytree saved with its run state.

A checkpoint at step S holds two items:
  state      the pytree of arrays (model, optimizer, rng ...), restored onto the shardings of the
             `like` tree given to `restore`, so a checkpoint moves between meshes
  run_state  JSON: data-iterator positions and the facts a resumed run must share with the run
             it continues (steps, seed, a digest of the data ...)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from alchemist_jax.runtime import distributed, numerics

STATE = "state"
RUN_STATE = "run_state"


def manager(
    directory: Path, *, max_to_keep: int | None = 2, read_only: bool = False
) -> ocp.CheckpointManager:
    """The orbax manager of `directory` (absolute path taken; created unless `read_only`).

    Args:
      max_to_keep: checkpoints kept (older ones are deleted after a save); None keeps all.
      read_only: open an existing folder for restoring only.
    """
    options = (
        ocp.CheckpointManagerOptions(read_only=True)
        if read_only
        else ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def latest_step(directory: Path) -> int | None:
    """The latest checkpointed step in `directory`, or None (no folder, no checkpoint).

    Every process of a multi-process run must call it (it waits for the others afterwards): a
    process that found no folder must not see one that another creates right after, since
    opening an orbax manager is a collective step of all processes."""
    step = manager(directory, read_only=True).latest_step() if Path(directory).is_dir() else None
    distributed.barrier(f"latest_step {Path(directory).absolute()}")
    return step


def save(checkpoints: ocp.CheckpointManager, step: int, state: Any, run_state: dict) -> None:
    """Saves `state` (a pytree of arrays) and `run_state` (JSON-able) as one checkpoint.

    Raises:
      NonFiniteError: `state` holds NaN or Inf (nothing is saved, so the last good checkpoint
        is not rotated out).
      OSError: the write failed (e.g. disk full): names the folder; the partial checkpoint is
        removed and the previous ones are intact.
    """
    if not bool(_all_finite(state)):
        raise numerics.NonFiniteError(
            f"not saving checkpoint {step} in {checkpoints.directory}: the state holds NaN or "
            "Inf; the last finite checkpoint is kept"
        )
    try:
        checkpoints.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(state), RUN_STATE: ocp.args.JsonSave(run_state)}
            ),
        )
        checkpoints.wait_until_finished()
    except OSError as error:
        _remove_partial(Path(checkpoints.directory))
        raise OSError(
            f"cannot write checkpoint {step} in {checkpoints.directory}: {error.strerror or error}"
        ) from None


_all_finite = jax.jit(numerics.all_finite)


def _remove_partial(directory: Path) -> None:
    """Deletes the temporary folders of an interrupted save (orbax names them *.orbax-*-tmp*)."""
    import shutil

    for partial in directory.glob("*tmp*"):
        shutil.rmtree(partial, ignore_errors=True)


def restore(
    checkpoints: ocp.CheckpointManager, like: Any, step: int | None = None
) -> tuple[Any, dict]:
    """(state, run_state) of checkpoint `step` (default: the latest); `like` gives the state's
    structure, shapes, dtypes and shardings (arrays or `jax.ShapeDtypeStruct`s)."""
    step = checkpoints.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = checkpoints.restore(
        step,
        args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract), RUN_STATE: ocp.args.JsonRestore()}
        ),
    )
    return restored[STATE], restored[RUN_STATE]


def restore_run_state(checkpoints: ocp.CheckpointManager, step: int | None = None) -> dict:
    """The JSON run state of checkpoint `step` (default: the latest), without the arrays."""
    step = checkpoints.latest_step() if step is None else step
    return checkpoints.restore(
        step, args=ocp.args.Composite(**{RUN_STATE: ocp.args.JsonRestore()})
    )[RUN_STATE]


def restore_part(checkpoints: ocp.CheckpointManager, step: int, key: str, like: Any) -> Any:
    """Entry `key` of the state dict of checkpoint `step`, shaped (and sharded) like `like`;
    nothing else of the state is read (e.g. the rater of a rating run without its proxies)."""
    abstract = {key: jax.tree.map(ocp.utils.to_shape_dtype_struct, like)}
    restored = checkpoints.restore(
        step,
        args=ocp.args.Composite(
            **{
                STATE: ocp.args.PyTreeRestore(
                    item=abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=True,
                )
            }
        ),
    )
    return restored[STATE][key]
