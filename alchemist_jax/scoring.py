"""The scoring pass (`alchemist-jax score`): one score per sample id of the pool, higher = better.

  driver    `score_pool` splits the pool (in index order) into chunks of `score.chunk_size`
            samples (rounded up to whole batches), scores each in fixed-shape batches (the
            last one padded) and writes it atomically as `.<out>.chunks/<chunk>.parquet`; a
            rerun skips the finished chunks (same ids, same metadata), and the last step joins
            them into `out` (columns id int64, score float32, pool order) with the run's
            metadata in the Parquet schema, then removes the chunk folder. Every scorer scores each row on its own, so scores do not depend
            on the batch size, and a resumed run writes the same file as an uninterrupted one.
  scorers   factories that return `score_batch(batch) -> (B,)`, one jitted function each:
              rater          the instance logit u of a rating run's EMA rater
              loss           -flow-matching loss of a proxy trained on the clean validation set
              el2n           -L2 norm of the velocity error of an early proxy (trained on the pool)
              grand          -per-sample gradient norm of the early proxy's loss
              clarity        variance of the Laplacian (sharpness)
              edge_density   fraction of pixels on a Sobel edge
              low_frequency  -fraction of the spectral energy in the lowest frequencies
              clip_score     cosine similarity of the image and caption embeddings of a local
                             HF CLIP checkpoint (`score.clip_path`, `models.clip`)
              alignment      how well the caption fits the image, by models trained on the
                             validation set (`score.alignment_method`, `alignment`)
  run       `run(cfg, out, rater_dir)`: load + preprocess the splits, build the scorer, score.

The proxy scores use fixed draws: draw d of the sample with id i takes its flow time t and noise
eps from the key fold_in(fold_in(key(score.seed), d), i) (`models.fixed_draws`), so a sample's score
depends on its id only, never on its batch or position. No caption is ever dropped while scoring.

Ratings metadata (Parquet schema key/values, all strings): `scorer`, `config_sha256` (sha256 of
the JSON of the config parts the scores depend on, `config_fingerprint`), `source` (the pool's
name), `count`, and for the rater scorer `rater_checkpoint` (the rating run's checkpoint folder)
and `rater_step`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
import pyarrow.parquet as pq
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from alchemist_jax import config as config_lib
from alchemist_jax import alignment, models, training
from alchemist_jax.data import load_splits, preprocess
from alchemist_jax.runtime.io import atomic_write_parquet
from alchemist_jax.data.sources import ArraySource
from alchemist_jax.data.tokenizer import Tokenizer
from alchemist_jax.models import clip
from alchemist_jax.runtime import checkpoints, parallel
from alchemist_jax.runtime.parallel import model_inputs

log = logging.getLogger("alchemist_jax.scoring")

ScoreBatch = Callable[[dict[str, np.ndarray]], Any]  # batch -> (B,) scores (numpy or jax)


# ==============================================================================================
# Driver: chunked, resumable, atomic
# ==============================================================================================


def chunk_folder(out: Path) -> Path:
    """Where `score_pool` keeps the finished chunks of `out` until it is complete."""
    return out.parent / f".{out.name}.chunks"


def read_metadata(path: Path) -> dict[str, str]:
    """The key/value metadata of a ratings (or chunk) Parquet file."""
    metadata = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in metadata.items()}


def _ratings_table(ids: np.ndarray, scores: np.ndarray, metadata: dict[str, str]) -> pa.Table:
    table = pa.table({"id": pa.array(ids, pa.int64()), "score": pa.array(scores, pa.float32())})
    return table.replace_schema_metadata(metadata)


def _finished(path: Path, ids: np.ndarray, metadata: dict[str, str]) -> np.ndarray | None:
    """The scores stored in `path` if it holds exactly `ids` (in order) under `metadata`, else
    None (missing, unreadable, other ids or another configuration: to be scored again)."""
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
        stored = read_metadata(path)
    except (OSError, KeyError, pa.ArrowException):
        return None
    if stored != metadata or table.column_names != ["id", "score"] or not np.array_equal(
            table.column("id").to_numpy(), ids):
        return None
    return table.column("score").to_numpy().astype(np.float32)


def score_pool(score_batch: ScoreBatch, source: ArraySource, out: Path, *, batch_size: int,
               chunk_size: int, metadata: dict[str, str], desc: str = "score") -> np.ndarray:
    """Scores every example of `source` and writes `out` (resumable; see the module docstring).

    Args:
      score_batch: batch -> (B,) scores, numpy or (better: not yet computed) jax arrays. The
        batch is a dict of numpy arrays of `batch_size` rows, laid out like
        `pipeline.eval_iterator` batches: the numeric fields of the examples, `id` int64 and
        `mask` bool; padding rows repeat the last real row with `id` -1 and `mask` False, and
        their scores are discarded.
      source: the pool in memory (preprocessed: `preprocess.materialize`), scored in index
        order.
      out: the ratings Parquet file: columns id int64, score float32, one row per example.
      batch_size: rows per call of `score_batch`.
      chunk_size: samples per chunk file (the unit of resuming), rounded up to a multiple of
        `batch_size` so that only the pool's last batch is padded.
      metadata: string key/values stored in the schema of `out` and of every chunk; a chunk
        written under other metadata is scored again.
      desc: progress bar label.
    Returns:
      (N,) float32 scores in pool order (as written).
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"score.batch_size and score.chunk_size must be >= 1, got "
                         f"{batch_size} and {chunk_size}")
    if len(source) == 0:
        raise ValueError(f"{source.name} is empty: there is nothing to score")
    out = Path(out)
    ids = source.ids
    done = _finished(out, ids, metadata)
    if done is not None:
        log.info("%s is complete (%d scores)", out, len(done))
        return done
    folder = chunk_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    chunk_size = -(-chunk_size // batch_size) * batch_size  # whole batches: no padding inside
    starts = range(0, len(source), chunk_size)
    paths = [folder / f"{index:05d}.parquet" for index in range(len(starts))]
    parts = [_finished(path, ids[start:start + chunk_size], metadata)
             for path, start in zip(paths, starts)]
    progress = tqdm(total=len(source), desc=desc, unit="sample", unit_scale=True,
                    initial=sum(len(p) for p in parts if p is not None))
    for index, start in enumerate(starts):
        if parts[index] is None:
            rows = _columns(source, start, start + chunk_size)
            # Every batch is dispatched before the first result is read back (async dispatch).
            pending = [(score_batch(batch), batch["mask"])
                       for batch in _padded_batches(rows, batch_size)]
            parts[index] = _collect(pending, progress)
            atomic_write_parquet(paths[index], _ratings_table(rows["id"], parts[index], metadata))
    progress.close()
    scores = np.concatenate(parts)
    atomic_write_parquet(out, _ratings_table(ids, scores, metadata))
    shutil.rmtree(folder)
    return scores


def _columns(source: ArraySource, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows start..stop-1 of the numeric columns of `source` (the fields that
    `pipeline.numeric_fields` keeps of its examples), as array slices: reading examples one by
    one (~130 us each through grain) costs more than the demo rater's forward pass (~50 us per
    sample on 2 CPU cores; docs/BENCHMARKS.md)."""
    columns = {"id": source.ids, "image": source.images, "label": source.labels,
               **source.extra}
    return {key: column[start:stop] for key, column in columns.items() if column is not None}


def _padded_batches(rows: dict[str, np.ndarray], batch_size: int
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch_size` rows of `rows` in order (slices), plus `mask`; the last is padded
    as `pipeline.eval_iterator` pads (the last row repeated, `id` -1, `mask` False)."""
    count = len(rows["id"])
    for start in range(0, count, batch_size):
        positions = np.arange(start, start + batch_size)
        mask = positions < count
        take = slice(start, start + batch_size) if mask[-1] else np.minimum(positions, count - 1)
        batch = {key: value[take] for key, value in rows.items()}
        yield {**batch, "id": np.where(mask, batch["id"], -1), "mask": mask}


def _collect(pending: list, progress: tqdm) -> np.ndarray:
    """Waits for the scores of a chunk's batches: (rows,) float32, padding dropped, in order."""
    scores = []
    for batch_scores, mask in pending:
        scores.append(np.asarray(batch_scores, np.float32)[mask])
        progress.update(len(scores[-1]))
    return np.concatenate(scores)


# ==============================================================================================
# Heuristic scorers (pure functions of the preprocessed images)
# ==============================================================================================

# A pixel is on an edge when its Sobel gradient magnitude exceeds this, in units of the [-1, 1]
# image: a step edge of height h gives 4h beside it, so 2.0 means a step of more than a quarter
# of the full range (64 of 255 grey levels; 255 in the Sobel units of 8-bit images, where Canny's
# usual thresholds lie); a linear ramp of slope s per pixel gives 8s, so a ramp across the full
# range counts only if it is shorter than 8 pixels. (On the demo pool a threshold of 1.0 ranked
# blurred digits above clean ones: blur widens the band of weak gradients.)
EDGE_THRESHOLD = 2.0
# Spatial frequencies within this radius (cycles per pixel; Nyquist = 0.5) are "low": a quarter
# of the Nyquist frequency, i.e. up to resolution/8 cycles per image (3.5 for 28x28).
LOW_FREQUENCY_RADIUS = 0.125

_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)
_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)


