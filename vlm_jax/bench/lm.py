"""LLaMA benchmark: train-step tokens/s beside Hugging Face's PyTorch LlamaForCausalLM of the same
config, greedy decode tokens/s with and without the KV cache and, on a GPU, MFU and decode speed
against the memory-bandwidth limit.

    python -m vlm_jax.bench.lm [--config configs/llama.py:tiny] [--batch 8] [--length 128]
        [--steps 20] [--warmup 3] [--decode-tokens 64] [--prompt-length 16] [--decode-batch 1]
        [--no-peer] [--json PATH] [--small] [--config.model.x=y ...]
    python -m vlm_jax.bench.lm --config configs/llama.py:tinyllama_1b --device-report \\
        --batch 4 --length 2048 [--remat dots] [--peak-tflops 989] [--peak-bandwidth 3.35e12]

Train step: ours is the trainer's jitted step (vlm_jax.train.trainer.jit_train_step: the optax
chain of config.optim, i.e. clipping + AdamW, state donated) with the training task itself,
vlm_jax.tasks.lm (masked next-token cross-entropy, segment ids as in training). The peer is
LlamaForCausalLM(input_ids, labels=input_ids), which computes the same loss, with torch AdamW of
the same hyperparameters and clipping, torch on all cores, float32. tokens/s counts the
batch x length input tokens of a step; both sides get the same random tokens.

Decode (greedy, batch --decode-batch, a random --prompt-length prompt, then --decode-tokens new
tokens; the timed run includes the prefill): "KV cache" is one jitted call, a prefill with
decode=True then a `jax.lax.fori_loop` of one-token steps over the cache of
vlm_jax.models.llama.init_cache (this module's own minimal loop, so it times the model alone;
vlm_jax.sampling.decode adds left padding and stop tokens around such a loop). "No cache" is one
jitted `fori_loop` that re-runs the whole model over the fixed (prompt + new tokens)-long buffer
for every token (causal, so the unfilled tail does not change the result; a growing prefix would
average prompt + N/2 tokens a step but recompile at every length). Both size the cache / buffer
to prompt + new tokens, and both must pick the same tokens. "HF generate" is transformers'
generate(use_cache=True, greedy) on the peer's model, for reference.
Decode serves the params cast once to the compute dtype, as an inference server would.

Device report (--device-report: bfloat16 compute, scan_layers, remat "dots" unless --dtype,
--scan-layers, --remat say otherwise):
  MFU = model FLOPs per token (`flops_per_token`) x train tokens/s / (peak dense bf16 FLOP/s x
  devices);
  decode bandwidth fraction = decode steps/s x bytes of params one step reads / peak memory
  bandwidth, where a step is one token per row and reads every param but the input embedding table
  (a one-row gather); the KV cache reads are left out, so the fraction is a lower bound.
The peaks come from DEVICE_PEAKS by jax's device_kind on a GPU, or from --peak-tflops /
--peak-bandwidth anywhere (so on a CPU these numbers are skipped with a message unless given).
The peer is CPU torch, so it is skipped when ours runs on an accelerator. `--config.model.x=y`
overrides win over --small, --device-report and the dtype / scan / remat flags.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax import config as config_lib
from vlm_jax import models
from vlm_jax.tasks import lm as lm_task
from vlm_jax.bench.common import (
    PeerSkipped, describe_optimizer, device_peaks, import_torch, load_average, load_note, num_cores,
    time_generate, time_steps, torch_optimizer, torch_threads, torch_train_step, trainer_step,
    write_json,
)
from vlm_jax.models.llama import Llama, from_config, init_cache

# --small: a model and run small enough for a unit test (flags given explicitly still win).
SMALL_MODEL = dict(vocab_size=128, width=32, depth=2, heads=2, kv_heads=1, mlp_dim=64, max_len=32)
SMALL_RUN = dict(batch=2, length=16, steps=2, warmup=1, decode_tokens=8, prompt_length=4,
                 decode_repeats=1)
DEFAULT_RUN = dict(batch=8, length=128, steps=20, warmup=3, decode_tokens=64, prompt_length=16,
                   decode_repeats=3)
# Compute dtype, scan_layers and remat of the plain run (float32, like the peer) and of
# --device-report (what the published configs train with).
PLAIN_MODEL = dict(dtype="float32", scan_layers=False, remat="none")
REPORT_MODEL = dict(dtype="bfloat16", scan_layers=True, remat="dots")


def flops_per_token(
    non_embedding_params: int, depth: int, attention_width: int, length: int, causal: bool = False
) -> int:
    """Model FLOPs of training on one token of a length-`length` sequence (forward + backward):

        6 * N + 12 * L * (H * D) * T        (PaLM's MFU, Chowdhery et al. 2022, appendix B)

    N = non-embedding params (`param_counts`): each takes a multiply-add (2 FLOPs) in the forward
    and two in the backward (input and weight gradients), so 6 N. 12 L (H*D) T is attention's two
    T x T matmuls (QK^T and AV: 2 x 2 x T x H*D per token per layer in the forward, x3 with the
    backward), counted in full as PaLM does although the causal mask makes half of them moot.
    H*D (heads x head dim) is the width for every LLaMA. Remat's recomputation is hardware, not
    model, FLOPs: it is not counted. `causal` counts only the unmasked half of attention (6 L H D T),
    as the H100 reference figures the GPU report compares with do.
    """
    return 6 * non_embedding_params + (6 if causal else 12) * depth * attention_width * length


def param_counts(model: Llama) -> dict[str, int]:
    """{'total', 'embedding', 'non_embedding'} param counts, from the abstract init (no memory).

    non_embedding: every param but the input embedding table, which is a gather (no FLOPs, one row
    read a token). A tied table is also the output matmul, so then it counts.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    params = nn.unbox(shapes["params"])
    total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    embedding = math.prod(params["embed"]["embedding"].shape)
    return dict(total=total, embedding=embedding,
                non_embedding=total if model.tie_embeddings else total - embedding)


def lm_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The batch vlm_jax.tasks.lm trains on, for whole rows of `tokens` [B, T]: every position but
    the last predicts the next token (B x (T-1) predictions, as LlamaForCausalLM(labels=tokens))."""
    b, t = tokens.shape
    mask = np.ones((b, t), np.float32)
    mask[:, -1] = 0.0
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "loss_mask": mask,
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
    }


def random_tokens(vocab: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Uniform int32 tokens."""
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


# Ours.


def bench_ours_train(
    config: ml_collections.ConfigDict, tokens: np.ndarray, steps: int, warmup: int,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Times the trainer's jitted step on `tokens` [B, T]."""
    model = models.build(config)
    one_step, _, mesh = trainer_step(config, model, lm_task, lm_batch(tokens), devices)
    timing = time_steps(one_step, steps, warmup)
    return dict(
        timing,
        name=f"vlm_jax Llama, trainer's jitted step (JAX {jax.__version__})",
        tokens_per_s=tokens.size / timing["median_step_s"],
        where=f"{mesh.size} {mesh.devices.flat[0].platform}, {num_cores()} cores",
        mesh=dict(mesh.shape),
        devices=int(mesh.size),
        dtype=str(config.model.dtype),
    )


def greedy_decoders(model: Llama, new_tokens: int) -> tuple[Callable, Callable]:
    """(with_cache, without_cache): jitted (params, prompt [B, P]) -> greedy tokens [B, new_tokens].

    `model` must have max_len >= P + new_tokens (the cache's length).
    """
    next_token = lambda logits: jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # noqa: E731

    @jax.jit
    def with_cache(params: Any, prompt: jax.Array) -> jax.Array:
        batch = prompt.shape[0]
        logits, state = model.apply({"params": params, "cache": init_cache(model, batch)}, prompt,
                                    decode=True, mutable=["cache"])
        out = jnp.zeros((batch, new_tokens), jnp.int32).at[:, 0].set(next_token(logits))

        def step(i: jax.Array, carry: tuple[Any, jax.Array]) -> tuple[Any, jax.Array]:
            cache, out = carry
            token = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
            logits, state = model.apply({"params": params, "cache": cache}, token, decode=True,
                                        mutable=["cache"])
            out = jax.lax.dynamic_update_slice_in_dim(out, next_token(logits)[:, None], i, axis=1)
            return state["cache"], out

        return jax.lax.fori_loop(1, new_tokens, step, (state["cache"], out))[1]

    @jax.jit
    def without_cache(params: Any, prompt: jax.Array) -> jax.Array:
        batch, length = prompt.shape
        buffer = jnp.zeros((batch, length + new_tokens), jnp.int32).at[:, :length].set(prompt)

        def step(i: jax.Array, buffer: jax.Array) -> jax.Array:
            logits = model.apply({"params": params}, buffer)
            last = jax.lax.dynamic_slice_in_dim(logits, length + i - 1, 1, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(buffer, next_token(last)[:, None], length + i,
                                                       axis=1)

        return jax.lax.fori_loop(0, new_tokens, step, buffer)[:, length:]

    return with_cache, without_cache


def bench_ours_decode(
    config: ml_collections.ConfigDict, prompt: np.ndarray, new_tokens: int, repeats: int
) -> dict[str, Any]:
    """Greedy decode with and without the KV cache; one warmup run each (compiles)."""
    cfg = config.model
    # Decoding has no gradient to remat, and its cache need only hold this prompt + new tokens.
    model = from_config(cfg, remat="none", max_len=prompt.shape[1] + new_tokens)
    dtype = jnp.dtype(cfg.dtype)
    init = jax.jit(lambda rng: nn.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32)))["params"])
    params = jax.tree.map(lambda p: p.astype(dtype), init(jax.random.key(int(config.seed))))
    # One step reads every param but the input embedding table (one row of it is gathered).
    read = dict(params, embed={}) if not cfg.tie_embeddings else params
    bytes_per_step = sum(leaf.nbytes for leaf in jax.tree.leaves(read))
    prompt = jnp.asarray(prompt)
    result: dict[str, Any] = dict(param_bytes_per_step=bytes_per_step, dtype=str(dtype))
    outputs = {}
    for name, fn in zip(("cache", "no_cache"), greedy_decoders(model, new_tokens)):
        holder = {}

        def run_once(fn=fn, holder=holder) -> None:
            holder["out"] = jax.block_until_ready(fn(params, prompt))

        timing = time_steps(run_once, repeats, warmup=1)
        outputs[name] = np.asarray(holder["out"])
        result[name] = dict(timing, tokens_per_s=prompt.shape[0] * new_tokens / timing["median_step_s"])
    result["greedy_match"] = bool(np.array_equal(outputs["cache"], outputs["no_cache"]))
    result["cache_speedup"] = result["cache"]["tokens_per_s"] / result["no_cache"]["tokens_per_s"]
    return result


