"""Image captioning: a caption per image through vlm_jax.sampling.decode, scored with COCO metrics.

    config.evals.val = dict(kinds=("caption",), split="validation", num_examples=500,
                            method="greedy", beam_size=3, max_new_tokens=20, batch_size=128,
                            baseline=True)

reports `val/BLEU-1` .. `val/BLEU-4`, `val/ROUGE-L`, `val/CIDEr` (evals.caption_metrics.compute
over every evaluated image, its reference captions against the generated one) and the same under
`val/heldout/...` for the images marked held out (the world's held-out colour-shape pairs; absent
when the source marks none). CIDEr's document frequencies come from the references of the scored
set, so the held-out numbers are computed on the held-out subset alone (as an eval of that subset
would), not sliced out of the full set's per-image scores.

`method` is "greedy" or "beam" (`beam_size`, `length_penalty`); unset, `method`, `beam_size` and
`max_new_tokens` fall back to config.decode, then to greedy / 3 / 20. Images are decoded in
batches of `batch_size` rows, prompt [bos], stopping at eos; the last batch is padded (repeating
its last image) so every batch has one shape and one compile.

With `baseline=True` the evaluator also reports, once per construction, a nearest-caption
baseline under `val/baseline/...` (and `val/baseline/heldout/...`): each evaluated image gets the
first caption of the training image nearest to it in pixel space (L2 distance between the
normalised images at 32x32, over the first `baseline_train_examples` (5000) usable training
images; ties go to the earlier image; an image never retrieves itself when the evaluated split
is the training split). A model whose captions do not beat it has learnt little beyond "looks
like".

With `grounding=True` (Show, Attend and Tell or CoCa on the built-in world) it also reports
evals.grounding's measures under `val/grounding/...`: for each generated colour or shape word, the
share of the attention with which it was predicted that falls inside the box of the object it
names, against the box's share of the image area (what a uniform map would put there).

`last_captions` keeps the latest generated captions (one string per image, in data order), and
`last_ids` their ids.
"""

from __future__ import annotations

import copy
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vlm_jax.evals import caption_metrics
from vlm_jax.sampling.attention import as_grid as attention_grid

METHODS = ("greedy", "beam")
BASELINE_SIZE = 32  # side of the images the nearest-caption baseline compares
_DISTANCE_CHUNK = 256  # evaluated images per block of the distance matrix


