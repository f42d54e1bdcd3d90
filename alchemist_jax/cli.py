"""The `alchemist-jax` command line: a thin shell over the library.

Every subcommand that reads a configuration takes `--config FILE` plus `key.sub=value` overrides.
User mistakes (bad config, missing data, bad manifests) and failed runs (non-finite values) end
with one line on stderr and exit status 2; set ALCHEMIST_DEBUG=1 to see the traceback instead.
SIGTERM / SIGINT stop a long run at the next step boundary after saving a checkpoint, with one
line and exit status 75; the same command resumes it.

Size: one small function per subcommand plus the argument parser; nothing else lives here.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
from pathlib import Path

from alchemist_jax import config as config_lib


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML config file (configs/*.yaml); defaults when omitted",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. data.batch_size=32",
    )


def _add_allow_data_change(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-data-change",
        action="store_true",
        help="resume even if the data changed since the run's last checkpoint (refused otherwise)",
    )


def _cmd_fetch(args: argparse.Namespace) -> None:
    from alchemist_jax.data import builtin, cache

    builtin.fetch_all()
    print(f"built-in data ready in {cache.cache_dir()}: MNIST, Animal-MNIST, CLIP vocabulary")


def _cmd_data_summary(args: argparse.Namespace) -> None:
    from alchemist_jax.data import corrupt, load, summary

    cfg = config_lib.load_config(args.config, args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    source = load(cfg.data.source, cfg.data.split, config=cfg.data, report_dir=args.out)
    if cfg.data.corrupt.fraction > 0:
        source, _ = corrupt(
            source,
            cfg.data.corrupt.fraction,
            cfg.data.corrupt.kinds,
            seed=cfg.data.corrupt.seed,
            truth_path=args.out / "defects.parquet",
        )
    stats = summary.summarize(source, seed=cfg.data.seed)
    if cfg.data.corrupt.fraction > 0:
        stats["defects"] = dict(
            sorted(collections.Counter(kind or "clean" for kind in source.defects).items())
        )
    summary.write_json(stats, args.out / "summary.json")
    sheet = summary.contact_sheet(source, args.out / "contact_sheet.png", seed=cfg.data.seed)
    print(json.dumps(stats, indent=2))
    print(f"wrote {args.out / 'summary.json'} and {sheet}")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from alchemist_jax.data import load
    from alchemist_jax.data.tfds_dataset import prepare_tfds

    cfg = config_lib.load_config(args.config, args.overrides)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    sources = {
        split: load(args.source, split, config=cfg.data, report_dir=args.out) for split in splits
    }
    path = prepare_tfds(sources, args.out, name=args.name, overwrite=args.overwrite)
    counts = ", ".join(f"{split} {len(source)}" for split, source in sources.items())
    print(f"wrote TFDS dataset {path} ({counts}); load it with data.source={path}")


def _cmd_encode(args: argparse.Namespace) -> None:
    from alchemist_jax import encoding

    _use_compilation_cache()
    cfg = config_lib.load_config(args.config, args.overrides)
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    summary = encoding.run(
        cfg, args.source, args.out, splits=splits, name=args.name, overwrite=args.overwrite
    )
    print(json.dumps(summary, indent=2))
    print(f"load it with data.source={Path(args.out) / args.name / encoding.VERSION}")


def _use_compilation_cache() -> None:
    """Persists compiled XLA programs in the data cache (a rerun skips the ~minute of compiling
    the meta-step), unless the user chose a cache with JAX_COMPILATION_CACHE_DIR."""
    import jax

    from alchemist_jax.data.cache import cache_dir

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax_compile"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _cmd_rate(args: argparse.Namespace) -> None:
    from alchemist_jax import rating

    _use_compilation_cache()
    cfg = config_lib.load_config(args.config, args.overrides)
    final = rating.run(cfg, args.workdir, allow_data_change=args.allow_data_change)
    print(json.dumps(final, indent=2))
    print(
        f"rater, proxies and metrics in {args.workdir} (checkpoints/, metrics.jsonl, "
        "tensorboard/, curves.png)"
    )


def _load(args: argparse.Namespace, **shortcuts) -> config_lib.Config:
    """The config of `--config` + overrides; flags such as `--scorer` are shortcuts for their
    config key (`shortcuts`: key -> flag value, None when the flag was not given)."""
    extra = [f"{key}={value}" for key, value in shortcuts.items() if value is not None]
    return config_lib.load_config(args.config, [*args.overrides, *extra])


def _cmd_score(args: argparse.Namespace) -> None:
    from alchemist_jax import scoring

    _use_compilation_cache()
    cfg = _load(args, **{"score.scorer": args.scorer})
    summary = scoring.run(cfg, args.out, rater_dir=args.rater)
    print(json.dumps(summary, indent=2))


def _cmd_dedup(args: argparse.Namespace) -> None:
    from alchemist_jax import dedup

    _use_compilation_cache()
    cfg = _load(args, **{"data.source": args.source})
    summary = dedup.run(cfg, args.out, rater_dir=args.rater_dir)
    line = (
        f"dedup: {summary['count']} samples, {summary['groups']} groups, "
        f"{summary['grouped']} samples in groups of 2 or more -> {summary['path']}"
    )
    if "pair_precision" in summary:  # the pool has injected copies
        measured = {
            key: summary[key]
            for key in ("recall_duplicate", "recall_near_duplicate", "pair_precision")
        }
        line += (
            " (injected copies: "
            + ", ".join(
                f"{key} {'-' if value is None else f'{value:.3f}'}"
                for key, value in measured.items()
            )
            + ")"
        )
    print(line)


def _cmd_select(args: argparse.Namespace) -> None:
    from alchemist_jax import selection

    # `--ratings A B key=value`: argparse hands overrides written after the files to --ratings.
    overrides = [p for p in args.ratings if "=" in p.parts[0] and not p.exists()]
    args.overrides = [*args.overrides, *map(str, overrides)]
    ratings = [p for p in args.ratings if p not in overrides]
    cfg = _load(args, **{"select.policy": args.policy, "select.keep": args.keep})
    summary = selection.run(cfg, ratings, args.out, dedup=args.dedup)
    print(json.dumps(summary, indent=2))


def _cmd_train(args: argparse.Namespace) -> None:
    from alchemist_jax import training

    _use_compilation_cache()
    if args.selection is not None and args.weights is not None:
        raise ValueError("give --selection or --weights, not both")
    cfg = _load(args)
    final = training.run(
        cfg,
        args.workdir,
        selection=args.selection,
        weights=args.weights,
        allow_data_change=args.allow_data_change,
    )
    print(json.dumps(final, indent=2))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from alchemist_jax.evaluation import generative

    _use_compilation_cache()
    cfg = _load(args)
    metrics = generative.run(cfg, args.model, args.out)
    print(json.dumps(metrics, indent=2))


def _cmd_report(args: argparse.Namespace) -> None:
    from alchemist_jax import report

    path = report.build(args.workdir)
    print(f"report: {path}")


def _cmd_pipeline(args: argparse.Namespace) -> None:
    from alchemist_jax import pipeline

    _use_compilation_cache()
    cfg = _load(args)
    pipeline.run(cfg, args.workdir, allow_data_change=args.allow_data_change)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alchemist-jax",
        description="Meta-gradient data selection for text-to-image diffusion training.",
    )
    several = parser.add_argument_group(
        "several processes (one per host; docs/SCALING.md)",
        "every process runs the same command; default: one process, or the environment "
        "variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID",
    )
    several.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="address of process 0's coordination service; 'auto' on a TPU pod or SLURM",
    )
    several.add_argument("--process-count", type=int, metavar="N", help="number of processes")
    several.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = commands.add_parser(
        "fetch", help="download and convert the built-in data (MNIST, Animal-MNIST, CLIP BPE)"
    )
    fetch.set_defaults(run=_cmd_fetch)

    data_summary = commands.add_parser(
        "data-summary", help="print counts, image sizes, caption lengths; write a contact sheet"
    )
    _add_config_arguments(data_summary)
    data_summary.add_argument(
        "--out", type=Path, required=True, help="folder for summary.json and contact_sheet.png"
    )
    data_summary.set_defaults(run=_cmd_data_summary)

    prepare = commands.add_parser(
        "prepare", help="convert any source into a random-access TFDS array_record dataset"
    )
    _add_config_arguments(prepare)
    prepare.add_argument(
        "--source",
        required=True,
        help="built-in name, manifest (.parquet/.csv), image folder or TFDS dir",
    )
    prepare.add_argument("--out", type=Path, required=True, help="output folder")
    prepare.add_argument(
        "--splits",
        default="train",
        help="comma-separated splits to convert (manifests and folders: train)",
    )
    prepare.add_argument("--name", default="alchemist_dataset", help="TFDS dataset name")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    prepare.set_defaults(run=_cmd_prepare)

    encode = commands.add_parser(
        "encode",
        help="encode any source into a TFDS dataset of VAE latents and CLIP text embeddings",
    )
    _add_config_arguments(encode)
    encode.add_argument(
        "--source",
        required=True,
        help="built-in name, manifest (.parquet/.csv), image folder or TFDS dir",
    )
    encode.add_argument("--out", type=Path, required=True, help="output folder (TFDS data dir)")
    encode.add_argument(
        "--splits",
        default="train",
        help="comma-separated splits to encode (manifests and folders: train)",
    )
    encode.add_argument("--name", default="alchemist_dataset", help="TFDS dataset name")
    encode.add_argument(
        "--overwrite", action="store_true", help="replace a dataset encoded with other settings"
    )
    encode.set_defaults(run=_cmd_encode)

    rate = commands.add_parser(
        "rate", help="learn the rater with meta-gradients through a population of proxies"
    )
    _add_config_arguments(rate)
    rate.add_argument(
        "--workdir",
        type=Path,
        required=True,
        help="run folder; rerunning the same command there resumes the run",
    )
    _add_allow_data_change(rate)
    rate.set_defaults(run=_cmd_rate)

    score = commands.add_parser(
        "score", help="write one score per sample id of the pool (ratings.parquet); resumable"
    )
    _add_config_arguments(score)
    score.add_argument("--out", type=Path, required=True, help="the ratings.parquet to write")
    score.add_argument(
        "--scorer",
        default=None,
        help=f"shortcut for score.scorer ({', '.join(config_lib.SCORERS)})",
    )
    score.add_argument(
        "--rater",
        type=Path,
        default=None,
        help="scorer `rater`: the workdir of an `alchemist-jax rate` run",
    )
    score.set_defaults(run=_cmd_score)

    dedup = commands.add_parser(
        "dedup", help="group exact and near duplicates of the pool (dedup.parquet)"
    )
    _add_config_arguments(dedup)
    dedup.add_argument("--out", type=Path, required=True, help="the dedup.parquet to write")
    dedup.add_argument(
        "--source",
        default=None,
        help="shortcut for data.source (built-in name, manifest, folder, TFDS)",
    )
    dedup.add_argument(
        "--rater-dir",
        type=Path,
        default=None,
        help="dedup.embedding=rater: the workdir of an `alchemist-jax rate` run",
    )
    dedup.set_defaults(run=_cmd_dedup)

    select = commands.add_parser(
        "select", help="choose the training subset from ratings (selection.parquet)"
    )
    _add_config_arguments(select)
    select.add_argument(
        "--ratings",
        type=Path,
        nargs="+",
        required=True,
        help="one or more ratings.parquet; several are fused (a weighted geometric mean of "
        "rank percentiles: select.weights, else select.fusion's weights)",
    )
    select.add_argument(
        "--dedup",
        type=Path,
        default=None,
        help="a dedup.parquet: keep at most the best-scored member of each duplicate group",
    )
    select.add_argument("--out", type=Path, required=True, help="the selection.parquet to write")
    select.add_argument(
        "--policy",
        default=None,
        help=f"shortcut for select.policy ({', '.join(config_lib.POLICIES)})",
    )
    select.add_argument(
        "--keep",
        type=float,
        default=None,
        help="shortcut for select.keep (fraction of the pool kept)",
    )
    select.set_defaults(run=_cmd_select)

    train = commands.add_parser(
        "train", help="train the T2I model on a selection, with weights, or on the full pool"
    )
    _add_config_arguments(train)
    train.add_argument(
        "--workdir",
        type=Path,
        required=True,
        help="run folder; rerunning the same command there resumes the run",
    )
    train.add_argument(
        "--selection", type=Path, default=None, help="selection.parquet: train on these ids only"
    )
    train.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="ratings.parquet: sample the pool with probability from the scores",
    )
    _add_allow_data_change(train)
    train.set_defaults(run=_cmd_train)

    evaluate = commands.add_parser(
        "evaluate", help="test loss, FCD, text alignment and a sample grid of a trained model"
    )
    _add_config_arguments(evaluate)
    evaluate.add_argument(
        "--model", type=Path, required=True, help="the workdir of an `alchemist-jax train` run"
    )
    evaluate.add_argument(
        "--out", type=Path, required=True, help="folder for metrics.json and samples.png"
    )
    evaluate.set_defaults(run=_cmd_evaluate)

    report = commands.add_parser(
        "report", help="build DIR/report/index.html from a pipeline run folder"
    )
    report.add_argument("--workdir", type=Path, required=True, help="a pipeline run folder")
    report.set_defaults(run=_cmd_report)

    pipeline = commands.add_parser(
        "pipeline", help="rate, score, select, train every arm, evaluate and report"
    )
    _add_config_arguments(pipeline)
    pipeline.add_argument(
        "--workdir",
        type=Path,
        required=True,
        help="run folder; rerunning resumes every finished stage",
    )
    _add_allow_data_change(pipeline)
    pipeline.set_defaults(run=_cmd_pipeline)
    return parser


# Exit statuses: 0 done; 2 a user mistake or a failed run (one line on stderr); 75 stopped by
# SIGTERM / SIGINT after saving progress (rerun the same command to resume).
EXIT_ERROR = 2


def _configure_logging() -> None:
    """The project's own messages at INFO, everything else (JAX's backend probing, TFDS, absl)
    at WARNING: a CPU run does not print `Unable to initialize backend 'tpu'` as if it were
    ours."""
    logging.basicConfig(level=logging.WARNING, format="[alchemist-jax] %(message)s")
    logging.getLogger("alchemist_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed arguments; config overrides (key.sub=value) may also come after the options
    (argparse alone takes positionals only before them, or right after a list option)."""
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(build_parser(), argv)
    _configure_logging()
    from alchemist_jax.data.cache import DataUnavailableError
    from alchemist_jax.runtime.preemption import EXIT_PREEMPTED, Preempted

    try:
        from alchemist_jax.runtime import distributed

        distributed.initialize(args.coordinator, args.process_count, args.process_id)
        args.run(args)
    except Preempted as stopped:
        print(f"alchemist-jax {args.command}: {stopped}", file=sys.stderr)
        return EXIT_PREEMPTED
    except (config_lib.ConfigError, DataUnavailableError, ValueError, OSError) as error:
        if os.environ.get("ALCHEMIST_DEBUG"):
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, OSError) and error.strerror and not error.filename:
            message = error.strerror  # "cannot write PATH: No space left on device", no [Errno]
        print(f"alchemist-jax {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a step loop
        print(f"alchemist-jax {args.command}: interrupted", file=sys.stderr)
        return 128 + 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
