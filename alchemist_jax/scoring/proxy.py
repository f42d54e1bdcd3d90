"""Scorers built from a trained model: proxy DiTs (loss, el2n, grand), CLIP, caption alignment.

  loss           -flow-matching loss of a proxy trained on the clean validation set
  el2n           -L2 norm of the velocity error of an early proxy (trained on the pool)
  grand          -per-sample gradient norm of the early proxy's loss
  clip_score     cosine similarity of the image and caption embeddings of a local HF CLIP
                 checkpoint (`score.clip_path`, `models.clip`)
  alignment      how well the caption fits the image, by models trained on the validation set
                 (`score.alignment_method`, `alignment`)

Each factory takes the `ScoringInputs` of the pass and returns `score_batch(batch) -> (B,)`.
The proxy scores use fixed draws: draw d of the sample with id i takes its flow time t and noise
eps from the key fold_in(fold_in(key(score.seed), d), i) (`models.fixed_draws`), so a sample's
score depends on its id only, never on its batch or position. No caption is ever dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alchemist_jax import alignment, models, training
from alchemist_jax import config as config_lib
from alchemist_jax.config import PROXY_SCORERS
from alchemist_jax.data import load_splits
from alchemist_jax.data.sources import ArraySource
from alchemist_jax.models import clip
from alchemist_jax.runtime.parallel import model_inputs
from alchemist_jax.scoring.driver import ScoreBatch, pool_columns
from alchemist_jax.scoring.rating_run import RatingRun


@dataclasses.dataclass
class ScoringInputs:
    """What a scorer factory may need: the config, the preprocessed pool, the validation set
    (`loss` and `alignment` only), the rating run (`rater` only) and the workdir of proxy
    training (resumable; None: in memory)."""

    cfg: config_lib.Config
    pool: ArraySource
    validation: ArraySource | None
    rating_run: RatingRun | None
    proxy_workdir: Path | None


def proxy_score_fn(
    kind: str, graphdef: nnx.GraphDef, rest: nnx.State, *, draws: int, seed: int
) -> Callable[..., jax.Array]:
    """The jitted `score(params, batch, id_low, id_high) -> (B,)` of a proxy DiT.

    For each sample and each of `draws` fixed draws (`models.fixed_draws`), the flow-matching
    error at (t, eps) without caption dropout gives a statistic, averaged over the draws and
    negated:
      loss: the loss, mean over (H, W, C) of (v_pred - (eps - x0))^2;
      el2n: the L2 norm of v_pred - (eps - x0) over (H, W, C);
      grand: the global L2 norm of the gradient of the sample's own loss w.r.t. `params`
        (per-example gradients: memory grows with B times the parameter count).
    `batch` holds the model inputs (`parallel.MODEL_INPUTS`); `id_low` / `id_high` (B,) uint32 are
    the halves of the sample ids (`models.split_ids`).
    """
    if kind not in PROXY_SCORERS:
        raise ValueError(f"unknown proxy scorer {kind!r}: one of {', '.join(PROXY_SCORERS)}")

    def losses(params, batch, t, eps):
        return models.flow_matching_loss_at(nnx.merge(graphdef, params, rest), batch, t, eps)

    def grad_norms(params, batch, t, eps):
        def one(row, t_row, eps_row):
            single = lambda p: losses(
                p,
                jax.tree.map(lambda x: x[None], row),  # noqa: E731
                t_row[None],
                eps_row[None],
            )[0]
            return optax.tree.norm(jax.grad(single)(params))

        return jax.vmap(one)(batch, t, eps)

    def score(params, batch, id_low, id_high):
        x0 = models.visual_input(batch)

        def statistic(draw):
            t, eps = models.fixed_draws(seed, draw, id_low, id_high, x0.shape[1:])
            if kind == "grand":
                return grad_norms(params, batch, t, eps)
            per_sample = losses(params, batch, t, eps)
            return per_sample if kind == "loss" else jnp.sqrt(per_sample * x0[0].size)

        return -jnp.mean(jax.lax.map(statistic, jnp.arange(draws)), axis=0)

    return jax.jit(score)


def _train_proxy(
    inputs: ScoringInputs, data: ArraySource, steps: int, desc: str
) -> training.Trained:
    """A DiT of the config trained `steps` steps on `data` (seed `score.seed`), in the
    resumable `inputs.proxy_workdir`."""
    cfg = inputs.cfg
    # The proxies warm up over at most a tenth of their steps (early proxies are short).
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, warmup_steps=min(cfg.train.warmup_steps, steps // 10)),
    )
    return training.train_model(
        cfg, data, inputs.proxy_workdir, steps=steps, seed=cfg.score.seed, desc=desc
    )


def proxy_scorer(kind: str) -> Callable[[ScoringInputs], ScoreBatch]:
    """The factory of proxy scorer `kind` (`config.PROXY_SCORERS`): trains its proxy DiT
    (`loss`: `score.proxy_steps` on the validation set; `el2n` / `grand`: `score.early_steps`
    on the pool) and scores with `proxy_score_fn`."""

    def factory(inputs: ScoringInputs) -> ScoreBatch:
        score_cfg = inputs.cfg.score
        if kind == "loss":  # trained for long on the clean validation set
            data, steps = inputs.validation, score_cfg.proxy_steps
        else:  # early in training on the pool itself (EL2N / GraNd)
            data, steps = inputs.pool, score_cfg.early_steps
        trained = _train_proxy(inputs, data, steps, f"{kind} proxy")
        score = proxy_score_fn(
            kind, trained.graphdef, trained.rest, draws=score_cfg.draws, seed=score_cfg.seed
        )
        return lambda batch: score(
            trained.params, model_inputs(batch), *models.split_ids(batch["id"])
        )

    return factory


def pool_captions(cfg: config_lib.Config, pool: ArraySource) -> dict[int, str]:
    """id -> the full caption text of every sample of the preprocessed `pool`, read from the
    source of `cfg.data` (defects included: a swapped caption is the swapped text). The
    preprocessed pool keeps only token ids cut at `data.max_text_length`.

    Raises:
      ValueError: the source has no captions, or other ids than `pool`.
    """
    source = load_splits(cfg.data).train
    if isinstance(source, ArraySource) and source.captions is not None:
        ids, texts = source.ids, source.captions
    else:  # example by example (a manifest decodes its images once more)
        pairs = [
            (example["id"], example.get("caption"))
            for example in map(source.__getitem__, range(len(source)))
        ]
        ids = np.array([pair[0] for pair in pairs], np.int64)
        texts = [pair[1] for pair in pairs]
    if any(text is None for text in texts):
        raise ValueError(f"score.scorer=clip_score needs a caption for every sample of {pool.name}")
    if not np.array_equal(ids, pool.ids):
        raise ValueError(f"the captions of {source.name} are not those of {pool.name} (other ids)")
    return dict(zip(pool.ids.tolist(), texts))


def clip_scorer(inputs: ScoringInputs) -> ScoreBatch:
    """score_batch of the CLIP checkpoint in `score.clip_path`: the cosine similarity (B,) of
    each image with its caption. CLIP sees the pool's preprocessed images (`clip.clip_pixels`)
    and each sample's full caption text (`pool_captions`, looked up by id), tokenized by the
    checkpoint's own tokenizer to its own context length (77 for OpenAI CLIP): a caption longer
    than `data.max_text_length` is scored whole, not cut to the pool's token ids."""
    example = inputs.pool[0]
    if "image" not in example or "tokens" not in example:
        raise ValueError(
            f"score.scorer=clip_score needs pixel images and captions; the pool "
            f"{inputs.pool.name} has {', '.join(sorted(example))}"
        )
    checkpoint = clip.load_clip(inputs.cfg.score.clip_path)
    captions = pool_captions(inputs.cfg, inputs.pool)
    padding = captions[int(inputs.pool.ids[0])]  # for padding rows (id -1; scores discarded)
    score = clip.clip_score_fn(checkpoint)

    def score_batch(batch):
        texts = [captions.get(int(i), padding) for i in batch["id"]]
        return score(checkpoint.params, batch["image"], checkpoint.tokenize(texts))

    return score_batch


