"""Downstream training (`alchemist-jax train` calls `run`): the text-to-image DiT of `cfg.model`
trained from scratch on a selection of the pool, on the pool sampled by rating weights, or on the
whole pool; how well it then does on held-out data is the benchmark's measure of a selection.

  data      the preprocessed pool (or the selected subset of it): shuffled epochs from a grain
            stream, or, with sampling weights, batches drawn with replacement with probability
            proportional to the weights (a pure function of (seed, batch position))
  model     the same DiT as the rating proxies (`models.init_proxy`), caption dropout for CFG
  step      one pure function jitted once on the mesh: batch rows split, parameters and AdamW
            moments split by their logical axes (`mesh` section: FSDP), state donated; AdamW
            (linear warmup, cosine decay to 10% of the peak), global-norm clipping
  loop      progress bar, metrics.jsonl (+ TensorBoard): training loss every 10 steps and the
            validation loss at fixed (t, noise) draws every `train.eval_every` steps; orbax
            checkpoints of the state and the data position, from which a rerun of the same
            command resumes and ends bitwise-equal to an uninterrupted run

The state is a dict of pytrees: step (), params (nnx.State), opt (optax state), rng (key data).

Size: the downstream training story in one file (program, fixed-draw validation loss, weighted
sampling, loop, command), as big_vision tells it; infrastructure lives in `runtime/`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alchemist_jax import config as config_lib
from alchemist_jax import models
from alchemist_jax.data import pipeline, prepare_splits
from alchemist_jax.data.sources import ArraySource, Source
from alchemist_jax.runtime import checkpoints, io, numerics, parallel, preemption, progress, runlog
from alchemist_jax.runtime.parallel import model_inputs

log = logging.getLogger("alchemist_jax.training")

LOG_EVERY = 10  # steps between training-loss lines (the mean loss of those steps)
# Key of the validation loss's fixed draws: the same for every run, so that the curves of
# different selections and seeds compare at the same (t, noise).
VALIDATION_SEED = 0
# Config sections a resumed run must share with the run it continues; the others (evaluate,
# pipeline, ...) do not change what training computes.
RESUME_SECTIONS = ("data", "model", "train")


# ==============================================================================================
# The model
# ==============================================================================================


@dataclasses.dataclass
class Trained:
    """A trained DiT, split as `models.init_proxy` splits it."""

    graphdef: nnx.GraphDef
    params: nnx.State  # the trained `nnx.Param`s
    rest: nnx.State  # everything else (e.g. a frozen text encoder), as initialised

    def module(self) -> models.DiT:
        """The nnx module `nnx.merge(graphdef, params, rest)`."""
        return nnx.merge(self.graphdef, self.params, self.rest)


def make_optimizer(train_cfg: config_lib.TrainConfig, steps: int) -> optax.GradientTransformation:
    """Clipping to global norm `grad_clip`, then AdamW whose learning rate rises linearly from 0
    to `learning_rate` over `warmup_steps` and follows a cosine down to 10% of it at `steps`.
    Weight decay applies to matrices and embeddings (ndim >= 2), not to biases and norm scales."""
    if not 0 <= train_cfg.warmup_steps < steps:
        raise config_lib.ConfigError(
            f"train.warmup_steps={train_cfg.warmup_steps} must be in "
            f"[0, {steps}), the steps of the run"
        )
    peak = train_cfg.learning_rate
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, peak, train_cfg.warmup_steps, steps, end_value=0.1 * peak
    )
    return optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip),
        optax.adamw(
            schedule,
            weight_decay=train_cfg.weight_decay,
            mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params),
        ),
    )


# Input fields of a model batch, each (name, shape without the batch axis, dtype name).
InputSpec = tuple[tuple[str, tuple[int, ...], str], ...]


def input_spec(example: dict[str, np.ndarray]) -> InputSpec:
    """The `InputSpec` of one example's model inputs (`parallel.MODEL_INPUTS`)."""
    return tuple(
        (k, tuple(np.shape(v)), str(np.asarray(v).dtype))
        for k, v in sorted(model_inputs(example).items())
    )


