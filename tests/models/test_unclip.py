"""configs/unclip.py:tiny's five stages through the one trainer (clip, prior, decoder, upsample1,
upsample2), shrunk, and `vlm-jax sample` drawing through the whole chain: text -> prior -> decoder
-> upsampler -> upsampler. Each stage holds the one before whole and frozen; none stores it again."""

import jax
import ml_collections
import numpy as np
import pytest

from vlm_jax import config as config_lib

# The CLIP of the staged_smoke_config fixture's CLIP stage.
_CLIP = dict(embed_dim=16, text=dict(width=16, depth=1, heads=2), image=dict(channels=(8, 16, 16), pool="mean"))
_STEPS = dict(train=dict(steps=2, eval_every=0, ckpt_every=1000), data=dict(batch_size=8))


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) else value
    return out


def _shrunk(model: dict) -> dict:
    """A stage's model section made narrow, down through its frozen parts (prior, base)."""
    out = dict(model)
    name = model["name"]
    if name == "unclip_prior":
        out["clip"] = _merged(model["clip"], _CLIP)
        out.update(width=16, depth=1, heads=2)
    elif name == "unclip_decoder":
        out["prior"] = _shrunk(model["prior"])
        out["unet"] = dict(model["unet"], block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=2,
                           cross_attention_dim=16, pooled_dim=16)
    elif name == "diffusion_upsampler":
        out["base"] = _shrunk(model["base"])
        out["unet"] = dict(model["unet"], block_out_channels=(8, 8), norm_num_groups=4)
    return out


def _fast(task: dict) -> dict:
    """A stage's task section sampling in 2 steps, down through the copies it keeps (prior, base)."""
    out = dict(task, sample_steps=2)
    if "prior" in task:
        out["prior"] = _fast(task["prior"])
    if "base" in task:
        out["base"] = dict(task["base"], task=_fast(task["base"]["task"]))
    return out


@pytest.mark.slow
def test_stages_train_and_sample_through_the_whole_chain(staged_smoke_config, tmp_path):
    import orbax.checkpoint as ocp
    from PIL import Image

    from vlm_jax import cli
    from vlm_jax.train import stages

    config = staged_smoke_config("configs/unclip.py:tiny", {})
    with config.unlocked():
        config.model = ml_collections.ConfigDict(_shrunk(config.model.to_dict()))
        config.task = ml_collections.ConfigDict(_fast(config.task.to_dict()))
        for name in ("prior", "decoder", "upsample1"):
            own = config_lib.load(config.stages[name].config)
            config.stages[name].update(ml_collections.ConfigDict(dict(
                model=_shrunk(own.model.to_dict()), task=_fast(own.task.to_dict()),
                evals=dict(val=dict(num_examples=8, batch_size=8)), **_STEPS)))
    run = str(tmp_path / "run")
    summaries = stages.train_stages(config, run, devices=jax.devices()[:1])
    names = ["clip", "prior", "decoder", "upsample1", "upsample2"]
    assert [(n, s["finished"]) for n, s in summaries] == [(n, True) for n in names]
    stored = {n: set(ocp.StandardCheckpointer().restore(f"{run}/{n}/checkpoints/2/state")["params"]) for n in names[1:]}
    assert "clip" not in stored["prior"] and "prior" not in stored["decoder"]  # frozen: not stored again
    assert stored["upsample1"] == stored["upsample2"] == {"unet"}
    assert np.isfinite(summaries[2][1]["train"]["train/loss"]) and "train/bilinear_mse" in summaries[3][1]["train"]
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", "--workdir", run, "--prompt", "a red circle.", "-n", "2", "--out", str(grid)]) == 0
    grids = [np.asarray(Image.open(p)) for p in (tmp_path / "grid_stage0.png", tmp_path / "grid_stage1.png", grid)]
    assert grids[2].shape[1] >= 2 * 64  # two 64x64 images in a row: the last upsampler's size
    assert not np.array_equal(grids[0], grids[1]) and not np.array_equal(grids[1], grids[2])  # a grid per stage
    scene = tmp_path / "scene.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(scene)
    out = tmp_path / "var.png"
    assert cli.main(["sample", "--workdir", run, "--image", str(scene), "-n", "3", "--out", str(out)]) == 0
    assert Image.open(out).size[0] >= 3 * 64 and (tmp_path / "var_stage0.png").exists()
    out = tmp_path / "interp.png"
    assert cli.main(["sample", "--workdir", run, "--image", str(scene), str(scene), "--interpolate", "3",
                     "--out", str(out)]) == 0
    assert Image.open(out).size[0] >= 3 * 64
