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
    image_embeds: np.ndarray,
    class_embeds: np.ndarray,
    labels: np.ndarray,
    held_out: np.ndarray | None = None,
    num_objects: np.ndarray | None = None,
) -> dict[str, float]:
    """Top-1/top-5 accuracy of images [N,E] against classes [C,E] for labels [N].

    With held_out [N] (the label is a held-out pair) the top-1 is also split into heldout/seen;
    with num_objects [N] it is split into single-object scenes (where the class names the whole
    image) and multi-object ones (where it names only the main object among others).
    """
    logits = l2_normalize(image_embeds) @ class_embeds.T
    top5 = np.argsort(-logits, axis=1)[:, :5]
    hit1 = top5[:, 0] == labels
    hit5 = (top5 == labels[:, None]).any(axis=1)
    out = {"zero_shot_top1": float(hit1.mean()), "zero_shot_top5": float(hit5.mean())}
    groups = {"": np.ones_like(hit1)}
    if num_objects is not None:
        groups.update({"_single": num_objects == 1, "_multi": num_objects > 1})
    for suffix, members in groups.items():
        if suffix and members.any():
            out[f"zero_shot_top1{suffix}"] = float(hit1[members].mean())
        if held_out is not None:
            for name, part in (("heldout", held_out), ("seen", ~held_out)):
                if (members & part).any():
                    out[f"zero_shot_top1{suffix}_{name}"] = float(hit1[members & part].mean())
    return out
