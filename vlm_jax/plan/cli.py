"""`vlm-jax plan`: will a config train on a given mesh of a given accelerator? Answered without it.

The command line: `vlm-jax plan` (add_subparser registers it on vlm_jax.cli) and
`python -m vlm_jax.plan` (main), which is also how the child process runs its pickled job (--job).
Unless this process is that child, the compile always runs in a child with fake CPU devices.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from collections.abc import Sequence

from vlm_jax.plan.child import CHILD_ENV, plan_in_subprocess
from vlm_jax.plan.devices import DEVICES, get_device, parse_mesh
from vlm_jax.plan.fit import check_batch, in_process
from vlm_jax.plan.report import format_plan


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="path.py[:variant]; --config.x=y overrides as for train")
    p.add_argument("--mesh", help="data=D,fsdp=F,tensor=T (missing axes are 1)")
    p.add_argument("--device", help=f"one of {', '.join(DEVICES)}, or a size such as 24GiB")
    p.add_argument("--batch", type=int, default=None, help="global batch (default config.data.batch_size)")
    p.add_argument("--length", type=int, default=None, help="sequence length (default config.data.text_length)")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of HBM kept free (default 0.1)")
    p.add_argument("--attention", choices=["target", "xla"], default="target",
                   help="target: flash stand-in where the target runs a flash kernel; xla: as compiled on CPU")
    p.add_argument("--no-max-batch", dest="max_batch", action="store_false",
                   help="skip the search for the largest batch (one compile only)")
    p.add_argument("--max-compiles", type=int, default=4, help="extra compiles for the batch search")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # the child's pickled job


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Registers `plan` on vlm_jax.cli's subparsers (handler: cmd_plan)."""
    p = subparsers.add_parser("plan", help="memory and FLOPs of a config's train step on a device mesh, "
                                           "compiled ahead of time without the hardware")
    _add_arguments(p)
    p.set_defaults(fn=cmd_plan)
    return p


def _write_json(path: str, result: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def cmd_plan(args, overrides) -> int:
    """`vlm-jax plan ...`: prints the plan (and writes --json). Compiles in a child process with
    fake CPU devices unless this already is that child."""
    from vlm_jax import config as config_lib

    if args.job:
        with open(args.job, "rb") as f:
            job = pickle.load(f)
        result = in_process(job["config"], job["mesh"], job["device"], **job["kwargs"])
        _write_json(args.json, result)
        return 0
    if not (args.config and args.mesh and args.device):
        raise config_lib.ConfigError("plan needs --config, --mesh and --device")
    config = config_lib.load(args.config, overrides)
    try:
        mesh_cfg = parse_mesh(args.mesh)
        device = get_device(args.device)
        check_batch(config, mesh_cfg, args.batch)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
    kwargs = dict(batch=args.batch, length=args.length, headroom=args.headroom, attention=args.attention,
                  max_batch=args.max_batch, max_compiles=args.max_compiles, verbose=not args.quiet)
    try:
        if os.environ.get(CHILD_ENV):
            result = in_process(config, mesh_cfg, device, **kwargs)
        else:
            result = plan_in_subprocess(config, mesh_cfg, device, **kwargs)
    except RuntimeError as e:
        print(f"vlm-jax plan: {e}", file=sys.stderr)
        return 1
    print(format_plan(result))
    if args.json:
        _write_json(args.json, result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vlm_jax.plan --config ... --mesh ... --device ...`."""
    from vlm_jax import config as config_lib

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m vlm_jax.plan", description=__doc__.split("\n")[0])
    _add_arguments(parser)
    try:
        rest, overrides = config_lib.split_overrides(argv)
        return cmd_plan(parser.parse_args(rest), overrides)
    except config_lib.ConfigError as e:
        print(f"vlm-jax plan: config error: {e}", file=sys.stderr)
        return 2

