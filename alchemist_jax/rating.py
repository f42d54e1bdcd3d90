"""Learning the rater (`alchemist-jax rate` calls `run`): one rating run, top to bottom.

  data      training pool (optionally with injected defects) and a clean validation set,
            preprocessed once into memory; grain iterators with resumable state
  models    P proxy DiTs (stacked, trained side by side with jax.vmap) and one rater
  steps     pure functions jitted once on a mesh with explicit shardings and donated state:
            `meta_step` (K unrolled proxy steps + the rater's meta-gradient update; its
            gradient alone is `meta_gradient`),
            `proxy_steps` (plain weighted steps), `reset_proxy` (staggered re-initialisation)
  loop      meta-steps with a progress bar, metrics to JSONL + TensorBoard, periodic AUROC
            when the defects are known, orbax checkpoints (state + iterator positions) from
            which a rerun of the same command resumes, curves as PNG at the end

The state is a dict of pytrees:
  step (), rng (key data), rater / rater_ema (rater params), rater_opt (optax state),
  proxy / proxy_opt (leading axis P), warm_proxy (P, ...) the restart point of resets.

Size: the rating story in one file, as big_vision tells training: data iterators, the jitted
program and the loop read top to bottom; the infrastructure it uses lives in `runtime/`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alchemist_jax import config as config_lib
from alchemist_jax import meta, models
from alchemist_jax.data import PreparedSplits, pipeline, prepare_splits
from alchemist_jax.data.sources import Source
from alchemist_jax.evaluation.defects import defect_auroc
from alchemist_jax.runtime import checkpoints, numerics, parallel, preemption, progress, runlog
from alchemist_jax.runtime.parallel import model_inputs

log = logging.getLogger("alchemist_jax.rating")


# ==============================================================================================
# Steps (pure functions, jitted once)
# ==============================================================================================


def meta_loss_fn(
    name: str, proxy_graph, proxy_rest, plain_weight: float = 0.0
) -> Callable[..., jax.Array] | None:
    """The validation objective `(proxy_params, val_batch, rng) -> (B_v,)` of `rate.meta_loss`
    (`config.META_LOSSES`), for `meta.meta_gradient(val_loss_fn=...)`:
      plain: None, i.e. the proxy's training loss (with `model.caption_dropout`) on the
        validation batch;
      caption_gap: `models.caption_gap_loss_fn` of the proxy loss without caption dropout (loss
        under the true captions minus under a derangement of the batch's captions, fixed per
        meta-step key, plus `plain_weight` times the loss under the true captions): twice the
        validation forward/backward work.
    """
    if name == "plain":
        return None
    if name == "caption_gap":
        return models.caption_gap_loss_fn(
            models.proxy_loss_fn(proxy_graph, proxy_rest, 0.0), plain_weight=plain_weight
        )
    raise ValueError(f"unknown rate.meta_loss {name!r}: one of {', '.join(config_lib.META_LOSSES)}")


@dataclasses.dataclass
class RatingProgram:
    """The jitted steps of a rating run and the shardings they were compiled for."""

    init_state: Callable[[jax.Array], dict]
    meta_gradient: Callable[..., tuple[Any, dict]]
    meta_step: Callable[..., tuple[dict, dict]]
    proxy_steps: Callable[..., tuple[dict, jax.Array]]
    reset_proxy: Callable[[dict, jax.Array], dict]
    score: Callable[[Any, dict], jax.Array]
    state_sharding: Any
    train_sharding: NamedSharding  # (P, S, B, ...) batches: P and B split (mesh.rules)
    val_sharding: NamedSharding  # (B, ...) batches: B split over the batch axes


# State entries stacked over the population of proxies (leading axis P).
POPULATION_STATE = ("proxy", "proxy_opt", "warm_proxy")
# metrics.jsonl keys drawn in curves.png, one panel per group.
CURVE_PANELS = (("meta_loss", "proxy_loss"), ("weight_entropy", "weight_ess"), ("auroc/",))


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _meta_metrics(grads, aux: dict) -> dict[str, jax.Array]:
    """Scalars of one meta-step: losses, the spread of the weights (P, K, B) and the norm of the
    population-averaged meta-gradient."""
    weights = aux["weights"]
    batch = weights.shape[-1]
    probs = weights / weights.sum(-1, keepdims=True)
    entropy = -(probs * jnp.log(jnp.maximum(probs, 1e-30))).sum(-1) / jnp.log(batch)
    ess = weights.sum(-1) ** 2 / (weights**2).sum(-1) / batch
    return {
        "meta_loss": aux["meta_loss"].mean(),
        "proxy_loss": aux["inner_losses"].mean(),
        "weight_entropy": entropy.mean(),
        "weight_ess": ess.mean(),
        "weight_max": weights.max(-1).mean(),
        "rater_grad_norm": _global_norm(grads),
    }


def build_program(
    cfg: config_lib.Config,
    example_batch: dict,
    mesh: jax.sharding.Mesh,
) -> RatingProgram:
    """Builds the models and jits the steps for batches shaped like `example_batch`."""
    rate_cfg = cfg.rate
    population = rate_cfg.population
    key = jax.random.key(rate_cfg.seed)
    # The proxies' leading axis P is split over the mesh axes of the `population` rule, each
    # proxy's batch rows over those of `batch` (config mesh.rules); the vmaps over proxies say so
    # with `spmd_axis_name`, so that sharding constraints inside them keep P split.
    rules = cfg.mesh.rules
    population_axes = parallel.axes_of(parallel.POPULATION, mesh, rules) or None
    rows = NamedSharding(mesh, parallel.logical_spec((None, parallel.BATCH), mesh, rules))

    def split_rows(batches: dict) -> dict:
        """(S, B, ...) batches of one proxy, constrained to rows split over the batch axes."""
        return jax.lax.with_sharding_constraint(batches, rows)

    proxy_graph, _, proxy_rest = models.init_proxy(
        cfg.model, example_batch, key, cfg.data.max_text_length
    )
    rater_graph, _, rater_rest = models.init_rater(
        cfg.rater, example_batch, key, cfg.data.max_text_length
    )
    loss_fn = models.proxy_loss_fn(proxy_graph, proxy_rest, cfg.model.caption_dropout)
    val_loss_fn = meta_loss_fn(
        rate_cfg.meta_loss, proxy_graph, proxy_rest, rate_cfg.gap_plain_weight
    )
    rater_fn = models.rater_weight_fn(rater_graph, rater_rest, cfg.rater.temperature)
    score_fn = models.rater_score_fn(rater_graph, rater_rest)
    inner_opt = meta.inner_optimizer(rate_cfg.inner_lr, rate_cfg.inner_eps)
    rater_opt = optax.chain(
        optax.clip_by_global_norm(rate_cfg.rater_clip), optax.adam(rate_cfg.rater_lr)
    )

    def init_proxy_params(k):
        return models.init_proxy(cfg.model, example_batch, k, cfg.data.max_text_length)[1]

    def init_state(k: jax.Array) -> dict:
        rater_key, proxy_key, k = jax.random.split(k, 3)
        rater = models.init_rater(cfg.rater, example_batch, rater_key, cfg.data.max_text_length)[1]
        proxies = jax.vmap(init_proxy_params)(jax.random.split(proxy_key, population))
        return {
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(k),
            "rater": rater,
            "rater_ema": rater,
            "rater_opt": rater_opt.init(rater),
            "proxy": proxies,
            "proxy_opt": jax.vmap(inner_opt.init)(proxies),
            "warm_proxy": proxies,
        }

    def next_key(state: dict) -> tuple[dict, jax.Array]:
        k, sub = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        return {**state, "rng": jax.random.key_data(k)}, sub

    def population_meta_gradient(
        state: dict, train_batches: dict, val_batch: dict, penalty_lambda, k: jax.Array
    ):
        """The rater's meta-gradient averaged over the P proxies, and `meta.meta_gradient`'s
        auxiliary outputs per proxy (leading axis P)."""

        def one_proxy(proxy, proxy_opt, batches, proxy_key):
            return meta.meta_gradient(
                state["rater"],
                proxy,
                proxy_opt,
                split_rows(batches),
                val_batch,
                proxy_key,
                rater_fn=rater_fn,
                loss_fn=loss_fn,
                inner_opt=inner_opt,
                val_loss_fn=val_loss_fn,
                mode=rate_cfg.mode,
                remat=rate_cfg.remat,
                mixed_mode=rate_cfg.mixed_mode,
                unroll=rate_cfg.unroll,
                lookahead_lr=rate_cfg.lookahead_lr,
                penalty_lambda=penalty_lambda,
            )

        grads, aux = jax.vmap(one_proxy, spmd_axis_name=population_axes)(
            state["proxy"], state["proxy_opt"], train_batches, jax.random.split(k, population)
        )
        return jax.tree.map(lambda g: g.mean(axis=0), grads), aux

    def meta_gradient(state: dict, train_batches: dict, val_batch: dict, penalty_lambda):
        """What `meta_step` would apply, without applying it: (rater gradient, its metrics)."""
        _, k = next_key(state)
        grads, aux = population_meta_gradient(state, train_batches, val_batch, penalty_lambda, k)
        return grads, _meta_metrics(grads, aux)

    def meta_step(state: dict, train_batches: dict, val_batch: dict, penalty_lambda):
        state, k = next_key(state)
        grads, aux = population_meta_gradient(state, train_batches, val_batch, penalty_lambda, k)
        updates, opt_state = rater_opt.update(grads, state["rater_opt"], state["rater"])
        rater = optax.apply_updates(state["rater"], updates)
        ema = optax.incremental_update(rater, state["rater_ema"], 1.0 - rate_cfg.ema_decay)
        metrics = _meta_metrics(grads, aux)
        # A meta-step with a non-finite loss, meta-gradient or proxy is skipped (not applied).
        ok = numerics.all_finite(
            (aux["meta_loss"], aux["inner_losses"], grads, aux["proxy_params"])
        )
        updated = {
            "rater": rater,
            "rater_ema": ema,
            "rater_opt": opt_state,
            "proxy": aux["proxy_params"],
            "proxy_opt": aux["inner_opt_state"],
        }
        updated = numerics.keep_if(ok, updated, {key: state[key] for key in updated})
        return {**state, "step": state["step"] + 1, **updated}, {**metrics, "finite": ok}

    def proxy_steps(state: dict, batches: dict, use_rater: bool) -> tuple[dict, jax.Array]:
        """Plain steps of every proxy on (P, S, B, ...) batches, weighted by the current rater
        (`use_rater`) or uniformly (warm start); and whether the proxies stayed finite (if not,
        the steps are not applied)."""
        state, k = next_key(state)
        rater = jax.lax.stop_gradient(state["rater"])

        def one_proxy(proxy, proxy_opt, proxy_batches, proxy_key):
            def step(carry, inputs):
                params, opt_state = carry
                batch, index = inputs
                weights = rater_fn(rater, batch) if use_rater else 1.0

                def objective(p):
                    return jnp.mean(
                        weights * loss_fn(p, batch, jax.random.fold_in(proxy_key, index))
                    )

                grads = jax.grad(objective)(params)
                updates, opt_state = inner_opt.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), None

            steps = jax.tree.leaves(proxy_batches)[0].shape[0]
            (proxy, proxy_opt), _ = jax.lax.scan(
                step, (proxy, proxy_opt), (split_rows(proxy_batches), jnp.arange(steps))
            )
            return proxy, proxy_opt

        proxy, proxy_opt = jax.vmap(one_proxy, spmd_axis_name=population_axes)(
            state["proxy"], state["proxy_opt"], batches, jax.random.split(k, population)
        )
        ok = numerics.all_finite(proxy)  # diverged proxies are not kept
        updated = numerics.keep_if(
            ok,
            {"proxy": proxy, "proxy_opt": proxy_opt},
            {"proxy": state["proxy"], "proxy_opt": state["proxy_opt"]},
        )
        return {**state, **updated}, ok

    def reset_proxy(state: dict, index: jax.Array) -> dict:
        """Restarts proxy `index` from its warm-start point with a fresh optimizer state.

        A select along the population axis (no gather or dynamic slice of it): with P split over
        devices each device rewrites its own proxies or none, and nothing moves between them."""
        chosen = jnp.arange(population) == index  # (P,)

        def put(fresh, current):  # (P, ...) each
            return jnp.where(chosen.reshape((-1,) + (1,) * (current.ndim - 1)), fresh, current)

        fresh_opt = jax.vmap(inner_opt.init)(state["warm_proxy"])
        return {
            **state,
            "proxy": jax.tree.map(put, state["warm_proxy"], state["proxy"]),
            "proxy_opt": jax.tree.map(put, fresh_opt, state["proxy_opt"]),
        }

    # Every state entry split by its parameters' logical axes (FSDP: parameters and optimizer
    # states alike); the stacked proxies' leading axis by the `population` rule.
    replicated = NamedSharding(mesh, P())
    state_shape = jax.eval_shape(init_state, key)
    state_sharding = {
        name: parallel.logical_shardings(
            value, mesh, rules, leading=(parallel.POPULATION,) if name in POPULATION_STATE else ()
        )
        for name, value in state_shape.items()
    }
    rater_sharding = state_sharding["rater"]
    train_sharding = NamedSharding(
        mesh, parallel.logical_spec((parallel.POPULATION, None, parallel.BATCH), mesh, rules)
    )
    val_sharding = NamedSharding(mesh, parallel.logical_spec((parallel.BATCH,), mesh, rules))
    return RatingProgram(
        init_state=jax.jit(init_state, out_shardings=state_sharding),
        meta_gradient=jax.jit(
            meta_gradient,
            in_shardings=(state_sharding, train_sharding, val_sharding, replicated),
            out_shardings=(rater_sharding, replicated),
        ),
        meta_step=jax.jit(
            meta_step,
            in_shardings=(state_sharding, train_sharding, val_sharding, replicated),
            out_shardings=(state_sharding, replicated),
            donate_argnums=(0,),
        ),
        proxy_steps=jax.jit(
            proxy_steps,
            static_argnums=(2,),
            in_shardings=(state_sharding, train_sharding),
            out_shardings=(state_sharding, replicated),
            donate_argnums=(0,),
        ),
        reset_proxy=jax.jit(
            reset_proxy,
            in_shardings=(state_sharding, replicated),
            out_shardings=state_sharding,
            donate_argnums=(0,),
        ),
        score=jax.jit(
            score_fn, in_shardings=(rater_sharding, val_sharding), out_shardings=replicated
        ),
        state_sharding=state_sharding,
        train_sharding=train_sharding,
        val_sharding=val_sharding,
    )


# ==============================================================================================
# Loop
# ==============================================================================================


class _Batches:
    """Draws this process's part of the (P, S, B, ...) proxy batches and (B_val, ...) validation
    batches, as global arrays laid out for the steps; the grain iterators' positions go into
    checkpoints.

    Each inner step draws one global batch of P * B pool examples, laid out (P, B): proxy p
    trains on positions p * B .. (p + 1) * B - 1. A process reads only the positions of the
    proxies and rows its devices hold (`parallel.local_block` of the step's sharding), so the
    batches, and the run, are the same on any number of processes."""

    def __init__(self, data: PreparedSplits, cfg: config_lib.Config, program: RatingProgram):
        rate_cfg, batch = cfg.rate, cfg.data.batch_size
        self.population, self.batch = rate_cfg.population, batch
        self.val_batch = rate_cfg.val_batch_size
        self.program = program
        proxies, _, rows = parallel.local_block(program.train_sharding, (self.population, 1, batch))
        self.local_shape = (proxies.stop - proxies.start, rows.stop - rows.start)
        self.train = pipeline.train_iterator(
            data.pool,
            batch * self.population,
            seed=cfg.data.seed,
            rows=parallel.block_rows((proxies, rows), (self.population, batch)),
            read_threads=cfg.data.read_threads,
        )
        self.validation = pipeline.train_iterator(
            data.validation,
            self.val_batch,
            seed=cfg.data.seed + 1,
            rows=parallel.local_rows(program.val_sharding, self.val_batch),
            read_threads=cfg.data.read_threads,
        )

    def proxy_batches(self, steps: int) -> dict[str, jax.Array]:
        draws = [model_inputs(next(self.train)) for _ in range(steps)]
        stacked = {k: np.stack([d[k] for d in draws]) for k in draws[0]}  # (S, P_l*B_l, ...)
        local = {
            k: np.swapaxes(v.reshape(steps, *self.local_shape, *v.shape[2:]), 0, 1)
            for k, v in stacked.items()
        }
        return parallel.global_batch(
            local, self.program.train_sharding, (self.population, steps, self.batch)
        )

    def validation_batch(self) -> dict[str, jax.Array]:
        return parallel.global_batch(
            model_inputs(next(self.validation)), self.program.val_sharding, (self.val_batch,)
        )

    def get_state(self) -> dict:
        return {"train": self.train.get_state(), "validation": self.validation.get_state()}

    def set_state(self, state: dict) -> None:
        self.train.set_state(state["train"])
        self.validation.set_state(state["validation"])


def score_source(
    program: RatingProgram, rater_params, source: Source, batch_size: int
) -> np.ndarray:
    """Batch-independent rater scores u (N,) float32 of every example of `source`, in order
    (every process reads its rows of each batch and gets every score)."""
    scores = np.empty(len(source), np.float32)
    rows = parallel.local_rows(program.val_sharding, batch_size)
    batches = pipeline.eval_iterator(source, batch_size, rows=rows)
    for number, batch in enumerate(batches):
        inputs = parallel.global_batch(model_inputs(batch), program.val_sharding, (batch_size,))
        u = np.asarray(program.score(rater_params, inputs))
        start = number * batch_size
        real = min(batch_size, len(source) - start)
        scores[start : start + real] = u[:real]
    return scores


def rater_auroc(
    program: RatingProgram, state: dict, data: PreparedSplits, batch_size: int
) -> dict[str, float]:
    """AUROC of the EMA rater's scores, clean vs each defect kind, within caption classes."""
    scores = score_source(program, state["rater_ema"], data.pool, batch_size)
    return defect_auroc(scores, data.defects, data.caption_classes)


def run(
    cfg: config_lib.Config,
    workdir: str | Path,
    *,
    stop_after: int | None = None,
    allow_data_change: bool = False,
) -> dict[str, Any]:
    """Runs (or resumes) a rating run in `workdir`; returns the final metrics.

    Args:
      cfg: the run's config (sections data, model, rater, rate must match a run it resumes).
      workdir: run folder (config.yaml, checkpoints/, metrics.jsonl, tensorboard/, curves.png).
      stop_after: end after that many meta-steps in this call (used to test resuming: an
        interrupted run, rerun, ends with the same rater as an uninterrupted one).
      allow_data_change: resume even if the pool or validation data differ from the data the
        checkpoint was trained on (otherwise refused).
    Raises:
      preemption.Preempted: SIGTERM / SIGINT arrived; a checkpoint of the last finished
        meta-step was saved first.
      numerics.NonFiniteError: `rate.max_bad_steps` consecutive meta-steps were non-finite.
    """
    mesh = parallel.make_mesh(cfg.mesh)
    parallel.check_batch_split(
        {"data.batch_size": cfg.data.batch_size, "rate.val_batch_size": cfg.rate.val_batch_size},
        mesh,
        parallel.axes_of(parallel.BATCH, mesh, cfg.mesh.rules),
    )
    parallel.check_batch_split(
        {"rate.population": cfg.rate.population},
        mesh,
        parallel.axes_of(parallel.POPULATION, mesh, cfg.mesh.rules),
    )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.write_run_config(
        cfg,
        workdir,
        ("data", "model", "rater", "rate"),
        resumable=checkpoints.latest_step(workdir / "checkpoints") is not None,
    )
    rate_cfg = cfg.rate
    inner, cycle = rate_cfg.inner_steps, rate_cfg.meta_every or rate_cfg.inner_steps

    data = prepare_splits(cfg.data, report_dir=workdir)
    log.info(
        "pool %d examples, validation %d; %s, K=%d, P=%d, %d meta-steps",
        len(data.pool),
        len(data.validation),
        rate_cfg.mode,
        inner,
        rate_cfg.population,
        rate_cfg.steps,
    )
    _check_batches_fit(cfg, len(data.pool), len(data.validation))
    example = model_inputs(data.pool[0])
    example = {k: np.stack([v] * cfg.data.batch_size) for k, v in example.items()}
    program = build_program(cfg, example, mesh)
    batches = _Batches(data, cfg, program)
    guard = numerics.BadStepGuard(
        "rate",
        rate_cfg.max_bad_steps,
        f"the proxies or the rater diverge: lower rate.inner_lr ({rate_cfg.inner_lr:g}) or "
        f"rate.rater_lr ({rate_cfg.rater_lr:g}), or check the data for extreme values",
    )
    fingerprint = data.fingerprint()

    manager = checkpoints.manager(workdir / "checkpoints")
    state = program.init_state(jax.random.key(rate_cfg.seed))
    if manager.latest_step() is not None:
        state, run_state = checkpoints.restore(manager, state)
        _check_same_data(
            run_state.get("data"), fingerprint, workdir, int(state["step"]), allow_data_change
        )
        batches.set_state(run_state["batches"])
        runlog.forget_after(workdir / runlog.METRICS_FILE, int(state["step"]))
        log.info("resumed from meta-step %d", int(state["step"]))
    elif rate_cfg.warm_start_steps:
        state, ok = program.proxy_steps(
            state, batches.proxy_batches(rate_cfg.warm_start_steps), False
        )
        guard.check(0, ok, {})
        # A copy: the state is donated to the next step, and one buffer cannot be donated twice.
        state = {**state, "warm_proxy": jax.tree.map(jnp.copy, state["proxy"])}

    metrics_log = runlog.MetricsLog(workdir)
    start = int(state["step"])
    if start >= rate_cfg.steps:
        log.info("the run in %s is complete (%d meta-steps)", workdir, start)
        metrics_log.close()
        return metrics_log.last()
    end = rate_cfg.steps if stop_after is None else min(rate_cfg.steps, start + stop_after)
    last: dict[str, float] = {}
    pending: list[tuple[int, Any, Any]] = []  # (meta-step, finite flag, metrics), not yet read

    def read_pending() -> None:
        """Reads the finite flags of the steps run since the last read (one device sync per log
        interval, not per step) and counts the skipped ones."""
        for number, ok, values in jax.device_get(pending):
            guard.check(number, ok, values)
        pending.clear()

    def save(done: int) -> None:
        read_pending()
        checkpoints.save(
            manager, done, state, {"batches": batches.get_state(), "data": fingerprint}
        )

    steps_bar = progress.bar(
        range(start, end),
        desc=f"rate ({rate_cfg.mode})",
        unit="step",
        initial=start,
        total=rate_cfg.steps,
    )
    with preemption.guard() as stop:
        for step in steps_bar:
            if cycle > inner:
                state, ok = program.proxy_steps(state, batches.proxy_batches(cycle - inner), True)
                pending.append((step + 1, ok, {}))
            val_epochs = step * rate_cfg.val_batch_size / len(data.validation)
            penalty_lambda = np.float32(
                meta.penalty_lambda_at(val_epochs, rate_cfg.penalty_start, rate_cfg.penalty_decay)
            )
            state, metrics = program.meta_step(
                state, batches.proxy_batches(inner), batches.validation_batch(), penalty_lambda
            )
            ok = metrics.pop("finite")
            pending.append(
                (
                    step + 1,
                    ok,
                    {k: metrics[k] for k in ("meta_loss", "proxy_loss", "rater_grad_norm")},
                )
            )
            for p in _proxies_to_reset(step + 1, rate_cfg.reset_every, rate_cfg.population):
                state = program.reset_proxy(state, jnp.int32(p))
            done = step + 1
            if done % rate_cfg.log_every == 0 or done == end:
                read_pending()
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last["skipped_steps"] = guard.skipped
                if rate_cfg.mode == "penalty":
                    last["penalty_lambda"] = float(penalty_lambda)
                if data.defects is not None and (
                    done % rate_cfg.checkpoint_every == 0 or done == rate_cfg.steps
                ):
                    last.update(
                        {
                            f"auroc/{k}": v
                            for k, v in rater_auroc(
                                program, state, data, rate_cfg.val_batch_size
                            ).items()
                        }
                    )
                metrics_log.write(done, last)
                steps_bar.set_postfix(
                    meta=f"{last['meta_loss']:.4f}",
                    proxy=f"{last['proxy_loss']:.4f}",
                    H=f"{last['weight_entropy']:.3f}",
                )
            if done % rate_cfg.checkpoint_every == 0 or done == end:
                save(done)
            elif stop.requested:
                save(done)
            if stop.requested:
                manager.wait_until_finished()
                metrics_log.close()
                raise preemption.Preempted(
                    f"rate stopped by {stop.signal_name} after meta-step {done} of "
                    f"{rate_cfg.steps}; checkpoint saved in {workdir / 'checkpoints'}: rerun the "
                    "same command to resume"
                )
    steps_bar.close()
    manager.wait_until_finished()
    metrics_log.close()
    if int(state["step"]) == rate_cfg.steps:
        runlog.plot_curves(metrics_log.path, workdir / "curves.png", CURVE_PANELS, "meta-step")
    return last


def _check_batches_fit(cfg: config_lib.Config, pool: int, validation: int) -> None:
    """One meta-step draws P batches from the pool and one from the validation set."""
    draw = cfg.data.batch_size * cfg.rate.population
    if draw > pool:
        raise ValueError(
            f"data.batch_size * rate.population = {draw} is more than the pool's {pool} samples"
        )
    if cfg.rate.val_batch_size > validation:
        raise ValueError(
            f"rate.val_batch_size={cfg.rate.val_batch_size} is more than the "
            f"validation set's {validation} samples"
        )


def _check_same_data(
    saved: dict | None, current: dict, workdir: Path, step: int, allow: bool
) -> None:
    """Refuses to resume on data that changed since the checkpoint (unless `allow`)."""
    if saved is None or saved == current:
        return
    changed = ", ".join(split for split in current if saved.get(split) != current[split])
    message = (
        f"{workdir} holds a run on other data: the {changed} rows differ from those its "
        f"checkpoint at step {step} was trained on"
    )
    if not allow:
        raise ValueError(
            f"{message}; rerun with --allow-data-change to continue on the new "
            "data anyway, or use a new --workdir"
        )
    log.warning("%s; continuing (--allow-data-change)", message)


def _proxies_to_reset(done: int, reset_every: int, population: int) -> list[int]:
    """Proxy p restarts when (done + p * reset_every / P) is a multiple of reset_every: the
    population is staggered so that no two proxies restart at once."""
    if reset_every <= 0:
        return []
    return [
        p for p in range(population) if (done + p * reset_every // population) % reset_every == 0
    ]
