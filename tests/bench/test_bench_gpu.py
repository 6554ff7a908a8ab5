"""The GPU report (`python -m vlm_jax.bench.gpu`): the plain-JAX peers compute our losses, a section
in-process at toy size, the report's arithmetic and failure handling with fake sections, the
import closure on a machine without the data packages, and (slow) the whole --small run.

What the GPU machine lacks, and so the wheel folder of the README's "GPU report" must carry: the
project's own wheel (`pip wheel --no-deps`) and ml-collections (pure Python; it needs absl-py and
PyYAML, which the machine has). The data side (grain, tensorflow-datasets, array-record) and
tensorboardX are not there and must not be needed: test_import_closure_without_data_packages
blocks them, and the slow run works under the same block.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from vlm_jax import models, tasks
from vlm_jax.bench import gpu, gpu_report, gpu_sections, gpu_workloads, lm, plain_clip, plain_llama
from vlm_jax.bench import train as bench_train
from vlm_jax.bench.plain_common import param_count

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What the GPU machine does not have (tensorflow and pillow neither: tfds and image decoding need them).
ABSENT = ("grain", "tensorflow_datasets", "array_record", "tensorboardX", "tensorflow", "PIL")


def _small_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**dict(dict(small=True, interpret=True, configs=None, steps=None, warmup=None,
                                          platform="cpu", deadline_s=None), **kw))


def _float32(config):
    with config.unlocked():
        config.model.dtype = "float32"
    return config


def test_plain_models_compute_our_loss_on_our_params():
    # The same tree as our model's, so the plain init feeds both (cheaper to compile than flax's);
    # float32 so that the two orders of the same arithmetic agree to rounding.
    args = _small_args()
    config = _float32(gpu_workloads.llama_config(args))
    model = models.build(config)
    tokens = lm.random_tokens(int(config.model.vocab_size), (2, 16), 0)
    sizes = plain_llama.Sizes.from_config(config.model)
    params = jax.jit(plain_llama.init_params, static_argnums=0)(sizes, jax.random.key(0))
    ours_shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), tokens))["params"])
    assert jax.tree.map(lambda x: x.shape, ours_shapes) == jax.tree.map(lambda x: x.shape, params)
    batch = {k: jnp.asarray(v) for k, v in lm.lm_batch(tokens).items()}
    ours, plain = jax.jit(lambda p, b: (
        tasks.get("lm").loss_fn(model, p, b, jax.random.key(1), config, {})[0],
        plain_llama.loss(p, b["tokens"], sizes, dtype=jnp.float32, impl="xla")))(params, batch)
    assert float(plain) == pytest.approx(float(ours), rel=1e-5)
    assert param_count(params) == lm.param_counts(model)["total"]

    config = _float32(gpu_workloads.clip_config(args))
    model = models.build(config)
    batch = {k: jnp.asarray(v) for k, v in bench_train.random_batch(config, 4).items()}
    sizes = plain_clip.Sizes.from_config(config.model)
    params = jax.jit(plain_clip.init_params, static_argnums=0)(sizes, jax.random.key(0))
    ours_shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), batch["image"], batch["tokens"]))["params"])
    assert jax.tree.map(lambda x: x.shape, ours_shapes) == jax.tree.map(lambda x: x.shape, params)
    ours, plain = jax.jit(lambda p, b: (
        tasks.get("contrastive").loss_fn(model, p, b, jax.random.key(1), config, {})[0],
        plain_clip.loss(p, b, sizes, dtype=jnp.float32)))(params, batch)
    assert float(plain) == pytest.approx(float(ours), rel=1e-5)
    # Same model, so the same forward FLOPs on the jaxprs (the CLIP MFU's numerator).
    image, text = gpu_sections._clip_abstract_inputs(config)
    ours_flops = gpu_sections._forward_flops(lambda p, i, t: model.apply({"params": p}, i, t), params, image, text)
    plain_flops = gpu_sections._forward_flops(
        lambda p, i, t: (plain_clip.encode_image(p, i, sizes), plain_clip.encode_text(p, t, sizes)), params, image, text)
    assert ours_flops == plain_flops > 0


def test_plain_llama_section_in_process_and_its_mfu():
    result = gpu_sections.llama_plain(_small_args())
    size = gpu_workloads.SMALL
    tokens = size["llama_batch"] * size["llama_length"]
    assert result["items_per_step"] == tokens and result["unit"] == "tokens"
    assert result["items_per_s"] == pytest.approx(tokens / result["median_step_s"])
    assert result["first_step_s"] >= result["compile_s"] > 0
    assert result["attention_impl"] == "xla" and result["attention_refused"] == []
    # A finite loss near log(vocab) at init that the three AdamW steps bring down.
    assert 0 < result["loss_last"] < result["loss_first"] < 2 * jnp.log(128.0)
    model = models.build(gpu_workloads.llama_config(_small_args()))
    counts = lm.param_counts(model)
    assert result["params"] == counts["total"]
    assert result["flops_per_item"] == lm.flops_per_token(counts["non_embedding"], 2, 32, 16, causal=True)

    report = dict(header=dict(peak_tflops=2.0, peak_bandwidth=None), sections={
        "llama_plain": dict(status="ok", result=result)})
    derived = gpu_report.derive(report)["llama"]
    assert derived["impls"]["plain"]["mfu"] == pytest.approx(result["flops_per_item"] * result["items_per_s"] / 2e12)


def _train(impl: str, items_per_s: float, flops: float | None, params: int = 100) -> dict:
    return dict(impl=impl, unit="tokens", items_per_step=64, steps=2, warmup=1, median_step_s=64 / items_per_s,
                mean_step_s=64 / items_per_s, first_step_s=1.0, items_per_s=items_per_s, params=params,
                flops_per_item=flops, loss_first=5.0, loss_last=4.0)


def test_report_arithmetic():
    ok = lambda r: dict(status="ok", result=r, seconds=1.0, timeout_s=10.0, reason="", stderr_tail="")  # noqa: E731
    header = gpu.header(gpu.build_parser().parse_args([]), [])
    decode = dict(batch=1, param_bytes_per_step=2e9, prompt_length=32, new_tokens=128, repeats=3)
    report = dict(header=header, budget_s=100.0, total_s=5.0, order=["probe", "clip_ours"],
                  sections={
                      "probe": ok(dict(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")),
                      "clip_ours": ok(_train("ours", 1000.0, 123e9)),
                      "clip_torch": ok(_train("torch", 800.0, None, params=101)),
                      "decode_ours": ok(dict(decode, cache=dict(tokens_per_s=500.0), no_cache=dict(tokens_per_s=50.0),
                                             greedy_match=True)),
                      "decode_torch": ok(dict(decode, tokens_per_s=250.0, dtype="bfloat16 (cuda)")),
                  })
    derived = gpu_report.derive(report)
    assert derived["peaks"]["flops"] == 989e12 and derived["peaks"]["bandwidth"] == 3.35e12
    clip = derived["clip"]
    # The torch side has no FLOP count of its own: it is charged ours.
    assert clip["impls"]["torch"]["mfu"] == pytest.approx(123e9 * 800 / 989e12)
    assert clip["impls"]["ours"]["mfu"] == pytest.approx(123e9 * 1000 / 989e12)
    assert clip["ours/torch"] == pytest.approx(1.25) and clip["ours/plain"] is None
    assert clip["params_match"] is False
    decode = derived["decode"]
    assert decode["ours_cache"]["bandwidth_fraction"] == pytest.approx(500 * 2e9 / 3.35e12)
    assert decode["torch"]["ms_per_token"] == pytest.approx(4.0) and decode["ours/torch"] == pytest.approx(2.0)
    text = gpu_report.markdown(report)
    assert "# GPU report: NVIDIA H100 80GB HBM3" in text and "PARAMETER COUNTS DIFFER" in text
    assert "| MFU | 12.4% | - | 9.9% |" in text
    # Without the probe, the GPU nvidia-smi names gives the peaks.
    del report["sections"]["probe"]
    report["header"]["gpu"] = "NVIDIA H200, 550.54.15, 143771 MiB"
    assert gpu_report.peaks(report)["bandwidth"] == 4.8e12


def test_sections_share_the_time_left():
    assert sum(s.share for s in gpu.SECTIONS) == 100
    assert gpu.section_timeout(480.0, 6, 100) == pytest.approx(28.8)
    # Time a section left unused goes to the ones after it, in proportion.
    assert gpu.section_timeout(400.0, 10, 50) == pytest.approx(80.0)
    assert gpu.section_timeout(-3.0, 10, 50) == 0.0


FAKE_OK = """
import json, sys
json.dump({result}, open(sys.argv[1], "w"))
"""
FAKE_CRASH = "raise RuntimeError('the fake section exploded')"
FAKE_HANG = "import sys, time; print('hanging here', file=sys.stderr, flush=True); time.sleep(60)"


def test_a_crash_or_a_hang_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "MIN_SECTION_S", 0.1)
    codes = {
        "llama_ours": FAKE_OK.format(result=repr(_train("ours", 1000.0, 1e6))),
        "llama_plain": FAKE_CRASH,
        "llama_torch": FAKE_HANG,
        "decode_torch": FAKE_OK.format(result=repr(dict(section_skipped="no torch here"))),
        "clip_ours": FAKE_OK.format(result=repr(_train("ours", 10.0, 1e9))),
    }
    sections = [gpu.Section(name, "unused:unused", 1) for name in codes]
    argv_for = lambda section, path, timeout, report: [sys.executable, "-c", codes[section.name], path]  # noqa: E731
    header = gpu.header(gpu.build_parser().parse_args(["--peak-tflops", "1"]), ["--peak-tflops", "1"])
    report = gpu.run_all(sections, argv_for, header, budget_s=6.0, out_dir=str(tmp_path), log=None)

    entries = report["sections"]
    assert [entries[n]["status"] for n in codes] == ["ok", "failed", "timeout", "skipped", "ok"]
    assert "the fake section exploded" in entries["llama_plain"]["stderr_tail"]
    assert "hanging here" in entries["llama_torch"]["stderr_tail"]
    assert entries["llama_torch"]["seconds"] < 5.0  # Killed at its share, not after its 60 s sleep.
    assert entries["decode_torch"]["reason"] == "no torch here"
    assert entries["clip_ours"]["result"]["items_per_s"] == 10.0  # Ran after the hang.

    # Both files are there, as after every section.
    saved = json.loads((tmp_path / gpu_report.JSON_NAME).read_text())
    assert saved["sections"]["llama_torch"]["status"] == "timeout"
    assert saved["derived"]["llama"]["impls"]["ours"]["mfu"] == pytest.approx(1e6 * 1000 / 1e12)
    text = (tmp_path / gpu_report.MARKDOWN_NAME).read_text()
    assert "- llama_plain: failed: exit status 1" in text
    assert "- llama_torch: timeout: timed out after" in text
    assert "- decode_torch: skipped: no torch here" in text
    assert "## Failures: the end of each stderr" in text and "RuntimeError: the fake section exploded" in text
    assert "| llama_ours | ok |" in text


# Hides ABSENT from every import finder, so they behave as not installed: `import` raises
# ModuleNotFoundError and importlib.util.find_spec returns None (a finder that raised instead would
# break torch, which probes for tensorflow with find_spec).
BLOCKER = f"""
import sys