def _gray(images: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H, W): the mean over channels."""
    return jnp.mean(images, axis=-1)


def _filter3x3(gray: jax.Array, kernel: np.ndarray) -> jax.Array:
    """Cross-correlation of (B, H, W) with a 3x3 kernel over the valid region: (B, H-2, W-2)."""
    out = jax.lax.conv_general_dilated(gray[:, None], jnp.asarray(kernel)[None, None],
                                       window_strides=(1, 1), padding="VALID")
    return out[:, 0]


@jax.jit
def clarity(images: jax.Array) -> jax.Array:
    """Sharpness: the variance over pixels of the 3x3 Laplacian of the channel-mean image.

    images: (B, H, W, C) in [-1, 1] -> (B,) >= 0, higher = sharper (0 for a constant image).
    The Laplacian is taken over the valid (H-2, W-2) region, so borders add no artificial edges.
    """
    return jnp.var(_filter3x3(_gray(images), _LAPLACIAN), axis=(1, 2))


@jax.jit
def edge_density(images: jax.Array) -> jax.Array:
    """Detail: the fraction of (valid-region) pixels whose Sobel gradient magnitude of the
    channel-mean image exceeds `EDGE_THRESHOLD`. images: (B, H, W, C) in [-1, 1] -> (B,) in
    [0, 1], higher = more edges."""
    gray = _gray(images)
    gx, gy = _filter3x3(gray, _SOBEL_X), _filter3x3(gray, _SOBEL_X.T)
    return jnp.mean(jnp.sqrt(gx**2 + gy**2) > EDGE_THRESHOLD, axis=(1, 2))


@jax.jit
def low_frequency_energy(images: jax.Array) -> jax.Array:
    """Smoothness: the fraction of the spectral energy (2-D FFT of the channel-mean image, DC
    excluded) within `LOW_FREQUENCY_RADIUS` cycles per pixel of DC. images: (B, H, W, C) in
    [-1, 1] -> (B,) in [0, 1]; a constant image (no energy off DC) counts as 1."""
    gray = _gray(images)
    gray = gray - jnp.mean(gray, axis=(1, 2), keepdims=True)  # DC removed exactly
    power = jnp.abs(jnp.fft.fft2(gray)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(gray.shape[1]), np.fft.fftfreq(gray.shape[2]),
                         indexing="ij")
    low = jnp.asarray(np.hypot(fy, fx) <= LOW_FREQUENCY_RADIUS)
    tiny = 1e-6  # energy of a constant image is ~0: 0/0 -> 1
    return (jnp.sum(power * low, axis=(1, 2)) + tiny) / (jnp.sum(power, axis=(1, 2)) + tiny)


# Heuristic name -> score of an image batch, oriented so that higher = better: sharper, more
# edges, less of the energy in the lowest frequencies (blur, blank and low-res images score low).
HEURISTICS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "clarity": clarity,
    "edge_density": edge_density,
    "low_frequency": jax.jit(lambda images: -low_frequency_energy(images)),
}


# ==============================================================================================
# Proxy scorers: loss, el2n, grand (pure functions of a DiT's parameters)
# ==============================================================================================


PROXY_SCORERS = ("loss", "el2n", "grand")


def proxy_score_fn(kind: str, graphdef: nnx.GraphDef, rest: nnx.State, *, draws: int,
                   seed: int) -> Callable[..., jax.Array]:
    """The jitted `score(params, batch, id_low, id_high) -> (B,)` of a proxy DiT.

    For each sample and each of `draws` fixed draws (`models.fixed_draws`), the flow-matching error at
    (t, eps) without caption dropout gives a statistic, averaged over the draws and negated:
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
            single = lambda p: losses(p, jax.tree.map(lambda x: x[None], row),  # noqa: E731
                                      t_row[None], eps_row[None])[0]
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


