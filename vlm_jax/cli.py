"""`vlm-jax train|eval|sample|data|convert`: the command line.

    vlm-jax train --config configs/clip.py:tiny --workdir runs/clip [--config.optim.lr=3e-4 ...]
    vlm-jax eval  --workdir runs/clip [--config configs/clip.py:tiny]
    vlm-jax data preview --config configs/clip.py:tiny --out preview.png
    vlm-jax convert --from-hf path/to/hf_dir --out converted/
    vlm-jax convert --from-diffusers path/to/sd_folder --out converted_sd/   # then: vlm-jax sample --workdir converted_sd
    vlm-jax sample --workdir runs/alpaca/instruct --prompt "what is 3 plus 4?"
    vlm-jax sample --workdir runs/sat --image scene.png    (caption + per-word attention PNG; a run
                                                           of stages stands for its last stage)
    vlm-jax sample --workdir RUN --prompt "a large red circle on the left" -n 16 --out grid.png
                                                          (text-to-image runs: a grid of drawn images)
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence

from vlm_jax import config as config_lib
from vlm_jax.paths import local_dir


def _load_config(spec: str | None, workdir: str | None, overrides: list[str]):
    if spec:
        return config_lib.load(spec, overrides)
    saved = os.path.join(workdir or "", "config.json")
    if workdir and os.path.exists(saved):
        with open(saved) as f:
            config = config_lib.from_json(f.read())
        config_lib.apply_overrides(config, overrides)
        return config
    raise config_lib.ConfigError("--config is required (no config.json in the workdir)")


def _run_dir(args, overrides: list[str]):
    """(workdir, config) for eval and sample: a run of stages stands for its last stage."""
    from vlm_jax.train import stages

    config = config_lib.load(args.config, overrides) if args.config else None
    if not os.path.exists(os.path.join(args.workdir, "config.json")):
        stage = stages.last_stage_dir(args.workdir, config)
        if stage:
            print(f"vlm-jax: {args.workdir} is a run of stages; using its last stage, {stage}", file=sys.stderr)
            return stage, _load_config(None, stage, overrides)
    return args.workdir, config if config is not None else _load_config(None, args.workdir, overrides)


def _print_summary(summary: dict) -> None:
    print()
    print(f"step {summary['step']}" + (" (preempted: saved and stopped)" if summary.get("preempted") else ""))
    for key, value in sorted(summary.get("eval", {}).items()):
        print(f"  {key:36s} {value:.4f}")
    if "metrics_path" in summary:
        print(f"metrics:     {summary['metrics_path']}")
        print(f"tensorboard: tensorboard --logdir {summary['tensorboard_dir']}")
        print(f"checkpoints: {summary['checkpoint_dir']}")


def _join_run(args) -> bool:
    """jax.distributed.initialize for a multi-host run (flags, VLM_JAX_* variables or the
    cluster); False for a plain single-process run."""
    from vlm_jax.parallel import distributed

    options = distributed.Options.from_env(
        coordinator_address=args.coordinator_address, num_processes=args.num_processes,
        process_id=args.process_id, local_device_count=args.local_device_count,
        initialization_timeout=args.initialization_timeout, heartbeat_timeout=args.heartbeat_timeout,
        shutdown_timeout=args.shutdown_timeout,
    )
    if not distributed.initialize(options, verbose=True):
        return False
    import jax

    print(
        f"vlm-jax: process {jax.process_index()} of {jax.process_count()} "
        f"({jax.local_device_count()} of {jax.device_count()} devices; a lost process stops the run "
        f"within {options.heartbeat_timeout} s)", file=sys.stderr, flush=True,
    )
    return True


def cmd_train(args, overrides) -> int:
    from vlm_jax.parallel import distributed

    config = _load_config(args.config, None, overrides)
    if not _join_run(args):
        return _train(config, args)
    import jax

    try:
        status = _train(config, args, main=jax.process_index() == 0)
    except BaseException:  # noqa: BLE001
        # Out at once, without the exit barrier: the other hosts are probably blocked in a
        # collective with this one, and a dead process stops them within the heartbeat timeout
        # (a barrier would hold them up to the shutdown timeout first).
        import traceback

        print(f"vlm-jax: process {jax.process_index()} of {jax.process_count()} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    distributed.shutdown()  # Waits for the other hosts to finish too.
    return status


def _train(config, args, main: bool = True) -> int:
    from vlm_jax.train import stages
    from vlm_jax.train.trainer import train

    if not stages.stage_names(config):
        summary = train(config, args.workdir, stop_at_step=args.stop_at_step)
        if main:
            _print_summary(summary)
        else:
            print(f"step {summary['step']}" + (" (preempted: saved and stopped)" if summary["preempted"] else ""))
        return 0
    summaries = stages.train_stages(config, args.workdir, stop_at_step=args.stop_at_step)
    if not main:
        return 0
    for name, summary in summaries:
        print(f"\n== stage {name}: {summary['workdir']}")
        _print_summary(summary)
    if len(summaries) > 1:
        print("\n== by stage")
        keys = sorted({k for _, s in summaries for k in s.get("eval", {})})
        print(f"  {'metric':36s} " + " ".join(f"{n:>10s}" for n, _ in summaries))
        for key in keys:
            row = " ".join(f"{s.get('eval', {}).get(key, float('nan')):10.4f}" for _, s in summaries)
            print(f"  {key:36s} {row}")
    return 0


def cmd_eval(args, overrides) -> int:
    from vlm_jax.train.evaluate import evaluate

    workdir, config = _run_dir(args, overrides)
    summary = evaluate(config, workdir, step=args.step)
    _print_summary(summary)
    return 0


def cmd_sample(args, overrides) -> int:
    from vlm_jax.data import text
    from vlm_jax.sampling import sample

    workdir, config = _run_dir(args, overrides)
    from vlm_jax.sampling import draw

    if args.image and draw.has_generate(config):  # unCLIP: variations of an image, or between two
        return _sample_from_images(args, workdir, config)
    if args.image:
        if len(args.image) != 1:
            raise config_lib.ConfigError(f"a captioning run captions one --image, got {len(args.image)}")
        from vlm_jax.sampling import caption

        from vlm_jax import models
        from vlm_jax.sampling import attention

        png = args.attention_png  # asked for: an error if the model has no attention over the image
        if png is None and attention.has_image_attention(models.build(config)):
            stem = os.path.splitext(os.path.basename(args.image[0]))[0]
            png = os.path.join(workdir, f"attention_{stem}.png")
        caption.caption_image(
            workdir, args.image[0], config=config, method=args.method, beam_size=args.beam_size,
            max_new_tokens=args.max_new_tokens, step=args.step, out=sys.stdout, attention_png=png or None,
        )
        return 0
    if draw.has_generate(config):  # a text-to-image run
        return _sample_images(args, workdir, config)
    if args.prompt is None:
        raise config_lib.ConfigError("give --prompt (text) or --image (a captioning run)")
    if len(args.prompt) > 1 or args.interpolate:
        raise config_lib.ConfigError("a language model continues one --prompt (quote it); --interpolate draws images")
    prompt = args.prompt[0]
    template = args.template
    if template == "auto":
        template = "alpaca" if config.data.source in ("world_instruct", "alpaca") else "none"
    if template == "alpaca":
        prompt = text.format_prompt(prompt, args.input)
    elif args.input:
        raise config_lib.ConfigError("--input needs --template alpaca")
    sample.run_sample(
        workdir, prompt, config=config, max_new_tokens=args.max_new_tokens or 64, method=args.method or "greedy",
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, beam_size=args.beam_size or 4,
        seed=args.seed, step=args.step, out=sys.stdout,
    )
    return 0


def _sample_images(args, workdir, config) -> int:
    """The image path of `sample`: -n images drawn for --prompt, written as a grid to --out."""
    from vlm_jax.sampling import draw, images

    if args.prompt is None:
        raise config_lib.ConfigError("give --prompt: what to draw (this run is text-to-image)")
    if args.num < 1:
        raise config_lib.ConfigError(f"-n {args.num}: draw at least one image")
    if args.interpolate and (len(args.prompt) != 2 or args.interpolate < 2):
        raise config_lib.ConfigError("--interpolate STEPS (at least 2) blends exactly two prompts")
    if args.rerank and (args.rerank < args.num or args.interpolate):
        raise config_lib.ConfigError(f"--rerank N keeps the -n best of N draws: N >= n ({args.num}), no --interpolate")
    try:
        if args.interpolate:
            path = images.run_interpolation(workdir, args.prompt, steps=args.interpolate, config=config,
                                            num=args.num, out=args.out, seed=args.seed, step=args.step)
        else:
            path = images.run_image_sample(workdir, args.prompt, config=config, num=args.num, out=args.out,
                                           seed=args.seed, step=args.step, rerank=args.rerank,
                                           clip_workdir=args.clip_workdir)
    except draw.PromptError as e:
        print(f"vlm-jax: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _sample_from_images(args, workdir, config) -> int:
    """unCLIP's image path of `sample`: -n variations of one --image, or --interpolate STEPS
    between two, every stage's grid written (sampling.images.run_image_variations)."""
    from vlm_jax.sampling import images

    if args.prompt is not None or args.rerank:
        raise config_lib.ConfigError("--image draws from an image's CLIP embedding: no --prompt or --rerank with it")
    try:
        path = images.run_image_variations(workdir, args.image, config=config, num=args.num,
                                           interpolate=args.interpolate, out=args.out, seed=args.seed, step=args.step)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
    print(f"wrote {path}")
    return 0


