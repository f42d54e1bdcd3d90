"""CLIP from a local HF checkpoint: a tiny random checkpoint written here in transformers' format,
its towers against a float64 numpy forward of transformers' CLIPModel, the loader's errors, and
the clip_score scorer end to end."""

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
import safetensors.numpy
from flax import nnx
from PIL import Image
from scipy.special import erf
from test_rate import TINY
from transformers import CLIPConfig

from alchemist_jax import scoring
from alchemist_jax.config import load_config
from alchemist_jax.data import load_splits
from alchemist_jax.data import tokenizer as tokenizer_lib
from alchemist_jax.models import clip

TEXT = dict(
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    hidden_act="quick_gelu",
)
VISION = dict(
    hidden_size=12,
    intermediate_size=20,
    num_hidden_layers=2,
    num_attention_heads=3,
    image_size=16,
    patch_size=4,
    hidden_act="gelu",
)


# ----------------------------------------------------------------------------------------------
# A checkpoint in transformers' format and a float64 reference forward of CLIPModel
# ----------------------------------------------------------------------------------------------


def _torch_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of transformers' CLIPModel for `config`, in torch layout (Linear weights
    (out, in), Conv2d weights (out, in, kh, kw))."""
    text, vision = config.text_config, config.vision_config
    shapes = {}

    def norm(key, width):
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (width,), (width,)

    def linear(key, n_in, n_out):
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (n_out, n_in), (n_out,)

    for tower, section in (("text_model", text), ("vision_model", vision)):
        width, hidden = section.hidden_size, section.intermediate_size
        for n in range(section.num_hidden_layers):
            layer = f"{tower}.encoder.layers.{n}"
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                linear(f"{layer}.self_attn.{name}", width, width)
            norm(f"{layer}.layer_norm1", width)
            norm(f"{layer}.layer_norm2", width)
            linear(f"{layer}.mlp.fc1", width, hidden)
            linear(f"{layer}.mlp.fc2", hidden, width)
    shapes["text_model.embeddings.token_embedding.weight"] = (text.vocab_size, text.hidden_size)
    shapes["text_model.embeddings.position_embedding.weight"] = (
        text.max_position_embeddings,
        text.hidden_size,
    )
    norm("text_model.final_layer_norm", text.hidden_size)
    grid = vision.image_size // vision.patch_size
    shapes["vision_model.embeddings.class_embedding"] = (vision.hidden_size,)
    shapes["vision_model.embeddings.patch_embedding.weight"] = (
        vision.hidden_size,
        3,
        vision.patch_size,
        vision.patch_size,
    )
    shapes["vision_model.embeddings.position_embedding.weight"] = (grid**2 + 1, vision.hidden_size)
    norm("vision_model.pre_layrnorm", vision.hidden_size)
    norm("vision_model.post_layernorm", vision.hidden_size)
    shapes["text_projection.weight"] = (config.projection_dim, text.hidden_size)
    shapes["visual_projection.weight"] = (config.projection_dim, vision.hidden_size)
    shapes["logit_scale"] = ()
    return shapes


def write_checkpoint(directory, *, eos_token_id=49407, vocab_size=49408, seed=0):
    """Writes config.json (transformers.CLIPConfig) and model.safetensors (float32, with the
    position_ids buffer older exports carry) into `directory`; returns (config, weights as
    float64)."""
    config = CLIPConfig(
        text_config=dict(TEXT, eos_token_id=eos_token_id, vocab_size=vocab_size),
        vision_config=VISION,
        projection_dim=8,
    )
    config.save_pretrained(directory)
    rng = np.random.default_rng(seed)
    weights = {}
    for key, shape in _torch_shapes(config).items():
        is_norm_scale = "norm" in key and key.endswith(".weight")
        weights[key] = np.asarray(
            (1.0 if is_norm_scale else 0.0) + 0.3 * rng.normal(size=shape), np.float32
        )
    buffers = {"text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None]}
    safetensors.numpy.save_file({**weights, **buffers}, directory / "model.safetensors")
    return config, {key: value.astype(np.float64) for key, value in weights.items()}


def _layer_norm(x, w, prefix, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]


def _linear(x, w, prefix):
    return x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]


_ACTIVATIONS = {
    "quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x)),
    "gelu": lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2))),
}


def _encoder(x, w, tower, section, causal):
    batch, length, width = x.shape
    heads = section.num_attention_heads
    eps = section.layer_norm_eps
    for n in range(section.num_hidden_layers):
        prefix = f"{tower}.encoder.layers.{n}"
        h = _layer_norm(x, w, f"{prefix}.layer_norm1", eps)
        q, k, v = (
            _linear(h, w, f"{prefix}.self_attn.{name}_proj")
            .reshape(batch, length, heads, -1)
            .transpose(0, 2, 1, 3)
            for name in "qkv"
        )
        logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(width // heads)
        if causal:
            logits = logits + np.triu(np.full((length, length), -np.inf), 1)
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)
        x = x + _linear(out, w, f"{prefix}.self_attn.out_proj")
        h = _layer_norm(x, w, f"{prefix}.layer_norm2", eps)
        act = _ACTIVATIONS[section.hidden_act]
        x = x + _linear(act(_linear(h, w, f"{prefix}.mlp.fc1")), w, f"{prefix}.mlp.fc2")
    return x


def reference_text_embeds(w, config, tokens):
    """transformers' CLIPModel.get_text_features: tokens (B, L) -> (B, projection_dim)."""
    text = config.text_config
    length = tokens.shape[1]
    x = (
        w["text_model.embeddings.token_embedding.weight"][tokens]
        + w["text_model.embeddings.position_embedding.weight"][:length]
    )
    x = _encoder(x, w, "text_model", text, causal=True)
    x = _layer_norm(x, w, "text_model.final_layer_norm", text.layer_norm_eps)
    if text.eos_token_id == 2:
        end = tokens.argmax(-1)
    else:
        end = (tokens == text.eos_token_id).argmax(-1)
    return x[np.arange(len(tokens)), end] @ w["text_projection.weight"].T


