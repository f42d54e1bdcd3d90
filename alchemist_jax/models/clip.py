"""CLIP image and text towers in Flax NNX, loaded from a local Hugging Face checkpoint.

`load_clip(directory)` reads a directory written by `transformers.CLIPModel.save_pretrained` (or
any HF-format CLIP: `config.json` + `model.safetensors`, or shards listed in
`model.safetensors.index.json`) and returns the model split into `graphdef` + `params`. Nothing
is downloaded and torch is not needed: the safetensors files are read with numpy (float32,
float16 or bfloat16 weights; computed in float32 by default).

The modules reproduce `transformers.CLIPModel` and carry its parameter names, so a checkpoint key
is the module path with `kernel` / `scale` read as `weight` (torch layouts are transposed):
  text_model      token + position embedding, pre-LN encoder layers with causal self-attention,
                  final_layer_norm; pooled at the end-of-text token: the first position holding
                  `eos_token_id`, or (legacy configs with eos_token_id == 2) the highest id
  vision_model    patch_embedding (convolution without bias, stride = patch size) with the
                  class token prepended, position embedding, pre_layrnorm (HF's spelling),
                  encoder layers without mask, post_layernorm of the class token
  text_projection, visual_projection (no bias), logit_scale

`text_hidden_states_fn` gives the jitted text conditioning of a diffusion model: the text tower's
last or penultimate hidden states (B, L, D) of CLIP token ids and their mask (B, L).

`clip_score_fn` gives the jitted cosine similarity of the projected image and caption embeddings
of a batch of pool images ((B, R, R, C) in [-1, 1]) and CLIP token ids.

Size: both CLIP towers with HF's parameter names, the safetensors reader shared with the VAE
loader, and the tokenizer setup, mirroring one upstream model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util

from alchemist_jax.data import tokenizer as tokenizer_lib
from alchemist_jax.models.text_encoder import dot_product_attention

# The normalisation of OpenAI's CLIP preprocessing, used when the directory has no
# preprocessor_config.json.
OPENAI_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# `hidden_act` of the HF config -> the activation (HF `ACT2FN`).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
# Files that make the directory's own tokenizer loadable by `CLIPTokenizer.from_pretrained`.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
# The text tower's outputs a text encoder may hand on (`TextTransformer.hidden_states`).
HIDDEN_LAYERS = ("last", "penultimate")
# Checkpoint keys that are buffers, not parameters (older exports carry them): ignored.
IGNORED_KEY_SUFFIX = ".position_ids"


# ==============================================================================================
# Configuration
# ==============================================================================================


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """One transformer tower: width D, MLP width, layers, heads, activation, LayerNorm epsilon."""

    width: int
    intermediate: int
    depth: int
    heads: int
    activation: str
    layer_norm_eps: float


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """The architecture of an HF `CLIPModel` (read from its `config.json`)."""

    text: TowerConfig
    vision: TowerConfig
    vocab_size: int
    max_length: int  # text_config.max_position_embeddings: the longest token sequence
    eos_token_id: int
    image_size: int
    patch_size: int
    projection_dim: int
    logit_scale_init: float

    @classmethod
    def from_json(cls, path: Path) -> ClipConfig:
        """Reads an HF CLIP `config.json` (through `transformers.CLIPConfig`, which fills its
        defaults and reads legacy layouts). Raises ValueError naming the file and key of an
        unsupported setting."""
        try:
            model_type = json.loads(path.read_text()).get("model_type")
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path}: {e}") from None
        if model_type != "clip":
            raise ValueError(
                f"{path}: model_type is {model_type!r}, not 'clip' (a "
                "transformers CLIPModel with text and vision towers is needed)"
            )
        # Imported lazily (slow); only its configuration classes are used, so its "PyTorch was
        # not found" notice is noise here.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers import CLIPConfig

        hf = CLIPConfig.from_json_file(str(path))
        text, vision = hf.text_config, hf.vision_config

        def tower(section: Any, name: str) -> TowerConfig:
            if section.hidden_act not in ACTIVATIONS:
                raise ValueError(
                    f"{path}: {name}.hidden_act={section.hidden_act!r} is not "
                    f"supported: one of {', '.join(ACTIVATIONS)}"
                )
            return TowerConfig(
                section.hidden_size,
                section.intermediate_size,
                section.num_hidden_layers,
                section.num_attention_heads,
                section.hidden_act,
                float(section.layer_norm_eps),
            )

        def side(value: Any, key: str) -> int:
            sides = set(value) if isinstance(value, (list, tuple)) else {value}
            if len(sides) != 1:
                raise ValueError(f"{path}: vision_config.{key}={value!r} is not square")
            return int(sides.pop())

        if vision.num_channels != 3:
            raise ValueError(
                f"{path}: vision_config.num_channels={vision.num_channels}; only "
                "RGB (3) CLIP models are supported"
            )
        eos = text.eos_token_id
        if not isinstance(eos, int):
            raise ValueError(f"{path}: text_config.eos_token_id={eos!r} must be one integer")
        return cls(
            text=tower(text, "text_config"),
            vision=tower(vision, "vision_config"),
            vocab_size=text.vocab_size,
            max_length=text.max_position_embeddings,
            eos_token_id=eos,
            image_size=side(vision.image_size, "image_size"),
            patch_size=side(vision.patch_size, "patch_size"),
            projection_dim=hf.projection_dim,
            logit_scale_init=float(hf.logit_scale_init_value),
        )


# ==============================================================================================
# Modules (attribute names are HF's parameter names)
# ==============================================================================================


class Embedding(nnx.Module):
    """A lookup table, `weight` (count, D); also read whole (position embeddings)."""

    def __init__(self, count: int, width: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (count, width)))

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids: int (...) -> (..., D)."""
        return jnp.take(self.weight[...], ids, axis=0)


