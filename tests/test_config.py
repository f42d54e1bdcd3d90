"""Typed config: YAML + overrides, and errors that name the key."""

import pytest

from alchemist_jax.config import Config, ConfigError, load_config


def test_defaults_without_file():
    assert load_config() == Config()


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batch_size: 16\n  pool:\n    train_size: 100\n")
    cfg = load_config(path, ["data.pool.train_size=200", "data.corrupt.kinds=[noise, blur]",
                             "data.corrupt.fraction=1", "data.manifest.id_column=uid"])
    assert cfg.data.batch_size == 16
    assert cfg.data.pool.train_size == 200
    assert cfg.data.corrupt.kinds == ("noise", "blur")
    assert cfg.data.corrupt.fraction == 1.0 and isinstance(cfg.data.corrupt.fraction, float)
    assert cfg.data.manifest.id_column == "uid"
    assert load_config(path, ["data.manifest.id_column=null"]).data.manifest.id_column is None


def test_demo_config_loads():
    cfg = load_config("configs/demo.yaml")
    assert cfg.data.source == "pool" and cfg.data.corrupt.fraction == 0.3


@pytest.mark.parametrize("override, message", [
    ("data.batch_sise=3", "unknown config key 'data.batch_sise'. Did you mean 'data.batch_size'?"),
    ("dta.source=pool", "unknown config key 'dta'. Did you mean 'data', 'train'?"),
    ("data.batch_size=big", "config key 'data.batch_size' expects int, got 'big'"),
    ("data.batch_size=true", "config key 'data.batch_size' expects int, got True"),
    ("data.channels=2", "config key 'data.channels' must be one of 1, 3; got 2"),
    ("data.manifest.on_bad_sample=ignore",
     "config key 'data.manifest.on_bad_sample' must be one of 'skip', 'error'; got 'ignore'"),
    ("data.pool=3", "config key 'data.pool' must be a section (mapping), got 3"),
    ("data.corrupt.kinds=noise", "config key 'data.corrupt.kinds' expects a list, got 'noise'"),
    ("data.batch_size", "override 'data.batch_size' is not of the form key.sub=value"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  pool:\n    size: 3\n")
    with pytest.raises(ConfigError, match=r"Valid keys in 'data.pool': test_size, train_size, "
                                          r"validation_size"):
        load_config(path)


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
