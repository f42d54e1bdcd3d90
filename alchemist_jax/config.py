"""Typed, validated configuration.

A configuration is a tree of frozen dataclasses (`Config` at the root). It is loaded from a YAML
file under `configs/` and then overridden by `key.sub=value` strings from the command line:

    cfg = load_config("configs/demo.yaml", ["data.batch_size=32", "data.pool.train_size=2000"])

Validation happens at load time, in this module only, never later: an unknown key fails naming
the key and the valid keys nearby, a value of the wrong type names the key and the expected type,
a value outside a fixed set of choices (a `Literal`) names the choices, a number outside its range
(`RANGES`) names the key and the range, and settings that contradict each other (`validate`) name
both keys. Values in override strings are parsed as YAML scalars (`true`, `3`, `0.5`, `[a, b]`,
`null`); numbers in scientific notation (`3e-4`, which YAML 1.1 reads as a string) are numbers.

The schema is the one source of truth for every named choice: meta-gradient modes and remat
policies (defined by `alchemist_jax.meta`, which validates its own arguments), scorers
(`SCORERS`), selection policies (`POLICIES`) and pipeline arms (`ARMS`). The stages map these
names to their implementations.

Size: the whole schema with its comments, and its validation, in one place by design: one file
to read for every key, its range and the rules between keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from alchemist_jax.meta import MODES, REMAT_POLICIES
from alchemist_jax.runtime.io import atomic_write_bytes


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------

DEFECT_KINDS = ("noise", "blur", "blank", "caption_swap", "duplicate", "lowres")
EXTRA_DEFECT_KINDS = ("near_duplicate",)  # opt-in, outside the six the defaults are tuned on
# Kept apart from everything tuning looks at, to measure how selection generalises.
HELDOUT_DEFECT_KINDS = (
    "watermark",
    "jpeg",
    "bad_crop",
    "letterbox",
    "boilerplate_caption",
    "truncated_caption",
    "keyword_stuffing",
)
ALL_DEFECT_KINDS = DEFECT_KINDS + EXTRA_DEFECT_KINDS + HELDOUT_DEFECT_KINDS
DEFECT_FAMILIES = {"tuned": DEFECT_KINDS, "heldout": HELDOUT_DEFECT_KINDS}  # names in `kinds`
DefectKind = Literal[ALL_DEFECT_KINDS + tuple(DEFECT_FAMILIES)]


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """Sizes of the built-in `pool` splits (half MNIST, half Animal-MNIST in each)."""

    train_size: int = 8000  # training pool the rater rates and selection prunes
    validation_size: int = 1000  # small clean set the meta-gradient is taken on
    test_size: int = 1000  # clean held-out set for evaluation


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """The procedural `shapes` source."""

    size: int = 10000  # examples per split
    resolution: int = 32  # generated images are resolution x resolution RGB
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ManifestConfig:
    """Column names and bad-input policy for user data (Parquet/CSV manifests, image folders)."""

    image_column: str = "image"  # path to the image, relative to the manifest file
    caption_column: str = "caption"
    id_column: str | None = None  # None: ids are the row index
    label_column: str | None = None  # integer class labels (FCD / classifier alignment); None: none
    on_bad_sample: Literal["skip", "error"] = "skip"
    max_image_pixels: int = 64_000_000  # larger images are rejected as bad samples


@dataclasses.dataclass(frozen=True)
class CorruptConfig:
    """Defect injection for benchmarks (`alchemist_jax.data.corrupt`)."""

    fraction: float = 0.0  # fraction of the training pool to corrupt; 0 disables
    kinds: tuple[DefectKind, ...] = DEFECT_KINDS  # kinds, or family names `tuned` / `heldout`
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they become batches."""

    source: str = "pool"  # built-in name, manifest file, image folder or TFDS directory
    split: str = "train"
    validation_source: str | None = None  # None: the same source's "validation" split
    validation_fraction: float = 0.1  # random validation split when the source has none
    resolution: int = 28  # images are resized / center-cropped to resolution x resolution
    channels: Literal[1, 3] = 1
    max_text_length: int = 77  # CLIP context length; the built-in pool is fine with 32
    batch_size: int = 64
    seed: int = 0
    read_threads: int = 0  # grain prefetch threads; 0 suits in-memory data, raise for files
    # Splits with at most this many samples are preprocessed into host memory once (fast
    # epochs); larger ones are streamed: read and preprocessed per batch (memory independent of
    # the pool's size; raise data.read_threads for them).
    in_memory_limit: int = 100_000
    pool: PoolConfig = PoolConfig()
    shapes: ShapesConfig = ShapesConfig()
    manifest: ManifestConfig = ManifestConfig()
    corrupt: CorruptConfig = CorruptConfig()


