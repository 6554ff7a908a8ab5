"""Instruction following: greedy answers to held-out instructions, scored by exact match.

    config.evals.val = dict(kinds=("exact_match",), split="validation", num_examples=256,
                            max_new_tokens=16, batch_size=64, source="world_instruct")

(`source`, optional, overrides config.data.source for the items: a model pretrained on plain
text is scored on instructions that way.)

reports `val/exact_match` over all items, `val/exact_match_heldout` over the items marked held out
(for the world: a held-out colour-shape pair, or a held-out arithmetic pair) and
`val/exact_match/<kind>` per kind of item. Answers are compared after data.text.normalise_answer.
"""

from __future__ import annotations

import copy
from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np

from vlm_jax.data import text


class InstructEvaluator:
    """One config.evals entry of kind exact_match: loads its items once, then scores params."""

    kinds = ("exact_match",)

    def __init__(
        self, name: str, eval_cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
        model: nn.Module, tokenizer: Any,
    ):
        from vlm_jax.sampling import decode

        self.name = name
        if eval_cfg.get("source"):  # e.g. instructions to score a model pretrained on plain text
            config = copy.deepcopy(config)
            config.data.source = eval_cfg.source
        self.data = text.instruction_eval_data(config, eval_cfg.split, eval_cfg.get("num_examples"), tokenizer)
        if not self.data["prompts"]:
            raise ValueError(f"evaluator {name!r}: split {eval_cfg.split!r} has no usable instructions")
        self.tokenizer = tokenizer
        self.decoder = decode.decoder_for(model)
        self.max_new_tokens = int(eval_cfg.get("max_new_tokens", 16))
        self.batch_size = int(eval_cfg.get("batch_size", 64))
        self.last_answers: list[str] = []

    def answers(self, params: Any) -> list[str]:
        """The model's greedy answer to every item, decoded."""
        from vlm_jax.sampling import decode

        prompts = self.data["prompts"]
        # Similar lengths together: less left padding, fewer prompt-length compiles.
        order = np.argsort([len(p) for p in prompts], kind="stable")
        answers: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            new = decode.generate(
                self.decoder, params, [prompts[i] for i in rows], max_new_tokens=self.max_new_tokens,
                stop_tokens=(self.tokenizer.eos_id,), pad_id=max(self.tokenizer.pad_id, 0),
            )
            for i, ids in zip(rows, new):
                answers[int(i)] = self.tokenizer.decode(ids)
        return answers

    def __call__(self, params: Any, model_state: dict | None = None) -> dict[str, float]:
        """Metrics named '<evaluator>/<metric>'."""
        del model_state
        self.last_answers = self.answers(params)
        norm = text.normalise_answer
        hit = np.asarray([norm(a) == norm(b) for a, b in zip(self.last_answers, self.data["answers"])])
        held = np.asarray(self.data["held_out"], bool)
        kinds = np.asarray(self.data["kinds"])
        out = {"exact_match": float(hit.mean())}
        if held.any():
            out["exact_match_heldout"] = float(hit[held].mean())
        for kind in sorted(set(kinds.tolist()) - {""}):
            out[f"exact_match/{kind}"] = float(hit[kinds == kind].mean())
        return {f"{self.name}/{k}": v for k, v in out.items()}

    def samples(self) -> list[dict[str, Any]]:
        """The last call's items: instruction, input, the model's answer, the reference, whether
        they match (after normalise_answer), kind and held-out flag."""
        norm = text.normalise_answer
        return [
            dict(instruction=str(rec.get("instruction", "")), input=str(rec.get("input", "")), answer=answer,
                 reference=ref, correct=norm(answer) == norm(ref), kind=kind, held_out=held)
            for rec, answer, ref, kind, held in zip(
                self.data["records"], self.last_answers, self.data["answers"], self.data["kinds"],
                self.data["held_out"],
            )
        ]
