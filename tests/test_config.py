"""Typed config: YAML + overrides, and errors that name the key."""

from pathlib import Path

import pytest

from alchemist_jax.config import Config, ConfigError, load_config


def test_defaults_without_file():
    assert load_config() == Config()


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batch_size: 16\n  pool:\n    train_size: 100\n")
    cfg = load_config(
        path,
        [
            "data.pool.train_size=200",
            "data.corrupt.kinds=[noise, blur]",
            "data.corrupt.fraction=1",
            "data.manifest.id_column=uid",
        ],
    )
    assert cfg.data.batch_size == 16
    assert cfg.data.pool.train_size == 200
    assert cfg.data.corrupt.kinds == ("noise", "blur")
    assert cfg.data.corrupt.fraction == 1.0 and isinstance(cfg.data.corrupt.fraction, float)
    assert cfg.data.manifest.id_column == "uid"
    assert load_config(path, ["data.manifest.id_column=null"]).data.manifest.id_column is None


def test_demo_config_loads():
    cfg = load_config("configs/demo.yaml")
    assert cfg.data.source == "pool" and cfg.data.corrupt.fraction == 0.3


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.batch_sise=3",
            "unknown config key 'data.batch_sise'. Did you mean 'data.batch_size'?",
        ),
        ("dta.source=pool", "unknown config key 'dta'. Did you mean 'data', 'train'?"),
        ("data.batch_size=big", "config key 'data.batch_size' expects int, got 'big'"),
        ("data.batch_size=true", "config key 'data.batch_size' expects int, got True"),
        ("data.channels=2", "config key 'data.channels' must be one of 1, 3; got 2"),
        (
            "data.manifest.on_bad_sample=ignore",
            "config key 'data.manifest.on_bad_sample' must be one of 'skip', 'error'; got 'ignore'",
        ),
        ("data.pool=3", "config key 'data.pool' must be a section (mapping), got 3"),
        ("data.corrupt.kinds=noise", "config key 'data.corrupt.kinds' expects a list, got 'noise'"),
        ("data.batch_size", "override 'data.batch_size' is not of the form key.sub=value"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  pool:\n    size: 3\n")
    with pytest.raises(
        ConfigError,
        match=r"Valid keys in 'data.pool': test_size, train_size, "
        r"validation_size",
    ):
        load_config(path)


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def _numeric_keys(cls, prefix=""):
    """Dotted keys of every int / float field (optional or not) of a config dataclass tree."""
    import dataclasses
    import typing

    keys = []
    for field in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[field.name]
        if dataclasses.is_dataclass(tp):
            keys += _numeric_keys(tp, f"{prefix}{field.name}.")
        elif typing.get_origin(tp) is not tuple and {int, float} & set(
            typing.get_args(tp) or (tp,)
        ):
            keys.append(prefix + field.name)
    return keys


def test_every_number_has_a_range():
    from alchemist_jax.config import RANGES, Config

    # Every number is range-checked at load time.
    numbers = set(_numeric_keys(Config))
    assert numbers - set(RANGES) == set(), "numbers without a range in config.RANGES"
    assert set(RANGES) - numbers == set(), "RANGES names keys that are not numbers"
    # Every shipped config passes.
    for path in sorted(Path("configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.grad_clip=0", "config key 'train.grad_clip' must be > 0, got 0.0"),
        ("rate.ema_decay=1.5", "config key 'rate.ema_decay' must be in [0, 1), got 1.5"),
        ("rate.inner_lr=-1e-3", "config key 'rate.inner_lr' must be > 0, got -0.001"),
        ("train.learning_rate=.nan", "config key 'train.learning_rate' must be > 0, got nan"),
        ("select.keep=0", "config key 'select.keep' must be in (0, 1], got 0.0"),
        ("select.seed=-1", "config key 'select.seed' must be >= 0, got -1"),
        ("pipeline.seeds=[0,-2]", "pipeline.seeds must be >= 0, got [0, -2]"),
        ("dedup.max_hamming=65", "config key 'dedup.max_hamming' must be in [0, 64], got 65"),
        ("train.warmup_steps=3000", "train.warmup_steps=3000 must be < train.steps=2000"),
        ("rate.mixed_mode=true", "rate.mixed_mode=true applies to rate.mode=unrolled only"),
        ("rate.gap_plain_weight=1", "rate.gap_plain_weight applies to rate.meta_loss=caption_gap"),
        ("select.drop=0.6", "select.drop=0.6 leaves 0.4 of the pool to choose from"),
        ("select.weights=[1, -1]", "select.weights must be >= 0 with a positive sum"),
        ("pipeline.arms=[alchemy]", "config key 'pipeline.arms[0]' must be one of 'alchemist'"),
        ("score.scorer=clip_score", "score.scorer=clip_score needs score.clip_path=DIR"),
        (
            "rate.steps=!!python/object:os.system x",
            "override 'rate.steps=!!python/object:os.system",
        ),
    ],
)
def test_ranges_and_cross_field_checks_at_load_time(override, message):
    extra = ["rate.mode=penalty"] if "mixed_mode" in override else []
    with pytest.raises(ConfigError) as error:
        load_config(None, extra + [override])
    assert message in str(error.value)
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize(
    "text, value",
    [("3e-4", 3e-4), ("1E5", 1e5), ("-2.5e-3", -2.5e-3), ("1e+2", 100.0), (".5e1", 5.0)],
)
def test_scientific_notation_is_a_number(tmp_path, text, value):
    assert load_config(None, [f"rate.penalty_start={text}"]).rate.penalty_start == value
    path = tmp_path / "c.yaml"
    path.write_text(f"rate:\n  penalty_start: {text}\n")
    assert load_config(path).rate.penalty_start == value
    with pytest.raises(ConfigError, match="expects float, got '3e-4x'"):
        load_config(None, ["rate.penalty_start=3e-4x"])