# ==============================================================================================
# The rater of a rating run
# ==============================================================================================

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
        raise ValueError(f"{workdir} is not a rating run: it has no config.yaml "
                         "(pass the --workdir of `alchemist-jax rate`)")
    run_cfg = config_lib.load_config(workdir / "config.yaml")
    for key in RATER_DATA_KEYS:
        theirs, ours = getattr(run_cfg.data, key), getattr(data_cfg, key)
        if theirs != ours:
            raise ValueError(f"data.{key} is {ours!r} but the rater in {workdir} was trained "
                             f"with {theirs!r} ({workdir / 'config.yaml'})")
    folder = workdir / "checkpoints"
    step = checkpoints.latest_step(folder)
    if step is None:
        raise ValueError(f"{workdir} has no rater checkpoint in {folder}: let "
                         "`alchemist-jax rate` save one first")
    return RatingRun(workdir, run_cfg, int(step))


def restore_rater(run: RatingRun, like: nnx.State) -> nnx.State:
    """The EMA rater parameters (`state["rater_ema"]`) of the latest checkpoint of `run`, shaped
    like `like`; nothing else of the rating state (proxies, optimizer states) is read."""
    replicated = NamedSharding(parallel.make_mesh(), P())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), like)
    return checkpoints.restore_part(checkpoints.manager(run.checkpoints, read_only=True),
                                    run.step, "rater_ema", abstract)


