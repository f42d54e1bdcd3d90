"""Writes the reference fixtures of tests/test_vae.py and tests/test_clip.py (hidden states): tiny
random checkpoints in diffusers' and transformers' own formats, and those libraries' outputs on
fixed inputs. Run once by hand in a scratch environment (torch + diffusers + transformers; not
the project's venv, not CI), from the repository root:

    python3 -m venv /tmp/scratch
    /tmp/scratch/bin/pip install torch==2.13.0 diffusers transformers safetensors numpy
    /tmp/scratch/bin/python tools/make_vae_fixtures.py

(the fixtures in the repository were written with torch 2.13.0+cpu, diffusers 0.42.1,
transformers 5.25.0). It writes, under tests/fixtures/:

  vae_sd/               diffusers.AutoencoderKL, SD/SDXL-style: 2 DownEncoderBlock2D /
                        UpDecoderBlock2D of (8, 16) channels, GroupNorm of 4 groups, mid-block
                        attention, quant_conv / post_quant_conv, 4 latent channels; float32
  vae_sd_fp16/          the same weights saved in float16 by `save_pretrained`
  vae_sd_fp16_sharded/  the float16 weights in shards (`max_shard_size`) with their index
  vae_flux/             FLUX/SD3-style: 3 blocks of (4, 8, 8) channels, GroupNorm of 2
                        groups, 16 latent channels, no quant convs, shift_factor; float32
  vae_flux_bf16/        the same weights saved in bfloat16
  vae_reference.npz     for F in vae_sd, vae_flux: F/images (B, H, W, 3) in [-1, 1] and
                        F/latents (the decoder's input); for F and F_fp16 / F_bf16: F/mean and
                        F/std of `encode(images).latent_dist`, F/decoded = `decode(latents)
                        .sample`, all NHWC float32 (the fp16 / bf16 ones computed by torch in
                        float32 from the rounded weights)
  clip_tiny/            transformers.CLIPModel with a 514-token byte-level tokenizer
  clip_reference.npz    token ids of fixed captions, and `CLIPTextModel(ids,
                        output_hidden_states=True)`'s last_hidden_state, hidden_states[-2] and
                        pooler_output

Every parameter is random: weights, biases and the norms' scales and offsets (not the defaults).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures"

SD = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[8, 16],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=0.13025,
)
FLUX = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[4, 8, 8],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=2,
    sample_size=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
IMAGE_SHAPE = (2, 32, 32, 3)


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Every parameter made random: norm scales 1 + N(0, 0.2), biases N(0, 0.2), weights their
    default random init plus N(0, 0.1 * their std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif p.ndim == 1:  # GroupNorm / LayerNorm scales
                p.copy_(1 + 0.2 * noise)
            elif p.numel() > 1:
                p.add_(0.1 * float(p.std()) * noise)
            else:
                p.add_(0.1 * noise)


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().permute(0, 2, 3, 1).numpy().astype(np.float32)


def vae_outputs(model: AutoencoderKL, images: np.ndarray, latents: np.ndarray) -> dict:
    """Posterior mean and std of `images` (NHWC) and the decoding of `latents` (NHWC), by a
    float32 copy of `model`."""
    model = model.float().eval()
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
        decoded = model.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample
    return {
        "images": images,
        "mean": nhwc(posterior.mean),
        "std": nhwc(posterior.std),
        "latents": latents,
        "decoded": nhwc(decoded),
    }


def write_vaes(reference: dict) -> None:
    rng = np.random.default_rng(0)
    for name, config, seed, low in (
        ("vae_sd", SD, 1, ("fp16", torch.float16)),
        ("vae_flux", FLUX, 2, ("bf16", torch.bfloat16)),
    ):
        torch.manual_seed(seed)
        model = AutoencoderKL(**config).eval()
        perturb(model, seed)
        model.save_pretrained(ROOT / name)
        images = rng.uniform(-1, 1, IMAGE_SHAPE).astype(np.float32)
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        latents = rng.normal(
            size=(
                IMAGE_SHAPE[0],
                IMAGE_SHAPE[1] // factor,
                IMAGE_SHAPE[2] // factor,
                config["latent_channels"],
            )
        )
        latents = latents.astype(np.float32)
        for key, value in vae_outputs(model, images, latents).items():
            reference[f"{name}/{key}"] = value

        suffix, dtype = low
        rounded = AutoencoderKL.from_pretrained(ROOT / name).to(dtype)
        rounded.save_pretrained(ROOT / f"{name}_{suffix}")
        if dtype == torch.float16:
            rounded.save_pretrained(ROOT / f"{name}_{suffix}_sharded", max_shard_size="30KB")
        with safe_open(
            ROOT / f"{name}_{suffix}" / "diffusion_pytorch_model.safetensors", "pt"
        ) as f:
            assert all(f.get_tensor(key).dtype == dtype for key in f.keys())
        # Loaded back as float32 (diffusers' default): the rounded weights, computed in float32.
        reloaded = AutoencoderKL.from_pretrained(ROOT / f"{name}_{suffix}")
        for key in ("mean", "std", "decoded"):
            reference[f"{name}_{suffix}/{key}"] = vae_outputs(reloaded, images, latents)[key]


# ----------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable character table."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_clip(reference: dict) -> None:
    """A CLIPModel with a byte-level vocabulary (no merges: 256 + 256 `</w>` + 2 specials = 514
    tokens), so that the token table stays small."""
    directory = ROOT / "clip_tiny"
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(directory))
    assert len(tokenizer) == 514, len(tokenizer)

    config = CLIPConfig(
        text_config=dict(
            vocab_size=514,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=20,
            hidden_act="quick_gelu",
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        ),
        vision_config=dict(
            hidden_size=8,
            intermediate_size=12,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
        ),
        projection_dim=8,
    )
    torch.manual_seed(3)
    model = CLIPModel(config).eval()
    perturb(model, 3)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)

    captions = ["a cat", "two dogs on a red mat", "x"]
    ids = tokenizer(
        captions, max_length=20, truncation=True, padding="max_length", return_tensors="pt"
    )["input_ids"]
    text = CLIPTextModel.from_pretrained(directory).eval()
    with torch.no_grad():
        out = text(input_ids=ids, output_hidden_states=True)
        # The same tower inside CLIPModel (the checkpoint the project loads) agrees.
        check = model.text_model(input_ids=ids).last_hidden_state
    assert torch.equal(check, out.last_hidden_state)
    reference["ids"] = ids.numpy().astype(np.int32)
    reference["last"] = out.last_hidden_state.numpy()
    reference["penultimate"] = out.hidden_states[-2].numpy()
    reference["pooled"] = out.pooler_output.numpy()


def main() -> None:
    for path in ROOT.glob("vae_*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(ROOT / "clip_tiny", ignore_errors=True)
    vae_reference: dict = {}
    write_vaes(vae_reference)
    np.savez_compressed(ROOT / "vae_reference.npz", **vae_reference)
    clip_reference: dict = {}
    write_clip(clip_reference)
    np.savez_compressed(ROOT / "clip_reference.npz", **clip_reference)
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    print(f"wrote {ROOT} ({total / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
