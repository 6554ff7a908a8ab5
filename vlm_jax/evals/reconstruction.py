"""How well a first-stage model keeps what is in an image: kind `reconstruction`.

    config.evals.val = dict(kinds=("reconstruction",), split="validation", num_examples=500,
                            batch_size=256, num_png=16)

Two kinds of model: an image tokenizer (models.dvae, with encode_codes / decode_codes): each
validation image goes through the hard codes, `decode_codes(encode_codes(image))` (what a DALL-E
transformer reads and writes); a continuous autoencoder (models.autoencoder_kl, with
`reconstruct`): each image through the posterior mean, `decode(mean)` (what latent diffusion
decodes). The evaluator reports, over the whole split:

* `val/recon/mse`: mean squared error of the reconstructions in the data normalisation;
* tokenizers only: `val/recon/perplexity`: exp of the entropy of the histogram of all the split's
  codes, and `val/recon/dead_codes`: how many of the K codes no image of the split uses;
* when the source gives each image's objects (the built-in world): the world scorer
  (`vlm_jax.data.scorer.score`) on the reconstructions, turned back into uint8 pixels, against the
  image's objects: `val/recon/<attribute>_acc` for color, shape, size and position (per image the
  share of its objects with that attribute right, averaged over images), `val/recon/main_acc`
  (the main object fully right) and `val/recon/all_acc` (every object right and nothing else).

`write_grid(directory, step)` draws the first `num_png` originals with their reconstructions below
to `<directory>/<name>_step<step>.png`; `last_reconstructions` keeps the last call's uint8 images.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vlm_jax.evals.features import BatchedApply

PNG_SCALE = 4  # world images are 32 px: upscaled (nearest) so that pixels stay visible
PNG_COLUMNS = 8
_PAD = 2


def codebook_usage(codes: np.ndarray, num_codes: int) -> dict[str, float]:
    """perplexity (exp of the entropy of the code histogram) and dead_codes (codes never used) of
    int codes [...] in [0, num_codes)."""
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= num_codes):
        raise ValueError(f"codes outside [0, {num_codes}): {codes.min()}..{codes.max()}")
    counts = np.bincount(codes, minlength=num_codes).astype(np.float64)
    probs = counts[counts > 0] / max(codes.size, 1)
    return {
        "perplexity": float(np.exp(-np.sum(probs * np.log(probs)))),
        "dead_codes": float(np.sum(counts == 0)),
    }


def scene_scores(images: np.ndarray, scenes: list[list[dict[str, Any]]]) -> dict[str, float]:
    """The scorer's accuracies of uint8 images [N, S, S, 3] against their scenes (lists of object
    dicts): <attribute>_acc, main_acc and all_acc, each the mean over images."""
    from vlm_jax.data import scorer

    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    rows = [scorer.score(image, scene) for image, scene in zip(images, scenes)]
    out = {}
    for attribute in scorer.ATTRIBUTES:
        values = [r[f"{attribute}_acc"] for r in rows if f"{attribute}_acc" in r]
        if values:
            out[f"{attribute}_acc"] = float(np.mean(values))
    out["main_acc"] = float(np.mean([r["main_correct"] for r in rows]))
    out["all_acc"] = float(np.mean([r["all_correct"] for r in rows]))
    return out


def comparison_grid(originals: np.ndarray, reconstructions: np.ndarray, columns: int = PNG_COLUMNS,
                    scale: int = PNG_SCALE) -> np.ndarray:
    """uint8 [N, S, S, 3] twice -> one uint8 image: rows of up to `columns` originals, each with its
    reconstructions in the row below, upscaled `scale` times (nearest), white gaps between."""
    if originals.shape != reconstructions.shape or originals.ndim != 4 or len(originals) == 0:
        raise ValueError(f"need two equal non-empty [N, S, S, 3] stacks, got {originals.shape} and "
                         f"{reconstructions.shape}")
    n, s = originals.shape[:2]
    cell = s * scale
    cols = min(columns, n)
    bands = -(-n // cols)
    grid = np.full((bands * 2 * (cell + _PAD) + _PAD, cols * (cell + _PAD) + _PAD, 3), 255, np.uint8)
    for i in range(n):
        band, col = divmod(i, cols)
        x = _PAD + col * (cell + _PAD)
        for row, image in enumerate((originals[i], reconstructions[i])):
            y = _PAD + (2 * band + row) * (cell + _PAD)
            grid[y : y + cell, x : x + cell] = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    return grid


class ReconstructionEvaluator:
    """One config.evals entry of kind reconstruction: loads its images once, then scores params."""

    kinds = ("reconstruction",)

    def __init__(
        self, name: str, eval_cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
        model: nn.Module, tokenizer: Any, mesh: Mesh,
    ):
        from vlm_jax.data import pipeline

        codes = all(hasattr(model, m) for m in ("encode_codes", "decode_codes"))
        if not codes and not hasattr(model, "reconstruct"):
            raise ValueError(f"evaluator {name!r}: reconstruction needs an image tokenizer with encode_codes "
                             f"and decode_codes (models.dvae) or an autoencoder with reconstruct "
                             f"(models.autoencoder_kl), not {type(model).__name__}")
        self.name = name
        self.config = config
        self.num_codes = int(model.num_codes) if codes else None  # None: a continuous autoencoder
        self.num_png = int(eval_cfg.get("num_png", 16))
        self.data = pipeline.eval_data(config, eval_cfg.split, eval_cfg.get("num_examples"), tokenizer)
        batch = int(eval_cfg.get("batch_size", 256))
        rules = config.sharding_rules
        if codes:
            self._encode = BatchedApply(model, "encode_codes", mesh, rules, batch)
            self._decode = BatchedApply(model, "decode_codes", mesh, rules, batch)
        else:
            self._reconstruct = BatchedApply(model, "reconstruct", mesh, rules, batch)
        self.originals = self._to_uint8(self.data["image"])
        self.last_reconstructions: np.ndarray | None = None

    def _to_uint8(self, images: np.ndarray) -> np.ndarray:
        from vlm_jax.data.normalise import denormalise

        return denormalise(images, self.config)

    def reconstruct(self, params: Any, model_state: dict | None = None) -> tuple[np.ndarray | None, np.ndarray]:
        """(codes int32 [N, h, w], or None for a continuous autoencoder; reconstructions float32
        [N, S, S, 3] in the data normalisation)."""
        model_state = model_state or {}
        if self.num_codes is None:
            return None, self._reconstruct(params, model_state, self.data["image"])
        codes = np.rint(self._encode(params, model_state, self.data["image"])).astype(np.int32)
        return codes, self._decode(params, model_state, codes)

    def __call__(self, params: Any, model_state: dict | None = None) -> dict[str, float]:
        """Metrics named '<evaluator>/recon/<metric>' (see the module docstring)."""
        codes, recon = self.reconstruct(params, model_state)
        out = {"mse": float(np.mean(np.square(recon - self.data["image"])))}
        if codes is not None:
            out.update(codebook_usage(codes, self.num_codes))
        self.last_reconstructions = self._to_uint8(recon)
        if "objects" in self.data:
            out.update(scene_scores(self.last_reconstructions, self.data["objects"]))
        return {f"{self.name}/recon/{k}": v for k, v in out.items()}

    def write_grid(self, directory: str, step: int) -> str:
        """Writes the first num_png originals above their last reconstructions to
        <directory>/<name>_step<step>.png; returns the path. Call after an evaluation."""
        from PIL import Image

        if self.last_reconstructions is None:
            raise ValueError(f"evaluator {self.name!r}: nothing reconstructed yet; call it first")
        n = max(1, min(self.num_png, len(self.originals)))
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{self.name}_step{int(step)}.png")
        Image.fromarray(comparison_grid(self.originals[:n], self.last_reconstructions[:n])).save(path)
        return path