# Rematerialisation of each scanned model block (models/stacked.py maps the names to
# jax.checkpoint_policies): none = keep its residuals, full = nothing saveable (recompute the
# block in the backward pass), dots = keep matmul outputs without batch dimensions.
BLOCK_REMAT = ("none", "full", "dots")
# Compute dtype of a model's layers. float32: compute in the parameters' dtype (float32, or
# float64 under x64). bfloat16: matmuls and activations in bfloat16 with float32 parameters
# (master weights, hence float32 optimizer states) and float32 outputs (velocity, rater scores).
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The T2I diffusion model (a DiT) used as proxy and downstream model.

    `preset` names a size (see `alchemist_jax.models.PRESETS`); any field set here overrides it.
    """

    preset: Literal["tiny", "small", "base", "xl"] = "tiny"
    patch_size: int | None = None
    width: int | None = None  # transformer width D
    depth: int | None = None  # DiT blocks
    heads: int | None = None
    mlp_ratio: float | None = None
    text_width: int | None = None  # CLIP-style text encoder
    text_depth: int | None = None
    text_heads: int | None = None
    text_trainable: bool = True  # False: the text encoder is frozen at its initialisation
    caption_dropout: float = 0.1  # drop the caption with this probability (for CFG)
    block_remat: Literal[BLOCK_REMAT] = "none"  # per scanned block (DiT and its text encoder)
    compute_dtype: Literal[COMPUTE_DTYPES] = "float32"  # COMPUTE_DTYPES above


@dataclasses.dataclass(frozen=True)
class RaterConfig:
    """The rater: image features f and caption embedding e, head on [f, e, f*e]."""

    width: int = 128  # feature width of f and e
    hidden: int = 256  # hidden width of the heads
    temperature: float = 1.0  # w = B * softmax(u / temperature) * b
    batch_head: bool = False  # the paper's group MLP on batch mean/variance -> b
    compute_dtype: Literal[COMPUTE_DTYPES] = "float32"  # COMPUTE_DTYPES; weights in float32


# The rater's meta-loss (the validation objective its meta-gradient minimises; rating.py builds
# one objective per name): plain = the validation loss; caption_gap = validation loss under the
# true captions minus under shuffled ones (image–text fit; docs/RESULTS.md compares them).
META_LOSSES = ("plain", "caption_gap")


@dataclasses.dataclass(frozen=True)
class RateConfig:
    """Learning the rater (`alchemist-jax rate`): meta-gradients through a population of proxies.

    One meta-step: every proxy takes `meta_every` real training steps on rater-weighted batches;
    the last `inner_steps` of them are unrolled into the meta-gradient of the validation loss
    (mode `unrolled`), which is averaged over the population and applied to the rater.
    """

    mode: Literal[MODES] = "unrolled"
    meta_loss: Literal[META_LOSSES] = "plain"  # the validation objective (META_LOSSES above)
    gap_plain_weight: float = 0.0  # caption_gap: + this x the plain loss (true captions)
    steps: int = 1500  # meta-steps
    inner_steps: int = 4  # K, unrolled inner steps per meta-step (lookahead: 1)
    meta_every: int | None = None  # M >= K proxy steps per meta-step; None: M = K
    population: int = 4  # P proxies, trained side by side (jax.vmap)
    reset_every: int = 500  # meta-steps between re-initialisations of a proxy (0: never)
    warm_start_steps: int = 0  # plain steps before meta-learning; resets restart from there
    inner_lr: float = 1e-3  # proxy learning rate (Adam, eps 1e-3, eps_root 1e-12)
    inner_eps: float = 1e-3
    lookahead_lr: float = 0.1  # lookahead: lr of the virtual SGD step
    penalty_start: float = 1.0  # penalty: lambda = start - decay * validation epochs (no floor)
    penalty_decay: float = 0.03
    rater_lr: float = 1e-3  # Adam
    rater_clip: float = 1.0  # global-norm clipping of the meta-gradient
    ema_decay: float = 0.99  # EMA of rater parameters, used for scoring
    val_batch_size: int = 256
    remat: Literal[REMAT_POLICIES] = "full"
    mixed_mode: bool = False  # unrolled: MixFlow-MG custom VJP of the inner step
    unroll: int = 1  # unrolled: inner steps per lax.scan iteration (inner_steps: straight-line)
    checkpoint_every: int = 250  # meta-steps
    log_every: int = 10
    max_bad_steps: int = 10  # consecutive non-finite (skipped) meta-steps before the run stops
    seed: int = 0


PROXY_SCORERS = ("loss", "el2n", "grand")  # scores from a proxy DiT the scorer trains
HEURISTIC_SCORERS = ("clarity", "edge_density", "low_frequency")  # pure functions of the image
SCORERS = ("rater", *PROXY_SCORERS, *HEURISTIC_SCORERS, "clip_score", "alignment")
GROUPINGS = ("auto", "label", "caption", "kmeans", "none")
# How cluster offsets enter the ranking (selection/ranking.py): shrunk = each cluster's mean offset
# removed only as far as its size and spread make it style (empirical Bayes, capped), then one
# ranking of the whole pool; within = a ranking and a proportional budget per cluster; global =
# one ranking of the raw scores.
RANKINGS = ("shrunk", "within", "global")
# Weights of several ratings files when select.weights is empty: reliability = estimated from
# each scorer's scores without labels (selection/fusion.py); equal = 1 each.
FUSIONS = ("reliability", "equal")
POLICIES = (
    "filter",
    "shift_gsample",
    "gsample",
    "topk",
    "bottomk",
    "random",
    "block",
    "threshold",
    "weighted",
    "cdf_accept",
)


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """The scoring pass (`alchemist-jax score`): one score per sample id, higher = better."""

    scorer: Literal[SCORERS] = "rater"
    batch_size: int = 256
    chunk_size: int = 4096  # samples per atomically written chunk (the unit of resuming)
    proxy_steps: int = 1000  # loss: steps of the proxy trained on the validation set
    early_steps: int = 100  # el2n / grand: steps of the early-training proxy
    draws: int = 4  # loss / el2n / grand: fixed (t, noise) draws averaged per sample
    seed: int = 0
    clip_path: str | None = None  # clip_score: a local HF CLIP directory (safetensors)
    # alignment: does the caption describe the image? Models trained on the validation set:
    # contrastive (a small CLIP-like model) or diffusion (a proxy DiT's loss under other captions
    # minus under its own); docs/RESULTS.md "Caption–image alignment" compares them.
    alignment_method: Literal["contrastive", "diffusion"] = "contrastive"
    alignment_steps: int = 500  # contrastive: training steps (diffusion: score.proxy_steps)
    alignment_references: int = 256  # most distinct validation captions compared against
    alignment_t_min: float = 0.5  # diffusion: draws' flow times are t_min + (1 - t_min) U(0, 1)
    # Write scores that are NaN or Inf (a diverged rater or proxy) instead of refusing to.
    allow_nonfinite: bool = False


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """Choosing the training subset from ratings (`alchemist-jax select`)."""

    policy: Literal[POLICIES] = "filter"
    keep: float = 0.5  # R: fraction of the pool kept (exactly round(R * N) ids)
    group_by: Literal[GROUPINGS] = "auto"  # ranking clusters
    clusters: int = 20  # kmeans: number of clusters of caption embeddings
    min_cluster_size: int = 20  # kmeans / auto: smaller clusters are merged into their nearest
    ranking: Literal[RANKINGS] = "shrunk"  # cluster offsets: shrunk | within | global (RANKINGS)
    fusion: Literal[FUSIONS] = "reliability"  # weights when `weights` is empty (FUSIONS)
    drop: float = 0.25  # filter: lowest-scored fraction dropped before the random fill
    head: float | None = None  # shift_gsample: top fraction dropped; None: min(.25, .95 - R)
    mu: float = 0.54  # (shift_)gsample: mean rank percentile of the Gaussian (0 = best)
    sigma: float = 0.25  # (shift_)gsample: its spread in rank percentiles
    start: float = 0.0  # block: rank percentile where the window starts
    threshold: float | None = None  # threshold: keep scores >= it (None: the keep quantile)
    temperature: float = 1.0  # weighted / cdf_accept: sharpness of the score-based sampling
    weights: tuple[float, ...] = ()  # fusion: weight of each ratings file, in order; (): equal
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    """Near-duplicate detection (`alchemist-jax dedup`): groups of exact and near copies."""

    embedding: Literal["pixels", "rater"] = "pixels"  # rater: a rating run's image features
    max_hamming: int = 16  # pHash bits (of 64) that may differ between duplicates
    min_cosine: float = 0.9  # least cosine similarity of the embeddings of duplicates
    min_aligned_cosine: float = 0.995  # final check: pixel correlation at the best shift
    max_shift: int = 2  # final check: largest shift (px, each axis) searched
    border: int = 2  # final check: px at the frame edges left out (filled in by shifts)
    align_size: int = 64  # final check: larger images are shrunk to this side first
    align_blur: float = 0.0  # final check: px std of a Gaussian blur (0: none)
    bands: int = 4  # pHash rotations used as sort keys (one per leading band)
    projection_tables: int = 8  # random-hyperplane sort keys of the embeddings
    window: int = 8  # neighbours in each key's sorted order compared with each sample
    embedding_size: int = 14  # pixels: side of the downsampled canonical image
    blur: float = 1.0  # pixels: std of the Gaussian blur before downsampling (0: none)
    batch_size: int = 1024  # images fingerprinted per jitted call
    seed: int = 0  # draws the random hyperplanes


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Downstream training of the T2I model (`alchemist-jax train`), same DiT as the proxy."""

    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-3  # AdamW peak, after linear warmup, cosine decay to 10%
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 100  # validation loss (fixed draws) logged every this many steps
    checkpoint_every: int = 500
    max_bad_steps: int = 10  # consecutive non-finite (skipped) steps before the run stops
    # The run stops as diverged when the mean training loss of a log interval exceeds this
    # multiple of the first interval's (finite, so the non-finite guard would not see it).
    divergence_factor: float = 1000.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation of a trained T2I model on the clean held-out test split."""

    test_source: str | None = None  # None: the data source's "test" split
    test_size: int | None = None  # evaluate on the first N test samples; None: all
    loss_draws: int = 4  # fixed (t, noise) draws per test sample for the test loss
    sample_steps: int = 20  # Euler steps of the sampler
    guidance_scale: float = 3.0
    classifier_steps: int = 1500  # training steps of the feature classifier (cached)
    grid_captions: int = 8  # captions in the PNG grid of samples
    grid_samples: int = 8  # samples per caption in the grid
    seed: int = 0
    # Latent datasets (`alchemist-jax encode`): the VAE folder that decodes generated and test
    # latents to pixels (FCD, alignment, CLIP metrics, the sample grid); None: test loss only.
    vae_path: str | None = None
    # A local HF CLIP folder: Fréchet distance in CLIP image features (generated vs test images)
    # and the mean CLIP score of each generated image against its caption; None: not reported.
    clip_path: str | None = None


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    """`alchemist-jax encode`: images -> VAE latents, captions -> CLIP text hidden states."""

    vae_path: str | None = None  # a diffusers AutoencoderKL folder (config.json + safetensors)
    clip_path: str | None = None  # an HF CLIP folder; its text tower encodes the captions
    hidden_layer: Literal["last", "penultimate"] = "penultimate"  # text hidden states stored
    store_std: bool = False  # also store the posterior std (scaled) as `latent_std`
    batch_size: int = 32  # images per jitted encoder call
    chunk_size: int = 1024  # samples per atomically written chunk (the unit of resuming)
    image_size: int = 256  # images are resized / center-cropped to image_size^2 before encoding


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way of choosing the downstream training set (a pipeline arm).

    ratings: whose ratings the policy ranks (ratings/<name>.parquet), fused when there are
      several (weighted by select.weights, in this order): meta raters (`RATERS`) or scorers
      (`SCORERS`, e.g. `alignment`); empty for none.
    policy: a selection policy (`POLICIES`), or None for a fixed subset: the whole pool
      (`clean_only` False) or its clean samples (True, needs injected defects: the oracle).
    dedup: collapse the duplicate groups of dedup.parquet (each keeps its best-scored member)
      before the budget is applied.
    """

    ratings: tuple[str, ...]
    policy: str | None
    dedup: bool = False
    clean_only: bool = False


