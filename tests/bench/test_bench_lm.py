"""The LLaMA benchmark: one --small run end to end, and its FLOPs / params / peaks arithmetic."""

import importlib.util
import json
import os
import types

import pytest

from vlm_jax import config as config_lib
from vlm_jax import models
from vlm_jax.bench import lm as bench

LLAMA_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "llama.py")
HAVE_PEER = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


@pytest.mark.parametrize("peer", [
    False,
    # -m slow (the default suite's budget): the PyTorch / transformers peer measured beside ours.
    pytest.param(True, marks=[pytest.mark.slow, pytest.mark.skipif(not HAVE_PEER, reason="no torch/transformers")]),
])
def test_small_run_end_to_end(tmp_path, capsys, peer):
    path = tmp_path / "lm.json"
    # conftest makes 8 fake CPU devices; --small's batch of 2 trains on one of them. The peak
    # flags turn on the device report that a CPU otherwise skips.
    argv = ["--config", f"{LLAMA_CONFIG}:tiny", "--small", "--devices", "1", "--json", str(path),
            "--peak-tflops", "1", "--peak-bandwidth", "1e11"]
    result = bench.main(argv + ([] if peer else ["--no-peer"]))
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    train, decode, report = result["train"], result["decode"], result["device_report"]
    tokens = bench.SMALL_RUN["batch"] * bench.SMALL_RUN["length"]
    assert train["batch"] * train["length"] == tokens
    ours = train["ours"]
    assert ours["tokens_per_s"] > 0 and ours["tokens_per_s"] == pytest.approx(tokens / ours["median_step_s"])
    for side in ("cache", "no_cache"):
        assert decode[side]["tokens_per_s"] > 0
    assert decode["greedy_match"]
    assert decode["cache_speedup"] == pytest.approx(
        decode["cache"]["tokens_per_s"] / decode["no_cache"]["tokens_per_s"])
    small = bench.SMALL_MODEL
    assert result["model"]["width"] == small["width"] and result["params"]["total"] > 0

    # MFU and the bandwidth fraction from the flags' peaks.
    assert report["mfu"] == pytest.approx(result["flops_per_token"] * ours["tokens_per_s"] / 1e12)
    steps_per_s = decode["cache"]["tokens_per_s"] / decode["batch"]
    assert report["decode_bandwidth_fraction"] == pytest.approx(
        steps_per_s * decode["param_bytes_per_step"] / 1e11)
    # float32 params less the [128, 32] embedding table.
    assert decode["param_bytes_per_step"] == 4 * result["params"]["non_embedding"]

    table = capsys.readouterr().out
    assert "train MFU" in table and "KV cache speedup" in table
    if not peer:
        assert train["peer"] is None and train["peer_skipped"] == "--no-peer"
        return
    theirs = train["peer"]
    assert theirs["tokens_per_s"] > 0 and decode["peer"]["tokens_per_s"] > 0
    assert train["ratio"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
    assert train["params_match"] and theirs["params"] == result["params"]["total"]
    assert "ratio ours/peer" in table and "param counts match" in table


def test_flops_per_token_by_hand():
    config = config_lib.load(f"{LLAMA_CONFIG}:tiny")  # vocab 512, width 128, 4 layers, 4/2 heads
    per_layer = (
        128 * 128 + 2 * 128 * 64 + 128 * 128  # query, key + value (2 kv heads of 32), out
        + 3 * 128 * 344  # gate, up, down
        + 2 * 128  # the two RMSNorm scales
    )
    non_embedding = 4 * per_layer + 128 + 128 * 512  # + final norm + untied lm_head
    counts = bench.param_counts(models.build(config))
    assert counts == dict(total=non_embedding + 512 * 128, embedding=512 * 128,
                          non_embedding=non_embedding)
    assert non_embedding == 791_680
    # 6 N + 12 L (H D) T at T = 128.
    assert bench.flops_per_token(non_embedding, 4, 128, 128) == 6 * 791_680 + 12 * 4 * 128 * 128
    assert bench.flops_per_token(non_embedding, 4, 128, 128) == 5_536_512


def test_tinyllama_param_count():
    config = config_lib.load(f"{LLAMA_CONFIG}:tinyllama_1b")
    counts = bench.param_counts(models.build(config))
    assert counts["total"] == 1_100_048_384  # TinyLlama-1.1B's published checkpoint
    assert counts["non_embedding"] == counts["total"] - 32000 * 2048


def test_device_peaks_table_and_flags():
    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert bench.device_peaks(h100)["flops"] == 989e12
    assert bench.device_peaks(h100)["bandwidth"] == 3.35e12
    h200 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")
    assert bench.device_peaks(h200)["bandwidth"] == 4.8e12
    mixed = bench.device_peaks(h100, peak_tflops=500)
    assert mixed["flops"] == 500e12 and mixed["bandwidth"] == 3.35e12
    cpu = types.SimpleNamespace(platform="cpu", device_kind="cpu")
    assert bench.device_peaks(cpu)["flops"] is None and bench.device_peaks(cpu)["bandwidth"] is None
