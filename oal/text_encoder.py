"""The built-in diffusion models' text side: a word tokenizer that needs no vocabulary files, and a tiny CLIP text
encoder (shared by the untrained tiny model in oal.diffusion and the trained one in oal.ldm)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import torch


class WordTokenizer:
    """The built-in model's tokenizer: lower-cased words hashed into a fixed vocabulary.

    CLIP's BPE tokenizer needs vocabulary files that only come from a hub; this one needs nothing.
    Ids 0/1/2 are start, end and padding, as a CLIP tokenizer's specials are.
    """

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __init__(self, vocab_size: int = 1000, model_max_length: int = 16):
        self.vocab_size = vocab_size
        self.model_max_length = model_max_length

    def word_ids(self, text: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())
        return [3 + int(hashlib.sha1(w.encode()).hexdigest(), 16) % (self.vocab_size - 3) for w in words]

    def __call__(self, texts: list[str], **_: Any) -> dict[str, torch.Tensor]:
        rows = []
        for t in texts:
            ids = [self.bos_token_id, *self.word_ids(t)][: self.model_max_length - 1] + [self.eos_token_id]
            rows.append(ids + [self.pad_token_id] * (self.model_max_length - len(ids)))
        return {"input_ids": torch.tensor(rows)}


def tiny_text_encoder(seed: int | None = None) -> tuple[Any, WordTokenizer]:
    """A 2-layer, 32-d CLIP text encoder with the built-in word tokenizer (seeded when `seed` is given)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if seed is not None:
        torch.manual_seed(seed)
    tok = WordTokenizer()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=tok.model_max_length, projection_dim=32,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=2))
    return text, tok
