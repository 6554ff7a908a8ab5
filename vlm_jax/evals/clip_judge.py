"""A CLIP run as the judge of generated images: embeddings for the CLIP score, reranking and FD.

    judge = ClipJudge(resolve_clip_workdir("stage:clip", workdir), mesh)
    judge.embed_images(uint8 [N, S, S, 3]) -> float32 [N, E]    (unit length)
    judge.embed_texts(["a red circle.", ...]) -> float32 [T, E]  (unit length)
    clip_score(image_embeds, text_embeds) -> float32 [N] = 100 * max(cos, 0)

The run is any image-text model with encode_image / encode_text (a world CLIP: configs/clip.py).
Its latest checkpoint is read with its own config.json and tokenizer; images are fit to its image
size and normalisation (data.pipeline.preprocess_images) and texts tokenised at its text length (a
text that would be cut is an error). The params are restored replicated over the given mesh (a
one-device mesh when none is given), so the judge runs beside the model being trained.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from vlm_jax.evals.features import BatchedApply, l2_normalize

STAGE_PREFIX = "stage:"


def resolve_clip_workdir(spec: str, workdir: str | None) -> str:
    """clip_workdir -> the folder of the CLIP run: a path as given, or for "stage:<name>" the stage
    <name> of the current run of stages (the sibling <run root>/<name> of the evaluated run's own
    workdir, as train.stages lays them out). FileNotFoundError when there is no run there."""
    spec = str(spec).strip()
    if spec.startswith(STAGE_PREFIX):
        name = spec[len(STAGE_PREFIX):].strip()
        if not name or os.sep in name:
            raise ValueError(f"clip_workdir {spec!r}: write 'stage:<name>' with the name of a stage")
        if not workdir:
            raise ValueError(f"clip_workdir {spec!r} names a stage, but the evaluator was built without its run's workdir")
        path = os.path.join(os.path.dirname(os.path.abspath(workdir)), name)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"clip_workdir {spec!r}: no stage folder {path} beside the run {workdir}")
    else:
        path = spec
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"clip_workdir {spec!r}: {path} holds no run (no config.json)")
    return path


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Unit-length image embeddings [N, E] and text embeddings [N, E], row by row -> float32 [N] =
    100 * max(cos, 0), the CLIP score of the text-to-image literature (w = 100; Hessel et al.'s
    CLIPScore has w = 2.5)."""
    cos = np.sum(np.asarray(image_embeds, np.float32) * np.asarray(text_embeds, np.float32), axis=-1)
    return 100.0 * np.maximum(cos, 0.0)


def _one_device_mesh() -> jax.sharding.Mesh:
    from vlm_jax.parallel.mesh import make_mesh

    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])


class ClipJudge:
    """The CLIP run in `path` (its latest checkpoint), restored over `mesh`, as an embedder."""

    def __init__(self, path: str, mesh: jax.sharding.Mesh | None = None, batch_size: int = 64):
        from vlm_jax import config as config_lib
        from vlm_jax import models, tasks
        from vlm_jax.data import tokenizer as tokenizer_lib
        from vlm_jax.train.checkpoint import restore_params

        with open(os.path.join(path, "config.json")) as f:
            self.config = config_lib.from_json(f.read())
        self.path = path
        self.model = models.build(self.config)
        if not (hasattr(self.model, "encode_image") and hasattr(self.model, "encode_text")):
            raise ValueError(f"the run in {path} ({type(self.model).__name__}) is not an image-text model "
                             "with encode_image / encode_text (a CLIP run)")
        self.tokenizer = tokenizer_lib.load_or_train(self.config, path)
        self.mesh = mesh if mesh is not None else _one_device_mesh()
        size = int(self.config.data.image_size)
        inputs = tasks.get(self.config.task.name).model_inputs(
            {"image": jnp.zeros((1, size, size, 3), jnp.float32), "tokens": jnp.zeros((1, 2), jnp.int32)}
        )
        shapes = jax.eval_shape(lambda r: nn.meta.unbox(
            self.model.init({"params": r, "dropout": r}, *inputs, train=False)), jax.random.key(0))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes)
        self.params = restore_params(path, abstract["params"])
        state = {k: v for k, v in abstract.items() if k not in ("params", "cache", "intermediates") and v}
        self.model_state = restore_params(path, state, key="model_state") if state else {}
        rules = self.config.sharding_rules
        self._rules = rules
        self._images = BatchedApply(self.model, "encode_image", self.mesh, rules, batch_size)
        self._texts = BatchedApply(self.model, "encode_text", self.mesh, rules, batch_size)

    def _apply(self, fn: BatchedApply, x: np.ndarray) -> np.ndarray:
        from vlm_jax.parallel.rules import as_rules

        with jax.set_mesh(self.mesh), nn.logical_axis_rules(as_rules(self._rules)):
            return l2_normalize(fn(self.params, self.model_state, x))

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] (any S: fit to the CLIP's image size) -> unit-length float32 [N, E]."""
        from vlm_jax.data import pipeline

        return self._apply(self._images, pipeline.preprocess_images(np.asarray(images, np.uint8), self.config))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> unit-length float32 [T, E]; ValueError for a text longer than the CLIP's text length."""
        length = int(self.config.data.text_length)
        tokens, cut = self.tokenizer.tokenize(list(texts), length, return_truncated=True)
        if cut.any():
            raise ValueError(f"{texts[int(np.argmax(cut))]!r} does not fit the CLIP's text length {length}")
        return self._apply(self._texts, np.asarray(tokens, np.int32))

    def describe(self) -> str:
        """What the judge is, for log lines."""
        return f"{type(self.model).__name__} run {self.path}"


def judge_from_config(eval_cfg: Any, workdir: str | None, mesh: jax.sharding.Mesh | None) -> ClipJudge | None:
    """The ClipJudge an evaluator config names (clip_workdir; None when empty)."""
    spec = str(eval_cfg.get("clip_workdir", "") or "")
    if not spec:
        return None
    return ClipJudge(resolve_clip_workdir(spec, workdir), mesh, int(eval_cfg.get("batch_size", 64)))
