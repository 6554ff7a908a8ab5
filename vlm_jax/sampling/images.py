"""The image path of `vlm-jax sample`: images drawn for a prompt by a text-to-image run, as a grid.

    vlm-jax sample --workdir RUN --prompt "a large red circle on the left" -n 16 --out grid.png [--seed S]
    vlm-jax sample --workdir RUN --prompt "a red circle." "a blue square." "a green ring." -n 8
    vlm-jax sample --workdir RUN --prompt "a red circle." "a blue square." --interpolate 8 -n 4

Any run whose task module defines generate (see sampling.draw) takes this path: the run is
restored with sample.load_for_sampling, the prompt tokenised with the run's tokenizer at
config.data.text_length (an empty prompt, or one that would be cut, is a draw.PromptError), and
the n images are written as one row with the prompt under it. Several prompts: a row each, every
row drawn with the same rng, so for a GAN column j has the same noise z in every row (style held,
content changed). --interpolate S (two prompts; a task with `interpolate`, e.g. GAN-INT-CLS): n
rows of one noise each, S columns from the first prompt's text embedding to the second's.
A cascade (a task with generate_stages: unCLIP's upsamplers over its decoder) writes every stage's
grid, the lowest resolution beside `out` as <out>_stage0.png, and so on (stage_path).

    vlm-jax sample --workdir runs/unclip --image scene.png -n 8                  # variations
    vlm-jax sample --workdir runs/unclip --image a.png b.png --interpolate 8     # between two images

run_image_variations: unCLIP's drawing from images (the task's variations / interpolate_images).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from vlm_jax.data.normalise import denormalise
from vlm_jax.sampling import draw


def _restore(workdir: str, config: ml_collections.ConfigDict | None, step: int | None, prompts: list[str]):
    from vlm_jax.sampling.sample import load_for_sampling

    for prompt in prompts:
        draw.check_prompt(prompt)
    config, model, params, tokenizer = load_for_sampling(workdir, config, step=step)
    tokens = draw.prompt_tokens(tokenizer, prompts, int(config.data.text_length))
    return config, model, draw.as_variables(params), tokens


def run_image_sample(
    workdir: str,
    prompt: str | Sequence[str],
    *,
    config: ml_collections.ConfigDict | None = None,
    num: int = 16,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    step: int | None = None,
    batch_size: int = 16,
    rerank: int = 0,
    clip_workdir: str | None = None,
) -> str:
    """Draws `num` images for each prompt (a string or a list) with the text-to-image run in
    workdir (its checkpoint at `step`, default the latest; every row with rng PRNGKey(seed)) and
    writes them as a grid, a row per prompt with the prompt under it, to `out` (default
    <workdir>/sample.png); returns the path. rerank N > 0: draw N per prompt and keep the `num`
    best by the CLIP of clip_workdir (module docstring). draw.PromptError for an empty or
    over-long prompt, ValueError for a run whose task draws no images."""
    if int(num) < 1:
        raise ValueError(f"-n {num}: draw at least one image")
    if rerank and int(rerank) < int(num):
        raise ValueError(f"--rerank {rerank} must be at least -n {num}: it keeps the n best of N")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("give at least one prompt")
    config, model, variables, tokens = _restore(workdir, config, step, prompts)
    task = draw.text_to_image_task(config)
    judge = _judge(workdir, config, clip_workdir) if rerank else None
    draws = int(rerank) if rerank else int(num)
    path = out if out is not None else os.path.join(workdir, "sample.png")
    if judge is None and hasattr(task, "generate_stages"):  # a cascade: every stage's grid
        rng = jax.random.PRNGKey(int(seed))
        staged = [task.generate_stages(model, variables, np.repeat(row[None], draws, axis=0), rng, config)
                  for row in tokens]
        return write_stages(path, [[row[k] for row in staged] for k in range(len(staged[0]))], prompts, config)
    rows = [
        draw.generate_images(task, model, variables, np.repeat(row[None], draws, axis=0),
                             jax.random.PRNGKey(int(seed)), config, batch_size)
        for row in tokens
    ]
    if judge is not None:
        rows = [best_of(judge, row, prompt, int(num)) for row, prompt in zip(rows, prompts)]
    return draw.write_grid(path, rows, prompts)


def stage_path(path: str | os.PathLike, stage: int) -> str:
    """Where stage `stage` (0: the lowest resolution) of a cascade's grid goes beside `path`."""
    stem, ext = os.path.splitext(os.fspath(path))
    return f"{stem}_stage{stage}{ext or '.png'}"


def write_stages(path: str | os.PathLike, stages: Sequence[Sequence[Any]], labels: Sequence[str],
                 config: ml_collections.ConfigDict) -> str:
    """stages[k]: the grid rows (data-normalised images [n, s, s, 3]) of stage k, lowest resolution
    first. The last stage's grid goes to `path`, each earlier one to stage_path(path, k); returns path."""
    for k, rows in enumerate(stages):
        target = path if k == len(stages) - 1 else stage_path(path, k)
        draw.write_grid(target, [denormalise(np.asarray(r), config) for r in rows], labels)
    return os.fspath(path)


def read_image(path: str) -> np.ndarray:
    """An image file -> uint8 [H, W, 3] (data.pipeline.load_image); ValueError naming the file when
    it cannot be read."""
    from vlm_jax.data.pipeline import load_image

    image = load_image(path)
    if image is None:
        raise ValueError(f"cannot read image {path!r}")
    return image