def reference_image_embeds(w, config, pixels):
    """transformers' CLIPModel.get_image_features: pixels (B, S, S, 3) normalised ->
    (B, projection_dim); the patch convolution written as a sum over each patch."""
    vision = config.vision_config
    batch, size, patch = len(pixels), vision.image_size, vision.patch_size
    grid = size // patch
    blocks = pixels.reshape(batch, grid, patch, grid, patch, 3)
    patches = np.einsum(
        "bipjqc,dcpq->bijd", blocks, w["vision_model.embeddings.patch_embedding.weight"]
    )
    cls = np.broadcast_to(
        w["vision_model.embeddings.class_embedding"], (batch, 1, vision.hidden_size)
    )
    x = np.concatenate([cls, patches.reshape(batch, grid * grid, -1)], axis=1)
    x = x + w["vision_model.embeddings.position_embedding.weight"]
    x = _layer_norm(x, w, "vision_model.pre_layrnorm", vision.layer_norm_eps)
    x = _encoder(x, w, "vision_model", vision, causal=False)
    pooled = _layer_norm(x[:, 0], w, "vision_model.post_layernorm", vision.layer_norm_eps)
    return pooled @ w["visual_projection.weight"].T


def reference_pixels(images01, size, mean, std):
    """(B, R, R, C) in [0, 1] -> CLIP inputs (B, S, S, 3): PIL bicubic per channel (float
    mode), clipped to [0, 1], normalised."""
    rgb = np.repeat(images01, 3, axis=-1) if images01.shape[-1] == 1 else images01
    resized = np.stack(
        [
            np.stack(
                [
                    np.asarray(
                        Image.fromarray(channel.astype(np.float32), mode="F").resize(
                            (size, size), Image.Resampling.BICUBIC
                        )
                    )
                    for channel in np.moveaxis(image, -1, 0)
                ],
                axis=-1,
            )
            for image in rgb
        ]
    )
    return (np.clip(resized.astype(np.float64), 0, 1) - np.array(mean)) / np.array(std)


def _cosine(a, b):
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _token_rows(rng, count, length, vocab_size):
    """Token rows (count, length) like a tokenizer's: start token, text, end token, padding (0
    or the end token); the text holds id 2 and an id above the end token (an added token), so
    that the two end-of-text rules of transformers pick different positions than argmax or
    the first 2."""
    rows = np.zeros((count, length), np.int32)
    for row in range(count):
        words = rng.integers(3, 49406, size=rng.integers(3, length - 2))
        words[rng.integers(len(words))] = 2
        words[rng.integers(len(words))] = vocab_size - 1
        rows[row, : len(words) + 2] = [49406, *words, 49407]
        if row % 2:
            rows[row, len(words) + 2 :] = 49407
    return rows


