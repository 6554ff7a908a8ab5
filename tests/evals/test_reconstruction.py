"""evals.reconstruction on hand-made cases: perfect reconstructions score 1.0, scrambled ones low."""

import os

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

from vlm_jax import config as config_lib
from vlm_jax import evals, models
from vlm_jax.data import pipeline, world
from vlm_jax.data.normalise import normalise
from vlm_jax.evals import reconstruction

N = 24


def _config():
    cfg = config_lib.load("configs/dalle.py:tokenizer_tiny")
    with cfg.unlocked():
        cfg.model.update(dict(num_codes=16, hidden=8, channel_mults=(1, 2, 4), embed_dim=8))
        cfg.evals.val.update(dict(num_examples=N, batch_size=8, num_png=10))
    return cfg


def _world_eval_data(config, split, num_examples, tokenizer, **kw):
    examples = [world.example(i, split, image_size=32) for i in range(int(num_examples))]
    return {
        "image": normalise(np.stack([ex["image"] for ex in examples]), config),
        "objects": [ex["objects"] for ex in examples],
        "index": np.arange(len(examples), dtype=np.int32),
    }


@pytest.fixture
def evaluator(monkeypatch):
    monkeypatch.setattr(pipeline, "eval_data", _world_eval_data)
    cfg = _config()
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    (ev,) = evals.build(cfg, models.build(cfg), None, mesh)
    assert isinstance(ev, reconstruction.ReconstructionEvaluator)
    return ev


def _with_reconstruction(ev, monkeypatch, images, codes=None):
    codes = np.zeros((len(images), 8, 8), np.int32) if codes is None else codes
    monkeypatch.setattr(ev, "reconstruct", lambda params, model_state=None: (codes, images))


def test_a_perfect_reconstruction_scores_one(evaluator, monkeypatch, tmp_path):
    codes = np.arange(N * 64).reshape(N, 8, 8) % 16
    _with_reconstruction(evaluator, monkeypatch, evaluator.data["image"].copy(), codes)
    out = evaluator({})
    for key in ("color_acc", "shape_acc", "size_acc", "position_acc", "main_acc", "all_acc"):
        assert out[f"val/recon/{key}"] == 1.0, key
    assert out["val/recon/mse"] == 0.0
    np.testing.assert_allclose(out["val/recon/perplexity"], 16.0, rtol=1e-9)
    assert out["val/recon/dead_codes"] == 0.0
    path = evaluator.write_grid(str(tmp_path / "samples"), 7)
    assert os.path.basename(path) == "val_step7.png"
    png = np.asarray(Image.open(path))
    # 10 images in rows of 8: two bands of (originals, reconstructions), 4x upscaled, 2 px gaps.
    assert png.shape == (4 * (128 + 2) + 2, 8 * (128 + 2) + 2, 3)
    np.testing.assert_array_equal(png[2:130:4, 2:130:4], evaluator.originals[0])
    np.testing.assert_array_equal(png[132:260:4, 2:130:4], evaluator.last_reconstructions[0])


def test_scrambled_reconstructions_score_low(evaluator, monkeypatch):
    images = evaluator.data["image"]
    _with_reconstruction(evaluator, monkeypatch, np.roll(images, 1, axis=0))  # each shows another scene
    out = evaluator({})
    assert out["val/recon/main_acc"] < 0.2 and out["val/recon/all_acc"] < 0.2
    assert out["val/recon/color_acc"] < 0.5 and out["val/recon/mse"] > 0.05
    assert out["val/recon/perplexity"] == 1.0 and out["val/recon/dead_codes"] == 15.0
    blank = np.full_like(images, images[0, 0, 0])  # background only: nothing found
    _with_reconstruction(evaluator, monkeypatch, blank)
    assert evaluator({})["val/recon/all_acc"] == 0.0


def test_bad_input_is_a_clear_error(evaluator):
    """(The path through a real model, encode_codes then decode_codes, runs in the train smoke test
    of tests/tasks/test_image_tokenizer.py.)"""
    cfg = _config()
    model = models.build(cfg)
    with pytest.raises(ValueError, match="outside"):
        reconstruction.codebook_usage(np.asarray([0, 16]), 16)
    with pytest.raises(ValueError, match="nothing reconstructed"):
        evaluator.write_grid("/tmp", 0)
    bad = ml_collections.ConfigDict(dict(val=dict(kinds=("reconstruction", "zero_shot"), split="validation")))
    with cfg.unlocked():
        cfg.evals = bad
    with pytest.raises(ValueError, match="cannot be combined"):
        evals.build(cfg, model, None, None)
    with cfg.unlocked():
        cfg.evals.val.kinds = ("reconstruction",)
    with pytest.raises(ValueError, match="image tokenizer"):
        reconstruction.ReconstructionEvaluator("val", cfg.evals.val, cfg, object(), None, None)
