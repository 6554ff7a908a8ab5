"""Diffusion upsamplers (models.diffusion_upsampler, tasks.diffusion_upsample): the conditioning on
the low-resolution image, the frozen base, the loss against a hand computation, sampling compiled
once, generate through a text-to-image base (configs/ddpm.py:tiny, narrow) and through two stacked
upsamplers, and a run of stages (CLIP, DDPM, upsampler) through the one trainer."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax import models
from vlm_jax.models import diffusion_upsampler, unet as unet_lib
from vlm_jax.sampling import diffusion as samplers
from vlm_jax.tasks import diffusion_upsample as DU

_SMALL = {  # configs/ddpm.py:tiny made narrow (as tests/models/test_text_diffusion.py does)
    "model.text.width": 16, "model.text.depth": 1, "model.text.heads": 2, "model.embed_dim": 16,
    "model.unet.block_out_channels": (16, 32), "model.unet.norm_num_groups": 4, "model.unet.cross_attention_dim": 16,
    "model.unet.pooled_dim": 16, "model.unet.attention_head_dim": 2,
}
# One level, no attention; pooled_dim 8: the UNet reads the conditioning's noise level.
_UNET = dict(name="unet", in_channels=6, out_channels=3, block_out_channels=(8,), layers_per_block=1,
             down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), mid_block_type="",
             norm_num_groups=4, cross_attention_dim=0, pooled_dim=8)


def _with_task(config: ml_collections.ConfigDict, **task) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(config.to_dict())
    out.task.update(task)
    return out


@pytest.fixture(scope="module")
def stack():
    """configs/ddpm.py:tiny made narrow (32x32), an upsampler to 64 on it and a second to 128 on
    that. The params are initialised part by part, each program compiled once (the DDPM's is
    tests/models/test_text_diffusion.py's, which the suite's compilation cache serves), and put
    together as the stacked model's init lays them out (test_config_and_param_tree checks that)."""
    base = config_lib.load("configs/ddpm.py:tiny", {**_SMALL, "task.sample_steps": 3})
    up1 = DU.stage_config(base, _UNET, sample_steps=2, degrade="blur")
    up2 = DU.stage_config(up1, _UNET, sample_steps=2, degrade="none")
    model = models.build(up2)
    model1 = model.base
    tokens = jnp.array([[2, 5, 6, 3] + [0] * 16, [2, 7, 3] + [0] * 17], jnp.int32)
    small = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    ddpm = nn.unbox(jax.jit(model1.base.init)(jax.random.key(0), small, tokens))
    init = jax.jit(diffusion_upsampler.DiffusionUpsampler(base=None, unet=model.unet).init)
    unets = [nn.unbox(init(jax.random.key(i), small, tokens))["params"]["unet"] for i in (1, 2)]
    variables = {"params": {"base": {"base": ddpm["params"], "unet": unets[0]}, "unet": unets[1]}}
    denoise = jax.jit(lambda v, x, t, low, level: model1.apply(v, x, t, low, level, method=model1.denoise))
    return dict(up1=up1, up2=up2, model=model, variables=variables, tokens=tokens, ddpm=ddpm,
                model1=model1, variables1=DU.base_variables(variables), denoise=denoise,
                images=jax.random.uniform(jax.random.key(2), (2, 64, 64, 3), minval=-1, maxval=1))


def test_config_and_param_tree(stack):
    up1, up2, v = stack["up1"], stack["up2"], stack["variables"]
    assert (up1.data.image_size, up2.data.image_size) == (64, 128)
    assert up2.task.base.image_size == 64 and up2.task.base.task.base.image_size == 32
    assert up2.task.base.task.base.task.name == "diffusion" and up2.optim.trainable == "^(?!base/)"
    assert set(stack["ddpm"]) == {"params"}  # no model state
    shapes = jax.eval_shape(stack["model"].init, jax.random.key(0), jnp.zeros((2, 128, 128, 3)), stack["tokens"])
    shape = lambda tree: jax.tree.map(lambda a: tuple(a.shape), nn.unbox(tree))  # noqa: E731
    assert shape(shapes) == shape(v)  # the stacked init's tree: base/base (DDPM), base/unet, unet
    assert v["params"]["unet"]["conv_in"]["kernel"].shape[-2] == 6  # [x_t; upsampled low-res image]
    with pytest.raises(ValueError, match="in_channels 6"):
        diffusion_upsampler.from_config(ml_collections.ConfigDict(dict(unet={**_UNET, "in_channels": 3})))
    with pytest.raises(ValueError, match="no caption"):
        diffusion_upsampler.from_config(ml_collections.ConfigDict(dict(unet=dict(
            _UNET, down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            cross_attention_dim=8, attention_head_dim=2))))


