"""Shared by the quantization tests: the tiny model shape they calibrate and a tokenizer."""
from __future__ import annotations

# hidden and every per-rank input size (tp 1 and 2) a multiple of 128, the AWQ group;
# 8 heads, 4 kv heads, head_dim 32
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
            vocab_size=1000, num_hidden_layers=2)


def byte_tokenizer(text: str) -> list[int]:
    """UTF-8 bytes as token ids: a tokenizer for tiny random models (vocab >= 256)."""
    return list(text.encode("utf-8"))
