"""The rater of a rating run (`alchemist-jax rate --workdir DIR`), read back for scoring.

`open_rating_run` reads the run's config and finds its latest checkpoint; `restore_rater` reads
only the EMA rater out of it (`runtime.checkpoints.restore_part`); `rater_scorer` is the
`rater` scorer: the instance logit u of the EMA rater. Dedup's `rater` embedding uses
`ema_rater` too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alchemist_jax import config as config_lib
from alchemist_jax import models
from alchemist_jax.runtime import checkpoints, parallel
from alchemist_jax.runtime.parallel import model_inputs
from alchemist_jax.scoring.driver import ScoreBatch

# Data settings a rater's inputs depend on: they must agree between the rating run and the pool.
RATER_DATA_KEYS = ("resolution", "channels", "max_text_length")


@dataclasses.dataclass(frozen=True)
class RatingRun:
    """A finished or running `alchemist-jax rate` workdir: its config and latest checkpoint."""

    workdir: Path
    config: config_lib.Config
    step: int

    @property
    def checkpoints(self) -> Path:
        return (self.workdir / "checkpoints").absolute()


def open_rating_run(workdir: Path, data_cfg: config_lib.DataConfig) -> RatingRun:
    """Reads `workdir/config.yaml` and finds its latest checkpoint.

    Raises:
      ValueError: no config.yaml, no checkpoint, or a data setting of `RATER_DATA_KEYS` that
        differs between the rating run and `data_cfg` (the pool being scored).
    """
    workdir = Path(workdir)
    if not (workdir / "config.yaml").is_file():
        raise ValueError(
            f"{workdir} is not a rating run: it has no config.yaml "
            "(pass the --workdir of `alchemist-jax rate`)"
        )
    run_cfg = config_lib.load_config(workdir / "config.yaml")
    for key in RATER_DATA_KEYS:
        theirs, ours = getattr(run_cfg.data, key), getattr(data_cfg, key)
        if theirs != ours:
            raise ValueError(
                f"data.{key} is {ours!r} but the rater in {workdir} was trained "
                f"with {theirs!r} ({workdir / 'config.yaml'})"
            )
    folder = workdir / "checkpoints"
    step = checkpoints.latest_step(folder)
    if step is None:
        raise ValueError(
            f"{workdir} has no rater checkpoint in {folder}: let "
            "`alchemist-jax rate` save one first"
        )
    return RatingRun(workdir, run_cfg, int(step))


def restore_rater(run: RatingRun, like: nnx.State) -> nnx.State:
    """The EMA rater parameters (`state["rater_ema"]`) of the latest checkpoint of `run`, shaped
    like `like`, replicated on this process's devices; nothing else of the rating state (proxies,
    optimizer states) is read."""
    replicated = NamedSharding(parallel.local_mesh(), P())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), like
    )
    return checkpoints.restore_part(
        checkpoints.manager(run.checkpoints, read_only=True), run.step, "rater_ema", abstract
    )


def ema_rater(run: RatingRun, example: dict[str, np.ndarray]):
    """(graphdef, EMA parameters, rest) of the rater of `run`, for `nnx.merge`. `example` is one
    example of the pool (fixes the input shapes)."""
    batch = {k: np.asarray(v)[None] for k, v in model_inputs(example).items()}
    graphdef, params, rest = models.init_rater(
        run.config.rater, batch, jax.random.key(0), run.config.data.max_text_length
    )
    return graphdef, restore_rater(run, params), rest


def rater_scorer(run: RatingRun, example: dict[str, np.ndarray]) -> ScoreBatch:
    """score_batch of the EMA rater of `run`: the instance logits u (B,) (`Rater.scores`).
    `example` is one example of the pool (fixes the input shapes)."""
    graphdef, ema, rest = ema_rater(run, example)
    # The scoring pass's explicit layout: parameters replicated on this process's devices, the
    # batch rows and the scores split over them (`driver.score_pool`).
    rows = parallel.local_rows_sharding()
    score = jax.jit(
        models.rater_score_fn(graphdef, rest),
        in_shardings=(NamedSharding(rows.mesh, P()), rows),
        out_shardings=rows,
    )
    return lambda b: score(ema, model_inputs(b))