def test_the_low_res_image_and_its_noise_level_reach_the_output(stack):
    variables, x, denoise = stack["variables1"], stack["images"], stack["denoise"]
    low = jax.image.resize(x, (2, 32, 32, 3), "linear")
    t, zero = jnp.array([10, 500]), jnp.zeros((2,))
    out = denoise(variables, x, t, low, zero)
    assert out.shape == (2, 64, 64, 3) and np.isfinite(np.asarray(out)).all()
    assert np.abs(np.asarray(denoise(variables, x, t, -low, zero)) - np.asarray(out)).max() > 1e-4
    assert np.abs(np.asarray(denoise(variables, x, t, low, zero + 0.5)) - np.asarray(out)).max() > 1e-5
    with pytest.raises(ValueError, match="not 1/2 of"):
        denoise(variables, x, t, x, zero)


def test_loss_against_a_hand_computation_and_no_gradient_into_the_base(stack):
    model, variables, x0 = stack["model1"], stack["variables1"], np.asarray(stack["images"], np.float64)
    config = _with_task(stack["up1"], degrade="none", prediction="v_prediction", min_snr_gamma=5.0)
    rng = jax.random.key(7)
    batch = {"image": jnp.asarray(x0, jnp.float32), "tokens": stack["tokens"]}
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda p: DU.loss_fn(model, p, batch, rng, config, {}), has_aux=True))
    (loss, aux), grads = loss_and_grad(variables["params"])
    m = aux["metrics"]
    # By hand: the same draws of t and noise, the arithmetic in float64 numpy.
    _, _, _, r_t, r_noise, _ = jax.random.split(rng, 6)
    t = np.asarray(jax.random.randint(r_t, (2,), 0, 1000))
    noise = np.asarray(jax.random.normal(r_noise, x0.shape, jnp.float32), np.float64)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t][:, None, None, None]
    low = x0.reshape(2, 32, 2, 32, 2, 3).mean(axis=(2, 4))  # degrade "none": 2x2 means
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    out = np.asarray(stack["denoise"](variables, f32(x_t), jnp.asarray(t), f32(low), jnp.zeros((2,))), np.float64)
    v = np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0
    mse = ((out - v) ** 2).mean(axis=(1, 2, 3))
    snr = (abar / (1 - abar)).ravel()
    np.testing.assert_allclose(loss, np.mean(np.minimum(snr, 5.0) / (snr + 1) * mse), rtol=2e-4)
    np.testing.assert_allclose(m["mse"], mse.mean(), rtol=2e-4)
    x0_hat = np.clip(np.sqrt(abar) * x_t - np.sqrt(1 - abar) * out, -1, 1)
    np.testing.assert_allclose(m["x0_mse"], ((x0_hat - x0) ** 2).mean(), rtol=2e-4)
    bilinear = np.asarray(jax.image.resize(jnp.asarray(low, jnp.float32), (2, 64, 64, 3), "linear"), np.float64)
    np.testing.assert_allclose(m["bilinear_mse"], ((bilinear - x0) ** 2).mean(), rtol=1e-4)
    assert set(m) == {"loss", "mse", "mse_low_t", "mse_high_t", "x0_mse", "bilinear_mse"}
    # The frozen base is never run by the loss: no gradient reaches it; the UNet's does.
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["base"]))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["unet"])) > 0
    with pytest.raises(ValueError, match="task.degrade 'jpeg'"):
        DU.loss_fn(model, variables["params"], batch, rng, _with_task(config, degrade="jpeg"), {})
    blind = diffusion_upsampler.DiffusionUpsampler(None, unet_lib.from_config(ml_collections.ConfigDict(
        {**_UNET, "pooled_dim": 0})))  # a UNet that cannot read the level
    with pytest.raises(ValueError, match="pooled_dim"):
        DU.loss_fn(blind, variables["params"], batch, rng, _with_task(config, noise_aug=0.2), {})