@dataclasses.dataclass
class TrainProgram:
    """The model, the initial state (replicated on the mesh) and the jitted training step."""

    graphdef: nnx.GraphDef
    rest: nnx.State
    initial_state: dict
    # (state, batch) -> (state, mean loss, finite); the state is donated. A step whose loss or
    # gradient is not finite is not applied (the step count and rng still advance).
    train_step: Callable[[dict, dict], tuple[dict, jax.Array, jax.Array]]
    batch_sharding: NamedSharding


@functools.lru_cache(maxsize=16)
def _jitted_program(
    model_cfg: config_lib.ModelConfig,
    train_cfg: config_lib.TrainConfig,
    max_text_length: int,
    inputs: InputSpec,
    mesh: jax.sharding.Mesh,
    rules: config_lib.ShardingRules | None = None,
) -> tuple[Callable, Callable]:
    """`init(key) -> (graphdef, state, rest)` and `train_step(state, rest, batch) -> (state,
    loss, finite)` of a `train_cfg.steps`-step run, jitted once per configuration, input shapes and
    mesh (the seed enters through init's key only, so seeds share them)."""
    optimizer = make_optimizer(train_cfg, train_cfg.steps)
    example = {name: np.zeros((1, *shape), dtype) for name, shape, dtype in inputs}

    def init(key: jax.Array) -> tuple[nnx.GraphDef, dict, nnx.State]:
        init_key, loop_key = jax.random.split(key)
        graphdef, params, rest = models.init_proxy(model_cfg, example, init_key, max_text_length)
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt": optimizer.init(params),
            "rng": jax.random.key_data(loop_key),
        }
        return graphdef, state, rest

    graphdef, state_shape, rest_shape = jax.eval_shape(init, jax.random.key(0))

    def train_step(state: dict, rest: nnx.State, batch: dict) -> tuple[dict, jax.Array, jax.Array]:
        loss_fn = models.proxy_loss_fn(graphdef, rest, model_cfg.caption_dropout)
        rng, step_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, batch, step_key)))(
            state["params"]
        )
        updates, opt_state = optimizer.update(grads, state["opt"], state["params"])
        ok = numerics.all_finite((loss, grads))
        kept = numerics.keep_if(
            ok,
            {"params": optax.apply_updates(state["params"], updates), "opt": opt_state},
            {"params": state["params"], "opt": state["opt"]},
        )
        return {"step": state["step"] + 1, **kept, "rng": jax.random.key_data(rng)}, loss, ok

    # Parameters, AdamW moments and the frozen rest split by their logical axes (FSDP: mesh.rules);
    # batch rows over `parallel.row_axes`.
    replicated = NamedSharding(mesh, P())
    state_sharding = {
        name: parallel.logical_shardings(value, mesh, rules) for name, value in state_shape.items()
    }
    rest_sharding = parallel.logical_shardings(rest_shape, mesh, rules)
    batch_sharding = NamedSharding(mesh, P(parallel.row_axes(mesh, rules)))
    return (
        jax.jit(init, out_shardings=(replicated, state_sharding, rest_sharding)),
        jax.jit(
            train_step,
            in_shardings=(state_sharding, rest_sharding, batch_sharding),
            out_shardings=(state_sharding, replicated, replicated),
            donate_argnums=(0,),
        ),
    )


def build_program(
    cfg: config_lib.Config, inputs: InputSpec, mesh: jax.sharding.Mesh, steps: int, seed: int
) -> TrainProgram:
    """The DiT of `cfg.model` for inputs `inputs`, initialised from `seed`, and the training
    step of a `steps`-step run on batches of `cfg.train.batch_size` split over the mesh."""
    init, train_step = _jitted_program(
        cfg.model,
        dataclasses.replace(cfg.train, steps=steps, seed=0),
        cfg.data.max_text_length,
        inputs,
        mesh,
        cfg.mesh.rules,
    )
    graphdef, state, rest = init(jax.random.key(seed))
    return TrainProgram(
        graphdef,
        rest,
        state,
        lambda state, batch: train_step(state, rest, batch),
        NamedSharding(mesh, P(parallel.row_axes(mesh, cfg.mesh.rules))),
    )