def ema_rater(run: RatingRun, example: dict[str, np.ndarray]):
    """(graphdef, EMA parameters, rest) of the rater of `run`, for `nnx.merge`. `example` is one
    example of the pool (fixes the input shapes)."""
    batch = {k: np.asarray(v)[None] for k, v in model_inputs(example).items()}
    graphdef, params, rest = models.init_rater(run.config.rater, batch, jax.random.key(0),
                                               run.config.data.max_text_length)
    return graphdef, restore_rater(run, params), rest


def rater_scorer(run: RatingRun, example: dict[str, np.ndarray]) -> ScoreBatch:
    """score_batch of the EMA rater of `run`: the instance logits u (B,) (`Rater.scores`).
    `example` is one example of the pool (fixes the input shapes)."""
    graphdef, ema, rest = ema_rater(run, example)
    score = jax.jit(models.rater_score_fn(graphdef, rest))
    return lambda b: score(ema, model_inputs(b))


# ==============================================================================================
# Scorer registry and the command
# ==============================================================================================


@dataclasses.dataclass
class ScoringInputs:
    """What a scorer factory may need: the config, the preprocessed pool, the validation set
    (`loss` only), the rating run (`rater` only) and the workdir of proxy training (resumable;
    None: in memory)."""

    cfg: config_lib.Config
    pool: ArraySource
    validation: ArraySource | None
    rating_run: RatingRun | None
    proxy_workdir: Path | None


def _heuristic_factory(name: str) -> Callable[[ScoringInputs], ScoreBatch]:
    def factory(inputs: ScoringInputs) -> ScoreBatch:
        if "image" not in inputs.pool[0]:
            raise ValueError(f"score.scorer={name} needs pixel images; the pool "
                             f"{inputs.pool.name} has none (precomputed latents)")
        score = HEURISTICS[name]
        return lambda batch: score(batch["image"])

    return factory