# The PyTorch peer: torch and transformers are optional, so imported lazily.


def _hf_llama(config: ml_collections.ConfigDict) -> Any:
    """A randomly initialised float32 LlamaForCausalLM of our model section's sizes."""
    torch, _ = import_torch()
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm_jax.convert.hf_llama import hf_config

    if jax.default_backend() != "cpu":
        raise PeerSkipped(f"the peer is CPU torch; ours runs on {jax.default_backend()}")
    cfg = config.model
    if cfg.get("lora") and cfg.lora.get("rank", 0):
        raise PeerSkipped("the peer has no LoRA adapters")
    torch.manual_seed(int(config.seed))
    return LlamaForCausalLM(LlamaConfig(**hf_config(cfg))).float()


def _peer_name(model: Any) -> str:
    import torch
    import transformers

    return (f"HF transformers LlamaForCausalLM ({model.config._attn_implementation}); torch "
            f"{torch.__version__}, transformers {transformers.__version__}")


def bench_peer_train(
    config: ml_collections.ConfigDict, tokens: np.ndarray, steps: int, warmup: int
) -> dict[str, Any]:
    """Times LlamaForCausalLM(labels=tokens) + torch AdamW; PeerSkipped when it cannot run."""
    torch, _ = import_torch()
    with torch_threads() as threads:
        model = _hf_llama(config).train()
        ids = torch.from_numpy(tokens).long()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch_optimizer(params, config.optim)
        one_step = torch_train_step(lambda: model(input_ids=ids, labels=ids).loss, params, opt,
                                    config.optim.clip_norm)
        timing = time_steps(one_step, steps, warmup)
    return dict(
        timing,
        name=_peer_name(model),
        tokens_per_s=tokens.size / timing["median_step_s"],
        params=sum(p.numel() for p in model.parameters()),
        where=f"torch, {threads} threads",
        optimizer=describe_optimizer(opt),
        dtype="float32",
    )


