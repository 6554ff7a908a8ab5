"""What the benchmarks beside a PyTorch peer share: the timer, the machine's cores and load, the
devices' peak FLOP/s and bandwidth, our trainer's jitted step, the peer's threads, optimiser, step
and generate loop, and the result as JSON.

torch is optional, so the torch helpers import it lazily (the peer is skipped without it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vlm_jax import config as config_lib
from vlm_jax.parallel import hosts
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.train import optim
from vlm_jax.train.trainer import jit_train_step, sharding_context, state_initializer


# jax device_kind substring -> (peak dense bfloat16 FLOP/s, peak memory bandwidth in B/s), per
# device, from the vendors' data sheets (no sparsity); the first match wins.
DEVICE_PEAKS = (
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100", 312e12, 1.555e12),
)


class PeerSkipped(Exception):
    """The PyTorch peer cannot run for this config or environment (the message says why)."""


def num_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # Not Linux.
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average (0 where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def load_note(load_before: float, cores: int) -> str | None:
    """A warning line when other processes were busy before the run, else None."""
    if load_before <= 0.5:
        return None
    # OpenMP's spinning barriers stall when a core is taken away, so torch suffers most.
    return (f"note: load average {load_before:.1f} on {cores} cores before the run; other "
            "processes skew these timings (torch's the most)")


def device_peaks(
    device: Any, peak_tflops: float | None = None, peak_bandwidth: float | None = None
) -> dict[str, Any]:
    """{'flops', 'bandwidth', 'source', 'device_kind'} of one device (anything with `platform` and
    `device_kind`, e.g. a jax.Device): the flags, else DEVICE_PEAKS on a GPU, else None."""
    flops = peak_tflops * 1e12 if peak_tflops else None
    bandwidth = peak_bandwidth or None
    sources = ["flags"] if flops or bandwidth else []
    if device.platform == "gpu" and not (flops and bandwidth):
        for kind, table_flops, table_bandwidth in DEVICE_PEAKS:
            if kind in device.device_kind:
                flops, bandwidth = flops or table_flops, bandwidth or table_bandwidth
                sources.append(f"table ({kind})")
                break
    return dict(flops=flops, bandwidth=bandwidth, source=" + ".join(sources) or "none",
                device_kind=device.device_kind)


def time_steps(step: Callable[[], Any], steps: int, warmup: int) -> dict[str, float]:
    """Runs `step` (which must block until done) warmup + steps times; per-step seconds."""
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    timed = times[warmup:]
    return dict(first_step_s=times[0], median_step_s=statistics.median(timed),
                mean_step_s=sum(timed) / len(timed))


def time_with_losses(step: Callable[[], Any], steps: int, warmup: int) -> dict[str, Any]:
    """time_steps of a step that returns its loss (a scalar array or tensor, or metrics with a
    'loss'), plus loss_first / loss_last as floats, read after the timing so no step waits."""
    losses: list[Any] = []

    def one() -> None:
        out = step()
        losses.append(out["loss"] if isinstance(out, dict) else out)

    timing = time_steps(one, steps, warmup)
    return dict(timing, loss_first=float(losses[0]), loss_last=float(losses[-1]))


def trainer_step(
    config: ml_collections.ConfigDict, model: nn.Module, task: Any, batch: dict[str, np.ndarray],
    devices: Sequence[jax.Device] | None = None,
) -> tuple[Callable[[], None], Any, jax.sharding.Mesh]:
    """Our train step on `batch`, built and jitted exactly as vlm_jax.train.trainer builds it.

    task: a vlm_jax.tasks module (or any object with its model_inputs and loss_fn). Returns
    (one_step, abstract state, mesh); one_step runs a step on the batch, blocks until done and
    returns the step's metrics.
    """
    mesh = make_mesh(config.mesh, devices)
    rules = config.sharding_rules
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = len(next(iter(batch.values())))
    if rows % batch_devices:
        raise config_lib.ConfigError(
            f"batch size {rows} is not divisible by the {batch_devices} devices the batch is split over"
        )
    tx = optim.make_optimizer(config.optim, int(config.train.steps))
    init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    init, shardings, abstract = state_initializer(model, task, tx, batch, mesh, rules)
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(init_rng)
    batch_shardings = hosts.batch_shardings(batch, mesh, rules)
    train_step = jit_train_step(model, task, tx, config, mesh, shardings, batch_shardings)
    global_batch = hosts.global_batch(batch, batch_shardings)
    holder = {"state": state}

    def one_step() -> dict[str, jax.Array]:
        with sharding_context(mesh, rules):
            new_state, metrics = train_step(holder["state"], global_batch, step_rng)
        holder["state"] = new_state
        jax.block_until_ready((new_state, metrics))
        return metrics

    return one_step, abstract, mesh


def import_torch() -> tuple[Any, Any]:
    """(torch, transformers), or PeerSkipped when either is missing."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise PeerSkipped(f"torch and transformers are needed for the peer: {e}")
    return torch, transformers


@contextlib.contextmanager
def torch_threads(threads: int | None = None) -> Iterator[int]:
    """torch on `threads` intra-op threads (default: all cores) inside the block; yields the count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or num_cores())
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def torch_optimizer(params: Sequence[Any], cfg: ml_collections.ConfigDict) -> Any:
    """torch AdamW (or SGD) of `config.optim`, decaying matrices only, as our optax chain does.

    Our decay mask decays `kernel` / `embedding` leaves: in torch the parameters of 2+ dims. The
    schedule is left out: it changes values, not the work of a step.
    """
    import torch

    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": float(cfg.weight_decay)},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if cfg.name == "sgd":
        opt_class, opt_kw = torch.optim.SGD, dict(momentum=float(cfg.b1))
    else:
        opt_class = torch.optim.AdamW
        opt_kw = dict(betas=(float(cfg.b1), float(cfg.b2)), eps=float(cfg.eps))
    try:
        # torch's fastest CPU update; foreach measured several times slower on CLIP.
        return opt_class(groups, lr=float(cfg.lr), fused=True, **opt_kw)
    except (RuntimeError, TypeError):
        return opt_class(groups, lr=float(cfg.lr), foreach=True, **opt_kw)


def describe_optimizer(opt: Any) -> str:
    """'AdamW fused' / 'AdamW foreach'."""
    return type(opt).__name__ + (" fused" if opt.defaults.get("fused") else " foreach")


def torch_train_step(
    loss_of: Callable[[], Any], params: Sequence[Any], opt: Any, clip_norm: float
) -> Callable[[], None]:
    """One torch step as our train step does it: loss, backward, clip by global norm, update.

    The step returns the loss (detached; reading it synchronises, so callers read it at the end).
    """
    import torch

    def one_step() -> Any:
        opt.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        if clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, float(clip_norm), foreach=True)
        opt.step()
        return loss.detach()

    return one_step


def time_generate(
    model: Any, ids: Any, new_tokens: int, repeats: int, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Times HF model.generate(ids [B, P], greedy, use_cache=True) of exactly `new_tokens` tokens
    after one warmup run; `sync` waits for the device. Adds tokens_per_s (B x new_tokens a run)."""
    import torch

    def run_once() -> None:
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                           pad_token_id=0)
        sync()

    timing = time_steps(run_once, repeats, warmup=1)
    return dict(timing, tokens_per_s=ids.shape[0] * new_tokens / timing["median_step_s"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return str(float(value))  # "inf" / "nan": strict JSON has no such numbers.
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json(path: str, result: dict[str, Any]) -> None:
    """Writes a benchmark's result dict (numpy scalars made plain, anything else as str)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(result), f, indent=1)