class CaptionEvaluator:
    """One config.evals entry of kind caption: loads its images and references once, then scores params."""

    kinds = ("caption",)

    def __init__(
        self, name: str, eval_cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
        model: nn.Module, tokenizer: Any,
    ):
        from vlm_jax.data import pipeline
        from vlm_jax.sampling import decode

        self.name = name
        decode_cfg = config.get("decode") or {}
        self.method = str(eval_cfg.get("method") or decode_cfg.get("method", "greedy"))
        if self.method not in METHODS:
            raise ValueError(f"evaluator {name!r}: method {self.method!r}; choose one of {METHODS}")
        self.beam_size = int(eval_cfg.get("beam_size") or decode_cfg.get("beam_size", 3))
        self.length_penalty = float(eval_cfg.get("length_penalty", decode_cfg.get("length_penalty", 0.6)))
        self.max_new_tokens = int(eval_cfg.get("max_new_tokens") or decode_cfg.get("max_new_tokens", 20))
        self.batch_size = int(eval_cfg.get("batch_size", 128))
        self.data = pipeline.eval_data(config, eval_cfg.split, eval_cfg.get("num_examples"), tokenizer)
        self.references = {i: list(caps) for i, caps in enumerate(self.data["captions"])}
        held = self.data.get("held_out")
        self.held_out = np.asarray(held, bool) if held is not None else np.zeros(len(self.references), bool)
        self.tokenizer = tokenizer
        self.model = model
        self.image_size = int(config.data.image_size)
        self.decoder = decode.decoder_for(model)
        self.grounding = bool(eval_cfg.get("grounding", False))
        if self.grounding:
            from vlm_jax.sampling import attention

            if not attention.has_image_attention(model):
                raise ValueError(f"evaluator {name!r}: grounding needs a model with attention over the image "
                                 f"(Show, Attend and Tell or CoCa), not {type(model).__name__}")
            if "objects" not in self.data:
                raise ValueError(f"evaluator {name!r}: grounding needs object boxes (the built-in world's)")
            self._maps = jax.jit(lambda v, im, t: attention.flat_attention(model, v, im, t))
        self.last_ids: list[list[int]] = []
        self.last_captions: list[str] = []
        self.baseline_captions: list[str] | None = None
        self.baseline: dict[str, float] = {}
        if eval_cfg.get("baseline", False):
            num_train = int(eval_cfg.get("baseline_train_examples", 5000))
            self.baseline_captions = nearest_captions(config, eval_cfg.split, self.data, num_train, tokenizer)
            self.baseline = self.score(self.baseline_captions)

    # ------------------------------------------------------------------ generation and scoring

    def _variables(self, params: Any, model_state: dict | None) -> Any:
        """params alone, or a variables dict when the model keeps state (e.g. BatchNorm's
        batch_stats): the captioners' decoders take either (models.show_tell.variables_of)."""
        state = {k: v for k, v in (model_state or {}).items() if k != "cache" and v}
        return {"params": params, **state} if state else params

    def _batches(self):
        """(start, rows, images) per batch of evaluated images; the last batch is padded with copies
        of its last image so that every batch has one shape (one compile)."""
        images = self.data["image"]
        n = len(images)
        for start in range(0, n, self.batch_size):
            batch = images[start : start + self.batch_size]
            rows = len(batch)
            if rows < self.batch_size and n > self.batch_size:
                batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - rows, axis=0)])
            yield start, rows, batch

    def generate(self, params: Any, model_state: dict | None = None) -> list[list[int]]:
        """The model's caption of every evaluated image as generated ids (data order)."""
        from vlm_jax.sampling import decode

        variables = self._variables(params, model_state)
        out: list[list[int]] = []
        for _, rows, batch in self._batches():
            new = decode.generate(
                self.decoder, variables, [[self.tokenizer.bos_id]] * len(batch), max_new_tokens=self.max_new_tokens,
                method=self.method, beam_size=self.beam_size, length_penalty=self.length_penalty,
                stop_tokens=(self.tokenizer.eos_id,), pad_id=max(self.tokenizer.pad_id, 0),
                context=batch,
            )
            out.extend(list(ids) for ids in new[:rows])
        return out

    def captions(self, params: Any, model_state: dict | None = None) -> list[str]:
        """The model's caption of every evaluated image, decoded to text (data order)."""
        return [self.tokenizer.decode(ids) for ids in self.generate(params, model_state)]

    def ground(self, params: Any, model_state: dict | None, ids: list[list[int]]) -> dict[str, float]:
        """evals.grounding's measures of the generated captions `ids` (one per evaluated image)."""
        from vlm_jax.evals import grounding

        variables = self._variables(params, model_state)
        width = self.max_new_tokens + 1
        pad = max(self.tokenizer.pad_id, 0)
        words: list[grounding.Word] = []
        mentions = grounding.Mentions()
        for start, rows, batch in self._batches():
            tokens = np.full((len(batch), width), pad, np.int32)
            tokens[:, 0] = self.tokenizer.bos_id
            for r in range(rows):
                seq = ids[start + r][: width - 1]
                tokens[r, 1 : 1 + len(seq)] = seq
            maps = attention_grid(self._maps(variables, batch, tokens))
            for r in range(rows):
                got, seen = grounding.score(
                    maps[r], self.tokenizer.pieces(ids[start + r]), self.data["objects"][start + r], self.image_size
                )
                words.extend(got)
                mentions.add(seen)
        return grounding.summarise(words, mentions)

    def score(self, candidates: list[str]) -> dict[str, float]:
        """COCO metrics of one caption per image: all images, and 'heldout/...' for the held-out ones."""
        if len(candidates) != len(self.references):
            raise ValueError(f"{len(candidates)} captions for {len(self.references)} images")
        cands = dict(enumerate(candidates))
        out = dict(caption_metrics.compute(self.references, cands))
        held = np.flatnonzero(self.held_out)
        if held.size:
            sub = caption_metrics.compute(
                {int(i): self.references[int(i)] for i in held}, {int(i): cands[int(i)] for i in held}
            )
            out.update({f"heldout/{k}": v for k, v in sub.items()})
        return {k: float(v) for k, v in out.items()}

    def __call__(self, params: Any, model_state: dict | None = None) -> dict[str, float]:
        """Metrics named '<evaluator>/<metric>' (and '<evaluator>/baseline/<metric>')."""
        self.last_ids = self.generate(params, model_state)
        self.last_captions = [self.tokenizer.decode(ids) for ids in self.last_ids]
        out = self.score(self.last_captions)
        if self.grounding:
            out.update({f"grounding/{k}": v for k, v in self.ground(params, model_state, self.last_ids).items()})
        out.update({f"baseline/{k}": v for k, v in self.baseline.items()})
        return {f"{self.name}/{k}": v for k, v in out.items()}

    def samples(self) -> list[dict[str, Any]]:
        """The last call's captions, one per evaluated image (data order), with its references."""
        return [dict(image=i, caption=caption, references=self.references[i])
                for i, caption in enumerate(self.last_captions)]