def _layer_norm(width: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance, as torch computes it.
    return nnx.LayerNorm(width, epsilon=eps, use_fast_variance=False, rngs=rngs)


class SelfAttention(nnx.Module):
    """HF `CLIPAttention`: q/k/v/out projections with bias, softmax(q k^T / sqrt(Dh)) v."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj = nnx.Linear(width, width, rngs=rngs)
        self.k_proj = nnx.Linear(width, width, rngs=rngs)
        self.v_proj = nnx.Linear(width, width, rngs=rngs)
        self.out_proj = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x: (B, L, D); mask: bool broadcastable to (B, H, L, L), or None. Returns (B, L, D)."""

        def split_heads(y):
            return y.reshape(*y.shape[:-1], self.heads, y.shape[-1] // self.heads)

        out = dot_product_attention(
            split_heads(self.q_proj(x)),
            split_heads(self.k_proj(x)),
            split_heads(self.v_proj(x)),
            mask,
        )
        return self.out_proj(out.reshape(x.shape))


class Mlp(nnx.Module):
    """HF `CLIPMLP`: fc1 -> activation -> fc2."""

    def __init__(self, width: int, hidden: int, activation: str, *, rngs: nnx.Rngs):
        self.activation = ACTIVATIONS[activation]
        self.fc1 = nnx.Linear(width, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nnx.Module):
    """HF `CLIPEncoderLayer`: x + attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""

    def __init__(self, config: TowerConfig, *, rngs: nnx.Rngs):
        self.layer_norm1 = _layer_norm(config.width, config.layer_norm_eps, rngs)
        self.self_attn = SelfAttention(config.width, config.heads, rngs=rngs)
        self.layer_norm2 = _layer_norm(config.width, config.layer_norm_eps, rngs)
        self.mlp = Mlp(config.width, config.intermediate, config.activation, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    """HF `CLIPEncoder`: `layers`, applied in order."""

    def __init__(self, config: TowerConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(config, rngs=rngs) for _ in range(config.depth)])

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class TextEmbeddings(nnx.Module):
    def __init__(self, config: ClipConfig, *, rngs: nnx.Rngs):
        self.token_embedding = Embedding(config.vocab_size, config.text.width, rngs=rngs)
        self.position_embedding = Embedding(config.max_length, config.text.width, rngs=rngs)


class TextTransformer(nnx.Module):
    """HF `CLIPTextModel` (the `text_model` of `CLIPModel`)."""

    def __init__(self, config: ClipConfig, *, rngs: nnx.Rngs):
        self.eos_token_id = config.eos_token_id
        self.embeddings = TextEmbeddings(config, rngs=rngs)
        self.encoder = Encoder(config.text, rngs=rngs)
        self.final_layer_norm = _layer_norm(config.text.width, config.text.layer_norm_eps, rngs)

    def end_positions(self, tokens: jax.Array) -> jax.Array:
        """tokens: int32 (B, L) -> int32 (B,): the position of each row's end-of-text token (see
        the module docstring)."""
        if self.eos_token_id == 2:  # configs from before transformers PR #24773
            return jnp.argmax(tokens, axis=-1)
        return jnp.argmax(tokens == self.eos_token_id, axis=-1)

    def hidden_states(self, tokens: jax.Array, hidden_layer: str = "last") -> jax.Array:
        """tokens: int32 (B, L), L <= max_length -> (B, L, D): with hidden_layer "last",
        transformers' `last_hidden_state` (after final_layer_norm); with "penultimate",
        `hidden_states[-2]` (the output of all layers but the last, without final_layer_norm,
        as SDXL reads it). Attention is causal only, without a padding mask, as the diffusers
        pipelines call the text encoder."""
        if hidden_layer not in HIDDEN_LAYERS:
            raise ValueError(
                f"hidden_layer={hidden_layer!r} is not one of {', '.join(HIDDEN_LAYERS)}"
            )
        length = tokens.shape[-1]
        positions = self.embeddings.position_embedding.weight
        if length > positions.shape[0]:
            raise ValueError(
                f"token length {length} exceeds the text model's "
                f"max_position_embeddings {positions.shape[0]}"
            )
        x = self.embeddings.token_embedding(tokens) + positions[:length]
        causal = jnp.tril(jnp.ones((length, length), bool))
        layers = list(self.encoder.layers)
        if hidden_layer == "penultimate":
            for layer in layers[:-1]:
                x = layer(x, causal)
            return x
        for layer in layers:
            x = layer(x, causal)
        return self.final_layer_norm(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: int32 (B, L) with L <= max_length, each row holding its end-of-text token ->
        the pooled output (B, D) at that token (see the module docstring)."""
        # Causal attention only: keys after the end-of-text token never reach the pooled output.
        x = self.hidden_states(tokens, "last")
        end = self.end_positions(tokens)
        return jnp.take_along_axis(x, end[:, None, None], axis=1)[:, 0]


class VisionEmbeddings(nnx.Module):
    def __init__(self, config: ClipConfig, *, rngs: nnx.Rngs):
        width, patch = config.vision.width, config.patch_size
        self.class_embedding = nnx.Param(
            nnx.initializers.normal(width**-0.5)(rngs.params(), (width,))
        )
        self.patch_embedding = nnx.Conv(
            3,
            width,
            (patch, patch),
            strides=(patch, patch),
            padding="VALID",
            use_bias=False,
            rngs=rngs,
        )
        self.position_embedding = Embedding((config.image_size // patch) ** 2 + 1, width, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels: (B, S, S, 3) normalised -> (B, 1 + (S/P)^2, D): class token, then the patches
        row by row."""
        patches = self.patch_embedding(pixels)
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...], (patches.shape[0], 1, patches.shape[-1]))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.weight[...]


class VisionTransformer(nnx.Module):
    """HF `CLIPVisionModel` (the `vision_model` of `CLIPModel`)."""

    def __init__(self, config: ClipConfig, *, rngs: nnx.Rngs):
        self.image_size = config.image_size
        self.embeddings = VisionEmbeddings(config, rngs=rngs)
        self.pre_layrnorm = _layer_norm(config.vision.width, config.vision.layer_norm_eps, rngs)
        self.encoder = Encoder(config.vision, rngs=rngs)
        self.post_layernorm = _layer_norm(config.vision.width, config.vision.layer_norm_eps, rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels: (B, S, S, 3) normalised, S = image_size -> the pooled output (B, D): the
        class token after post_layernorm."""
        if pixels.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"images of {pixels.shape[1]}x{pixels.shape[2]} do not match the "
                f"vision model's image_size {self.image_size}"
            )
        x = self.pre_layrnorm(self.embeddings(pixels))
        return self.post_layernorm(self.encoder(x, None)[:, 0])


class CLIP(nnx.Module):
    """HF `CLIPModel`: both towers and their projections into the shared embedding space."""

    def __init__(self, config: ClipConfig, *, rngs: nnx.Rngs):
        self.text_model = TextTransformer(config, rngs=rngs)
        self.vision_model = VisionTransformer(config, rngs=rngs)
        self.text_projection = nnx.Linear(
            config.text.width, config.projection_dim, use_bias=False, rngs=rngs
        )
        self.visual_projection = nnx.Linear(
            config.vision.width, config.projection_dim, use_bias=False, rngs=rngs
        )
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init, jnp.float32))

    def text_embeds(self, tokens: jax.Array) -> jax.Array:
        """tokens: int32 (B, L) -> (B, projection_dim), not normalised (HF
        `get_text_features`)."""
        return self.text_projection(self.text_model(tokens))

    def image_embeds(self, pixels: jax.Array) -> jax.Array:
        """pixels: (B, S, S, 3) normalised -> (B, projection_dim), not normalised (HF
        `get_image_features`)."""
        return self.visual_projection(self.vision_model(pixels))