def run_image_variations(
    workdir: str, images: Sequence[str], *, config: ml_collections.ConfigDict | None = None, num: int = 8,
    interpolate: int = 0, out: str | os.PathLike | None = None, seed: int = 0, step: int | None = None,
) -> str:
    """unCLIP from images: one image -> `num` variations (its CLIP embedding through the decoder and
    upsamplers; the task's variations[_stages]); two images with interpolate S >= 2 -> S images
    along the slerp of their embeddings (interpolate_images[_stages]). Every stage's grid is
    written (write_stages; default path <workdir>/variations.png or interpolation.png)."""
    from vlm_jax.sampling.sample import load_for_sampling

    images = list(images)
    if interpolate and (len(images) != 2 or int(interpolate) < 2):
        raise ValueError("--interpolate STEPS (at least 2) with --image blends exactly two images")
    if not interpolate and len(images) != 1:
        raise ValueError(f"variations start from one --image, got {len(images)} (two: add --interpolate STEPS)")
    if int(num) < 1:
        raise ValueError(f"-n {num}: draw at least one image")
    pixels = [read_image(p) for p in images]
    config, model, params, _ = load_for_sampling(workdir, config, step=step)
    variables = draw.as_variables(params)
    task = draw.text_to_image_task(config)
    name = "interpolate_images" if interpolate else "variations"
    if not callable(getattr(task, name, None)):
        raise ValueError(f"task {config.task.name!r} has no {name}: it does not draw from images")
    fn = getattr(task, f"{name}_stages", None)
    rng = jax.random.PRNGKey(int(seed))
    if interpolate:
        args, label = (pixels[0], pixels[1], np.linspace(0.0, 1.0, int(interpolate), dtype=np.float32)), \
            f"{os.path.basename(images[0])} -> {os.path.basename(images[1])}"
    else:
        args, label = (pixels[0], int(num)), f"variations of {os.path.basename(images[0])}"
    stages = fn(model, variables, *args, rng, config) if fn else [getattr(task, name)(model, variables, *args, rng, config)]
    path = out if out is not None else os.path.join(workdir, f"{'interpolation' if interpolate else 'variations'}.png")
    return write_stages(path, [[s] for s in stages], [label], config)


def _judge(workdir: str, config: ml_collections.ConfigDict, clip_workdir: str | None):
    """The ClipJudge for --rerank: clip_workdir, else the run's first evaluator's clip_workdir."""
    from vlm_jax.evals import clip_judge
    from vlm_jax.train import stages

    spec = clip_workdir or next(
        (str(e.get("clip_workdir")) for e in (config.get("evals") or {}).values()
         if isinstance(e, ml_collections.ConfigDict) and e.get("clip_workdir")), "")
    if not spec:
        raise ValueError("--rerank needs a CLIP to judge the samples: pass --clip-workdir RUN "
                         "(the run's evaluators name none)")
    own = stages.last_stage_dir(workdir) or workdir  # "stage:<name>" is a sibling of the drawing stage
    return clip_judge.ClipJudge(clip_judge.resolve_clip_workdir(spec, own))


def best_of(judge, images: np.ndarray, prompt: str, keep: int) -> np.ndarray:
    """uint8 images [N, S, S, 3] drawn for `prompt` -> the `keep` with the highest CLIP score
    against it, best first."""
    from vlm_jax.evals.clip_judge import clip_score

    text = judge.embed_texts([prompt])
    scores = clip_score(judge.embed_images(images), np.repeat(text, len(images), axis=0))
    return images[np.argsort(-scores, kind="stable")[:keep]]


def run_interpolation(
    workdir: str,
    prompts: Sequence[str],
    *,
    steps: int = 8,
    config: ml_collections.ConfigDict | None = None,
    num: int = 4,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    step: int | None = None,
) -> str:
    """An interpolation grid between two prompts: `num` rows (one noise draw each, from
    PRNGKey(seed)), `steps` columns from the first prompt's text conditioning to the second's
    (the task's interpolate); written to `out` (default <workdir>/interpolation.png)."""
    if len(prompts) != 2:
        raise ValueError(f"--interpolate takes two prompts, got {len(prompts)}")
    if int(steps) < 2 or int(num) < 1:
        raise ValueError(f"--interpolate {steps} -n {num}: at least 2 steps and 1 row")
    config, model, variables, tokens = _restore(workdir, config, step, list(prompts))
    task = draw.text_to_image_task(config)
    if not hasattr(task, "interpolate"):
        raise ValueError(f"task {config.task.name!r} has no interpolate: it cannot blend two prompts")
    betas = np.linspace(0.0, 1.0, int(steps), dtype=np.float32)
    images = task.interpolate(model, variables, tokens[0], tokens[1], betas, int(num),
                              jax.random.PRNGKey(int(seed)), config)  # [num, steps, S, S, 3]
    rows = [denormalise(np.asarray(r), config) for r in images]
    labels = [f"{prompts[0]} -> {prompts[1]}" if i == 0 else "" for i in range(len(rows))]
    path = out if out is not None else os.path.join(workdir, "interpolation.png")
    return draw.write_grid(path, rows, labels)
