"""Latent diffusion (configs/ldm.py): the latent scale measured on the first batch and kept, a fixed
scale left alone, and the tiny config's three stages (clip, autoencoder, diffusion) through the one
trainer, then `vlm-jax sample` (the smoke test of the learning run)."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax import models
from vlm_jax.models.text_diffusion import STATS

_SMALL = {
    "model.text.width": 16, "model.text.depth": 1, "model.text.heads": 2, "model.embed_dim": 16,
    "model.unet.block_out_channels": (16, 32), "model.unet.norm_num_groups": 4, "model.unet.cross_attention_dim": 16,
    "model.unet.pooled_dim": 16, "model.unet.attention_head_dim": 2,
    "model.autoencoder.block_out_channels": (8, 16, 16), "model.autoencoder.norm_num_groups": 4,
    "model.autoencoder.mid_block_add_attention": False,
    # Cross-attention at the lower level only (and in the mid block): a smaller program to compile.
    "model.unet.down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "model.unet.up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}


def _images(seed, scale=1.0):
    return scale * jax.random.uniform(jax.random.key(seed), (2, 32, 32, 3), minval=-1, maxval=1)


def _autoencoder_parts(model, images):
    """What an init needs for encode and decode alone (no UNet, no text tower): a small init."""
    model.autoencoder(images)
    return model.encode(images)


def test_latent_scale_is_measured_on_the_first_batch_then_kept():
    model = models.build(config_lib.load("configs/ldm.py:tiny", _SMALL))
    assert model.measures_latent_scale
    init = jax.jit(lambda r, x: model.init(r, x, method=_autoencoder_parts))
    variables = nn.unbox(init(jax.random.key(0), _images(0)))
    assert float(variables[STATS]["latent_scale"]) == 0.0  # not measured yet: read as 1
    encode = jax.jit(lambda v, x, measure: model.apply(v, x, measure=measure, method=model.encode, mutable=[STATS]),
                     static_argnums=2)
    raw = lambda v, x: model.apply(v, x, method=lambda m, y: m.autoencoder.encode(y)[0])  # noqa: E731
    x0, state = encode(variables, _images(1), False)
    assert float(state[STATS]["latent_scale"]) == 0.0  # only measure=True measures
    np.testing.assert_allclose(x0, raw(variables, _images(1)), rtol=1e-5, atol=1e-5)
    x0, state = encode(variables, _images(1), True)
    scale = float(state[STATS]["latent_scale"])
    np.testing.assert_allclose(scale, 1.0 / np.std(raw(variables, _images(1))), rtol=1e-5)
    np.testing.assert_allclose(np.std(x0), 1.0, rtol=1e-4)
    measured = {**variables, **state}
    again, kept = encode(measured, _images(2, scale=0.3), True)  # other images: the scale stays
    assert float(kept[STATS]["latent_scale"]) == scale
    np.testing.assert_allclose(again, scale * raw(measured, _images(2, scale=0.3)), rtol=1e-5, atol=1e-5)
    # decode undoes the scale: decode(encode(x)) is the autoencoder's round trip through the mean.
    round_trip = model.apply(measured, x0, method=model.decode)
    direct = model.apply(measured, _images(1), method=lambda m, y: m.autoencoder.reconstruct(y))
    np.testing.assert_allclose(round_trip, direct, rtol=1e-4, atol=1e-5)


def test_a_fixed_latent_scale_keeps_no_state():
    model = models.build(config_lib.load("configs/ldm.py:tiny", {**_SMALL, "model.latent_scale": 0.5}))
    assert not model.measures_latent_scale
    variables = jax.jit(lambda r, x: model.init(r, x, method=_autoencoder_parts))(jax.random.key(0), _images(0))
    assert set(variables) == {"params"}
    variables = nn.unbox(variables)
    x0 = model.apply(variables, _images(1), measure=True, method=model.encode)
    raw = model.apply(variables, _images(1), method=lambda m, y: m.autoencoder.encode(y)[0])
    np.testing.assert_allclose(x0, 0.5 * raw, rtol=1e-5, atol=1e-5)


# -m slow (the default suite's 6-minute budget; 65 s here): tests/models/test_text_diffusion.py's
# stage smoke test runs the same stages, trainer, diffusion task and sampling in pixel space, and
# the tests above the measured latent scale.
@pytest.mark.slow
def test_stages_train_clip_autoencoder_then_diffusion_and_sample(staged_smoke_config, tmp_path, monkeypatch):
    """configs/ldm.py:tiny's three stages, two steps each of narrow models on the small world: the
    diffusion stage gets the autoencoder whole and the CLIP's text tower, both frozen, measures
    its latent scale on the first batch and keeps it, and vlm-jax sample draws 32x32 images."""
    import orbax.checkpoint as ocp

    from vlm_jax import cli
    from vlm_jax.sampling import draw
    from vlm_jax.train import stages
    from vlm_jax.train.metrics import read_metrics

    config = staged_smoke_config("configs/ldm.py:tiny", {**_SMALL, "task.sample_steps": 2})
    with config.unlocked():
        config.stages.autoencoder.update(dict(
            model=dict(block_out_channels=(8, 16, 16), norm_num_groups=4, mid_block_add_attention=False),
            data=dict(batch_size=8),
            train=dict(steps=2, log_every=1, eval_every=0, ckpt_every=1000, progress=False, async_checkpoints=False),
        ))
        # (The reconstruction evaluator on a KL autoencoder: tests/tasks/test_autoencoder_kl_task.py.)
        config.stages.autoencoder.evals = ml_collections.ConfigDict()
    run = str(tmp_path / "run")
    summaries = dict(stages.train_stages(config, run, devices=jax.devices()[:1]))
    assert list(summaries) == ["clip", "autoencoder", "diffusion"] and all(s["finished"] for s in summaries.values())

    read = lambda stage: ocp.StandardCheckpointer().restore(f"{run}/{stage}/checkpoints/2/state")  # noqa: E731
    clip, autoencoder, diffusion = read("clip")["params"], read("autoencoder")["params"], read("diffusion")
    assert set(diffusion["params"]) == {"unet"}  # the frozen parts are not stored again
    # The scale: measured on step 1 (1 / std of the posterior means), kept on step 2, checkpointed.
    logged = [r["train/latent_scale"] for r in read_metrics(f"{run}/diffusion") if "train/latent_scale" in r]
    stored = float(diffusion["model_state"][STATS]["latent_scale"])
    assert len(logged) == 2 and logged[0] == logged[1] == pytest.approx(stored, rel=1e-6)
    assert np.isfinite(stored) and stored > 0 and abs(stored - 1.0) > 1e-3

    # vlm-jax sample restores the run (frozen parts from their stages) and draws 32x32 images.
    drawn, seen = [], []
    real_generate, real_write_grid = draw.generate_images, draw.write_grid
    monkeypatch.setattr(draw, "generate_images", lambda task, model, variables, *a: seen.append(variables)
                        or real_generate(task, model, variables, *a))
    monkeypatch.setattr(draw, "write_grid", lambda path, rows, prompts: drawn.extend(rows) or real_write_grid(
        path, rows, prompts))
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", "--workdir", f"{run}/diffusion", "--prompt", "a red circle.", "-n", "2",
                     "--out", str(grid)]) == 0
    assert [np.shape(row) for row in drawn] == [(2, 32, 32, 3)] and grid.exists()
    (variables,) = seen
    assert float(variables[STATS]["latent_scale"]) == stored
    params = variables["params"]
    for ours, theirs in ((params["autoencoder"], autoencoder), (params["text"], clip["text"]),
                         (params["text_projection"], clip["text_projection"])):
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
