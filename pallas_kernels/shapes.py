"""Named problem shapes: the one list the bench, the tests, the GPU check and the docs use.

A `Linear` is one weight of a model in torch's ``nn.Linear`` terms: ``in``
input features (K) and ``out`` output features (N). Iterating one gives
``(in, out)``, so ``for k, n in LLAMA3_8B`` reads naturally.

* `LLAMA3_8B`: the three layer shapes of Llama-3-8B that carry its weight
  bytes (attention q/o, MLP gate/up, MLP down), the default of the bench,
  the lowering tests and `scripts/gpu_check.sh`.
* `ODD`: shapes that are no tile multiples (K = 1000, N = 200 or 96), for the
  paths that handle a tail.
* `REAL_MODELS`: every distinct linear shape of common open models, from
  their published configs (hidden size, intermediate size, attention heads,
  key/value heads, head dim). The block rules must tile each of these
  without padding -- that is, without copying -- the weight
  (tests/test_pallas_block_sizes.py).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Linear:
    in_features: int
    out_features: int
    name: str = dataclasses.field(default="", compare=False)

    def __iter__(self):  # (in, out), the name is a label
        return iter((self.in_features, self.out_features))

    @property
    def label(self) -> str:
        return f"{self.in_features}x{self.out_features}"


LLAMA3_8B = (
    Linear(4096, 4096, "attention q/o"),
    Linear(4096, 14336, "MLP gate/up"),
    Linear(14336, 4096, "MLP down"),
)

# TinyLlama-1.1B's MLP and its lm_head (hidden 2048, vocabulary 32000): the
# decode shapes of the end-to-end benchmark's model (`xla-qops bench --model`).
TINYLLAMA_DECODE = (
    Linear(2048, 5632, "TinyLlama MLP gate/up"),
    Linear(5632, 2048, "TinyLlama MLP down"),
    Linear(2048, 32000, "TinyLlama lm_head"),
)

# K (per-channel) or N no multiple of 128, K no multiple of the GPU's K step.
ODD = (
    Linear(1000, 200, "K, N no multiples of 128"),
    Linear(1000, 96, "K no multiple of 128, N < 128"),
    Linear(640, 200, "N no multiple of 128"),
)


def _decoder(hidden: int, intermediate: int, heads: int, kv_heads: int,
             head_dim: int | None = None) -> tuple[Linear, ...]:
    """The linears of a Llama-style decoder layer (separate q/k/v, gated MLP)."""
    head_dim = head_dim or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = [Linear(hidden, q, "q_proj"), Linear(hidden, kv, "k_proj/v_proj"),
              Linear(q, hidden, "o_proj"), Linear(hidden, intermediate, "gate_proj/up_proj"),
              Linear(intermediate, hidden, "down_proj")]
    unique = {}
    for s in shapes:  # q_proj and o_proj coincide when q == hidden
        unique.setdefault((s.in_features, s.out_features), s)
    return tuple(unique.values())


# Published configs (config.json of each model on the Hugging Face hub).
REAL_MODELS: dict[str, tuple[Linear, ...]] = {
    "Llama-2-7B": _decoder(4096, 11008, 32, 32),
    "Llama-2-13B": _decoder(5120, 13824, 40, 40),
    "Llama-2-70B": _decoder(8192, 28672, 64, 8),
    "Llama-3-8B": _decoder(4096, 14336, 32, 8),
    "Llama-3-70B": _decoder(8192, 28672, 64, 8),
    "Mistral-7B": _decoder(4096, 14336, 32, 8),
    "Qwen2-0.5B / Qwen2.5-0.5B": _decoder(896, 4864, 14, 2),
    "Qwen2-1.5B / Qwen2.5-1.5B": _decoder(1536, 8960, 12, 2),
    "Qwen2.5-3B": _decoder(2048, 11008, 16, 2),
    "Qwen2-7B / Qwen2.5-7B": _decoder(3584, 18944, 28, 4),
    "Qwen2.5-14B": _decoder(5120, 13824, 40, 8),
    "Qwen2.5-32B": _decoder(5120, 27648, 40, 8),
    "Qwen2-72B / Qwen2.5-72B": _decoder(8192, 29568, 64, 8),
    # Falcon: fused query_key_value (multi-query: one key/value head of 64
    # on 7B, eight on 40B), dense, and a non-gated 4x MLP.
    "Falcon-7B": (Linear(4544, 4544 + 2 * 64, "query_key_value"), Linear(4544, 4544, "dense"),
                  Linear(4544, 18176, "dense_h_to_4h"), Linear(18176, 4544, "dense_4h_to_h")),
    "Falcon-40B": (Linear(8192, 8192 + 2 * 8 * 64, "query_key_value"),
                   Linear(8192, 8192, "dense"), Linear(8192, 32768, "dense_h_to_4h"),
                   Linear(32768, 8192, "dense_4h_to_h")),
    # Phi-3: fused qkv_proj and gate_up_proj.
    "Phi-3-mini": (Linear(3072, 3 * 3072, "qkv_proj"), Linear(3072, 3072, "o_proj"),
                   Linear(3072, 2 * 8192, "gate_up_proj"), Linear(8192, 3072, "down_proj")),
    "Phi-3-medium": (Linear(5120, 5120 + 2 * 1280, "qkv_proj"), Linear(5120, 5120, "o_proj"),
                     Linear(5120, 2 * 17920, "gate_up_proj"), Linear(17920, 5120, "down_proj")),
    # Gemma: head_dim 256 (so q is 4096 wide on the 3072-wide 7B).
    "Gemma-2B": _decoder(2048, 16384, 8, 1, head_dim=256),
    "Gemma-7B": _decoder(3072, 24576, 16, 16, head_dim=256),
}


def real_model_shapes() -> tuple[Linear, ...]:
    """Every distinct (in, out) of `REAL_MODELS`, labelled with its first model."""
    unique = {}
    for model, linears in REAL_MODELS.items():
        for s in linears:
            unique.setdefault((s.in_features, s.out_features),
                              Linear(s.in_features, s.out_features, f"{model} {s.name}"))
    return tuple(unique.values())


def parse(text: str) -> tuple[Linear, ...]:
    """``"4096x4096,4096x14336"`` (INxOUT, comma-separated) -> Linears.

    Raises:
      ValueError: an entry is not two positive integers joined by "x".
    """
    out = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shapes: expected comma-separated INxOUT pairs such as "
                             f"4096x14336, got {item.strip()!r}")
        out.append(Linear(int(parts[0]), int(parts[1])))
    return tuple(out)


def to_text(shapes) -> str:
    """The inverse of `parse`: ``"4096x4096,4096x14336,..."``."""
    return ",".join(Linear(*s).label for s in shapes)


__all__ = ["Linear", "LLAMA3_8B", "TINYLLAMA_DECODE", "ODD", "REAL_MODELS", "real_model_shapes", "parse",
           "to_text"]
