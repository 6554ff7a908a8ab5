"""Zero-shot and retrieval metrics against hand-checked cases."""

import numpy as np
import pytest

from vlm_jax.evals.retrieval import retrieval_metrics
from vlm_jax.evals.zero_shot import class_embeddings, zero_shot_metrics


def test_retrieval_perfect_and_shifted():
    img = np.eye(4)
    # Two captions per image; the second caption of image i points at image (i + 1) % 4.
    txt = np.concatenate([np.eye(4), np.roll(np.eye(4), 1, axis=1)])
    owner = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    m = retrieval_metrics(img, txt, owner, ks=(1, 2))
    assert m["i2t_r1"] == 1.0  # Each image's best caption is its own first caption.
    assert m["t2i_r1"] == 0.5  # The shifted captions retrieve the wrong image first.
    # Their own image is next (ties with the other zero-similarity images count in its favour).
    assert m["t2i_r2"] == 1.0


def test_retrieval_matches_brute_force():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(20, 8)), rng.normal(size=(60, 8))
    owner = np.repeat(np.arange(20), 3)
    m = retrieval_metrics(img, txt, owner, ks=(1, 5))
    i = img / np.linalg.norm(img, axis=1, keepdims=True)
    t = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    s = i @ t.T
    i2t5 = np.mean([bool(set(np.argsort(-s[n])[:5]) & set(np.where(owner == n)[0])) for n in range(20)])
    t2i1 = np.mean([np.argmax(s[:, m_]) == owner[m_] for m_ in range(60)])
    assert m["i2t_r5"] == pytest.approx(i2t5)
    assert m["t2i_r1"] == pytest.approx(t2i1)


def test_zero_shot_metrics_and_prompt_ensembling():
    classes = ["a", "b", "c"]
    templates = ["{} one", "{} two"]
    table = {f"{c} {t}": np.eye(3)[k] + 0.1 * j for k, c in enumerate(classes) for j, t in enumerate(["one", "two"])}
    emb = class_embeddings(lambda texts: np.stack([table[t] for t in texts]), classes, templates)
    assert emb.shape == (3, 3) and np.allclose(np.linalg.norm(emb, axis=1), 1)
    images = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])
    labels = np.array([0, 1, 2, 2])
    held = np.array([False, False, True, True])
    m = zero_shot_metrics(images, emb, labels, held)
    assert m["zero_shot_top1"] == 0.75
    assert m["zero_shot_top1_heldout"] == 0.5 and m["zero_shot_top1_seen"] == 1.0
    assert m["zero_shot_top5"] == 1.0


def test_zero_shot_split_by_object_count():
    classes = np.eye(3)
    images = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])
    labels = np.array([0, 1, 1, 2])
    held = np.array([True, False, True, False])
    m = zero_shot_metrics(images, classes, labels, held, num_objects=np.array([1, 1, 2, 3]))
    assert m["zero_shot_top1_single"] == 1.0 and m["zero_shot_top1_multi"] == 0.0
    assert m["zero_shot_top1_single_heldout"] == 1.0 and m["zero_shot_top1_multi_heldout"] == 0.0
    assert m["zero_shot_top1_heldout"] == 0.5 and m["zero_shot_top1_seen"] == 0.5