def alignment_scorer(inputs: ScoringInputs) -> ScoreBatch:
    """score_batch of `score.alignment_method` (`alignment`), its model trained on the
    validation set: the contrastive model's log-softmax of the own caption (not checkpointed: it
    trains in about a minute, and again identically on a resumed run), or the diffusion margin
    of a proxy DiT trained `score.proxy_steps` steps (resumable, like the `loss` proxy)."""
    score_cfg = inputs.cfg.score
    if "tokens" not in inputs.pool[0] and "text_embedding" not in inputs.pool[0]:
        raise ValueError(
            f"score.scorer=alignment needs captions; the pool {inputs.pool.name} has none"
        )
    validation = model_inputs(pool_columns(inputs.validation, 0, len(inputs.validation)))
    references = alignment.reference_captions(
        validation, score_cfg.alignment_references, score_cfg.seed
    )
    if score_cfg.alignment_method == "contrastive":
        graphdef, params, rest = alignment.train_contrastive(
            validation,
            alignment.ContrastiveTraining(steps=score_cfg.alignment_steps),
            score_cfg.seed,
            desc="alignment model",
        )
        margin = alignment.contrastive_margin_fn(graphdef, rest, references)
        return lambda batch: margin(params, model_inputs(batch))
    trained = _train_proxy(inputs, inputs.validation, score_cfg.proxy_steps, "alignment proxy")
    margin = alignment.diffusion_margin_fn(
        trained.graphdef,
        trained.rest,
        references,
        draws=score_cfg.draws,
        seed=score_cfg.seed,
        t_min=score_cfg.alignment_t_min,
    )
    return lambda batch: margin(trained.params, model_inputs(batch), *models.split_ids(batch["id"]))