ABSENT = {ABSENT!r}


class Hidden:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)


sys.meta_path[:] = [Hidden(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
"""


def _blocked_env(tmp_path) -> dict[str, str]:
    """An environment whose Pythons (children too) cannot import ABSENT: a sitecustomize on PYTHONPATH."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


def test_import_closure_without_data_packages(tmp_path):
    code = textwrap.dedent(f"""
        import importlib, sys
        import vlm_jax.bench.gpu as gpu
        for name in gpu.section_modules():
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {ABSENT!r})
        assert not loaded, loaded
        print("imported", len(gpu.section_modules()), "section modules")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_blocked_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"imported {len(gpu.section_modules())} section modules" in proc.stdout


@pytest.mark.slow  # About 2 minutes on 2 cores: every section as a child process.
def test_small_interpret_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "vlm_jax.bench.gpu", "--small", "--interpret", "--out", str(out),
         "--peak-tflops", "1", "--peak-bandwidth", "1e11"],
        cwd=REPO, env=_blocked_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / gpu_report.JSON_NAME).read_text())
    text = (out / gpu_report.MARKDOWN_NAME).read_text()
    assert text in proc.stdout  # Printed at the end.
    for name in report["order"]:
        assert report["sections"][name]["status"] == "ok", (name, report["sections"][name])
    assert report["order"] == [s.name for s in gpu.SECTIONS]

    tests = report["sections"]["kernel_tests"]["result"]
    assert tests["failed"] == tests["errors"] == 0 and tests["passed"] + tests["skipped"] > 0
    assert "GPU kernel tests" in text and f"{tests['skipped']} skipped" in text
    derived = report["derived"]
    for workload in ("llama", "clip"):
        d = derived[workload]
        assert d["params_match"] and d["flops_match"], d
        for impl in ("ours", "plain", "torch"):
            assert d["impls"][impl]["items_per_s"] > 0 and 0 < d["impls"][impl]["mfu"] < 1, (workload, impl)
            result = report["sections"][f"{workload}_{impl}"]["result"]
            assert jnp.isfinite(result["loss_first"]) and jnp.isfinite(result["loss_last"])
        assert d["ours/plain"] > 0 and d["ours/torch"] > 0
    for side in ("ours_cache", "ours_no_cache", "torch"):
        assert 0 < derived["decode"][side]["bandwidth_fraction"] < 1, side
    assert report["sections"]["decode_ours"]["result"]["greedy_match"]
    for heading in ("## LLaMA train step", "## CLIP ViT-B/16 train step", "## Batch-1 decode",
                    "## Kernels", "| attention bf16 |", "| vq lookup |", "ratios (tokens/s): ours/plain JAX"):
        assert heading in text, heading
