"""The train-step benchmark: ours and the PyTorch peer both run, on models of identical size."""

import os

import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax.bench import train as bench

pytest.importorskip("torch")
pytest.importorskip("transformers")

CLIP_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "clip.py")
# 2 timed steps after 1 warmup; the batch splits evenly over conftest's 8 fake devices.
QUICK = ["--steps", "2", "--warmup", "1", "--batch-size", "8"]
SMALL_TEXT = [
    "--config.model.text.width=32", "--config.model.text.heads=2", "--config.model.text.depth=1",
    "--config.model.embed_dim=24",
]


def _check(result: dict) -> None:
    assert result["ours"]["examples_per_s"] > 0
    assert result["peer"] is not None, result["peer_skipped"]
    assert result["peer"]["examples_per_s"] > 0
    assert result["ratio"] > 0
    assert result["ours"]["params"]["total"] > 0
    assert result["params_match"]
    assert result["ours"]["params"] == result["peer"]["params"]


@pytest.mark.slow  # the default suite's budget; test_peer_none_skips_the_peer runs the bench's wiring
def test_cnn_tower_against_its_torch_mirror(capsys):
    result = bench.main(
        ["--config", f"{CLIP_CONFIG}:tiny", *QUICK, *SMALL_TEXT,
         "--config.model.image.channels=(8, 16)"]
    )
    _check(result)
    assert result["image_kind"] == "cnn"
    # Both towers (and the temperature) have the same sizes, not merely the same total.
    assert result["ours"]["params"]["image"] == result["peer"]["params"]["image"] > 0
    assert result["ours"]["params"]["other"] == 1
    table = capsys.readouterr().out
    assert "ratio ours/peer" in table and "param counts match" in table


@pytest.mark.slow  # CI time
def test_vit_tower_against_hugging_face_clip():
    # tiny's image section has no ViT keys and overrides cannot add keys, so the ViT case starts
    # from b32 (whose image section has them all) and shrinks it.
    result = bench.main(
        ["--config", f"{CLIP_CONFIG}:b32", *QUICK, *SMALL_TEXT,
         "--config.model.image.width=32", "--config.model.image.depth=1",
         "--config.model.image.heads=2", "--config.model.image.patch_size=8",
         "--config.model.image.image_size=32", "--config.data.image_size=32",
         "--config.model.text.vocab_size=300", "--config.model.text.eos_id=299",
         "--config.model.text.context_length=12", "--config.data.text_length=12",
         "--config.model.dtype=float32", "--config.model.scan_layers=false"]
    )
    _check(result)
    assert result["image_kind"] == "vit"
    assert result["peer"]["name"].startswith("HF transformers CLIPModel")


def test_peer_none_skips_the_peer(monkeypatch):
    # Only the wiring is under test here; the two tests above already time a real step.
    fake = dict(examples_per_s=1.0, median_step_s=1.0, mean_step_s=1.0, first_step_s=1.0,
                name="stub", mesh={}, params=dict(image=1, text=1, other=1, total=3),
                dtype="float32", where="stub")
    monkeypatch.setattr(bench, "bench_ours", lambda *args, **kwargs: fake)

    def no_peer(*args, **kwargs):
        raise AssertionError("--peer none must not build the peer")

    monkeypatch.setattr(bench, "bench_peer", no_peer)
    result = bench.main(["--config", f"{CLIP_CONFIG}:tiny", "--peer", "none", *QUICK])
    assert result["peer"] is None and result["peer_skipped"] == "--peer none"
    assert result["ratio"] is None
    assert "skipped: --peer none" in bench.format_table(result)


def test_random_batch_has_one_eos_per_row():
    config = config_lib.load(f"{CLIP_CONFIG}:tiny")
    batch = bench.random_batch(config, 32)
    eos, length = config.model.text.eos_id, config.data.text_length
    assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.float32
    # The tiny config trains with hard negatives, so the benchmark batch carries them too.
    for tokens in (batch["tokens"], batch["negative_tokens"]):
        assert tokens.shape == (32, length) and tokens.dtype == np.int32
        np.testing.assert_array_equal((tokens == eos).sum(axis=1), 1)
        assert tokens.min() >= 0 and tokens.max() < config.model.text.vocab_size
    assert (batch["tokens"] != batch["negative_tokens"]).any()
    config.data.hard_negatives = False
    assert "negative_tokens" not in bench.random_batch(config, 4)
