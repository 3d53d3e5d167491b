"""When a spec rule or linear exists: ``Rule.when`` / ``Linear.when`` name a Shape attribute
(a flag such as ``attn_bias``) or a Shape method of the global layer index (DeepSeek's
``moe_layer`` / ``dense_layer``)."""
from __future__ import annotations


def applies(when: str | None, shape, layer: int | None = None) -> bool:
    """Whether a rule / linear with condition ``when`` (a Shape attribute, or a Shape method
    taking the global layer index) exists for ``shape`` (at ``layer``; None: at any layer)."""
    if when is None:
        return True
    cond = getattr(shape, when)
    if not callable(cond):
        return bool(cond)
    layers = range(shape.layers) if layer is None else (layer,)
    return any(cond(i) for i in layers)