# ----------------------------------------------------------------------------------------------
# The towers against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eos_token_id", [49407, 2])
def test_towers_match_the_float64_reference(tmp_path, eos_token_id):
    config, w = write_checkpoint(tmp_path, eos_token_id=eos_token_id, vocab_size=49410)
    rng = np.random.default_rng(1)
    tokens = _token_rows(rng, 4, 12, vocab_size=49410)
    pixels = rng.normal(size=(3, 16, 16, 3))
    with jax.enable_x64(True):
        checkpoint = clip.load_clip(tmp_path, dtype=np.float64)

        @jax.jit
        def embeds(params, tokens, pixels):
            model = nnx.merge(checkpoint.graphdef, params)
            return model.text_embeds(tokens), model.image_embeds(pixels)

        text, image = map(np.asarray, embeds(checkpoint.params, tokens, pixels))
    assert text.dtype == image.dtype == np.float64
    np.testing.assert_allclose(text, reference_text_embeds(w, config, tokens), rtol=0, atol=1e-9)
    np.testing.assert_allclose(image, reference_image_embeds(w, config, pixels), rtol=0, atol=1e-9)
    assert float(checkpoint.params["logit_scale"][...]) == pytest.approx(w["logit_scale"])


def test_clip_score_is_the_cosine_of_the_reference_embeddings(tmp_path):
    config, w = write_checkpoint(tmp_path)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": list(mean), "image_std": list(std)})
    )
    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, (5, 28, 28, 1)).astype(np.float32)
    checkpoint = clip.load_clip(tmp_path)
    assert checkpoint.image_mean == mean and checkpoint.image_std == std
    tokens = checkpoint.tokenize(["a cat", "a dog on a mat", "x", "seven", "a digit"])
    assert tokens.shape == (5, 77) and tokens.dtype == np.int32
    scores = np.asarray(clip.clip_score_fn(checkpoint)(checkpoint.params, images, tokens))
    assert scores.dtype == np.float32
    pixels = reference_pixels((images + 1) / 2, 16, mean, std)
    expected = _cosine(
        reference_image_embeds(w, config, pixels), reference_text_embeds(w, config, tokens)
    )
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)