# ==============================================================================================
# Validation loss at fixed draws
# ==============================================================================================


def _fixed_draw_loss_sum(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    batch: dict,
    id_low: jax.Array,
    id_high: jax.Array,
    mask: jax.Array,
    seed: jax.Array,
    draws: jax.Array,
) -> jax.Array:
    """Sum over the rows with `mask` and over `draws` draws of the flow-matching loss at the
    fixed draws of `models.fixed_draws` (ids as uint32 halves, `models.split_ids`)."""
    model = nnx.merge(graphdef, params, rest)
    x0 = models.visual_input(batch)

    def add_draw(draw, total):
        t, eps = models.fixed_draws(seed, draw, id_low, id_high, x0.shape[1:])
        losses = models.flow_matching_loss_at(model, batch, t, eps)
        return total + jnp.sum(jnp.where(mask, losses, 0.0))

    return jax.lax.fori_loop(0, draws, add_draw, jnp.zeros((), jnp.float32))


@functools.lru_cache(maxsize=16)
def _loss_sum_step(graphdef: nnx.GraphDef, model_key: tuple, rows: NamedSharding) -> Callable:
    """`_fixed_draw_loss_sum` of `graphdef` jitted once with explicit shardings: the model's
    (params, rest) as they lie (`model_key`, a `parallel.sharding_key`), the batch, id halves
    and mask split by `rows`, the seed, draw count and the sum replicated."""
    replicated = NamedSharding(rows.mesh, P())
    params, rest = parallel.unkey_shardings(model_key)
    return jax.jit(
        functools.partial(_fixed_draw_loss_sum, graphdef),
        in_shardings=(params, rest, rows, rows, rows, rows, replicated, replicated),
        out_shardings=replicated,
    )


def validation_loss(
    trained: Trained, data: Source, batch_size: int, seed: int, draws: int = 1
) -> float:
    """Mean flow-matching loss of `trained` over every example of `data` and `draws` fixed
    (t, noise) draws per example, with the caption (no dropout).

    The draws of an example depend only on (seed, draw index, example id) (`models.fixed_draws`),
    so the value does not depend on `batch_size` or on the order of `data`; with the
    same seed, models are compared at the same draws.

    Args:
      trained: the model, its arrays on the mesh of the config (as `train_model` and
        `load_trained` return them).
      data: preprocessed examples (`preprocess.prepared`: in memory or streamed).
      batch_size: rows per jitted evaluation step; divisible by the device count.
      seed: key of the draws.
      draws: (t, noise) draws per example.
    """
    devices = jax.device_count()
    if batch_size % devices:
        raise ValueError(f"batch_size={batch_size} must be divisible by the {devices} devices")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    # Rows over every device of the model's own mesh (one mesh for parameters and batch); each
    # process reads its rows of every batch.
    mesh = getattr(jax.tree.leaves(trained.params)[0].sharding, "mesh", None)
    mesh = mesh if isinstance(mesh, jax.sharding.Mesh) else parallel.make_mesh()
    batch_sharding = NamedSharding(mesh, P(mesh.axis_names))
    rows = parallel.local_rows(batch_sharding, batch_size)
    step = _loss_sum_step(
        trained.graphdef, parallel.sharding_key((trained.params, trained.rest)), batch_sharding
    )
    total = 0.0
    for batch in pipeline.eval_iterator(data, batch_size, rows=rows):
        id_low, id_high = models.split_ids(batch["id"])
        local = {"id_low": id_low, "id_high": id_high, "mask": batch["mask"]}
        inputs = parallel.global_batch(
            {**model_inputs(batch), **local}, batch_sharding, (batch_size,)
        )
        total += float(
            step(
                trained.params,
                trained.rest,
                model_inputs(inputs),
                inputs["id_low"],
                inputs["id_high"],
                inputs["mask"],
                np.int32(seed),
                np.int32(draws),
            )
        )
    return total / (len(data) * draws)


