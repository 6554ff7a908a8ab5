"""The caption evaluator (evals.captioning): a tiny random Show and Tell on the shared small world,
metric keys and ranges, the held-out subset, the nearest-caption baseline and the metric plumbing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax import evals
from vlm_jax.evals import captioning

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")


@pytest.fixture(scope="module")
def setup(world_cache):
    from vlm_jax import config as config_lib
    from vlm_jax import models
    from vlm_jax.data.tokenizer import Tokenizer

    config = config_lib.load(
        "configs/show_tell.py:tiny",
        {
            "data.tfds_data_dir": str(world_cache / "tfds"),
            "tokenizer.path": str(world_cache / "tokenizer.model"),
            "model.embed_dim": 16,
            "model.hidden": 16,
            "model.encoder.channels": (8, 8, 8, 8),
            "model.encoder.output_dim": 16,
            "model.image_norm": "none",  # no batch_stats: the evaluator gets params alone
        },
    )
    with config.unlocked():
        config.data.world_num_examples.update(dict(train=256, validation=64, test=64))
    tokenizer = Tokenizer.load(world_cache / "tokenizer.model")
    model = models.build(config)
    images, tokens = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2, 8), jnp.int32)
    params = nn.unbox(jax.jit(lambda r: model.init({"params": r}, images, tokens))(jax.random.key(0)))["params"]
    cfg = ml_collections.ConfigDict(
        dict(kinds=("caption",), split="validation", num_examples=64, method="greedy", max_new_tokens=8,
             batch_size=24, baseline=True)
    )
    with config.unlocked():
        config.evals = ml_collections.ConfigDict(dict(val=cfg))
    (evaluator,) = evals.build(config, model, tokenizer, mesh=None)
    return config, model, params, tokenizer, evaluator


def test_metrics_keys_ranges_and_captions(setup):
    _, _, params, _, ev = setup
    assert isinstance(ev, captioning.CaptionEvaluator)
    assert ev.held_out.any() and not ev.held_out.all()  # the world marks some images held out
    out = ev(params, {})
    for prefix in ("val/", "val/heldout/", "val/baseline/", "val/baseline/heldout/"):
        for m in METRICS:
            assert 0.0 <= out[prefix + m] <= 10.0, (prefix + m, out[prefix + m])
    assert len(out) == 4 * len(METRICS)
    assert len(ev.last_captions) == 64 and all(isinstance(c, str) for c in ev.last_captions)
    first = list(ev.last_captions)
    samples = ev.samples()  # what the trainer writes to <workdir>/samples/val_step<N>.jsonl
    assert [s["caption"] for s in samples] == first and [s["image"] for s in samples] == list(range(64))
    assert all(s["references"] == ev.references[s["image"]] for s in samples)
    # An empty model state decodes the same way.
    assert ev(params, {"batch_stats": {}})["val/CIDEr"] == out["val/CIDEr"] and ev.last_captions == first
    # The padded last batch (64 = 24 + 24 + 16) gives the captions of one unpadded batch.
    ev.batch_size = 64
    try:
        assert ev.captions(params) == first
    finally:
        ev.batch_size = 24


def test_baseline_is_deterministic_and_sensible(setup):
    config, _, _, tokenizer, ev = setup
    again = captioning.nearest_captions(config, "validation", ev.data, 5000, tokenizer)
    assert again == ev.baseline_captions and len(again) == 64
    assert all(isinstance(c, str) and c for c in again)
    # Nearest neighbours in pixel space share words with the references: better than nothing.
    assert ev.baseline["BLEU-1"] > 0.2 and ev.baseline["CIDEr"] > 0.0


def test_perfect_captions_score_high(setup, monkeypatch):
    _, _, params, tokenizer, ev = setup
    refs = [caps[0] for caps in ev.data["captions"]]
    ids = [tokenizer.encode(r) + [tokenizer.eos_id] for r in refs]
    monkeypatch.setattr(ev, "generate", lambda params, model_state=None: list(ids))
    out = ev(params)
    assert out["val/CIDEr"] > 1.0 and out["val/BLEU-4"] > 0.5
    assert out["val/heldout/CIDEr"] > 1.0 and out["val/heldout/BLEU-4"] > 0.5
    assert out["val/CIDEr"] > out["val/baseline/CIDEr"]
    assert ev.last_captions == refs


def test_beam_search_and_a_short_last_batch(setup):
    config, model, params, tokenizer, _ = setup
    cfg = ml_collections.ConfigDict(
        dict(kinds=("caption",), split="validation", num_examples=6, method="beam", beam_size=2,
             max_new_tokens=5, batch_size=4)
    )
    ev = captioning.CaptionEvaluator("b", cfg, config, model, tokenizer)
    out = ev(params)
    want = {f"b/{m}" for m in METRICS}
    if ev.held_out.any():
        want |= {f"b/heldout/{m}" for m in METRICS}
    assert set(out) == want and all(0.0 <= v <= 10.0 for v in out.values())
    assert len(ev.last_captions) == 6 and ev.baseline_captions is None


def test_nearest_rows_matches_brute_force_and_excludes():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(300, 12)).astype(np.float32), rng.normal(size=(40, 12)).astype(np.float32)
    brute = np.argmin(((q[:, None] - k[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(captioning.nearest_rows(q, k), brute)
    # A query equal to a key finds it, unless that key is excluded.
    q2 = k[:5].copy()
    np.testing.assert_array_equal(captioning.nearest_rows(q2, k), np.arange(5))
    picked = captioning.nearest_rows(q2, k, exclude=np.array([0, 1, -1, 3, 4]))
    assert picked[2] == 2 and all(picked[i] != i for i in (0, 1, 3, 4))


def test_caption_kind_cannot_be_combined(setup):
    config, model, _, tokenizer, _ = setup
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.evals = ml_collections.ConfigDict(dict(v=dict(kinds=("caption", "accuracy"), split="validation")))
    with pytest.raises(ValueError, match="caption cannot be combined"):
        evals.build(config, model, tokenizer, mesh=None)
