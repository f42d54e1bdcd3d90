"""The diffusers AutoencoderKL in NNX against diffusers itself: tiny random folders written by
`diffusers.AutoencoderKL.save_pretrained` (float32, float16, float16 sharded, bfloat16) and
diffusers' outputs on fixed inputs, all under tests/fixtures/ (written once by
tools/make_vae_fixtures.py; no torch here); the loader's errors; the latent scaling."""

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

from alchemist_jax.models import vae

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = np.load(FIXTURES / "vae_reference.npz")

# Tolerance of the float32 parity, relative to the largest reference value. Torch and XLA sum in
# different orders, so each reduction of N terms differs by about eps * sqrt(N) relative (eps =
# 2^-23 = 1.2e-7): N is at most 2048 (a GroupNorm group over 32 x 32 x 2) and typically 144 (a
# 3 x 3 convolution of 16 channels), i.e. 1.4e-6 to 5.4e-6 per layer; the decoder chains ~15
# such layers whose errors add up mostly at random (sqrt(15) ~ 4), so ~2e-5 bounds it. Measured
# (torch 2.13.0 CPU vs jax 0.10.2 CPU): at most 2.3e-6 (the FLUX-style decoder's output).
FLOAT32_RTOL = 2e-5
# Outputs from weights rounded to float16 / bfloat16 against the float32 weights': unit roundoff
# u = 2^-11 / 2^-8 of every weight, amplified by the depth; 10 u relative bounds it (measured:
# 0.8 u for float16, 2.5 u for bfloat16).
ROUNDED_RTOL = {"fp16": 10 * 2.0**-11, "bf16": 10 * 2.0**-8}


def _max_rel_error(actual, expected):
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def outputs():
    """folder name -> (checkpoint, {"mean", "std", "decoded"}); the jitted functions of a family
    (vae_sd, vae_flux) are shared by its folders (same graph, float32 params), so each family
    compiles once."""
    functions, results = {}, {}

    def run(name):
        if name not in results:
            family = "_".join(name.split("_")[:2])
            checkpoint = vae.load_vae(FIXTURES / name)
            if family not in functions:
                functions[family] = (
                    vae.encode_fn(checkpoint),
                    vae.decode_fn(checkpoint, scaled=False),
                )
            encode, decode = functions[family]
            mean, std = encode(checkpoint.params, REFERENCE[f"{family}/images"])
            decoded = decode(checkpoint.params, REFERENCE[f"{family}/latents"])
            results[name] = (
                checkpoint,
                {"mean": np.asarray(mean), "std": np.asarray(std), "decoded": np.asarray(decoded)},
            )
        return results[name]

    return run


# ----------------------------------------------------------------------------------------------
# Parity with diffusers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vae_sd", "vae_sd_fp16", "vae_flux", "vae_flux_bf16"])
def test_encoder_and_decoder_match_diffusers_in_float32(outputs, name):
    checkpoint, ours = outputs(name)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(checkpoint.params))
    for key in ("mean", "std", "decoded"):
        expected = REFERENCE[f"{name}/{key}"]
        assert ours[key].shape == expected.shape, key
        assert _max_rel_error(ours[key], expected) < FLOAT32_RTOL, key
    # The fixtures are not degenerate: the posterior std varies and the decoder has range.
    assert ours["std"].std() > 0.05 and np.abs(ours["decoded"]).max() > 1


def test_shapes_follow_the_architecture(outputs):
    sd, sd_out = outputs("vae_sd")
    flux, flux_out = outputs("vae_flux")
    assert (sd.config.latent_channels, sd.config.downsampling) == (4, 2)
    assert sd.config.use_quant_conv and sd.config.shift_factor == 0.0
    assert sd_out["mean"].shape == (2, 16, 16, 4) and sd_out["decoded"].shape == (2, 32, 32, 3)
    assert (flux.config.latent_channels, flux.config.downsampling) == (16, 4)
    assert not flux.config.use_quant_conv and not flux.config.use_post_quant_conv
    assert (flux.scaling_factor, flux.shift_factor) == (0.3611, 0.1159)
    assert flux_out["mean"].shape == (2, 8, 8, 16)
    assert "quant_conv" not in flux.params and "quant_conv" in sd.params


@pytest.mark.parametrize(
    "name, family, rounding",
    [("vae_sd_fp16", "vae_sd", "fp16"), ("vae_flux_bf16", "vae_flux", "bf16")],
)
def test_rounded_weights_give_the_float32_outputs_within_their_rounding(
    outputs, name, family, rounding
):
    _, rounded = outputs(name)
    _, full = outputs(family)
    for key in ("mean", "std", "decoded"):
        error = _max_rel_error(rounded[key], full[key])
        assert 0 < error < ROUNDED_RTOL[rounding], key