# ==============================================================================================
# Batches
# ==============================================================================================


def weighted_batch_indices(
    probabilities: np.ndarray, seed: int, position: int, batch_size: int
) -> np.ndarray:
    """The rows of weighted batch number `position`: `batch_size` independent draws, with
    replacement, of index i with probability `probabilities[i]` (N,) (summing to 1).

    A pure function of (seed, position) (numpy's PCG64 seeded with the pair): a resumed run
    needs only the position. Returns int64 (batch_size,).
    """
    rng = np.random.default_rng([seed, position])
    return rng.choice(len(probabilities), size=batch_size, p=probabilities)


class WeightedBatches:
    """An endless iterator of batches of `source` drawn by `weighted_batch_indices` with
    probabilities proportional to `weights` (N,) >= 0: this process's `rows` of each global
    batch of `batch_size`; same interface as the grain iterators (`get_state` / `set_state`),
    its state is the batch position."""

    def __init__(
        self,
        source: Source,
        weights: np.ndarray,
        batch_size: int,
        seed: int,
        rows: np.ndarray | None = None,
    ):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.rows = np.arange(batch_size) if rows is None else np.asarray(rows)
        self.probabilities = sampling_probabilities(weights, len(source))
        self.position = 0

    def __iter__(self) -> WeightedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = weighted_batch_indices(self.probabilities, self.seed, self.position, self.batch_size)
        rows = rows[self.rows]
        self.position += 1
        return pipeline.stack_examples([self.source[int(i)] for i in rows])

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


