"""Text-to-image diffusion (models.text_diffusion, tasks.diffusion): the pixel rearrangement, the
conditioning, the loss and its caption dropping, guided sampling compiled once, and configs/ddpm.py's
two stages through the one trainer (the smoke test of the slow learning run)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax import models, tasks
from vlm_jax.models import text_diffusion
from vlm_jax.sampling import diffusion as samplers

DIFFUSION = tasks.get("diffusion")
_SMALL = {
    "model.text.width": 16, "model.text.depth": 1, "model.text.heads": 2, "model.embed_dim": 16,
    "model.unet.block_out_channels": (16, 32), "model.unet.norm_num_groups": 4, "model.unet.cross_attention_dim": 16,
    "model.unet.pooled_dim": 16, "model.unet.attention_head_dim": 2,
}


@pytest.fixture(scope="module")
def tiny():
    """configs/ddpm.py:tiny made narrow, initialised (shared by the tests below: one compile)."""
    config = config_lib.load("configs/ddpm.py:tiny", {**_SMALL, "task.sample_steps": 3})
    model = models.build(config)
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    tokens = jnp.array([[2, 5, 6, 3] + [0] * 16, [2, 7, 3] + [0] * 17], jnp.int32)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens))
    return config, model, variables, images, tokens


def test_patches_are_a_rearrangement_of_the_pixels():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    packed = text_diffusion.space_to_depth(x, 2)
    assert packed.shape == (2, 2, 3, 12)
    np.testing.assert_array_equal(packed[0, 1, 2].reshape(2, 2, 3), x[0, 2:4, 4:6])  # one 2x2 block
    np.testing.assert_array_equal(text_diffusion.depth_to_space(packed, 2), x)
    with pytest.raises(ValueError, match="patch 4 does not divide"):
        text_diffusion.space_to_depth(x, 4)


def test_condition_and_encode_decode(tiny):
    config, model, variables, images, tokens = tiny
    cond = model.apply(variables, tokens, method=model.condition)
    assert cond["context"].shape == (2, 20, 16) and cond["pooled"].shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(cond["pooled"], axis=-1), 4.0, rtol=1e-5)  # sqrt(E)
    x0 = model.apply(variables, images, method=model.encode)
    assert x0.shape == (2, 16, 16, 12)  # patch 2
    np.testing.assert_array_equal(model.apply(variables, x0, method=model.decode), images)
    # (That the tower stays frozen in training: the stage test below, after two steps.)


def test_cond_drop_trains_on_the_empty_caption(tiny):
    config, model, variables, images, tokens = tiny
    loss = lambda drop, toks: DIFFUSION.loss_fn(  # noqa: E731
        model, variables["params"], {"image": images, "tokens": toks}, jax.random.key(3),
        ml_collections.ConfigDict({**config.to_dict(), "task": {**config.task.to_dict(), "cond_drop": drop}}), {})
    all_dropped, metrics = loss(1.0, tokens)
    np.testing.assert_allclose(all_dropped, loss(0.0, jnp.zeros_like(tokens))[0], rtol=1e-6)
    assert set(metrics["metrics"]) == {"loss", "mse", "mse_low_t", "mse_high_t"}
    assert abs(float(all_dropped) - float(loss(0.0, tokens)[0])) > 1e-6


def test_guided_sampling_is_one_compiled_loop_and_bad_settings_are_errors(tiny):
    config, model, variables, _, tokens = tiny
    config = ml_collections.ConfigDict(config.to_dict())  # a copy: guidance changes below
    first = DIFFUSION.generate(model, variables, tokens, jax.random.key(0), config)
    assert first.shape == (2, 32, 32, 3)
    compiled = samplers._loop._cache_size()
    again = DIFFUSION.generate(model, variables, tokens[::-1], jax.random.key(0), config)
    assert samplers._loop._cache_size() == compiled  # new prompts and params: no new compilation
    assert np.abs(np.asarray(again) - np.asarray(first)).max() > 1e-3  # the prompts matter
    np.testing.assert_array_equal(DIFFUSION.generate(model, variables, tokens, jax.random.key(0), config), first)
    with config.unlocked():
        config.task.guidance = 1.0  # the conditional model alone
    unguided = DIFFUSION.generate(model, variables, tokens, jax.random.key(0), config)
    assert np.abs(np.asarray(unguided) - np.asarray(first)).max() > 1e-4
    for key, value, match in (("guidance", -1.0, "guidance scale must be >= 0"), ("sample_steps", 0, "sample_steps"),
                              ("sampler", "euler", "task.sampler 'euler'")):
        with config.unlocked():
            bad = ml_collections.ConfigDict(config.to_dict())
            bad.task[key] = value
        with pytest.raises(ValueError, match=match):
            DIFFUSION.generate(model, variables, tokens, jax.random.key(0), bad)


def test_stages_train_clip_then_diffusion_and_sample(staged_smoke_config, tmp_path):
    """configs/ddpm.py:tiny's two stages, a few steps of narrow models on the small world: the
    diffusion stage reads the CLIP stage's text tower, frozen, and vlm-jax sample draws from it."""
    import orbax.checkpoint as ocp
    from PIL import Image

    from vlm_jax import cli
    from vlm_jax.train import stages

    config = staged_smoke_config("configs/ddpm.py:tiny", {**_SMALL, "task.sample_steps": 2})
    run = str(tmp_path / "run")
    summaries = stages.train_stages(config, run, devices=jax.devices()[:1])
    assert [(n, s["finished"]) for n, s in summaries] == [("clip", True), ("diffusion", True)]
    read = lambda stage: ocp.StandardCheckpointer().restore(f"{run}/{stage}/checkpoints/2/state")["params"]  # noqa: E731
    clip, diffusion = read("clip"), read("diffusion")
    assert "text" not in diffusion and "unet" in diffusion  # frozen, not stored again
    from vlm_jax.sampling.sample import load_for_sampling

    _, _, params, _ = load_for_sampling(f"{run}/diffusion")
    for x, y in zip(jax.tree.leaves(clip["text"]), jax.tree.leaves(params["text"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", "--workdir", f"{run}/diffusion", "--prompt", "a red circle.", "-n", "2",
                     "--out", str(grid)]) == 0
    assert Image.open(grid).size[0] >= 2 * 32


def test_the_diffusion_stage_resumes_exactly_mid_run(staged_smoke_config, tmp_path):
    """Stopped at step 2 of 4 and resumed, the diffusion stage ends where the straight run does: the
    same noise, timesteps and dropped captions per step (drawn from the step's rng), the same
    batches, so the same losses and bit-identical parameters and optimiser state."""
    import shutil

    import orbax.checkpoint as ocp

    from vlm_jax.train import stages
    from vlm_jax.train.metrics import read_metrics

    config = staged_smoke_config("configs/ddpm.py:tiny", {**_SMALL, "train.steps": 4, "train.ckpt_every": 2})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    stages.train_stages(config, str(straight), devices=jax.devices()[:1])
    shutil.copytree(straight / "clip", resumed / "clip")  # the same frozen CLIP stage for both
    first = dict(stages.train_stages(config, str(resumed), devices=jax.devices()[:1], stop_at_step=2))
    assert not first["diffusion"]["finished"]
    assert dict(stages.train_stages(config, str(resumed), devices=jax.devices()[:1]))["diffusion"]["finished"]
    read = lambda run: ocp.StandardCheckpointer().restore(f"{run}/diffusion/checkpoints/4/state")  # noqa: E731
    a, b = read(straight), read(resumed)
    for key in ("params", "opt_state"):
        for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key]), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    losses = lambda run: [r["train/loss"] for r in read_metrics(f"{run}/diffusion") if "train/loss" in r]  # noqa: E731
    assert len(losses(straight)) == 4 and losses(resumed)[-2:] == losses(straight)[-2:]