def test_upsample_compiles_once_and_bad_settings_are_errors(stack):
    model, variables, task = stack["model1"], stack["variables1"], stack["up1"].task
    low = jax.image.resize(stack["images"], (2, 32, 32, 3), "linear")
    first = DU.upsample(model, variables, low, jax.random.key(0), task)
    assert first.shape == (2, 64, 64, 3) and float(jnp.abs(first).max()) <= 1.0
    compiled = samplers._loop._cache_size()
    again = DU.upsample(model, variables, -low, jax.random.key(1), task)
    assert samplers._loop._cache_size() == compiled  # new images, new rng: the same compiled loop
    assert np.abs(np.asarray(again) - np.asarray(first)).max() > 1e-4
    for key, value, match in (("sample_steps", 0, "sample_steps >= 1"), ("sampler", "euler", "task.sampler 'euler'"),
                              ("guidance", 2.0, "nothing to guide"), ("noise_aug_sample", 1.5, "must lie in")):
        with pytest.raises(ValueError, match=match):
            DU.upsample(model, variables, low, jax.random.key(0), _with_task(stack["up1"], **{key: value}).task)


def test_generate_through_the_base_and_two_stacked_upsamplers(stack):
    tokens, rng = stack["tokens"], jax.random.key(3)
    one = DU.generate(stack["model1"], stack["variables1"], tokens, rng, stack["up1"])
    assert one.shape == (2, 64, 64, 3)
    images = DU.generate_stages(stack["model"], stack["variables"], tokens, rng, stack["up2"])
    assert [i.shape for i in images] == [(2, 32, 32, 3), (2, 64, 64, 3), (2, 128, 128, 3)]  # 4x in two steps
    assert all(np.isfinite(np.asarray(i)).all() for i in images)
    alone = diffusion_upsampler.DiffusionUpsampler(base=None, unet=stack["model1"].unet)
    with pytest.raises(ValueError, match="no base model"):
        DU.generate(alone, stack["variables1"], tokens, rng, stack["up1"])
    no_base = ml_collections.ConfigDict(stack["up1"].to_dict())
    del no_base.task["base"]
    with pytest.raises(ValueError, match="task.base must hold"):
        DU.generate(stack["model1"], stack["variables1"], tokens, rng, no_base)


@pytest.mark.slow
def test_stages_clip_ddpm_upsampler_and_sample(staged_smoke_config, tmp_path):
    """configs/ddpm.py:tiny's CLIP and DDPM stages shrunk, then an upsampler stage to 64x64 over the
    DDPM stage (its whole model loaded as `base`, frozen), 2 steps each; vlm-jax sample draws at 64."""
    import orbax.checkpoint as ocp
    from PIL import Image

    from vlm_jax import cli
    from vlm_jax.sampling.sample import load_for_sampling
    from vlm_jax.train import stages

    config = staged_smoke_config("configs/ddpm.py:tiny", {**_SMALL, "task.sample_steps": 2})
    up = DU.stage_config(stages.stage_config(config, "diffusion", None), _UNET, sample_steps=2, degrade="bsr")
    (tmp_path / "up.json").write_text(json.dumps(up.to_dict()))
    (tmp_path / "up.py").write_text(
        "import json, ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict(json.load(open({str(tmp_path / 'up.json')!r})))\n")
    with config.unlocked():
        config.stages.order = ("clip", "diffusion", "upsample")
        config.stages.upsample = ml_collections.ConfigDict(
            dict(config=str(tmp_path / "up.py"), data=dict(image_size=64)))  # data.image_size is shared: set again
    run = str(tmp_path / "run")
    summaries = stages.train_stages(config, run, devices=jax.devices()[:1])
    assert [(n, s["finished"]) for n, s in summaries] == [("clip", True), ("diffusion", True), ("upsample", True)]
    train = summaries[-1][1]["train"]
    assert np.isfinite(train["train/loss"]) and {"train/bilinear_mse", "train/x0_mse"} <= set(train)
    stored = ocp.StandardCheckpointer().restore(f"{run}/upsample/checkpoints/2/state")["params"]
    assert set(stored) == {"unet"}  # the frozen base is not stored again
    _, _, params, _ = load_for_sampling(f"{run}/upsample")
    diffusion = ocp.StandardCheckpointer().restore(f"{run}/diffusion/checkpoints/2/state")["params"]
    clip = ocp.StandardCheckpointer().restore(f"{run}/clip/checkpoints/2/state")["params"]
    for x, y in zip(jax.tree.leaves(diffusion["unet"]) + jax.tree.leaves(clip["text"]),
                    jax.tree.leaves(params["base"]["unet"]) + jax.tree.leaves(params["base"]["text"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", "--workdir", f"{run}/upsample", "--prompt", "a red circle.", "-n", "2",
                     "--out", str(grid)]) == 0
    assert Image.open(grid).size[0] >= 2 * 64