def sampling_probabilities(weights: np.ndarray, size: int) -> np.ndarray:
    """`weights` (size,) >= 0 normalised to sum 1 (float64); ValueError for a wrong shape,
    negative or non-finite weights, or all zero."""
    weights = np.asarray(weights, np.float64)
    if weights.shape != (size,):
        raise ValueError(f"sampling_weights must have shape ({size},), got {weights.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError("sampling_weights must be finite, >= 0 and not all zero")
    return weights / weights.sum()


def rating_weights(scores: np.ndarray) -> np.ndarray:
    """Sampling weights from ratings: exp(z) with z the scores standardised over the pool (mean
    0, standard deviation 1; all scores equal: uniform). An example one standard deviation above
    the mean is drawn e ~ 2.7 times as often as an average one. Returns float64 (N,), max 1."""
    scores = np.asarray(scores, np.float64)
    std = scores.std()
    z = (scores - scores.mean()) / std if std > 0 else np.zeros_like(scores)
    return np.exp(z - z.max())


# ==============================================================================================
# Loop
# ==============================================================================================


def _data_digest(source: ArraySource, sampling_weights: np.ndarray | None) -> str:
    """A fingerprint of what is trained on (`ArraySource.fingerprint`: ids in order and sampled
    contents; and the weights), checked on resume."""
    digest = hashlib.sha256(source.fingerprint().encode())
    if sampling_weights is not None:
        digest.update(np.asarray(sampling_weights, np.float64).tobytes())
    return digest.hexdigest()


def train_model(
    cfg: config_lib.Config,
    train_data: ArraySource,
    workdir: str | Path | None,
    *,
    steps: int,
    seed: int,
    validation: ArraySource | None = None,
    sampling_weights: np.ndarray | None = None,
    desc: str = "train",
    stop_after: int | None = None,
    allow_data_change: bool = False,
) -> Trained:
    """Trains a fresh DiT of `cfg.model` for `steps` steps of `cfg.train.batch_size` examples.

    Args:
      cfg: `model`, `train` (optimizer, logging and checkpoint intervals; its `steps` and `seed`
        are replaced by the arguments), `data.max_text_length` / `data.read_threads`.
      train_data: preprocessed examples (`preprocess.materialize`), (R, R, C) images or latents
        and tokens or text embeddings.
      workdir: run folder for config.yaml, metrics.jsonl, tensorboard/ and checkpoints/; a call
        on a folder holding a checkpoint resumes from it (the config sections data, model and
        train and the training data must be the same). None: nothing is written.
      steps: optimizer steps of the run.
      seed: initialisation, caption dropout and flow draws, and the data order.
      validation: preprocessed examples whose fixed-draw loss (`validation_loss`, seed
        `VALIDATION_SEED`, one draw) is logged every `train.eval_every` steps and at the end.
      sampling_weights: (N,) >= 0: batches are drawn with replacement, example i with
        probability weights[i] / sum(weights) (`WeightedBatches`); None: shuffled epochs.
      desc: label of the progress bar.
      stop_after: end after this many steps in this call (for testing resumption).
      allow_data_change: resume even if the training data (or weights) differ from those of the
        checkpoint (otherwise refused).
    Returns:
      The model after the last step run.
    Raises:
      preemption.Preempted: SIGTERM / SIGINT arrived (with a workdir: after a checkpoint of
        the last finished step).
      numerics.NonFiniteError: `train.max_bad_steps` consecutive non-finite steps, or a
        training loss above `train.divergence_factor` times the first one logged.
    """
    train_cfg = cfg.train
    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(train_cfg, steps=steps, seed=seed))
    mesh = parallel.make_mesh(cfg.mesh)
    parallel.check_batch_split(
        {"train.batch_size": train_cfg.batch_size}, mesh, parallel.row_axes(mesh, cfg.mesh.rules)
    )
    batch_size = train_cfg.batch_size
    if batch_size > len(train_data):
        raise ValueError(
            f"train.batch_size={batch_size} is more than the {len(train_data)} training samples"
        )
    inputs = input_spec(train_data[0])
    program = build_program(run_cfg, inputs, mesh, steps, seed)
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        config_lib.write_run_config(
            run_cfg,
            workdir,
            RESUME_SECTIONS,
            resumable=checkpoints.latest_step(workdir / "checkpoints") is not None,
        )
    # Each process reads its rows of every global batch.
    rows = parallel.local_rows(program.batch_sharding, batch_size)
    if sampling_weights is None:
        batches = pipeline.train_iterator(
            train_data, batch_size, seed=seed, rows=rows, read_threads=cfg.data.read_threads
        )
    else:
        batches = WeightedBatches(train_data, sampling_weights, batch_size, seed, rows)
    # Saved with every checkpoint (as its JSON item) next to the data position: what
    # `load_trained` needs to rebuild the model, and what a resumed run must share.
    info = {
        "steps": steps,
        "seed": seed,
        "data": _data_digest(train_data, sampling_weights),
        "inputs": inputs,
    }

    state = program.initial_state
    losses: list = []  # (loss, finite) of the steps since the last training-loss line
    reference = None  # the first training-loss line: the scale divergence is measured against
    manager = metrics_log = None
    if workdir is not None:
        manager = checkpoints.manager(workdir / "checkpoints")
        if manager.latest_step() is not None:
            state, saved = checkpoints.restore(manager, state)
            if saved["data"] != info["data"]:
                message = (
                    f"{workdir} holds a run on other training data (rows, contents, "
                    "selection or weights changed since its checkpoint)"
                )
                if not allow_data_change:
                    raise ValueError(
                        f"{message}: rerun with --allow-data-change to continue on "
                        "the new data anyway, or use a new --workdir"
                    )
                log.warning("%s; continuing (--allow-data-change)", message)
            batches.set_state(saved["batches"])
            losses = [(loss, True) for loss in saved["losses"]]
            reference = saved.get("reference_loss")
            runlog.forget_after(workdir / runlog.METRICS_FILE, int(state["step"]))
            log.info("resuming %s at step %d of %d", workdir, int(state["step"]), steps)
        metrics_log = runlog.MetricsLog(workdir)
    guard = numerics.BadStepGuard(
        desc,
        train_cfg.max_bad_steps,
        f"training diverges: lower train.learning_rate ({train_cfg.learning_rate:g}) or check "
        "the data for extreme values",
    )

    def unread_losses() -> list[float]:
        """Reads the pending (loss, finite) pairs: counts skipped steps, returns the finite
        losses of the interval (a device sync once per log interval)."""
        values = jax.device_get(losses)
        first = step + 1 - len(values) + 1
        return [
            float(loss)
            for number, (loss, ok) in enumerate(values, first)
            if guard.check(number, ok, {"loss": loss})
        ]

    def save(done: int) -> None:
        finite = unread_losses()
        losses[:] = [(loss, True) for loss in finite]
        checkpoints.save(
            manager,
            done,
            state,
            {**info, "batches": batches.get_state(), "losses": finite, "reference_loss": reference},
        )

    start = int(state["step"])
    end = steps if stop_after is None else min(steps, start + stop_after)
    steps_bar = progress.bar(range(start, end), desc=desc, unit="step", initial=start, total=steps)
    with preemption.guard() as stop:
        for step in steps_bar:
            batch = parallel.global_batch(
                model_inputs(next(batches)), program.batch_sharding, (batch_size,)
            )
            state, loss, ok = program.train_step(state, batch)
            losses.append((loss, ok))
            done = step + 1
            metrics = {}
            if done % LOG_EVERY == 0 or done == steps:
                finite = unread_losses()
                losses = []
                if finite:
                    metrics["train_loss"] = float(np.mean(np.asarray(finite, np.float64)))
                    steps_bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")
                    reference = reference or metrics["train_loss"]
                    if metrics["train_loss"] > train_cfg.divergence_factor * reference:
                        raise numerics.NonFiniteError(
                            f"{desc} diverged at step {done}: training loss "
                            f"{metrics['train_loss']:.4g} is over train.divergence_factor="
                            f"{train_cfg.divergence_factor:g} times the first one logged "
                            f"({reference:.4g}); lower train.learning_rate "
                            f"({train_cfg.learning_rate:g})"
                        )
            if validation is not None and (done % train_cfg.eval_every == 0 or done == steps):
                trained = Trained(program.graphdef, state["params"], program.rest)
                metrics["val_loss"] = validation_loss(
                    trained, validation, batch_size, VALIDATION_SEED
                )
            if metrics_log is not None:
                for key, value in metrics.items():  # one line per metric (docs: run folders)
                    metrics_log.write(done, {key: value})
            if manager is not None and (
                done % train_cfg.checkpoint_every == 0 or done == end or stop.requested
            ):
                save(done)
            if stop.requested:
                if metrics_log is not None:
                    metrics_log.close()
                where = (
                    (
                        f"checkpoint saved in {workdir / 'checkpoints'}: rerun the same command "
                        "to resume"
                    )
                    if manager is not None
                    else "nothing was saved (no workdir)"
                )
                raise preemption.Preempted(
                    f"{desc} stopped by {stop.signal_name} after step {done} of {steps}; {where}"
                )
    steps_bar.close()
    if manager is not None:
        manager.wait_until_finished()
        metrics_log.close()
    return Trained(program.graphdef, state["params"], program.rest)


