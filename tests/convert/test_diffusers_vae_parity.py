"""convert.diffusers_vae on a tiny random diffusers AutoencoderKL: encode (mean, logvar) and decode
match torch in float32; old attention names and 1x1-conv attention weights convert the same."""

import json

import jax
import numpy as np
import pytest

from vlm_jax import models
from vlm_jax.convert import diffusers_vae
from vlm_jax.convert.checks import ConversionError, Tensors, finish_params
from vlm_jax.convert.safetensors_io import read_safetensors

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SMALL = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
)


def _save(path, **overrides):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**{**SMALL, **overrides}).eval()
    with torch.no_grad():  # norms start at 1 / 0 and biases at 0: make every weight count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


def _convert(path, raw=None):
    hf = json.loads((path / "config.json").read_text())
    raw = read_safetensors(str(path)) if raw is None else raw
    cfg = diffusers_vae.model_config(hf)
    tensors = Tensors(raw, ignore=diffusers_vae.IGNORED)
    params = diffusers_vae.params(tensors, cfg)
    tensors.finish()
    params = finish_params(cfg, params, diffusers_vae.dummy_inputs(cfg), dtype="float32", scan_layers=False)
    return cfg, params


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    return path, _save(path)


def test_encode_and_decode_match_diffusers(vae):
    path, hf = vae
    cfg, params = _convert(path)
    assert cfg.scaling_factor == pytest.approx(0.18215) and cfg.block_out_channels == (32, 64)
    model = models.build(cfg)
    assert model.downsample_factor == 2

    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, size=(2, 3, 32, 32)).astype(np.float32)
    latents = rng.normal(size=(2, 4, 16, 16)).astype(np.float32)
    with torch.no_grad():
        dist = hf.encode(torch.from_numpy(pixels)).latent_dist
        want_mean, want_logvar = dist.mean.numpy(), dist.logvar.numpy()
        want_image = hf.decode(torch.from_numpy(latents)).sample.numpy()

    variables = {"params": params}
    mean, logvar = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, pixels.transpose(0, 2, 3, 1))
    image = jax.jit(lambda v, z: model.apply(v, z, method="decode"))(variables, latents.transpose(0, 2, 3, 1))
    nchw = lambda x: np.asarray(x).transpose(0, 3, 1, 2)  # noqa: E731
    np.testing.assert_allclose(nchw(mean), want_mean, atol=1e-4, rtol=0)
    np.testing.assert_allclose(nchw(logvar), want_logvar, atol=1e-4, rtol=0)
    np.testing.assert_allclose(nchw(image), want_image, atol=1e-4, rtol=0)


def test_old_attention_names_and_conv_weights(vae):
    path, _ = vae
    raw = read_safetensors(str(path))
    old = dict(to_q="query", to_k="key", to_v="value", **{"to_out.0": "proj_attn"})
    renamed = {}
    for key, value in raw.items():
        for new_name, old_name in old.items():
            if f".attentions.0.{new_name}." in key:
                key = key.replace(f".{new_name}.", f".{old_name}.")
                if key.endswith(".weight"):
                    value = value[:, :, None, None]  # as a 1x1 Conv2d
        renamed[key] = value
    assert any(k.endswith("proj_attn.weight") for k in renamed)
    _, want = _convert(path)
    _, got = _convert(path, renamed)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_no_attention_no_quant_convs(tmp_path):
    _save(tmp_path, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)
    cfg, params = _convert(tmp_path)  # finish_params checks the tree against the model's own
    assert "quant_conv" not in params and "attentions_0" not in params["encoder"]["mid_block"]
    assert not cfg.use_quant_conv and not cfg.mid_block_add_attention


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(act_fn="relu"), "act_fn"),
        (dict(_class_name="AsymmetricAutoencoderKL"), "AsymmetricAutoencoderKL"),
        (dict(down_block_types=["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]), "AttnDownEncoderBlock2D"),
        (dict(norm_num_groups=24), "norm_num_groups"),
        (dict(up_block_types=["UpDecoderBlock2D"]), "up_block_types"),
    ],
)
def test_unsupported_configs_are_conversion_errors(change, match):
    hf = {"_class_name": "AutoencoderKL", **SMALL, **change}
    with pytest.raises(ConversionError, match=match):
        diffusers_vae.model_config(hf)


def test_missing_and_unused_weights_are_errors(vae):
    path, _ = vae
    raw = read_safetensors(str(path))
    cfg = diffusers_vae.model_config(json.loads((path / "config.json").read_text()))
    partial = {k: v for k, v in raw.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(ConversionError, match="decoder.conv_out.bias"):
        diffusers_vae.params(Tensors(partial), cfg)
    tensors = Tensors({**raw, "encoder.extra.weight": np.zeros(3, np.float32)})
    diffusers_vae.params(tensors, cfg)
    with pytest.raises(ConversionError, match="encoder.extra.weight"):
        tensors.finish()