def _train_proxy(inputs: ScoringInputs, data: ArraySource, steps: int, desc: str
                 ) -> training.Trained:
    """A DiT of the config trained `steps` steps on `data` (seed `score.seed`), in the
    resumable `inputs.proxy_workdir`."""
    cfg = inputs.cfg
    # The proxies warm up over at most a tenth of their steps (early proxies are short).
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, warmup_steps=min(cfg.train.warmup_steps, steps // 10)))
    return training.train_model(cfg, data, inputs.proxy_workdir, steps=steps,
                             seed=cfg.score.seed, desc=desc)


def _proxy_factory(kind: str) -> Callable[[ScoringInputs], ScoreBatch]:
    def factory(inputs: ScoringInputs) -> ScoreBatch:
        score_cfg = inputs.cfg.score
        if kind == "loss":  # trained for long on the clean validation set
            data, steps = inputs.validation, score_cfg.proxy_steps
        else:  # early in training on the pool itself (EL2N / GraNd)
            data, steps = inputs.pool, score_cfg.early_steps
        trained = _train_proxy(inputs, data, steps, f"{kind} proxy")
        score = proxy_score_fn(kind, trained.graphdef, trained.rest, draws=score_cfg.draws,
                               seed=score_cfg.seed)
        return lambda batch: score(trained.params, model_inputs(batch),
                                   *models.split_ids(batch["id"]))

    return factory


def clip_scorer(inputs: ScoringInputs) -> ScoreBatch:
    """score_batch of the CLIP checkpoint in `score.clip_path`: the cosine similarity (B,) of
    each image with its caption. CLIP sees the pool's preprocessed images (`clip.clip_pixels`);
    the captions are decoded from the pool's tokens and tokenized again by the checkpoint's
    tokenizer, to its own context length."""
    example = inputs.pool[0]
    if "image" not in example or "tokens" not in example:
        raise ValueError(f"score.scorer=clip_score needs pixel images and captions; the pool "
                         f"{inputs.pool.name} has {', '.join(sorted(example))}")
    checkpoint = clip.load_clip(inputs.cfg.score.clip_path)
    captions = Tokenizer(inputs.cfg.data.max_text_length)
    score = clip.clip_score_fn(checkpoint)

    def score_batch(batch):
        tokens = checkpoint.tokenize(captions.decode(batch["tokens"], batch["token_mask"]))
        return score(checkpoint.params, batch["image"], tokens)

    return score_batch


def alignment_scorer(inputs: ScoringInputs) -> ScoreBatch:
    """score_batch of `score.alignment_method` (`alignment`), its model trained on the
    validation set: the contrastive model's log-softmax of the own caption (not checkpointed: it
    trains in about a minute, and again identically on a resumed run), or the diffusion margin
    of a proxy DiT trained `score.proxy_steps` steps (resumable, like the `loss` proxy)."""
    score_cfg = inputs.cfg.score
    if "tokens" not in inputs.pool[0] and "text_embedding" not in inputs.pool[0]:
        raise ValueError(f"score.scorer=alignment needs captions; the pool {inputs.pool.name} "
                         "has none")
    validation = model_inputs(_columns(inputs.validation, 0, len(inputs.validation)))
    references = alignment.reference_captions(validation, score_cfg.alignment_references,
                                              score_cfg.seed)
    if score_cfg.alignment_method == "contrastive":
        graphdef, params, rest = alignment.train_contrastive(
            validation, alignment.ContrastiveTraining(steps=score_cfg.alignment_steps),
            score_cfg.seed, desc="alignment model")
        margin = alignment.contrastive_margin_fn(graphdef, rest, references)
        return lambda batch: margin(params, model_inputs(batch))
    trained = _train_proxy(inputs, inputs.validation, score_cfg.proxy_steps, "alignment proxy")
    margin = alignment.diffusion_margin_fn(trained.graphdef, trained.rest, references,
                                           draws=score_cfg.draws, seed=score_cfg.seed,
                                           t_min=score_cfg.alignment_t_min)
    return lambda batch: margin(trained.params, model_inputs(batch),
                                *models.split_ids(batch["id"]))


SCORERS: dict[str, Callable[[ScoringInputs], ScoreBatch]] = {
    "rater": lambda inputs: rater_scorer(inputs.rating_run, inputs.pool[0]),
    **{kind: _proxy_factory(kind) for kind in PROXY_SCORERS},
    **{name: _heuristic_factory(name) for name in HEURISTICS},
    "clip_score": clip_scorer,
    "alignment": alignment_scorer,
}
assert tuple(SCORERS) == config_lib.SCORERS, "every scorer of the config has a factory"

# score.* fields each scorer's result depends on (batch and chunk sizes never change a score).
_SCORE_FIELDS = {"loss": ("proxy_steps", "draws", "seed"),
                 "el2n": ("early_steps", "draws", "seed"),
                 "grand": ("early_steps", "draws", "seed"),
                 "clip_score": ("clip_path",),
                 "alignment": ("alignment_method", "alignment_references", "seed")}
# ... and those of each alignment method.
_ALIGNMENT_FIELDS = {"contrastive": ("alignment_steps",),
                     "diffusion": ("proxy_steps", "draws", "alignment_t_min")}


def _trains_a_proxy(score_cfg: config_lib.ScoreConfig) -> bool:
    """Whether the scores come from a DiT trained by `_train_proxy` (they depend on the config's
    `model` and `train` sections)."""
    return score_cfg.scorer in PROXY_SCORERS or (
        score_cfg.scorer == "alignment" and score_cfg.alignment_method == "diffusion")


def config_fingerprint(cfg: config_lib.Config, rating_run: RatingRun | None = None) -> str:
    """sha256 of the JSON of the config the scores depend on: `data`, the scorer and its
    `score.*` fields; `model` and `train` for the scorers with a proxy DiT; the rating run's
    `rater` and `rate` sections for the rater."""
    scorer = cfg.score.scorer
    fields = _SCORE_FIELDS.get(scorer, ())
    if scorer == "alignment":
        fields += _ALIGNMENT_FIELDS[cfg.score.alignment_method]
    parts: dict[str, Any] = {
        "data": config_lib.to_dict(cfg.data),
        "score": {key: getattr(cfg.score, key) for key in ("scorer", *fields)}}
    if _trains_a_proxy(cfg.score):
        parts.update(model=config_lib.to_dict(cfg.model), train=config_lib.to_dict(cfg.train))
    if rating_run is not None:
        parts.update(rater=config_lib.to_dict(rating_run.config.rater),
                     rate=config_lib.to_dict(rating_run.config.rate))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def ratings_metadata(cfg: config_lib.Config, pool: ArraySource,
                     rating_run: RatingRun | None = None) -> dict[str, str]:
    """The metadata of a ratings file (see the module docstring)."""
    metadata = {"scorer": cfg.score.scorer, "config_sha256": config_fingerprint(cfg, rating_run),
                "source": pool.name, "count": str(len(pool))}
    if rating_run is not None:
        metadata.update(rater_checkpoint=str(rating_run.checkpoints),
                        rater_step=str(rating_run.step))
    return metadata


def run(cfg: config_lib.Config, out: Path, rater_dir: Path | None = None) -> dict[str, Any]:
    """`alchemist-jax score`: scores the pool of `cfg.data` with `cfg.score.scorer` into `out`.

    Rerunning the same command resumes an interrupted pass (finished chunks are kept) and does
    nothing once `out` is complete. The rater scorer reads the rating run in `rater_dir` (its
    own config gives the rater's shapes); the proxy scorers train their proxy first (in the
    chunk folder, so an interrupted pass resumes that too).

    Returns:
      {"scorer", "count", "path", "seconds" (of this call's scoring pass; 0 when `out` was
      already complete), "samples_per_s" (count / seconds, None when nothing was scored),
      "score_mean", "score_std"}.
    """
    out = Path(out)
    scorer = cfg.score.scorer
    if scorer == "clip_score" and cfg.score.clip_path is None:
        raise ValueError("score.scorer=clip_score needs score.clip_path=DIR: a local directory "
                         "with an HF CLIP checkpoint (config.json + model.safetensors)")
    if scorer == "rater" and rater_dir is None:
        raise ValueError("score.scorer=rater needs the rating run: pass --rater DIR (the "
                         "--workdir of `alchemist-jax rate`)")
    if scorer != "rater" and rater_dir is not None:
        raise ValueError(f"--rater is read by score.scorer=rater only, not by {scorer}")
    rating_run = open_rating_run(rater_dir, cfg.data) if scorer == "rater" else None
    splits = load_splits(cfg.data)
    transform = preprocess.Preprocessor.for_config(cfg.data)
    pool = preprocess.materialize(splits.train, transform)
    metadata = ratings_metadata(cfg, pool, rating_run)
    seconds = 0.0
    scores = _finished(out, pool.ids, metadata)
    if scores is None:
        validation = (preprocess.materialize(splits.validation, transform)
                      if scorer in ("loss", "alignment") else None)
        # The proxy trains inside the chunk folder: resumed with it, removed with it.
        proxy_workdir = chunk_folder(out) / f"proxy-{metadata['config_sha256'][:16]}"
        score_batch = SCORERS[scorer](ScoringInputs(cfg, pool, validation, rating_run,
                                                    proxy_workdir))
        start = time.perf_counter()
        scores = score_pool(score_batch, pool, out, batch_size=cfg.score.batch_size,
                            chunk_size=cfg.score.chunk_size, metadata=metadata,
                            desc=f"score ({scorer})")
        seconds = time.perf_counter() - start
    return {"scorer": scorer, "count": len(scores), "path": str(out),
            "seconds": round(seconds, 3),
            "samples_per_s": round(len(scores) / seconds, 1) if seconds else None,
            "score_mean": float(np.mean(scores)), "score_std": float(np.std(scores))}