def cmd_data(args, overrides) -> int:
    from vlm_jax.data import preview

    config = _load_config(args.config, None, overrides)
    path = preview.write_preview(config, args.out, split=args.split, num=args.num)
    print(f"wrote {path}")
    return 0


def cmd_convert(args, overrides) -> int:
    import orbax.checkpoint as ocp

    from vlm_jax import convert

    del overrides
    out = local_dir(args.out, "--out")
    if args.from_diffusers:
        tokenizer = os.path.join(args.from_diffusers, "tokenizer")
        bpe = None
        if os.path.isdir(tokenizer):  # the prompt's tokenizer travels with the weights
            from vlm_jax.data.clip_bpe import ClipTokenizer

            bpe = ClipTokenizer.load(tokenizer)
        config, params = convert.pipeline_config(convert.from_diffusers(args.from_diffusers), tokenizer=bpe)
        if bpe is not None:
            shutil.copytree(tokenizer, os.path.join(out, "tokenizer"), dirs_exist_ok=True)
            config.tokenizer.path = os.path.abspath(os.path.join(out, "tokenizer"))
        else:
            print(f"vlm-jax: {args.from_diffusers} has no tokenizer/: set tokenizer.path before sampling",
                  file=sys.stderr)
    else:
        config, params = convert.from_hf(args.from_hf)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out, "params"), params, force=True)
    checkpointer.wait_until_finished()
    print(f"wrote {out}/config.json and {out}/params")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (overrides `--config.x=y` are split off before it runs)."""
    parser = argparse.ArgumentParser(prog="vlm-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) a run")
    p.add_argument("--config", required=True, help="path.py[:variant]")
    p.add_argument("--workdir", required=True)
    p.add_argument("--stop_at_step", type=int, default=None,
                   help="save and stop once this step is reached (as a preemption would)")
    g = p.add_argument_group(
        "multi-host", "jax.distributed.initialize: automatic under SLURM, Open MPI and on Cloud TPU pods; "
        "explicit with these flags or VLM_JAX_COORDINATOR_ADDRESS, VLM_JAX_NUM_PROCESSES, VLM_JAX_PROCESS_ID "
        "(VLM_JAX_DISTRIBUTED=0: never, =1: always, with JAX's own detection)")
    g.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    g.add_argument("--num_processes", type=int, default=None)
    g.add_argument("--process_id", type=int, default=None, help="0 .. num_processes - 1")
    g.add_argument("--local_device_count", type=int, default=None,
                   help="fake CPU devices per process [VLM_JAX_LOCAL_DEVICE_COUNT]")
    g.add_argument("--initialization_timeout", type=int, default=None,
                   help="seconds to wait for all processes to join [VLM_JAX_INITIALIZATION_TIMEOUT, 300]")
    g.add_argument("--heartbeat_timeout", type=int, default=None,
                   help="seconds after which a silent process counts as dead and the run stops "
                        "[VLM_JAX_HEARTBEAT_TIMEOUT, 60]")
    g.add_argument("--shutdown_timeout", type=int, default=None,
                   help="seconds the exit barrier waits for the other processes [VLM_JAX_SHUTDOWN_TIMEOUT, 120]")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("eval", help="evaluate a run's latest checkpoint")
    p.add_argument("--config", default=None)
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("sample", help="generate text from a run's checkpoint, streamed as it comes "
                                      "(images for a text-to-image run)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default=None, help="default: the run's config.json")
    p.add_argument("--prompt", default=None, nargs="+",
                   help="the text to continue (language models), or what to draw (text-to-image runs: "
                        "one or more prompts, a grid row each, the same noise down each column)")
    p.add_argument("--interpolate", type=int, default=0, metavar="STEPS",
                   help="text-to-image runs with two prompts: STEPS columns blending the first into "
                        "the second, -n rows of one noise each")
    p.add_argument("-n", "--num-samples", dest="num", type=int, default=16,
                   help="text-to-image runs: how many images to draw [16]")
    p.add_argument("--out", default=None, help="text-to-image runs: the grid PNG [<workdir>/sample.png]")
    p.add_argument("--rerank", type=int, default=0, metavar="N",
                   help="text-to-image runs: draw N per prompt, show the -n best by a CLIP's score [0: off]")
    p.add_argument("--clip-workdir", dest="clip_workdir", default=None,
                   help="with --rerank: the CLIP run that judges [the run's evaluator's clip_workdir]")
    p.add_argument("--image", default=None, nargs="+",
                   help="an image file to caption (captioning runs); unCLIP runs: -n variations of one "
                        "image, or two images with --interpolate STEPS")
    p.add_argument("--attention-png", default=None,
                   help="with --image: where to write the per-word attention figure "
                        "[<workdir>/attention_<image>.png; '' for none]")
    p.add_argument("--input", default="", help="the Alpaca input field (with --template alpaca)")
    p.add_argument("--template", choices=["auto", "alpaca", "none"], default="auto",
                   help="auto: the Alpaca prompt for instruction-tuned runs, raw text otherwise")
    p.add_argument("--max-new-tokens", type=int, default=None, help="[64; captions: config.decode's]")
    p.add_argument("--method", choices=["greedy", "sample", "beam"], default=None,
                   help="[greedy; captions: config.decode's]")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--beam-size", type=int, default=None, help="[4; captions: config.decode's]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None)
    p.set_defaults(fn=cmd_sample)
    from vlm_jax import plan

    plan.add_subparser(sub)
    p = sub.add_parser("data", help="look at the data")
    p.add_argument("action", choices=["preview"])
    p.add_argument("--config", required=True)
    p.add_argument("--out", default="preview.png")
    p.add_argument("--split", default="train")
    p.add_argument("--num", type=int, default=16)
    p.set_defaults(fn=cmd_data)
    p = sub.add_parser("convert", help="import Hugging Face weights")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", help="a directory with config.json + *.safetensors")
    source.add_argument("--from-diffusers", help="a diffusers pipeline folder (Stable Diffusion 1.x / 2.x layout)")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vlm-jax` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, overrides = config_lib.split_overrides(argv)
        args = build_parser().parse_args(rest)
        return args.fn(args, overrides)
    except config_lib.ConfigError as e:
        print(f"vlm-jax: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from vlm_jax.parallel.distributed import DistributedError

        if not isinstance(e, DistributedError):
            raise
        print(f"vlm-jax: multi-host: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