# ==============================================================================================
# Loading a checkpoint directory
# ==============================================================================================


def hf_key(path: tuple) -> str:
    """The checkpoint key of the parameter at NNX state path `path`, e.g.
    ('text_model', 'encoder', 'layers', 0, 'mlp', 'fc1', 'kernel') ->
    'text_model.encoder.layers.0.mlp.fc1.weight'."""
    *parents, leaf = (str(part) for part in path)
    return ".".join([*parents, {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def hf_layout(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """The shape an NNX parameter has in the torch checkpoint: Linear kernels (in, out) are
    stored (out, in), convolution kernels (kh, kw, in, out) as (out, in, kh, kw)."""
    if leaf == "kernel" and len(shape) == 2:
        return shape[::-1]
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def from_hf_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """The inverse of `hf_layout` on an array: torch layout -> NNX layout."""
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


# safetensors dtype names -> numpy dtypes; bfloat16 (which safetensors.numpy cannot read) through
# ml_dtypes, which jax depends on.
SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors_file(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of one `.safetensors` file as a read-only numpy array memory-mapped from it
    (the format: an 8-byte little-endian header size, a JSON header of name -> dtype, shape and
    byte range, then the data)."""
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        data = np.memmap(file, np.uint8, mode="r", offset=8 + size)
        tensors = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            tensors[key] = data[begin:end].view(dtype).reshape(info["shape"])
    except Exception as e:  # noqa: BLE001 (a damaged file fails in many ways)
        raise ValueError(f"cannot read {file}: {e!r}") from None
    return tensors


def read_safetensors(directory: Path, stem: str = "model") -> dict[str, np.ndarray]:
    """Every tensor of `directory/{stem}.safetensors`, or of the shards that
    `{stem}.safetensors.index.json` lists, as read-only numpy arrays (float16 and bfloat16 kept;
    the loaders cast). `stem` is "model" for transformers, "diffusion_pytorch_model" for
    diffusers."""
    single = directory / f"{stem}.safetensors"
    index = directory / f"{stem}.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{index} is not a safetensors index with a weight_map: {e!r}"
            ) from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        raise ValueError(f"{directory} has no {single.name} nor {index.name}")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"{index} lists the shard {file.name}, which is missing")
        tensors.update(read_safetensors_file(file))
    return tensors


def params_from_tensors(
    module: Callable[[], nnx.Module],
    tensors: dict[str, np.ndarray],
    *,
    where: Path,
    described: str,
    dtype: Any = np.float32,
) -> tuple[nnx.GraphDef, nnx.State]:
    """The module that `module()` builds (only its shapes are evaluated) split into (graphdef,
    params), the parameters taken from `tensors` (checkpoint key `hf_key(path)` -> torch-layout
    array), cast to `dtype` and put on the default device.

    Raises:
      ValueError naming the first missing key, the first unexpected key or a key whose shape
      differs from what the config implies; `where` is the checkpoint named in the message,
      `described` what its config.json describes (e.g. "the CLIPModel").
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(module))
    expected = traverse_util.flatten_dict(nnx.to_pure_dict(abstract))
    keys = {hf_key(path): path for path in expected}
    missing, unexpected = sorted(set(keys) - set(tensors)), sorted(set(tensors) - set(keys))
    if missing:
        raise ValueError(
            f"{where} has no parameter {missing[0]} ({len(missing)} missing) for "
            f"{described} its config.json describes"
        )
    if unexpected:
        raise ValueError(
            f"{where} has the unexpected key {unexpected[0]} ({len(unexpected)} "
            f"unexpected) for {described} its config.json describes"
        )
    values = {}
    for key, path in keys.items():
        shape = hf_layout(expected[path].shape, str(path[-1]))
        if tensors[key].shape != shape:
            raise ValueError(
                f"{where}: {key} has shape {tensors[key].shape}, but config.json implies {shape}"
            )
        # On the device once, not with every call of a jitted function.
        values[path] = jnp.asarray(from_hf_layout(np.asarray(tensors[key], dtype), str(path[-1])))
    params = traverse_util.unflatten_dict(values)
    nnx.replace_by_pure_dict(abstract, params)
    return graphdef, abstract


def load_params(
    config: ClipConfig, tensors: dict[str, np.ndarray], *, where: Path, dtype: Any = np.float32
) -> tuple[nnx.GraphDef, nnx.State]:
    """The `CLIP` module of `config` split into (graphdef, params), the parameters taken from
    `tensors` (HF key -> torch-layout array; buffers ending in `.position_ids` are ignored),
    cast to `dtype` and put on the default device. Raises ValueError as
    `params_from_tensors`."""
    tensors = {key: value for key, value in tensors.items() if not key.endswith(IGNORED_KEY_SUFFIX)}
    return params_from_tensors(
        lambda: CLIP(config, rngs=nnx.Rngs(0)),
        tensors,
        where=where,
        described="the CLIPModel",
        dtype=dtype,
    )


@dataclasses.dataclass(frozen=True)
class ClipCheckpoint:
    """A loaded CLIP directory: the model split into graphdef + params, its tokenizer (the
    directory's own, else the built-in CLIP vocabulary) and its image normalisation."""

    directory: Path
    config: ClipConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Any  # transformers.CLIPTokenizer
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    def tokenize(self, captions: list[str]) -> np.ndarray:
        """Captions -> int32 (B, max_length) token ids: start, text, end token (kept when the
        caption is truncated), padded with the tokenizer's pad token."""
        encoded = self.tokenizer(
            list(captions), max_length=self.config.max_length, truncation=True, padding="max_length"
        )
        return np.asarray(encoded["input_ids"], np.int32)


def _image_normalisation(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel: `image_mean` / `image_std` of preprocessor_config.json when
    the directory has one, else OpenAI's."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    stats = []
    for key, default in (("image_mean", OPENAI_IMAGE_MEAN), ("image_std", OPENAI_IMAGE_STD)):
        value = settings.get(key, default)
        if not (isinstance(value, list | tuple) and len(value) == 3):
            raise ValueError(f"{path}: {key} must list 3 numbers (R, G, B), got {value!r}")
        stats.append(tuple(float(v) for v in value))
    return stats[0], stats[1]


def _tokenizer(directory: Path, vocab_size: int) -> Any:
    """`CLIPTokenizer` of the directory when it has tokenizer files, else of the built-in CLIP
    vocabulary (`data.tokenizer`)."""
    own = any(all((directory / name).is_file() for name in names) for names in TOKENIZER_FILES)
    if own:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers import CLIPTokenizer

        source, tokenizer = directory, CLIPTokenizer.from_pretrained(str(directory))
    else:
        source, tokenizer = tokenizer_lib.vocabulary_dir(), tokenizer_lib.load_clip_tokenizer()
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer of {source} has {len(tokenizer)} tokens but "
            f"{directory / 'config.json'} has text_config.vocab_size={vocab_size}"
        )
    return tokenizer


def load_clip(directory: str | Path, dtype: Any = np.float32) -> ClipCheckpoint:
    """Loads an HF-format CLIP directory (see the module docstring), parameters cast to `dtype`.

    Raises:
      ValueError with a one-line message naming the directory, file or key at fault: not a
      directory, no config.json, an unsupported setting, no weights, or a missing, unexpected
      or misshapen parameter.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"CLIP checkpoint directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise ValueError(
            f"{directory} has no config.json (a transformers CLIPModel directory is needed)"
        )
    config = ClipConfig.from_json(directory / "config.json")
    graphdef, params = load_params(
        config, read_safetensors(directory), where=directory, dtype=dtype
    )
    mean, std = _image_normalisation(directory)
    return ClipCheckpoint(
        directory, config, graphdef, params, _tokenizer(directory, config.vocab_size), mean, std
    )


# ==============================================================================================
# Scoring
# ==============================================================================================


def clip_pixels(
    images: jax.Array, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> jax.Array:
    """Pool images -> CLIP inputs.

    images: (B, R, R, C) in [-1, 1], C in {1, 3} (gray is repeated to RGB) -> (B, S, S, 3),
    S = image_size: resized bicubically (antialiased when shrinking, as PIL's BICUBIC), clipped
    to [0, 1] as 8-bit resizing clips, then normalised per channel by `mean` and `std`.
    """
    pixels = (images + 1) / 2
    if pixels.shape[-1] == 1:
        pixels = jnp.repeat(pixels, 3, axis=-1)
    pixels = jax.image.resize(pixels, (pixels.shape[0], image_size, image_size, 3), "bicubic")
    pixels = jnp.clip(pixels, 0, 1)
    return (pixels - jnp.asarray(mean, pixels.dtype)) / jnp.asarray(std, pixels.dtype)


def clip_score_fn(checkpoint: ClipCheckpoint) -> Callable[..., jax.Array]:
    """The jitted `score(params, images, tokens) -> (B,)` of a loaded checkpoint: the cosine
    similarity in [-1, 1] of the projected embeddings of images (B, R, R, C) in [-1, 1]
    (`clip_pixels`) and their captions' token ids int32 (B, L) (`ClipCheckpoint.tokenize`)."""
    graphdef, config = checkpoint.graphdef, checkpoint.config
    mean, std = checkpoint.image_mean, checkpoint.image_std

    def score(params, images, tokens):
        model = nnx.merge(graphdef, params)
        image = model.image_embeds(clip_pixels(images, config.image_size, mean, std))
        text = model.text_embeds(tokens)
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        return jnp.sum(image * text, axis=-1)

    return jax.jit(score)


def text_hidden_states_fn(
    checkpoint: ClipCheckpoint, hidden_layer: str = "last"
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """The jitted `embed(params, tokens) -> (states, mask)` of a loaded checkpoint, for text
    conditioning: tokens int32 (B, L) (`ClipCheckpoint.tokenize`) -> states (B, L, D) float,
    the text tower's last or penultimate hidden states (`TextTransformer.hidden_states`), and
    mask (B, L) bool, True up to and including each row's end-of-text token (the padding after
    it is False)."""
    if hidden_layer not in HIDDEN_LAYERS:
        raise ValueError(f"hidden_layer={hidden_layer!r} is not one of {', '.join(HIDDEN_LAYERS)}")
    graphdef = checkpoint.graphdef

    def embed(params, tokens):
        text = nnx.merge(graphdef, params).text_model
        states = text.hidden_states(tokens, hidden_layer)
        mask = jnp.arange(tokens.shape[-1]) <= text.end_positions(tokens)[:, None]
        return states, mask

    return jax.jit(embed)