def test_a_sharded_checkpoint_loads_the_same_parameters(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    write_checkpoint(single)
    shutil.copytree(single, sharded)
    tensors = safetensors.numpy.load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {}
    for index, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-{index + 1:05d}-of-00002.safetensors"
        safetensors.numpy.save_file({key: tensors[key] for key in part}, sharded / name)
        weight_map.update({key: name for key in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ours, theirs = clip.load_clip(single), clip.load_clip(sharded)
    jax.tree.map(np.testing.assert_array_equal, ours.params, theirs.params)


def test_the_directorys_own_tokenizer_is_used_when_it_has_one(tmp_path):
    write_checkpoint(tmp_path)
    builtin = clip.load_clip(tmp_path).tokenize(["a cat"])
    assert builtin[0, 3:].tolist() == [49407] * 74  # the built-in pads with <|endoftext|>
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_lib.vocabulary_dir() / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!"}))
    own = clip.load_clip(tmp_path).tokenize(["a cat"])
    np.testing.assert_array_equal(own[0, :4], builtin[0, :4])
    assert own[0, 4:].tolist() == [0] * 73  # "!" is id 0


# ----------------------------------------------------------------------------------------------
# Text hidden states against transformers' own outputs (fixture of tools/make_vae_fixtures.py)
# ----------------------------------------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("hidden_layer", ["last", "penultimate"])
def test_text_hidden_states_match_transformers(hidden_layer):
    """tests/fixtures/clip_tiny is a random transformers CLIPModel (3 text layers, its own
    514-token byte-level tokenizer); the reference is `CLIPTextModel(ids,
    output_hidden_states=True)`'s last_hidden_state / hidden_states[-2] in float32 (torch CPU).
    Tolerance: float32 sums over at most 24 terms through 3 layers, ~1e-6 of the scale (2.1);
    measured 8.3e-7 (last), 5.4e-7 (penultimate)."""
    reference = np.load(FIXTURES / "clip_reference.npz")
    checkpoint = clip.load_clip(FIXTURES / "clip_tiny")
    tokens = checkpoint.tokenize(["a cat", "two dogs on a red mat", "x"])
    np.testing.assert_array_equal(tokens, reference["ids"])
    states, mask = clip.text_hidden_states_fn(checkpoint, hidden_layer)(checkpoint.params, tokens)
    assert states.shape == (3, 20, 16) and states.dtype == np.float32
    np.testing.assert_allclose(states, reference[hidden_layer], rtol=0, atol=5e-6)
    # True up to and including the end-of-text token (id 513); without merges a word is one
    # token per byte: "a cat" is start, a, c, a, t, end.
    np.testing.assert_array_equal(mask, np.arange(20) <= np.argmax(tokens == 513, -1)[:, None])
    assert mask.sum(1).tolist() == [6, 18, 3]


def test_text_hidden_states_refuse_an_unknown_layer(tmp_path):
    write_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="hidden_layer='middle' is not one of last, penultimate"):
        clip.text_hidden_states_fn(clip.load_clip(tmp_path), "middle")


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def _edit_weights(directory, edit):
    tensors = dict(safetensors.numpy.load_file(directory / "model.safetensors"))
    edit(tensors)
    safetensors.numpy.save_file(tensors, directory / "model.safetensors")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop("vision_model.encoder.layers.1.mlp.fc2.bias"),
            "has no parameter vision_model.encoder.layers.1.mlp.fc2.bias (1 missing)",
        ),
        (
            lambda t: t.update(
                {"text_model.encoder.layers.2.mlp.fc1.bias": np.zeros(24, np.float32)}
            ),
            "unexpected key text_model.encoder.layers.2.mlp.fc1.bias (1 unexpected)",
        ),
        (
            lambda t: t.update({"text_projection.weight": np.zeros((16, 8), np.float32)}),
            "text_projection.weight has shape (16, 8), but config.json implies (8, 16)",
        ),
    ],
)
def test_checkpoint_errors_name_the_key(tmp_path, edit, message):
    write_checkpoint(tmp_path)
    _edit_weights(tmp_path, edit)
    with pytest.raises(ValueError, match=re.escape(message)):
        clip.load_clip(tmp_path)


def test_directory_errors_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        clip.load_clip(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="has no config.json"):
        clip.load_clip(tmp_path)
    write_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no model.safetensors nor"):
        clip.load_clip(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"logit_scale": "part-1.safetensors"}})
    )
    with pytest.raises(ValueError, match="lists the shard part-1.safetensors, which is missing"):
        clip.load_clip(tmp_path)


# ----------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------


def test_clip_score_run_scores_the_pool_like_the_reference(tmp_path):
    config, w = write_checkpoint(tmp_path / "clip")
    cfg = load_config(
        "configs/demo.yaml",
        TINY
        + [
            "score.scorer=clip_score",
            f"score.clip_path={tmp_path / 'clip'}",
            "score.batch_size=40",
            "score.chunk_size=40",
        ],
    )
    out = tmp_path / "ratings.parquet"
    summary = scoring.run(cfg, out)
    table = pq.read_table(out)
    assert summary["count"] == table.num_rows == 96
    assert scoring.read_metadata(out)["scorer"] == "clip_score"

    pool = load_splits(cfg.data).train
    examples = [pool[i] for i in range(len(pool))]
    np.testing.assert_array_equal(table.column("id").to_numpy(), [e["id"] for e in examples])
    checkpoint = clip.load_clip(tmp_path / "clip")  # the built-in tokenizer, at length 77
    tokens = checkpoint.tokenize([e["caption"] for e in examples])
    images = np.stack([e["image"] for e in examples]) / 255.0
    pixels = reference_pixels(images, 16, clip.OPENAI_IMAGE_MEAN, clip.OPENAI_IMAGE_STD)
    expected = _cosine(
        reference_image_embeds(w, config, pixels), reference_text_embeds(w, config, tokens)
    )
    np.testing.assert_allclose(table.column("score").to_numpy(), expected, rtol=0, atol=1e-5)
    assert np.std(expected) > 0.05  # the scores differ from sample to sample


def test_clip_score_without_a_path_says_which_key_to_set():
    with pytest.raises(ValueError, match=r"needs score\.clip_path=DIR"):
        load_config("configs/demo.yaml", TINY + ["score.scorer=clip_score"])
