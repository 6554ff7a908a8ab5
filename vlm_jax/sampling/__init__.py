"""Generation: jitted decoding loops (greedy, sampling, beam search) over a model's cache.

`decode` holds the loops, the `Decoder` protocol and the LLaMA adapter; `sample` restores a run's
checkpoint and streams text for the `vlm-jax sample` command (imported on use: it needs orbax).
"""

from vlm_jax.sampling.decode import (
    Beam,
    Decoder,
    Generation,
    LlamaDecoder,
    decoder_for,
    filter_logits,
    generate,
    generate_detailed,
    stream,
)

__all__ = [
    "Beam",
    "Decoder",
    "Generation",
    "LlamaDecoder",
    "decoder_for",
    "filter_logits",
    "generate",
    "generate_detailed",
    "stream",
]
