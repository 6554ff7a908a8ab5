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
"""

from __future__ import annotations

import os
from collections.abc import Sequence

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
    rows = [
        draw.generate_images(task, model, variables, np.repeat(row[None], draws, axis=0),
                             jax.random.PRNGKey(int(seed)), config, batch_size)
        for row in tokens
    ]
    if judge is not None:
        rows = [best_of(judge, row, prompt, int(num)) for row, prompt in zip(rows, prompts)]
    path = out if out is not None else os.path.join(workdir, "sample.png")
    return draw.write_grid(path, rows, prompts)


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