def bench_peer_decode(
    config: ml_collections.ConfigDict, prompt: np.ndarray, new_tokens: int, repeats: int
) -> dict[str, Any]:
    """Times HF generate(use_cache=True, greedy) of exactly `new_tokens` tokens."""
    torch, _ = import_torch()
    with torch_threads() as threads, torch.inference_mode():
        model = _hf_llama(config).eval()
        timing = time_generate(model, torch.from_numpy(prompt).long(), new_tokens, repeats)
    return dict(timing, name=_peer_name(model), where=f"torch, {threads} threads")


# The run.


def load_config(
    spec: str, overrides: Sequence[str] = (), *, small: bool = False, device_report: bool = False,
    dtype: str | None = None, scan_layers: bool | None = None, remat: str | None = None,
) -> ml_collections.ConfigDict:
    """The config with --small's sizes, then the mode's dtype / scan / remat (flags win), then
    the --config.x=y overrides (which win over everything)."""
    mode = dict(REPORT_MODEL if device_report else PLAIN_MODEL)
    mode.update({k: v for k, v in dict(dtype=dtype, scan_layers=scan_layers, remat=remat).items()
                 if v is not None})
    ours = {**(SMALL_MODEL if small else {}), **mode}
    return config_lib.load(spec, [f"model.{k}={v}" for k, v in ours.items()] + list(overrides))


