"""Image->text and text->image retrieval recall@K with several captions per image."""

from __future__ import annotations

import numpy as np

from vlm_jax.evals.features import l2_normalize


def retrieval_metrics(
    image_embeds: np.ndarray, text_embeds: np.ndarray, text_owner: np.ndarray, ks=(1, 5, 10)
) -> dict[str, float]:
    """Recall@K. images [N,E], texts [M,E], text_owner [M] = index of each text's image.

    i2t: an image counts as found when any of its texts is in its top K; t2i: each text's image.
    """
    sims = l2_normalize(image_embeds) @ l2_normalize(text_embeds).T  # [N, M]
    n = sims.shape[0]
    out = {}
    # i2t: rank of the best-ranked own text = number of texts scoring above it.
    own = text_owner[None, :] == np.arange(n)[:, None]
    best_own = np.where(own, sims, -np.inf).max(axis=1)
    i2t_rank = (sims > best_own[:, None]).sum(axis=1)
    # t2i: number of images scoring above the text's own image.
    own_score = sims[text_owner, np.arange(sims.shape[1])]
    t2i_rank = (sims > own_score[None, :]).sum(axis=0)
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).mean())
        out[f"t2i_r{k}"] = float((t2i_rank < k).mean())
    return out