def test_a_sharded_folder_loads_the_same_parameters():
    single = vae.load_vae(FIXTURES / "vae_sd_fp16")
    sharded_dir = FIXTURES / "vae_sd_fp16_sharded"
    assert len(list(sharded_dir.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    sharded = vae.load_vae(sharded_dir)
    jax.tree.map(np.testing.assert_array_equal, single.params, sharded.params)


def test_params_take_the_requested_dtype():
    checkpoint = vae.load_vae(FIXTURES / "vae_flux_bf16", dtype=np.float16)
    assert {leaf.dtype for leaf in jax.tree.leaves(checkpoint.params)} == {np.dtype(np.float16)}


def test_old_attention_names_and_conv_weights_load(tmp_path):
    """Exports from before diffusers 0.14 name the mid-block attention query / key / value /
    proj_attn, some with 1x1-convolution weights."""
    shutil.copy(FIXTURES / "vae_sd" / "config.json", tmp_path)
    old = {}
    for key, value in safetensors.numpy.load_file(
        FIXTURES / "vae_sd" / "diffusion_pytorch_model.safetensors"
    ).items():
        for new, former in (
            ("to_q", "query"),
            ("to_k", "key"),
            ("to_v", "value"),
            ("to_out.0", "proj_attn"),
        ):
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{former}.")
                if key.endswith("weight") and "encoder." in key:
                    value = value[:, :, None, None]
        old[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    safetensors.numpy.save_file(old, tmp_path / "diffusion_pytorch_model.safetensors")
    jax.tree.map(
        np.testing.assert_array_equal,
        vae.load_vae(tmp_path).params,
        vae.load_vae(FIXTURES / "vae_sd").params,
    )


# ----------------------------------------------------------------------------------------------
# Latent scaling
# ----------------------------------------------------------------------------------------------


def test_scaling_round_trip_and_the_scaled_decoder(outputs):
    flux, _ = outputs("vae_flux")
    z = REFERENCE["vae_flux/mean"]
    stored = vae.scale_latents(z, flux.config)
    np.testing.assert_allclose(stored, (z - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(vae.unscale_latents(stored, flux.config), z, rtol=0, atol=1e-6)
    # decode_fn's default takes stored latents: the same images as diffusers' decode(z).
    decoded = vae.decode_fn(flux)(
        flux.params, vae.scale_latents(REFERENCE["vae_flux/latents"], flux.config)
    )
    assert _max_rel_error(decoded, REFERENCE["vae_flux/decoded"]) < FLOAT32_RTOL


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def _folder_with(tmp_path, **changes):
    """A copy of vae_sd with config.json keys changed."""
    folder = tmp_path / "vae"
    shutil.copytree(FIXTURES / "vae_sd", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(_class_name="AutoencoderKLWan"),
            "_class_name 'AutoencoderKLWan' is not supported (only 'AutoencoderKL'",
        ),
        (
            dict(_class_name="AsymmetricAutoencoderKL"),
            "_class_name 'AsymmetricAutoencoderKL' is not supported",
        ),
        (
            dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
            "down_block_types has 'AttnDownEncoderBlock2D', which is not supported (only "
            "'DownEncoderBlock2D')",
        ),
        (
            dict(up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]),
            "up_block_types has 'AttnUpDecoderBlock2D', which is not supported",
        ),
        (dict(act_fn="gelu"), "act_fn 'gelu' is not supported"),
        (dict(latents_mean=[0.0] * 4, latents_std=[1.0] * 4), "latents_mean [0.0, 0.0, 0.0, 0.0]"),
        (dict(use_quant_conv=False), "has the unexpected key quant_conv.bias (2 unexpected)"),
        (
            dict(latent_channels=8),
            "decoder.conv_in.weight has shape (16, 4, 3, 3), but config.json implies (16, 8, 3, 3)",
        ),
    ],
)
def test_unsupported_folders_fail_with_one_line_naming_folder_and_value(tmp_path, changes, message):
    folder = _folder_with(tmp_path, **changes)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        vae.load_vae(folder)
    assert str(error.value).startswith(str(folder)) and "\n" not in str(error.value)


def test_directory_errors_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        vae.load_vae(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="has no config.json"):
        vae.load_vae(tmp_path)
    folder = _folder_with(tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(
        ValueError,
        match="has no diffusion_pytorch_model.safetensors nor "
        "diffusion_pytorch_model.safetensors.index.json",
    ):
        vae.load_vae(folder)


def test_image_sizes_must_fit_the_downsampling(outputs):
    flux, _ = outputs("vae_flux")
    with pytest.raises(
        ValueError, match="30x32 are not divisible by the VAE's downsampling factor 4"
    ):
        vae.encode_fn(flux)(flux.params, np.zeros((1, 30, 32, 3), np.float32))
    with pytest.raises(ValueError, match=re.escape("latents must be (B, H, W, 16)")):
        vae.decode_fn(flux)(flux.params, np.zeros((1, 8, 8, 4), np.float32))