# Meta raters of the pipeline: learned by `rate` (exact: the config's rate section; penalty: the
# released scheme) and scored with score.scorer=rater.
RATERS = ("exact", "penalty")

# `alchemist` is the whole method; `meta_only` and `meta_alignment` add one of its components
# at a time (the meta rater, + the alignment scorer; `alchemist` = + dedup).
ARMS: dict[str, Arm] = {
    "alchemist": Arm(("exact", "alignment"), "filter", dedup=True),
    "meta_only": Arm(("exact",), "filter"),
    "meta_alignment": Arm(("exact", "alignment"), "filter"),
    "alchemist_shift_gsample": Arm(("exact",), "shift_gsample"),
    "release": Arm(("penalty",), "shift_gsample"),
    "topk": Arm(("exact",), "topk"),
    "random": Arm((), "random"),
    "full": Arm((), None),
    "oracle": Arm((), None, clean_only=True),
}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The whole pipeline (`alchemist-jax pipeline`, `./tools/demo.sh`): rate, score, select,
    train every arm for each seed, evaluate, report."""

    arms: tuple[Literal[tuple(ARMS)], ...] = (
        "alchemist",
        "meta_only",
        "meta_alignment",
        "alchemist_shift_gsample",
        "release",
        "topk",
        "random",
        "full",
    )
    seeds: tuple[int, ...] = (0,)  # downstream seeds (training order and initialisation)
    keep: float = 0.5
    budget: Literal["steps", "epochs", "both"] = "steps"  # epochs: steps scale with subset size
    penalty_steps: int | None = None  # steps of the `release` (penalty) rater; None: rate.steps


# The named axes of the device mesh (what each one splits: runtime/parallel.py, docs/SCALING.md).
MESH_AXES = ("data", "fsdp", "population", "tensor")
MeshAxis = Literal[MESH_AXES]


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> the mesh axes it is split over (MaxText style). The models name their
    parameters' dimensions (models/sharding.py); an array's dimension takes, in order, the axes of
    its rule that an earlier dimension of that array did not take and whose sizes divide it."""

    batch: tuple[MeshAxis, ...] = ("data", "fsdp")  # batch rows (activations, inputs)
    population: tuple[MeshAxis, ...] = ("population",)  # the stacked rating proxies
    embed: tuple[MeshAxis, ...] = ("fsdp",)  # model width D: FSDP splits every state along it
    mlp: tuple[MeshAxis, ...] = ("tensor", "fsdp")  # MLP / modulation hidden features
    heads: tuple[MeshAxis, ...] = ("tensor", "fsdp")  # attention features H * Dh
    vocab: tuple[MeshAxis, ...] = ("tensor", "fsdp")  # token-table rows
    layers: tuple[MeshAxis, ...] = ()  # stacked blocks (scan over layers): replicated


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh every step runs on: sizes of its axes, their product the device count;
    one size may be -1 (the devices left over). Axis types are Auto (runtime/parallel.py says why).
    """

    data: int = -1  # batch split, states replicated
    fsdp: int = 1  # batch split, parameters and optimizer states split (FSDP)
    population: int = 1  # rating proxies split (must divide rate.population); rows elsewhere
    tensor: int = 1  # MLP hidden features and attention heads split
    rules: ShardingRules = ShardingRules()


@dataclasses.dataclass(frozen=True)
class Config:
    """Root configuration of an alchemist_jax run."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    rater: RaterConfig = RaterConfig()
    rate: RateConfig = RateConfig()
    score: ScoreConfig = ScoreConfig()
    select: SelectConfig = SelectConfig()
    dedup: DedupConfig = DedupConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    encode: EncodeConfig = EncodeConfig()
    pipeline: PipelineConfig = PipelineConfig()
    mesh: MeshConfig = MeshConfig()