# ---------------------------------------------------------------------- nearest-caption baseline


def _small(images: np.ndarray, size: int = BASELINE_SIZE) -> np.ndarray:
    """f32 [N, S, S, 3] -> f32 [N, size * size * 3]: box-averaged when S is a multiple of size,
    else resized (linear, antialiased)."""
    n, s = images.shape[0], images.shape[1]
    if s == size:
        small = images
    elif s % size == 0:
        f = s // size
        small = images.reshape(n, size, f, size, f, images.shape[-1]).mean(axis=(2, 4))
    else:
        shape = (n, size, size, images.shape[-1])
        small = np.asarray(jax.image.resize(images, shape, method="linear", antialias=True))
    return np.asarray(small, np.float32).reshape(n, -1)


def nearest_rows(query: np.ndarray, keys: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """For each row of query f32 [N, D], the index of its nearest row of keys f32 [M, D] (squared L2;
    ties: the lower index), a chunk of query rows at a time. exclude int [N] (optional): per query
    row, a key index it may not pick (-1: none)."""
    keys = np.asarray(keys, np.float32)
    key_sq = np.einsum("md,md->m", keys, keys)
    out = np.empty(len(query), np.int64)
    for start in range(0, len(query), _DISTANCE_CHUNK):
        q = np.asarray(query[start : start + _DISTANCE_CHUNK], np.float32)
        d = key_sq[None, :] - 2.0 * (q @ keys.T)  # |q|^2 is the same for every key of a row
        if exclude is not None:
            own = exclude[start : start + len(q)]
            rows = np.flatnonzero(own >= 0)
            d[rows, own[rows]] = np.inf
        out[start : start + len(q)] = np.argmin(d, axis=1)
    return out


def nearest_captions(
    config: ml_collections.ConfigDict, split: str, data: dict, num_train: int, tokenizer: Any,
    train_split: str = "train",
) -> list[str]:
    """Per image of `data` (an eval_data result for `split`), the first caption of the nearest
    training image in pixel space (normalised images at 32x32; see the module docstring)."""
    from vlm_jax.data import pipeline

    size = int(config.data.image_size)
    small_cfg = config
    if size != BASELINE_SIZE and str(config.data.source) != "world":
        # Files are resized on load: load straight at 32x32 (a few MB for 5000 images, not GBs at
        # 224); the built-in world is rendered per image size, so it is loaded as trained and shrunk.
        small_cfg = copy.deepcopy(config)
        with small_cfg.unlocked():
            small_cfg.data.image_size = BASELINE_SIZE
    train = pipeline.eval_data(small_cfg, train_split, num_train, tokenizer)
    query_images = data["image"]
    if small_cfg is not config:
        # The evaluated images again, fit to 32x32 the same way as the training images.
        query = pipeline.eval_data(small_cfg, split, len(data["index"]), tokenizer)
        if not np.array_equal(query["index"], data["index"]):
            raise ValueError(f"split {split!r} gave different examples at {BASELINE_SIZE}x{BASELINE_SIZE}")
        query_images = query["image"]
    exclude = None
    if split == train_split:  # never retrieve the image itself
        where = {int(i): j for j, i in enumerate(train["index"])}
        exclude = np.asarray([where.get(int(i), -1) for i in data["index"]], np.int64)
    nearest = nearest_rows(_small(query_images), _small(train["image"]), exclude)
    return [train["captions"][int(j)][0] for j in nearest]
