"""The model's end, pad and stop token ids, from its tokenizer and generation_config.json.

TensorRT-LLM takes one ``end_id`` per request; models such as Llama-3-Instruct end a turn with
several tokens (generation_config.json ``eos_token_id: [128001, 128008, 128009]``:
``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``), which Hugging Face's ``generate`` all stops
at. So: ``end_id`` is the tokenizer's eos token (else generation_config's first eos id); every
other eos id becomes a default one-token stop word (TensorRT-LLM's stop_words_list), so serving
stops where ``generate`` stops. ``pad_id``: the tokenizer's pad token, else generation_config's
``pad_token_id``, else ``end_id`` (what TensorRT-LLM's runtime does without one).
"""
from __future__ import annotations

import json
from pathlib import Path

from common.errors import UserError


def _ids(value) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in values if v is not None]


def special_token_ids(tokenizer_dir) -> dict:
    """{"end_id", "pad_id", "stop_token_ids", "eos_token_ids"} for the model in ``tokenizer_dir``
    (end_id -1 and no stop ids for a model without any eos token)."""
    from transformers import AutoTokenizer

    d = Path(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(str(d))
    gen = generation_config(d)
    eos = _ids(tok.eos_token_id) + [i for i in _ids(gen.get("eos_token_id"))
                                   if i not in _ids(tok.eos_token_id)]
    end_id = eos[0] if eos else -1
    pads = _ids(tok.pad_token_id) or _ids(gen.get("pad_token_id"))
    pad_id = pads[0] if pads else (end_id if end_id >= 0 else 0)
    return {"end_id": end_id, "pad_id": pad_id, "stop_token_ids": eos[1:], "eos_token_ids": eos}


def generation_config(tokenizer_dir) -> dict:
    """``generation_config.json`` of ``tokenizer_dir`` ({} without one), its token ids checked:
    one line naming the file for anything the Triton models could not use."""
    gen_path = Path(tokenizer_dir) / "generation_config.json"
    if not gen_path.is_file():
        return {}
    try:
        gen = json.loads(gen_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{gen_path}: unreadable ({e}); fix or remove it") from None
    if not isinstance(gen, dict):
        raise UserError(f"{gen_path}: holds a JSON {type(gen).__name__}, not an object; fix or "
                        f"remove it")
    for key in ("eos_token_id", "pad_token_id"):
        v = gen.get(key)
        values = v if isinstance(v, list) else [v]
        if not all(i is None or (type(i) is int and i >= 0) for i in values):
            raise UserError(f"{gen_path}: {key} is {json.dumps(v)}, not a token id (an integer "
                            f">= 0) or a list of them; fix or remove it")
    return gen
