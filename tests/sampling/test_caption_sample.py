"""`vlm-jax sample --image`: a caption of an image file from a captioning run's checkpoint, and the
per-word attention figure (Show, Attend and Tell); BatchNorm statistics restored for Show and Tell."""

import numpy as np
import pytest
from PIL import Image


def _train(name, world_cache, workdir, **overrides):
    from vlm_jax import config as config_lib
    from vlm_jax.train.trainer import train

    config = config_lib.load(
        f"configs/{name}.py:tiny",
        {
            "data.tfds_data_dir": str(world_cache / "tfds"),
            "data.batch_size": 8,
            "tokenizer.path": str(world_cache / "tokenizer.model"),
            "train.steps": 2,
            "train.eval_every": 0,
            "train.ckpt_every": 2,
            "train.progress": False,
            "train.async_checkpoints": False,
            "model.embed_dim": 16,
            "model.hidden": 16,
            **overrides,
        },
    )
    with config.unlocked():
        config.evals = {}
        config.data.world_num_examples.update(dict(train=64, validation=32, test=32))
    train(config, str(workdir))
    return config


@pytest.fixture(scope="module")
def scene(world_cache, tmp_path_factory):
    from vlm_jax.data import world

    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(world.example(3, "validation", image_size=48)["image"]).save(path)  # resized to 32
    return path


def test_sample_image_prints_caption_and_writes_attention_png(world_cache, tmp_path, scene, capsys):
    from vlm_jax import cli
    from vlm_jax.data.tokenizer import Tokenizer
    from vlm_jax.sampling import caption, sample

    # The caption stage of a run of stages (the encoder stage is not needed here).
    run = tmp_path / "sat"
    workdir = run / "caption"
    # Hard attention: its REINFORCE baseline is model state, which sampling restores too.
    _train("show_attend_tell", world_cache, workdir, **{"model.attn_dim": 16, "model.attention": "hard",
                                                          "model.encoder.channels": (8, 8, 16, 16),
                                                          "model.encoder.output_dim": 16})
    (run / "stages.json").write_text('{"order": ["encoder", "caption"]}')
    # The run's folder stands for its last stage.
    assert cli.main(["sample", "--workdir", str(run), "--image", str(scene), "--method", "greedy",
                     "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.splitlines()
    # The default figure path is in the workdir, named after the image.
    assert printed[-1] == f"attention maps: {workdir / 'attention_scene.png'}"
    assert (workdir / "attention_scene.png").is_file()
    png = tmp_path / "maps.png"
    got = caption.caption_image(str(workdir), str(scene), method="greedy", max_new_tokens=6, attention_png=str(png),
                                out=None)
    assert printed[-2] == got["caption"] and got["png"] == str(png)
    # One map per generated piece (eos ends the caption), each a distribution over the 8x8 grid.
    eos = Tokenizer.load(world_cache / "tokenizer.model").eos_id
    pieces = got["ids"].index(eos) if eos in got["ids"] else len(got["ids"])
    assert got["maps"].shape == (pieces, 8, 8)
    np.testing.assert_allclose(got["maps"].sum(axis=(1, 2)), 1.0, atol=1e-5)
    sheet = Image.open(png)
    assert sheet.mode == "RGB" and sheet.size[0] >= 2 * caption.PANEL
    _, _, variables, _ = sample.load_for_sampling(str(workdir))
    assert int(variables["reinforce"]["updates"]) == 2  # the checkpoint's, not the init's 0
    with pytest.raises(ValueError, match="cannot read the image"):
        caption.caption_image(str(workdir), str(tmp_path / "missing.png"), out=None)


@pytest.mark.slow  # CI time: the hard-attention test above restores model state through the same path
def test_sample_image_restores_batch_norm_statistics(world_cache, tmp_path, scene):
    from vlm_jax.sampling import caption, sample

    workdir = tmp_path / "st"
    _train("show_tell", world_cache, workdir, **{"model.image_norm": "batch",
                                                   "model.encoder.channels": (8, 8, 8, 8),
                                                   "model.encoder.output_dim": 16})
    _, _, variables, _ = sample.load_for_sampling(str(workdir))
    stats = variables["batch_stats"]["image_bn"]
    # Two training steps moved the running statistics off their init (mean 0, var 1).
    assert np.abs(np.asarray(stats["mean"])).max() > 0
    got = caption.caption_image(str(workdir), str(scene), method="greedy", max_new_tokens=4, out=None)
    assert isinstance(got["caption"], str) and got["maps"] is None
    with pytest.raises(ValueError, match="no attention over the image"):
        caption.caption_image(str(workdir), str(scene), max_new_tokens=2, attention_png=str(tmp_path / "x.png"),
                              out=None)
    # The CLI writes no figure by default for a model without attention, and refuses one asked for.
    from vlm_jax import cli

    assert cli.main(["sample", "--workdir", str(workdir), "--image", str(scene), "--max-new-tokens", "2"]) == 0
    assert not list(workdir.glob("attention_*.png"))
    with pytest.raises(ValueError, match="no attention over the image"):
        cli.main(["sample", "--workdir", str(workdir), "--image", str(scene), "--attention-png",
                  str(tmp_path / "y.png")])