# ----------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Loads a YAML config file (or the defaults when `path` is None) and applies overrides.

    Args:
      path: a YAML file whose nested mappings mirror `Config`; missing keys keep their defaults.
      overrides: strings `dotted.key=value`, applied in order after the file.
    Raises:
      ConfigError: unreadable file, unknown key, wrong type or invalid choice (message names it).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(
                f"config file {path} is not valid YAML: {' '.join(str(e).split())}"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(
                f"override {item!r}: the value is not a YAML scalar or list "
                f"({str(e).splitlines()[0]})"
            ) from None
        _set_dotted(tree, key.strip(), value)
    config = _build(Config, tree, prefix="")
    validate(config)
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for logging and run metadata)."""
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    """The config as YAML text (tuples as lists), readable by `load_config`."""
    return yaml.safe_dump(json.loads(json.dumps(to_dict(config))), sort_keys=False)


def write_run_config(
    config: Config, workdir: Path, sections: typing.Sequence[str], *, resumable: bool = True
) -> None:
    """Stores the resolved config as `workdir/config.yaml`; a rerun in the same workdir (which
    resumes) must agree on the `sections` that shape its results (e.g. data, model, rate), while
    the others (say, evaluation settings) may change between runs.

    Args:
      resumable: the workdir holds progress made under its config.yaml (a checkpoint). False
        (e.g. a first run that failed before its first checkpoint): the stored config binds
        nothing and is replaced.
    Raises:
      ConfigError: the workdir holds progress under a config that differs in one of `sections`.
    """
    path = Path(workdir) / "config.yaml"
    if path.exists() and resumable:
        stored = yaml.safe_load(path.read_text()) or {}
        current = yaml.safe_load(to_yaml(config))
        changed = [name for name in sections if stored.get(name) != current.get(name)]
        if changed:
            raise ConfigError(
                f"{path} holds a different config (section {', '.join(changed)}): resume with "
                "the same config and overrides, or use a new --workdir"
            )
    atomic_write_bytes(path, to_yaml(config).encode())


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, values: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "<root>"
    if not isinstance(values, dict):
        raise ConfigError(f"config key {where!r} must be a section (mapping), got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(prefix + n) for n in near)}?" if near else ""
            raise ConfigError(
                f"unknown config key {prefix + str(key)!r}.{hint} "
                f"Valid keys in {where!r}: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key {key!r} expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"config key {key!r} must be one of {', '.join(map(repr, choices))}; got {value!r}"
            )
        return value
    if origin is tuple:
        (item_type, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        return tuple(_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot, unsigned exponent) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} expects float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} expects int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} expects bool (true/false), got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} expects str, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for config key {key!r}")


# ----------------------------------------------------------------------------------------------
# Ranges and cross-field checks (run by `load_config`)
# ----------------------------------------------------------------------------------------------

PHASH_BITS = 64  # bits of the perceptual hash (dedup)


def _range(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> tuple[Any, str]:
    """(predicate, description) of the interval between `low` and `high` (None: unbounded)."""

    def inside(value: float) -> bool:
        return (low is None or (value > low if low_open else value >= low)) and (
            high is None or (value < high if high_open else value <= high)
        )

    left = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    right = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    if low is None:
        text = f"{'<' if high_open else '<='} {high:g}"
    elif high is None:
        text = f"{'>' if low_open else '>='} {low:g}"
    else:
        text = f"in {left}, {right}"
    return inside, text


FINITE = (lambda value: True, "finite")  # any number but NaN and infinities
AT_LEAST_1 = _range(1)
AT_LEAST_0 = _range(0)
POSITIVE = _range(0, low_open=True)
FRACTION = _range(0, 1, high_open=True)  # [0, 1)
PROPER_FRACTION = _range(0, 1, low_open=True, high_open=True)  # (0, 1)
SHARE = _range(0, 1, low_open=True)  # (0, 1]

MESH_SIZE = (lambda value: value == -1 or value >= 1, ">= 1, or -1 (the remaining devices)")

_SEEDED = (  # sections with a `seed`
    "data",
    "data.shapes",
    "data.corrupt",
    "rate",
    "score",
    "select",
    "dedup",
    "train",
    "evaluate",
)

# Dotted key -> allowed range. Every number of the schema is here but lists (checked by
# `validate`); None values (unset optional keys) are not checked. Seeds are >= 0: numpy's
# generators refuse negative ones.
RANGES: dict[str, tuple[Any, str]] = {
    **{f"{section}.seed": AT_LEAST_0 for section in _SEEDED},
    "data.validation_fraction": PROPER_FRACTION,
    "data.resolution": _range(4),
    "data.max_text_length": _range(2),
    "data.batch_size": AT_LEAST_1,
    "data.read_threads": AT_LEAST_0,
    "data.in_memory_limit": AT_LEAST_0,
    "data.pool.train_size": AT_LEAST_1,
    "data.pool.validation_size": AT_LEAST_1,
    "data.pool.test_size": AT_LEAST_1,
    "data.shapes.size": AT_LEAST_1,
    "data.shapes.resolution": _range(8),
    "data.manifest.max_image_pixels": AT_LEAST_1,
    "data.corrupt.fraction": _range(0, 1),
    "model.patch_size": AT_LEAST_1,
    "model.width": AT_LEAST_1,
    "model.depth": AT_LEAST_1,
    "model.heads": AT_LEAST_1,
    "model.mlp_ratio": POSITIVE,
    "model.text_width": AT_LEAST_1,
    "model.text_depth": AT_LEAST_1,
    "model.text_heads": AT_LEAST_1,
    "model.caption_dropout": FRACTION,
    "rater.width": _range(4),
    "rater.hidden": AT_LEAST_1,
    "rater.temperature": POSITIVE,
    "rate.steps": AT_LEAST_1,
    "rate.inner_steps": AT_LEAST_1,
    "rate.meta_every": AT_LEAST_1,
    "rate.population": AT_LEAST_1,
    "rate.reset_every": AT_LEAST_0,
    "rate.warm_start_steps": AT_LEAST_0,
    "rate.gap_plain_weight": AT_LEAST_0,
    "rate.inner_lr": POSITIVE,
    "rate.inner_eps": POSITIVE,
    "rate.lookahead_lr": POSITIVE,
    "rate.penalty_start": FINITE,
    "rate.penalty_decay": AT_LEAST_0,
    "rate.rater_lr": POSITIVE,
    "rate.rater_clip": POSITIVE,
    "rate.ema_decay": FRACTION,
    "rate.val_batch_size": AT_LEAST_1,
    "rate.unroll": AT_LEAST_1,
    "rate.checkpoint_every": AT_LEAST_1,
    "rate.log_every": AT_LEAST_1,
    "rate.max_bad_steps": AT_LEAST_1,
    "score.batch_size": AT_LEAST_1,
    "score.chunk_size": AT_LEAST_1,
    "score.proxy_steps": AT_LEAST_1,
    "score.early_steps": AT_LEAST_1,
    "score.draws": AT_LEAST_1,
    "score.alignment_steps": AT_LEAST_1,
    "score.alignment_references": _range(2),
    "score.alignment_t_min": FRACTION,
    "select.keep": SHARE,
    "select.clusters": AT_LEAST_1,
    "select.min_cluster_size": AT_LEAST_1,
    "select.drop": FRACTION,
    "select.head": FRACTION,
    "select.mu": _range(0, 1),
    "select.sigma": POSITIVE,
    "select.start": FRACTION,
    "select.threshold": FINITE,
    "select.temperature": POSITIVE,
    "dedup.max_hamming": _range(0, PHASH_BITS),
    "dedup.min_cosine": _range(0, 1, low_open=True),
    "dedup.min_aligned_cosine": _range(0, 1, low_open=True),
    "dedup.max_shift": AT_LEAST_0,
    "dedup.border": AT_LEAST_0,
    "dedup.align_size": _range(4),
    "dedup.align_blur": AT_LEAST_0,
    "dedup.bands": _range(1, PHASH_BITS),
    "dedup.projection_tables": AT_LEAST_0,
    "dedup.window": AT_LEAST_1,
    "dedup.embedding_size": AT_LEAST_1,
    "dedup.blur": AT_LEAST_0,
    "dedup.batch_size": AT_LEAST_1,
    "train.steps": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1,
    "train.learning_rate": POSITIVE,
    "train.warmup_steps": AT_LEAST_0,
    "train.weight_decay": AT_LEAST_0,
    "train.grad_clip": POSITIVE,
    "train.eval_every": AT_LEAST_1,
    "train.checkpoint_every": AT_LEAST_1,
    "train.max_bad_steps": AT_LEAST_1,
    "train.divergence_factor": _range(1, low_open=True),
    "evaluate.test_size": AT_LEAST_1,
    "evaluate.loss_draws": AT_LEAST_1,
    "evaluate.sample_steps": AT_LEAST_1,
    "evaluate.guidance_scale": AT_LEAST_0,
    "evaluate.classifier_steps": AT_LEAST_1,
    "evaluate.grid_captions": AT_LEAST_1,
    "evaluate.grid_samples": AT_LEAST_1,
    "encode.batch_size": AT_LEAST_1,
    "encode.chunk_size": AT_LEAST_1,
    "encode.image_size": _range(8),
    "pipeline.keep": SHARE,
    "pipeline.penalty_steps": AT_LEAST_1,
    **{f"mesh.{axis}": MESH_SIZE for axis in MESH_AXES},
}


def _lookup(config: Config, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _check_range(dotted: str, value: Any) -> None:
    inside, text = RANGES[dotted]
    if value is not None and (not math.isfinite(value) or not inside(value)):
        raise ConfigError(f"config key {dotted!r} must be {text}, got {value!r}")


def check_section(section: Any, name: str) -> None:
    """The `RANGES` of one section, for library callers that build a section's dataclass
    directly (e.g. `check_section(DedupConfig(window=0), "dedup")`) rather than load a config.

    Raises:
      ConfigError: as `validate`.
    """
    prefix = name + "."
    for dotted in RANGES:
        if dotted.startswith(prefix) and dotted.count(".") == 1:
            _check_range(dotted, getattr(section, dotted[len(prefix) :]))


def validate(config: Config) -> None:
    """Checks every range of `RANGES` and the settings that must agree with each other.

    Raises:
      ConfigError: one line naming the key (or keys) and what is allowed.
    """
    for dotted in RANGES:
        _check_range(dotted, _lookup(config, dotted))
    r = config.rate
    if r.mode == "lookahead" and r.inner_steps != 1:
        raise ConfigError(f"rate.mode=lookahead needs rate.inner_steps=1 (got {r.inner_steps})")
    if r.mixed_mode and r.mode != "unrolled":
        raise ConfigError(f"rate.mixed_mode=true applies to rate.mode=unrolled only (got {r.mode})")
    if r.gap_plain_weight and r.meta_loss != "caption_gap":
        raise ConfigError(
            f"rate.gap_plain_weight applies to rate.meta_loss=caption_gap only (got {r.meta_loss})"
        )
    if r.meta_every is not None and r.meta_every < r.inner_steps:
        raise ConfigError(
            f"rate.meta_every ({r.meta_every}) must be >= rate.inner_steps ({r.inner_steps})"
        )
    sizes = [getattr(config.mesh, axis) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        named = ", ".join(f"mesh.{a}={n}" for a, n in zip(MESH_AXES, sizes, strict=True))
        raise ConfigError(f"at most one mesh size may be -1 (the remaining devices): {named}")
    t = config.train
    if t.warmup_steps >= t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be < train.steps={t.steps}")
    sel = config.select
    for name in ("drop", "head", "start"):
        value = getattr(sel, name)
        if (
            value is not None
            and sel.keep > 1.0 - value + 1e-9
            and name in _POLICY_FRACTIONS.get(sel.policy, ())
        ):
            raise ConfigError(
                f"select.{name}={value} leaves {1 - value:.3g} of the pool to "
                f"choose from, less than select.keep={sel.keep}; need keep <= "
                f"1 - {name}"
            )
    if any(w < 0 or not math.isfinite(w) for w in sel.weights) or (
        sel.weights and not sum(sel.weights) > 0
    ):
        raise ConfigError(
            f"select.weights must be >= 0 with a positive sum, got {list(sel.weights)}"
        )
    if config.score.scorer == "clip_score" and config.score.clip_path is None:
        raise ConfigError(
            "score.scorer=clip_score needs score.clip_path=DIR: a local directory with an HF CLIP "
            "checkpoint (config.json + model.safetensors)"
        )
    pipe = config.pipeline
    if not pipe.arms or not pipe.seeds:
        raise ConfigError("pipeline.arms and pipeline.seeds must not be empty")
    if min(pipe.seeds) < 0:
        raise ConfigError(f"pipeline.seeds must be >= 0, got {list(pipe.seeds)}")
    for name in pipe.arms:
        fused = ARMS[name].ratings
        if sel.weights and len(fused) > 1 and len(sel.weights) != len(fused):
            raise ConfigError(
                f"select.weights has {len(sel.weights)} values, but arm {name!r} fuses "
                f"{len(fused)} ratings ({', '.join(fused)}): give one weight each, in that order"
            )


# The fractions of the pool each policy sets aside before choosing (checked against keep).
_POLICY_FRACTIONS = {"filter": ("drop",), "shift_gsample": ("head",), "block": ("start",)}