def run(
    config: ml_collections.ConfigDict,
    *,
    batch: int = DEFAULT_RUN["batch"],
    length: int = DEFAULT_RUN["length"],
    steps: int = DEFAULT_RUN["steps"],
    warmup: int = DEFAULT_RUN["warmup"],
    decode_tokens: int = DEFAULT_RUN["decode_tokens"],
    prompt_length: int = DEFAULT_RUN["prompt_length"],
    decode_batch: int = 1,
    decode_repeats: int = DEFAULT_RUN["decode_repeats"],
    peer: bool = True,
    devices: Sequence[jax.Device] | None = None,
    peak_tflops: float | None = None,
    peak_bandwidth: float | None = None,
) -> dict[str, Any]:
    """Train step (ours, peer), decode (cache, no cache, HF generate) and the device report."""
    cfg = config.model
    if cfg.get("name") != "llama":
        raise config_lib.ConfigError(f"this benchmark times LLaMA models, not {cfg.get('name')!r}")
    if min(batch, length - 1, steps, decode_tokens, prompt_length, decode_batch, decode_repeats) < 1 \
            or warmup < 0:
        raise config_lib.ConfigError("sizes and counts must be >= 1 (--length >= 2, --warmup >= 0)")
    for what, n in (("--length", length), ("--prompt-length + --decode-tokens", prompt_length + decode_tokens)):
        if n > int(cfg.max_len):
            raise config_lib.ConfigError(f"{what} = {n} exceeds model.max_len {cfg.max_len}")
    model = models.build(config)
    counts = param_counts(model)
    heads, head_dim = int(cfg.heads), int(cfg.head_dim or cfg.width // cfg.heads)
    seed = int(config.seed)
    result: dict[str, Any] = dict(
        config=config.get("config_spec", "?"), backend=jax.default_backend(),
        load_before=load_average(), cores=num_cores(),
        model={k: cfg[k] for k in ("vocab_size", "width", "depth", "heads", "kv_heads", "mlp_dim",
                                    "max_len", "dtype", "scan_layers", "remat")},
        params=counts,
        flops_per_token=flops_per_token(counts["non_embedding"], int(cfg.depth), heads * head_dim, length),
    )

    tokens = random_tokens(int(cfg.vocab_size), (batch, length), seed)
    optim = config.optim
    train: dict[str, Any] = dict(
        batch=batch, length=length, steps=steps, warmup=warmup, peer=None, peer_skipped=None,
        ratio=None, params_match=None,
        optimizer=optim.name + (f", clip {optim.clip_norm:g}" if optim.clip_norm > 0 else ""),
    )
    train["ours"] = bench_ours_train(config, tokens, steps, warmup, devices)
    if peer:
        try:
            train["peer"] = bench_peer_train(config, tokens, steps, warmup)
            train["ratio"] = train["ours"]["tokens_per_s"] / train["peer"]["tokens_per_s"]
            train["params_match"] = train["peer"]["params"] == counts["total"]
        except PeerSkipped as e:
            train["peer_skipped"] = str(e)
    else:
        train["peer_skipped"] = "--no-peer"
    for side in ("ours", "peer"):
        if train[side]:
            train[side]["model_tflops"] = result["flops_per_token"] * train[side]["tokens_per_s"] / 1e12
    result["train"] = train

    prompt = random_tokens(int(cfg.vocab_size), (decode_batch, prompt_length), seed + 1)
    decode = dict(batch=decode_batch, prompt_length=prompt_length, new_tokens=decode_tokens,
                  repeats=decode_repeats, peer=None, peer_skipped=None)
    decode.update(bench_ours_decode(config, prompt, decode_tokens, decode_repeats))
    if peer and train["peer_skipped"] is None:
        decode["peer"] = bench_peer_decode(config, prompt, decode_tokens, decode_repeats)
    else:
        decode["peer_skipped"] = train["peer_skipped"]
    result["decode"] = decode
    result["device_report"] = device_report(result, (devices or jax.devices())[0], peak_tflops,
                                            peak_bandwidth)
    return result


def device_report(
    result: dict[str, Any], device: jax.Device, peak_tflops: float | None, peak_bandwidth: float | None
) -> dict[str, Any]:
    """MFU of the train step and decode's fraction of the bandwidth limit, where peaks are known."""
    peaks = device_peaks(device, peak_tflops, peak_bandwidth)
    report: dict[str, Any] = dict(peaks, mfu=None, mfu_skipped=None, decode_bandwidth_fraction=None,
                                  bandwidth_skipped=None)
    why = f"no peak for {device.platform} device {device.device_kind!r}"
    ours, decode = result["train"]["ours"], result["decode"]
    if peaks["flops"]:
        total = peaks["flops"] * ours["devices"]
        report["mfu"] = result["flops_per_token"] * ours["tokens_per_s"] / total
    else:
        report["mfu_skipped"] = f"{why}; pass --peak-tflops"
    if peaks["bandwidth"]:
        steps_per_s = decode["cache"]["tokens_per_s"] / decode["batch"]
        report["decode_bandwidth_fraction"] = steps_per_s * decode["param_bytes_per_step"] / peaks["bandwidth"]
    else:
        report["bandwidth_skipped"] = f"{why}; pass --peak-bandwidth"
    return report


def _table(rows: Sequence[tuple[str, Callable[[dict], str]]], columns: Sequence[tuple[str, dict | None]],
           label_width: int = 22) -> list[str]:
    lines = [f"{'':{label_width}s}" + "".join(f" {title:>16s}" for title, _ in columns)]
    for label, cell in rows:
        lines.append(f"{label:{label_width}s}" + "".join(
            f" {cell(data) if data else '-':>16s}" for _, data in columns))
    return lines


def format_table(result: dict[str, Any]) -> str:
    """The result as plain text."""
    m, p, train, decode = result["model"], result["params"], result["train"], result["decode"]
    lines = [
        f"LLaMA benchmark, {result['config']}: vocab {m['vocab_size']}, width {m['width']}, depth "
        f"{m['depth']}, heads {m['heads']} (kv {m['kv_heads']}), mlp {m['mlp_dim']}; {p['total']:,} "
        f"params ({p['non_embedding']:,} non-embedding); {m['dtype']}, scan_layers "
        f"{m['scan_layers']}, remat {m['remat']}",
        f"model FLOPs per trained token at length {train['length']}: "
        f"{result['flops_per_token'] / 1e6:,.2f} M (6 N + 12 L H D T)",
        "",
        f"train step: batch {train['batch']} x {train['length']} tokens, next-token cross-entropy, "
        f"{train['optimizer']}; median of {train['steps']} steps after {train['warmup']} warmup",
        f"  ours: {train['ours']['name']}, mesh {train['ours']['mesh']}",
        "  peer: " + (f"{train['peer']['name']}, {train['peer']['optimizer']}" if train["peer"]
                      else f"skipped: {train['peer_skipped']}"),
    ]
    lines += _table([
        ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
        ("median step (ms)", lambda r: f"{1e3 * r['median_step_s']:.1f}"),
        ("mean step (ms)", lambda r: f"{1e3 * r['mean_step_s']:.1f}"),
        ("first step (s)", lambda r: f"{r['first_step_s']:.2f}"),
        ("model TFLOP/s", lambda r: f"{r['model_tflops']:.3f}"),
        ("compute dtype", lambda r: r["dtype"]),
        ("devices/threads", lambda r: r["where"]),
    ], [("ours", train["ours"]), ("peer", train["peer"])])
    if train["peer"]:
        lines.append(f"ratio ours/peer (tokens/s): {train['ratio']:.2f}x")
        lines.append("param counts match" if train["params_match"] else
                     f"PARAM COUNTS DIFFER: ours {p['total']:,}, peer {train['peer']['params']:,}")
        if train["ours"]["dtype"] != "float32":
            lines.append(f"note: ours computes in {train['ours']['dtype']}, the peer in float32")

    n, plen = decode["new_tokens"], decode["prompt_length"]
    lines += [
        "",
        f"decode: batch {decode['batch']}, greedy, {plen}-token prompt + {n} new tokens (prefill "
        f"included), {decode['dtype']} params; median of {decode['repeats']} runs after 1 warmup",
    ]
    rows = [("ours, KV cache (fori_loop)", decode["cache"]),
            (f"ours, no cache (all {plen + n} tokens a step)", decode["no_cache"]),
            ("HF generate, use_cache=True", decode["peer"])]
    lines.append(f"{'':46s} {'tokens/s':>12s} {'ms/token':>10s}")
    for label, r in rows:
        if r:
            lines.append(f"{label:46s} {r['tokens_per_s']:>12,.1f} "
                         f"{1e3 * decode['batch'] / r['tokens_per_s']:>10.2f}")
        else:
            lines.append(f"{label:46s} {'skipped: ' + str(decode['peer_skipped']):>23s}")
    lines.append(f"KV cache speedup {decode['cache_speedup']:.1f}x; greedy tokens with and without "
                 "the cache " + ("agree" if decode["greedy_match"] else "DIFFER"))

    report = result["device_report"]
    lines += ["", f"device report ({report['device_kind']}; peaks from {report['source']}):"]
    if report["mfu"] is not None:
        lines.append(f"  train MFU {100 * report['mfu']:.1f}% of {report['flops'] / 1e12:.0f} TFLOP/s "
                     f"dense bf16 x {train['ours']['devices']} device(s)"
                     + ("" if m["dtype"] == "bfloat16" else f" (ours computes in {m['dtype']})"))
    else:
        lines.append(f"  train MFU skipped: {report['mfu_skipped']}")
    if report["decode_bandwidth_fraction"] is not None:
        lines.append(f"  decode (KV cache) at {100 * report['decode_bandwidth_fraction']:.1f}% of the "
                     f"{report['bandwidth'] / 1e12:.2f} TB/s bandwidth limit "
                     f"({decode['param_bytes_per_step'] / 1e6:,.3g} MB of params a step)")
    else:
        lines.append(f"  decode bandwidth fraction skipped: {report['bandwidth_skipped']}")
    note = load_note(result["load_before"], result["cores"])
    if note:
        lines.append(note)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `python -m vlm_jax.bench.lm` (after `--config.x=y` are split off)."""
    parser = argparse.ArgumentParser(prog="python -m vlm_jax.bench.lm", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--config", default="configs/llama.py:tiny", help="path.py[:variant]")
    for flag, help_text in (("batch", "train batch"), ("length", "train sequence length"),
                            ("steps", "timed train steps"), ("warmup", "untimed train steps first"),
                            ("decode-tokens", "new tokens a decode run"),
                            ("prompt-length", "decode prompt tokens"),
                            ("decode-repeats", "timed decode runs (after one warmup)")):
        default = DEFAULT_RUN[flag.replace("-", "_")]
        add(f"--{flag}", type=int, default=None, help=f"{help_text} (default {default}; --small: "
            f"{SMALL_RUN[flag.replace('-', '_')]})")
    add("--decode-batch", type=int, default=1, help="decode rows")
    add("--no-peer", action="store_true", help="skip the PyTorch peer (train step and HF generate)")
    add("--json", default=None, metavar="PATH", help="also write every number as JSON")
    add("--small", action="store_true", help="a tiny model and run (for tests)")
    add("--device-report", action="store_true",
        help=f"accelerator mode: defaults {REPORT_MODEL} instead of {PLAIN_MODEL}")
    add("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype")
    add("--scan-layers", action=argparse.BooleanOptionalAction, default=None)
    add("--remat", choices=["none", "full", "dots"], default=None)
    add("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of one device")
    add("--peak-bandwidth", type=float, default=None, help="peak memory bandwidth of one device, B/s")
    add("--devices", type=int, default=None, help="our train mesh uses the first N devices (default: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses argv, runs the benchmark, prints the table (and writes --json); returns the result."""
    rest, overrides = config_lib.split_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(rest)
    config = load_config(args.config, overrides, small=args.small, device_report=args.device_report,
                         dtype=args.dtype, scan_layers=args.scan_layers, remat=args.remat)
    sizes = SMALL_RUN if args.small else DEFAULT_RUN
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in sizes.items()}
    devices = jax.devices()[: args.devices] if args.devices else None
    result = run(config, **sizes, decode_batch=args.decode_batch, peer=not args.no_peer,
                 devices=devices, peak_tflops=args.peak_tflops, peak_bandwidth=args.peak_bandwidth)
    print(format_table(result), flush=True)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    try:
        main()
    except config_lib.ConfigError as e:
        print(f"vlm_jax.bench.lm: config error: {e}", file=sys.stderr)
        sys.exit(2)