@pytest.mark.slow
def test_tiny_ddpm_learns_to_draw_the_prompt(tmp_path):
    """The learning run of configs/ddpm.py:tiny as it is, both stages on the full built-in world (its
    default smoke test: test_stages_train_clip_then_diffusion_and_sample): one
    DDIM sample per validation prompt gets the main object right far above chance (1/48) and the
    shuffled-prompt floor, held-out pairs included (issue 16: at least 0.6), and guidance at w = 3
    beats none (w = 1), on the same model and noise. On one device, as `vlm-jax train` runs it."""
    from vlm_jax.train import stages
    from vlm_jax.train.evaluate import evaluate

    config = config_lib.load("configs/ddpm.py:tiny")
    summary = dict(stages.train_stages(config, str(tmp_path / "run"), devices=jax.devices()[:1]))["diffusion"]
    ev = summary["eval"]
    # Measured (2026-12-07, DDIM 50 with eta 1, w 2, threshold 0.9; then 2000 steps): 0.742,
    # held-out pairs 0.684, shuffled 0.047, fd_clip 0.041 (the real halves' 0.085), 22m54s in all
    # with the two extra evaluations (the suite's 8 host devices make a step slower than
    # `vlm-jax train`'s). With 1700 steps (`tiny` now): 0.652, held-out 0.603, shuffled 0.059,
    # fd_clip 0.045, and w = 3 above w = 1; 26m52s, its cores shared with a CI run.
    assert ev["val/gen/main_acc"] >= 0.6 and ev["val/gen/main_acc"] > 5 * ev["val/gen/shuffled/main_acc"]
    assert ev["val/gen/main_acc_heldout"] >= 0.45
    assert ev["val/gen/real/main_acc"] > 0.95 and "val/gen/fd_clip" in ev
    run = str(tmp_path / "run/diffusion")
    at = {}
    for w in (1.0, 3.0):
        other = config_lib.from_json(open(f"{run}/config.json").read())
        with other.unlocked():
            other.task.guidance = w
        at[w] = evaluate(other, run)["eval"]["val/gen/main_acc"]
    assert at[3.0] > at[1.0], at

