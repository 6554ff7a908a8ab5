"""The GPU report's output: figures derived from the sections' results (MFU, bandwidth fraction,
ratios), the markdown tables and the JSON, rewritten after every section.

A report is a dict: header (device, versions, flags), budget_s, order (section names), sections
({name: {status, seconds, timeout_s, result, reason, stderr_tail}}), total_s. `derive` adds the
derived figures; `markdown` renders it.
"""

from __future__ import annotations

import os
import types
from collections.abc import Sequence
from typing import Any

from vlm_jax.bench.common import device_peaks, write_json

TRAIN_WORKLOADS = (
    ("llama", "LLaMA train step (tinyllama_1b)", "tokens"),
    ("clip", "CLIP ViT-B/16 train step", "images"),
)
IMPLS = (("ours", "ours"), ("plain", "plain JAX"), ("torch", "PyTorch"))
MARKDOWN_NAME, JSON_NAME = "gpu_report.md", "gpu_report.json"
TAIL_LINES = 12


def _result(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    entry = report["sections"].get(name)
    return entry["result"] if entry and entry["status"] == "ok" else None


def peaks(report: dict[str, Any]) -> dict[str, Any]:
    """Peak FLOP/s and bandwidth of the probed device (DEVICE_PEAKS; without the probe, of the GPU
    nvidia-smi names), or from the flags."""
    probe, header = _result(report, "probe") or {}, report["header"]
    if not probe and header.get("gpu"):
        probe = dict(platform="gpu", device_kind=header["gpu"].split(",")[0])
    device = types.SimpleNamespace(platform=probe.get("platform", "unknown"),
                                   device_kind=probe.get("device_kind", "unknown"))
    return device_peaks(device, header.get("peak_tflops"), header.get("peak_bandwidth"))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def derive_train(report: dict[str, Any], workload: str, peak_flops: float | None) -> dict[str, Any]:
    """Per implementation: MFU (model FLOPs per item x items/s / peak); ours/peer ratios; params.

    An implementation without a FLOP count of its own (the torch CLIP) uses ours', else plain's.
    """
    results = {impl: _result(report, f"{workload}_{impl}") for impl, _ in IMPLS}
    counted = [r["flops_per_item"] for r in results.values() if r and r.get("flops_per_item")]
    out: dict[str, Any] = dict(impls={}, flops_per_item=counted[0] if counted else None)
    for impl, r in results.items():
        if not r:
            continue
        flops = r.get("flops_per_item") or out["flops_per_item"]
        out["impls"][impl] = dict(
            mfu=flops * r["items_per_s"] / peak_flops if flops and peak_flops else None,
            flops_per_item=flops, items_per_s=r["items_per_s"], ms_per_step=1e3 * r["median_step_s"])
    ours = results["ours"]
    for impl in ("plain", "torch"):
        out[f"ours/{impl}"] = _ratio(ours and ours["items_per_s"], results[impl] and results[impl]["items_per_s"])
    counts = {impl: r["params"] for impl, r in results.items() if r}
    out["params"] = counts
    out["params_match"] = len(set(counts.values())) <= 1 if counts else None
    flops_seen = {impl: r["flops_per_item"] for impl, r in results.items() if r and r.get("flops_per_item")}
    out["flops_match"] = len({round(f) for f in flops_seen.values()}) <= 1 if flops_seen else None
    return out


def derive_decode(report: dict[str, Any], peak_bandwidth: float | None) -> dict[str, Any]:
    """Per side: tokens/s, ms/token and (batch-1 steps/s x param bytes a step) / peak bandwidth."""
    out: dict[str, Any] = {}
    sides = (("ours_cache", "decode_ours", "cache"), ("ours_no_cache", "decode_ours", "no_cache"),
             ("torch", "decode_torch", None))
    for side, section, key in sides:
        r = _result(report, section)
        if not r:
            continue
        rate = (r[key] if key else r)["tokens_per_s"]
        fraction = rate / r["batch"] * r["param_bytes_per_step"] / peak_bandwidth if peak_bandwidth else None
        out[side] = dict(tokens_per_s=rate, ms_per_token=1e3 * r["batch"] / rate,
                         bandwidth_fraction=fraction, param_bytes_per_step=r["param_bytes_per_step"])
    if "ours_cache" in out and "torch" in out:
        out["ours/torch"] = out["ours_cache"]["tokens_per_s"] / out["torch"]["tokens_per_s"]
    return out


def derive(report: dict[str, Any]) -> dict[str, Any]:
    """The derived figures of every workload (recomputed whenever the report is written)."""
    p = peaks(report)
    derived: dict[str, Any] = dict(peaks=p)
    for workload, _, _ in TRAIN_WORKLOADS:
        derived[workload] = derive_train(report, workload, p["flops"])
    derived["decode"] = derive_decode(report, p["bandwidth"])
    return derived


def _num(value: float | None, fmt: str = ",.1f", scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:{fmt}}{suffix}"


def _table(titles: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in titles) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _status_line(report: dict[str, Any], names: Sequence[str]) -> list[str]:
    """'name: status (reason)' for each of `names` that did not finish ok."""
    lines = []
    for name in names:
        entry = report["sections"].get(name)
        if entry is None:
            lines.append(f"- {name}: not run")
        elif entry["status"] != "ok":
            lines.append(f"- {name}: {entry['status']}: {entry['reason']}")
    return lines


def _train_markdown(report: dict[str, Any], workload: str, title: str, unit: str) -> list[str]:
    d = report["derived"][workload]
    results = {impl: _result(report, f"{workload}_{impl}") for impl, _ in IMPLS}
    first = next((r for r in results.values() if r), None)
    lines = [f"## {title}", ""]
    if first is None:
        return lines + ["nothing measured", *_status_line(report, [f"{workload}_{i}" for i, _ in IMPLS]), ""]
    lines.append(f"batch {first['items_per_step']:,} {unit} a step; median of {first['steps']}"
                 f" timed steps after {first['warmup']} warm-up (the first includes the compile)")

    def row(label: str, cell: Any) -> list[str]:
        return [label] + [cell(r, d["impls"].get(impl, {})) if r else "-" for impl, r in results.items()]

    rows = [
        row("ms/step", lambda r, x: _num(x["ms_per_step"])),
        row(f"{unit}/s", lambda r, x: _num(x["items_per_s"], ",.0f")),
        row("MFU", lambda r, x: _num(x["mfu"], ".1%")),
        row("first step (s, compile)", lambda r, x: _num(r["first_step_s"], ".1f")),
        row("loss first -> last step", lambda r, x: f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}"),
        row("params", lambda r, x: f"{r['params']:,}"),
        row("attention", lambda r, x: r.get("attention", "-")),
        row("compute", lambda r, x: r.get("compute", "-")),
        row("optimizer", lambda r, x: r.get("optimizer", "-")),
        row("implementation", lambda r, x: r.get("name", "-")),
    ]
    lines += [""] + _table([""] + [label for _, label in IMPLS], rows) + [""]
    ratios = [f"ours/{label}: {_num(d[f'ours/{impl}'], '.2f', suffix='x')}" for impl, label in IMPLS[1:]]
    lines.append(f"ratios ({unit}/s): " + "; ".join(ratios))
    lines.append("losses: ours follows the config's learning-rate warmup (from 0), the peers a constant rate; "
                 "each side starts from its own random init (the work of a step is the same)")
    flops = d["flops_per_item"]
    peak = report["derived"]["peaks"]["flops"]
    lines.append(f"model FLOPs per {unit[:-1]}: {_num(flops, ',.4g')}"
                 + (" (6 x non-embedding params + causal attention)" if workload == "llama"
                    else " (3 x the forward's matmul FLOPs, counted on our forward's jaxpr)")
                 + f"; MFU against {_num(peak, ',.0f', 1e-12)} TFLOP/s dense bf16")
    if d["params_match"] is False:
        lines.append("PARAMETER COUNTS DIFFER: " + ", ".join(f"{k} {v:,}" for k, v in d["params"].items()))
    elif d["params_match"]:
        lines.append("parameter counts match")
    if d["flops_match"] is False:
        lines.append("FLOP COUNTS DIFFER between implementations: " + ", ".join(
            f"{impl} {r['flops_per_item']:,.4g}" for impl, r in results.items() if r and r.get("flops_per_item")))
    refused = [x for r in results.values() if r for x in r.get("attention_refused", [])]
    lines += [f"refused attention implementation: {x}" for x in refused]
    return lines + _status_line(report, [f"{workload}_{i}" for i, _ in IMPLS]) + [""]


def _decode_markdown(report: dict[str, Any]) -> list[str]:
    d = report["derived"]["decode"]
    ours, torch = _result(report, "decode_ours"), _result(report, "decode_torch")
    lines = ["## Batch-1 decode (tinyllama_1b, greedy, bf16 params)", ""]
    first = ours or torch
    if first:
        lines.append(f"{first['prompt_length']}-token prompt + {first['new_tokens']} new tokens (prefill included), "
                     f"median of {first['repeats']} runs after one warm-up")
        rows = []
        for side, label in (("ours_cache", "ours, KV cache"), ("ours_no_cache", "ours, no cache"),
                            ("torch", "PyTorch HF generate, KV cache")):
            x = d.get(side)
            rows.append([label] + ([_num(x["tokens_per_s"]), _num(x["ms_per_token"], ".2f"),
                                    _num(x["bandwidth_fraction"], ".1%"), _num(x["param_bytes_per_step"], ",.0f")]
                                   if x else ["-"] * 4))
        lines += [""] + _table(["", "tokens/s", "ms/token", "of bandwidth", "param bytes a step"], rows) + [""]
        bandwidth = report["derived"]["peaks"]["bandwidth"]
        lines.append(f"ratio ours/PyTorch (KV cache): {_num(d.get('ours/torch'), '.2f', suffix='x')}; bandwidth "
                     f"fraction = steps/s x param bytes a step / {_num(bandwidth, '.3g', 1e-12)} TB/s (the KV "
                     "cache's reads left out: a lower bound)")
        if ours:
            lines.append(f"ours with and without the cache pick the same tokens: {ours['greedy_match']}")
        if torch:
            lines.append(f"PyTorch: {torch['dtype']}")
    return lines + _status_line(report, ["decode_ours", "decode_torch"]) + [""]


def _kernel_tests_markdown(report: dict[str, Any]) -> list[str]:
    lines = ["## GPU kernel tests", ""]
    r = _result(report, "kernel_tests")
    if r and r.get("timed_out"):
        lines.append(f"pytest timed out after {r['timeout_s']:.0f} s (`{r['command']}`); end of its output:")
        lines += ["```", *r["output_tail"].splitlines()[-TAIL_LINES:], "```"]
    elif r and not r.get("no_junit"):
        lines.append(f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped, {r['errors']} errors "
                     f"in {r['seconds']:.0f} s (`{r['command']}`, JAX_PLATFORMS={r['jax_platforms'] or 'unset'})")
        lines += [f"- FAILED {x}" for x in r["failing"]]
        lines += [f"- skipped: {x}" for x in r["skip_reasons"]]
    elif r:
        lines.append(f"pytest exited {r['returncode']} without a JUnit report; end of its output:")
        lines += ["```", *r["output_tail"].splitlines()[-TAIL_LINES:], "```"]
    return lines + _status_line(report, ["kernel_tests"]) + [""]


def _kernels_markdown(report: dict[str, Any]) -> list[str]:
    lines = ["## Kernels (`python -m vlm_jax.bench.kernels`)", ""]
    for name in ("kernels_vq", "kernels_attention"):
        r = _result(report, name)
        if r:
            table = r["table"].splitlines()
            lines += [table[0].lstrip("# "), ""] + table[1:] + [""]
    return lines + _status_line(report, ["kernels_vq", "kernels_attention"]) + [""]


def _header_markdown(report: dict[str, Any]) -> list[str]:
    h, p = report["header"], report["derived"]["peaks"]
    probe = _result(report, "probe") or {}
    versions = ", ".join(f"{k} {v}" for k, v in h["versions"].items())
    lines = [
        f"# GPU report: {probe.get('device_kind', h.get('gpu') or 'device unknown (the probe did not run)')}",
        "",
        f"- {h['date']}; `{h['command']}`; budget {report['budget_s']:.0f} s, took {report['total_s']:.0f} s",
        f"- platform {probe.get('platform', '?')} x{probe.get('device_count', '?')}; {versions}; "
        f"Python {h['python']}",
        f"- peaks: {_num(p['flops'], ',.0f', 1e-12, ' TFLOP/s')} dense bf16, "
        f"{_num(p['bandwidth'], '.3g', 1e-12, ' TB/s')} (from {p['source']})"
        + ("" if p["flops"] and p["bandwidth"] else "; unknown ones leave MFU / bandwidth fractions out: "
           "pass --peak-tflops / --peak-bandwidth"),
    ]
    if h.get("small"):
        lines.append("- `--small`: toy shapes on this machine; no figure here says anything about a GPU")
    lines += ["", "| section | status | seconds | timeout (s) |", "|---|---|---|---|"]
    for name in report["order"]:
        e = report["sections"].get(name)
        lines.append(f"| {name} | {e['status'] if e else 'not run'} | {_num(e and e['seconds'])} | "
                     f"{_num(e and e['timeout_s'], '.0f')} |")
    return lines + [""]


def _failures_markdown(report: dict[str, Any]) -> list[str]:
    lines = []
    for name in report["order"]:
        e = report["sections"].get(name)
        if e and e["status"] in ("failed", "timeout") and e.get("stderr_tail"):
            lines += [f"### {name}: {e['reason']}", "", "```", *e["stderr_tail"].splitlines()[-TAIL_LINES:], "```", ""]
    return (["## Failures: the end of each stderr", ""] + lines) if lines else []


def markdown(report: dict[str, Any]) -> str:
    """The whole report as markdown."""
    report = dict(report, derived=derive(report))
    lines = _header_markdown(report) + _kernel_tests_markdown(report)
    for workload, title, unit in TRAIN_WORKLOADS:
        lines += _train_markdown(report, workload, title, unit)
    lines += _decode_markdown(report) + _kernels_markdown(report) + _failures_markdown(report)
    return "\n".join(lines).rstrip() + "\n"


def write(report: dict[str, Any], out_dir: str) -> str:
    """Writes OUT/gpu_report.md and OUT/gpu_report.json (with the derived figures); returns the markdown."""
    text = markdown(report)
    with open(os.path.join(out_dir, MARKDOWN_NAME), "w") as f:
        f.write(text)
    write_json(os.path.join(out_dir, JSON_NAME), dict(report, derived=derive(report)))
    return text