def load_trained(cfg: config_lib.Config, workdir: str | Path) -> Trained:
    """The final model of the finished train run in `workdir` (built from `cfg.model`).

    Raises:
      ValueError: `workdir` holds no checkpoint, or the run is unfinished (names the step
        reached), or its config.yaml has another model section than `cfg`.
    """
    workdir = Path(workdir)
    step = checkpoints.latest_step(workdir / "checkpoints")
    if step is None:
        raise ValueError(f"{workdir} holds no checkpoint of a train run")
    manager = checkpoints.manager(workdir / "checkpoints", read_only=True)
    info = checkpoints.restore_run_state(manager, step)
    if step < info["steps"]:
        raise ValueError(
            f"the train run in {workdir} is unfinished: it reached step {step} of "
            f"{info['steps']}; rerun its train command to finish it"
        )
    stored = yaml.safe_load((workdir / "config.yaml").read_text())
    if stored["model"] != json.loads(json.dumps(config_lib.to_dict(cfg)))["model"]:
        raise ValueError(
            f"{workdir / 'config.yaml'} has another model section than the config given"
        )
    inputs = tuple((name, tuple(shape), dtype) for name, shape, dtype in info["inputs"])
    program = build_program(cfg, inputs, parallel.make_mesh(cfg.mesh), info["steps"], info["seed"])
    state, _ = checkpoints.restore(manager, program.initial_state, step)
    return Trained(program.graphdef, state["params"], program.rest)


