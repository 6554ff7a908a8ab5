"""Zero-shot classification: images against prompt-ensembled class-name embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlm_jax.evals.features import l2_normalize


def class_embeddings(
    encode_text, class_names: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """[C, E] unit vectors: each class's prompts embedded, normalised, averaged, renormalised."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = l2_normalize(encode_text(prompts)).reshape(len(class_names), len(templates), -1)
    return l2_normalize(emb.mean(axis=1))


def zero_shot_metrics(
    image_embeds: np.ndarray, class_embeds: np.ndarray, labels: np.ndarray, held_out: np.ndarray | None
) -> dict[str, float]:
    """Top-1/top-5 accuracy [N,E] x [C,E] vs labels [N]; split by held-out pair when given."""
    logits = l2_normalize(image_embeds) @ class_embeds.T
    top5 = np.argsort(-logits, axis=1)[:, :5]
    hit1 = top5[:, 0] == labels
    hit5 = (top5 == labels[:, None]).any(axis=1)
    out = {"zero_shot_top1": float(hit1.mean()), "zero_shot_top5": float(hit5.mean())}
    if held_out is not None and held_out.any():
        out["zero_shot_top1_heldout"] = float(hit1[held_out].mean())
    if held_out is not None and (~held_out).any():
        out["zero_shot_top1_seen"] = float(hit1[~held_out].mean())
    return out
