"""The image path of `vlm-jax sample`: images drawn for a prompt by a text-to-image run, as a grid.

    vlm-jax sample --workdir RUN --prompt "a large red circle on the left" -n 16 --out grid.png [--seed S]

Any run whose task module defines generate (see sampling.draw) takes this path: the run is
restored with sample.load_for_sampling, the prompt tokenised with the run's tokenizer at
config.data.text_length (an empty prompt, or one that would be cut, is a draw.PromptError), and
the n images are written as one row with the prompt under it.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from vlm_jax.sampling import draw


def run_image_sample(
    workdir: str,
    prompt: str,
    *,
    config: ml_collections.ConfigDict | None = None,
    num: int = 16,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    step: int | None = None,
    batch_size: int = 16,
) -> str:
    """Draws `num` images for `prompt` with the text-to-image run in workdir (its checkpoint at
    `step`, default the latest; rng PRNGKey(seed)) and writes them as a one-row grid with the
    prompt under it to `out` (default <workdir>/sample.png); returns the path. draw.PromptError for an
    empty or over-long prompt, ValueError for a run whose task draws no images."""
    from vlm_jax.sampling.sample import load_for_sampling

    if int(num) < 1:
        raise ValueError(f"-n {num}: draw at least one image")
    draw.check_prompt(prompt)
    config, model, params, tokenizer = load_for_sampling(workdir, config, step=step)
    task = draw.text_to_image_task(config)
    tokens = draw.prompt_tokens(tokenizer, [prompt], int(config.data.text_length))
    images = draw.generate_images(
        task, model, draw.as_variables(params), np.repeat(tokens, int(num), axis=0), jax.random.PRNGKey(int(seed)),
        config, batch_size,
    )
    path = out if out is not None else os.path.join(workdir, "sample.png")
    return draw.write_grid(path, [images], [prompt])