# ==============================================================================================
# The command
# ==============================================================================================


def read_selection(path: Path, pool: ArraySource) -> ArraySource:
    """The examples of `pool` whose ids are listed in the `id` column of `path`, in pool
    order."""
    ids = io.read_parquet(path, ("id",)).column("id").to_numpy().astype(np.int64)
    if len(ids) == 0:
        raise ValueError(f"{path} selects no ids")
    return pool.take(
        np.sort(io.pool_positions(ids, pool.ids, str(path))), name=f"{pool.name}[selection]"
    )


def read_rating_weights(path: Path, pool: ArraySource) -> np.ndarray:
    """Sampling weights (N,) of the pool examples from the `id` / `score` columns of a ratings
    file, by `rating_weights`; every pool id needs a finite score."""
    table = io.read_parquet(path, ("id", "score"))
    ids = table.column("id").to_numpy().astype(np.int64)
    scores = table.column("score").to_numpy().astype(np.float64)
    indices = io.pool_positions(ids, pool.ids, str(path), cover=True)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{path}: column 'score' has non-finite values")
    pool_scores = np.empty(len(pool))
    pool_scores[indices] = scores
    return rating_weights(pool_scores)


def run(
    cfg: config_lib.Config,
    workdir: str | Path,
    selection: str | Path | None = None,
    weights: str | Path | None = None,
    allow_data_change: bool = False,
) -> dict[str, Any]:
    """Trains (or resumes) the T2I model of `cfg` in `workdir` for `train.steps` steps.

    Data: with `selection` (a Parquet file with an `id` column), the pool examples it lists;
    with `weights` (a ratings Parquet file, `id` and `score` for every pool id), the whole pool
    sampled with probability proportional to exp(z-scored score) (`rating_weights`); neither:
    the whole pool. The validation loss is taken on the clean validation set.
    Returns:
      {"steps", "train_size", "train_loss", "val_loss"} of the finished run.
    """
    if selection is not None and weights is not None:
        raise ValueError("give a selection or weights, not both")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = prepare_splits(cfg.data, report_dir=workdir)
    pool, sampling_weights = data.pool, None
    if selection is not None:
        pool = read_selection(Path(selection), pool)
    if weights is not None:
        sampling_weights = read_rating_weights(Path(weights), pool)
    mode = (
        "selection"
        if selection is not None
        else "weighted pool"
        if weights is not None
        else "full pool"
    )
    log.info("training on %d examples (%s), %d steps", len(pool), mode, cfg.train.steps)
    train_model(
        cfg,
        pool,
        workdir,
        steps=cfg.train.steps,
        seed=cfg.train.seed,
        validation=data.validation,
        sampling_weights=sampling_weights,
        allow_data_change=allow_data_change,
    )
    return {
        "steps": cfg.train.steps,
        "train_size": len(pool),
        **runlog.last_values(workdir / runlog.METRICS_FILE, ("train_loss", "val_loss")),
    }
