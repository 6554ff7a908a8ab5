"""convert.diffusers_unet on tiny random diffusers UNet2DConditionModels: outputs match in float32."""

import json

import jax
import numpy as np
import pytest

from vlm_jax.convert import diffusers_unet
from vlm_jax.convert.checks import ConversionError, Tensors, finish_params
from vlm_jax.convert.safetensors_io import read_safetensors
from vlm_jax.models import build

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), cross_attention_dim=32,
)
VARIANTS = {
    # SD 1.x: 1x1-conv projections, attention_head_dim an int that is the number of heads.
    "sd1": dict(
        TINY, layers_per_block=2, norm_num_groups=8, attention_head_dim=4, use_linear_projection=False,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
    ),
    # SD 2.x: linear projections, heads per block, two transformer layers.
    "sd2": dict(
        TINY, layers_per_block=1, norm_num_groups=32, attention_head_dim=[2, 4], use_linear_projection=True,
        transformer_layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
        upcast_attention=True,
    ),
    # Self-attention blocks, the single-resnet UNetMidBlock2D, a projected pooled condition and the
    # other timestep embedding options.
    "attn_pooled": dict(
        TINY, layers_per_block=1, norm_num_groups=8, attention_head_dim=16, norm_eps=1e-6,
        down_block_types=("AttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "AttnUpBlock2D"),
        mid_block_type="UNetMidBlock2D", class_embed_type="projection", projection_class_embeddings_input_dim=12,
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
    ),
}


def _save(path, **config):
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # diffusers sets norms to 1 / 0 and some projections to zero: make every weight count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


def _convert(path):
    """What a from_hf for diffusers UNets does: config.json -> section, safetensors -> checked params."""
    with open(path / "config.json") as f:
        model_cfg = diffusers_unet.model_config(json.load(f))
    tensors = Tensors(read_safetensors(str(path)), ignore=diffusers_unet.IGNORED)
    params = diffusers_unet.params(tensors, model_cfg)
    tensors.finish()
    inputs = diffusers_unet.dummy_inputs(model_cfg)
    params = finish_params(model_cfg, params, inputs, dtype="float32", scan_layers=False)
    return model_cfg, params


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_outputs_match_diffusers(variant, tmp_path):
    hf = _save(tmp_path, **VARIANTS[variant])
    model_cfg, params = _convert(tmp_path)
    assert model_cfg.name == "unet"

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 16, 16)).astype(np.float32)
    timesteps = np.array([7, 901])  # a different timestep per row
    context = rng.normal(size=(2, 5, 32)).astype(np.float32)
    pooled = rng.normal(size=(2, 12)).astype(np.float32) if model_cfg.pooled_dim else None
    with torch.no_grad():
        want = hf(
            torch.from_numpy(x), torch.from_numpy(timesteps), torch.from_numpy(context),
            class_labels=None if pooled is None else torch.from_numpy(pooled),
        ).sample.numpy().transpose(0, 2, 3, 1)

    model = build(model_cfg)
    got = jax.jit(model.apply)({"params": params}, x.transpose(0, 2, 3, 1), timesteps, context, pooled)
    assert got.shape == want.shape == (2, 16, 16, 4)
    diff = float(np.abs(np.asarray(got) - want).max())
    print(f"{variant}: max abs diff {diff:.2e} (output scale {np.abs(want).max():.2f})")
    assert diff < 1e-4, diff


def _config(**change):
    cfg = {**VARIANTS["sd1"], "_class_name": "UNet2DConditionModel", **change}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"]), "not built here"),
        (dict(up_block_types=["UpBlock2D", "KCrossAttnUpBlock2D"]), "not built here"),
        (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type"),
        (dict(class_embed_type="timestep"), "class_embed_type 'timestep' is not supported"),
        (dict(class_embed_type="projection"), "needs projection_class_embeddings_input_dim"),
        (dict(addition_embed_type="text"), "addition_embed_type"),
        (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
        (dict(only_cross_attention=[True, False]), "only_cross_attention"),
        (dict(cross_attention_dim=[32, 64]), "one context width"),
        (dict(some_future_option=3), "does not know"),
        (dict(_class_name="UNet2DModel"), "UNet2DConditionModel"),
        (dict(attention_head_dim=3), "not divisible into 3 attention heads"),
        (dict(block_out_channels=[32, 60]), "multiple of norm_num_groups"),
    ],
)
def test_unsupported_configs_raise(change, message):
    with pytest.raises(ConversionError, match=message):
        diffusers_unet.model_config(_config(**change))


def test_checkpoint_that_does_not_fit_raises():
    cfg = diffusers_unet.model_config(_config())
    with pytest.raises(ConversionError, match="no weight 'time_embedding.linear_1.weight'"):
        diffusers_unet.params(Tensors({}), cfg)
