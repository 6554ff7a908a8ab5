"""The kernel benchmark: every row is there, XLA matches the float32 reference, and implementations
that cannot run here (cuDNN on CPU; our kernels while they do not exist) show n/a instead of crashing.
"""

import json

import jax
import pytest

from vlm_jax.bench import kernels as bench

ATTENTION_COLUMNS = set(bench.ATTENTION_IMPLS)


def _shape(b, s, h, d):
    return f"B{b} S{s} H{h} D{d}"


@pytest.mark.slow  # CI time (23 s): the kernels themselves are tested in tests/kernels
def test_small_interpret_run(tmp_path, capsys):
    path = tmp_path / "kernels.json"
    result = bench.main(["--small", "--interpret", "--repeats", "1", "--json", str(path)])
    table = capsys.readouterr().out
    rows = result["rows"]

    # One attention row per shape x mask x pass x column, one VQ row per shape x dtype x column.
    attention = [r for r in rows if r["section"] == "attention"]
    vq = [r for r in rows if r["section"] == "vq"]
    assert len(attention) == len(bench.SMALL_ATTENTION_SHAPES) * 2 * 2 * len(ATTENTION_COLUMNS)
    assert len(vq) == len(bench.SMALL_VQ_SHAPES) * 2 * len(bench.VQ_IMPLS)
    lines = table.splitlines()
    assert lines[0].startswith("# kernels on ") and jax.__version__ in lines[0]
    for shape in bench.SMALL_ATTENTION_SHAPES:
        for mask in ("full", "causal"):
            for pass_ in ("fwd", "fwd+bwd"):
                assert any(_shape(*shape) in line and f"| {mask} " in line and f"| {pass_} " in line
                           for line in lines), (shape, mask, pass_)
    for n, d, k in bench.SMALL_VQ_SHAPES:
        for dtype in ("float32", "bfloat16"):
            assert any(f"N{n} d{d} K{k}" in line and dtype in line for line in lines), (n, d, k, dtype)
    assert lines[-1].startswith("targets at ")

    # Every cell either measured or explained; nothing ours failed in a way the run did not survive.
    for row in rows:
        assert row["status"] in ("ok", "n/a", "failed"), row
        assert row["status"] == "ok" or row["reason"], row
        if row["impl"] not in ("ours", "ours_h1"):
            assert row["status"] != "failed", row

    # XLA is close to the float32 reference (bf16 inputs; S <= 128), and its VQ indices agree.
    for row in attention:
        if row["impl"] == "xla":
            assert row["status"] == "ok", row
            assert row["tflops"] > 0 and row["err_out"] < 0.05, row
            if row["pass"] == "fwd+bwd":
                assert row["err_grad"] < 0.05, row
        if row["impl"] in ("ours", "ours_h1"):  # Both short shapes: several heads per program or one.
            assert row["status"] == "ok", row
            assert row["err_out"] < 0.05 and row.get("err_grad", 0.0) < 0.05, row
    for row in vq:
        if row["impl"] == "xla":
            assert row["status"] == "ok" and row["index_agreement"] > 0.99, row
        assert row["status"] != "ok" or row["temp_bytes"] is None or row["temp_bytes"] >= 0

    # cuDNN cannot run on CPU: n/a with the reason, both in the rows and the table.
    assert all(r["status"] == "n/a" and "GPU" in r["reason"] for r in attention if r["impl"] == "cudnn")
    assert "n/a (cuDNN needs an NVIDIA GPU" in table
    # JAX's Pallas mha runs in interpret mode at the aligned shape.
    b, s, h, d = bench.SMALL_ATTENTION_SHAPES[0]
    mha = [r for r in attention if r["impl"] == "jax_mha" and r["S"] == s]
    assert mha and all(r["status"] == "ok" for r in mha), mha

    data = json.loads(path.read_text())
    assert len(data["rows"]) == len(rows)
    assert data["header"]["jax"] == jax.__version__
    assert data["target_shape"] == list(bench.SMALL_ATTENTION_SHAPES[0])
    assert "ours/jax_mha fwd+bwd full" in data["ratios"] and "ours/cudnn fwd causal" in data["ratios"]
    assert data["ratios"][f"ours/ours_h1 B{b} S{s} fwd+bwd causal"] > 0
    assert data["ratios"][f"ours/xla B{b} S{s} fwd full"] > 0


def test_without_interpret_pallas_is_na_on_cpu(capsys):
    result = bench.main(["--small", "--only", "vq", "--repeats", "1", "--vq-dtype", "float32"])
    ours = [r for r in result["rows"] if r["impl"] == "ours"]
    assert ours and all(r["status"] == "n/a" and "needs a GPU" in r["reason"] for r in ours)
    assert "n/a (pallas_gpu needs a GPU" in capsys.readouterr().out
    assert all(r["status"] == "ok" for r in result["rows"] if r["impl"] == "xla")


def test_an_error_in_our_kernel_is_reported_not_raised(monkeypatch, capsys):
    import vlm_jax.kernels

    def broken(*args, impl="auto", **kwargs):
        if impl == "xla":
            return bench.importlib.import_module("vlm_jax.kernels.attention.reference").attention(
                *args, causal=kwargs["causal"], sm_scale=kwargs["sm_scale"])
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(vlm_jax.kernels, "attention", broken)
    monkeypatch.setattr(bench, "platform", lambda: "gpu")  # So that ours is called without --interpret.
    monkeypatch.setattr(bench, "SMALL_ATTENTION_SHAPES", ((1, 16, 1, 16),))
    result = bench.main(["--small", "--only", "attention", "--repeats", "1", "--warmup", "0"])
    ours = [r for r in result["rows"] if r["impl"] == "ours"]
    assert len(ours) == 4 and all(r["status"] == "failed" and "kernel exploded" in r["reason"] for r in ours)
    assert "FAILED (RuntimeError: kernel exploded)" in capsys.readouterr().out
