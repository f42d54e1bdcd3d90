"""`alchemist-jax encode` with the tiny fixture VAE and CLIP: the stored latents and text states
are those of `encode_fn` / `text_hidden_states_fn`, an interrupted run resumes from its finished
chunks, unsupported VAEs are refused by name, the data layer reads the result; manifests with a
label column."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alchemist_jax import config as config_lib
from alchemist_jax import encoding
from alchemist_jax.data import load, preprocess
from alchemist_jax.data.preprocess import resize_center_crop, to_unit_range
from alchemist_jax.models import clip as clip_lib
from alchemist_jax.models import vae as vae_lib

FIXTURES = Path(__file__).parent / "fixtures"
SIZE = 10  # examples per split of the tiny `shapes` source


def _config(**overrides) -> config_lib.Config:
    values = {
        "encode.vae_path": str(FIXTURES / "vae_sd"),
        "encode.clip_path": str(FIXTURES / "clip_tiny"),
        "encode.image_size": 16,
        "encode.batch_size": 4,
        "encode.chunk_size": 4,
        "data.shapes.size": SIZE,
        "data.shapes.resolution": 16,
        **overrides,
    }
    return config_lib.load_config(None, [f"{k}={v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    out = tmp_path_factory.mktemp("encoded")
    summary = encoding.run(_config(), "shapes", out, splits=("train", "test"))
    return out, summary


def test_encode_stores_the_encoders_outputs(encoded):
    out, summary = encoded
    assert summary["splits"] == {"train": SIZE, "test": SIZE}
    assert summary["latent_shape"] == [8, 8, 4] and summary["encoded_samples"] == 2 * SIZE
    source = load(out / "alchemist_dataset" / "1.0.0", "train")
    raw = load("shapes", "train", config=_config().data)
    assert np.array_equal(source.ids, raw.ids) and np.array_equal(source.labels, raw.labels)

    vae = vae_lib.load_vae(FIXTURES / "vae_sd")
    images = np.stack([to_unit_range(resize_center_crop(raw[i]["image"], 16, 3)) for i in range(4)])
    mean, _ = vae_lib.encode_fn(vae)(vae.params, images)
    expected = vae_lib.scale_latents(np.asarray(mean), vae.config)
    stored = np.stack([source[i]["latent"] for i in range(4)])
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-6)

    clip = clip_lib.load_clip(FIXTURES / "clip_tiny")
    tokens = clip.tokenize([raw[i]["caption"] for i in range(4)])
    states, mask = clip_lib.text_hidden_states_fn(clip, "penultimate")(clip.params, tokens)
    np.testing.assert_allclose(
        np.stack([source[i]["text_embedding"] for i in range(4)]), states, rtol=1e-5, atol=1e-6
    )
    assert np.array_equal(np.stack([source[i]["token_mask"] for i in range(4)]), mask)
    assert source[0]["caption"] == raw[0]["caption"]


def test_data_layer_reads_the_encoded_dataset(encoded):
    out, _ = encoded
    source = load(out / "alchemist_dataset" / "1.0.0", "test")
    prepared = preprocess.materialize(source, preprocess.Preprocessor(28, 1, 77))
    extra = prepared.extra
    assert set(extra) == {"latent", "text_embedding", "token_mask"}  # no tokens of the caption
    assert extra["latent"].shape == (SIZE, 8, 8, 4) and extra["token_mask"].dtype == bool
    assert extra["token_mask"].shape == extra["text_embedding"].shape[:2]


def test_rerun_of_a_finished_encode_does_nothing(encoded):
    out, summary = encoded
    again = encoding.run(_config(), "shapes", out, splits=("train", "test"))
    assert again == summary
    with pytest.raises(FileExistsError, match="--overwrite"):
        encoding.run(
            _config(**{"encode.hidden_layer": "last"}), "shapes", out, splits=("train", "test")
        )


def test_encode_resumes_from_finished_chunks(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = encoding.Encoder.__call__

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] > 1:  # one batch of 4 = one chunk written, then the run dies
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(encoding.Encoder, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encoding.run(_config(), "shapes", tmp_path, splits=("train",))
    chunks = sorted((tmp_path / ".alchemist_dataset.encode" / "train").glob("*.npz"))
    assert [p.name for p in chunks] == ["00000.npz"]
    monkeypatch.setattr(encoding.Encoder, "__call__", original)
    summary = encoding.run(_config(), "shapes", tmp_path, splits=("train",))
    assert summary["encoded_samples"] == SIZE - 4  # the first chunk was not encoded again
    assert not (tmp_path / ".alchemist_dataset.encode").exists()
    assert len(load(tmp_path / "alchemist_dataset" / "1.0.0", "train")) == SIZE


def test_unsupported_vae_is_refused_by_name(tmp_path):
    folder = tmp_path / "wan"
    shutil.copytree(FIXTURES / "vae_sd", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderKLWan"}))
    with pytest.raises(ValueError, match="AutoencoderKLWan"):
        encoding.run(_config(**{"encode.vae_path": str(folder)}), "shapes", tmp_path / "out")
    with pytest.raises(config_lib.ConfigError, match="encode.vae_path"):
        encoding.Encoder(config_lib.EncodeConfig(clip_path=str(FIXTURES / "clip_tiny")))


def test_manifest_label_column(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    table = pa.table(
        {"image": [f"{i}.png" for i in range(3)], "caption": ["a", "b", "c"], "cls": [2, None, 0]}
    )
    pq.write_table(table, tmp_path / "m.parquet")
    cfg = config_lib.load_config(None, ["data.manifest.label_column=cls"])
    source = load(tmp_path / "m.parquet", config=cfg.data)
    assert list(source.ids) == [0, 2]  # the row without a label is skipped as a bad sample
    assert list(source.labels) == [2, 0] and source[1]["label"] == 0
    assert load(tmp_path / "m.parquet").labels is None
    bad = config_lib.load_config(None, ["data.manifest.label_column=caption"])
    with pytest.raises(ValueError, match="label_column"):
        load(tmp_path / "m.parquet", config=bad.data)
