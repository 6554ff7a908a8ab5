"""`vlm-jax plan`: will a config train on a given mesh of a given accelerator? Answered without it.

    vlm-jax plan --config configs/llama.py:llama2_70b --mesh data=1,fsdp=64,tensor=4 --device h100
    python -m vlm_jax.plan --config configs/clip.py:b16 --mesh data=8,fsdp=32 --device v5p --json plan.json

The real train step (vlm_jax.train.trainer's state_initializer + jit_train_step, the task's loss and
the optimiser of config.optim) is traced with abstract inputs (jax.ShapeDtypeStruct with the run's
shardings) and compiled ahead of time on a fake set of as many CPU devices as the mesh has. No
parameter, optimiser or batch array is ever allocated.

What comes out, per device: params, optimiser state, gradients and batch bytes (exact, from shapes
and shardings); the compiler's temp bytes and the peak estimate (an estimate for the target) against
the device's HBM less a headroom; FLOPs per step; the largest per-device batch that fits; and the
step's collectives and the partitioner's involuntary full rematerializations.

One concern a module:
* devices: the accelerators (HBM per chip, backend) and the mesh argument;
* step: the train step, abstractly, traced and compiled ahead of time (and why on CPU it is an
  estimate for the target);
* standin: the flash-attention stand-in compiled wherever the target would run a flash kernel;
* accounting: bytes from shapes and shardings, FLOPs from the jaxpr, the compiler and 6*N*tokens;
* collectives: the compiled step's collectives and XLA's native log;
* fit: plan() in this process, the fit verdict and the largest-batch search;
* child: plan() in a `python -m vlm_jax.plan` child with fake CPU devices, for meshes larger than
  this process;
* report: the text the command prints (format_plan);
* cli: the command line (add_subparser, cmd_plan, main).

Importing the package does not import jax.
"""

from vlm_jax.plan.accounting import count_params, jaxpr_flops, per_device_bytes, total_bytes
from vlm_jax.plan.child import plan_in_subprocess
from vlm_jax.plan.cli import add_subparser, cmd_plan, main
from vlm_jax.plan.devices import DEVICES, GB, Device, GiB, MiB, get_device, parse_mesh
from vlm_jax.plan.fit import plan
from vlm_jax.plan.report import format_plan
from vlm_jax.plan.standin import flash_attention_standin, target_attention
from vlm_jax.plan.step import (
    CPU_COMPILER_OPTIONS,
    IMAGE_TEXT_TASKS,
    Setup,
    compile_step,
    example_batch,
    setup,
    state_summary,
)

__all__ = [
    "CPU_COMPILER_OPTIONS",
    "DEVICES",
    "GB",
    "IMAGE_TEXT_TASKS",
    "Device",
    "GiB",
    "MiB",
    "Setup",
    "add_subparser",
    "cmd_plan",
    "compile_step",
    "count_params",
    "example_batch",
    "flash_attention_standin",
    "format_plan",
    "get_device",
    "jaxpr_flops",
    "main",
    "parse_mesh",
    "per_device_bytes",
    "plan",
    "plan_in_subprocess",
    "setup",
    "state_summary",
    "target_attention",
    "total_bytes",
]
