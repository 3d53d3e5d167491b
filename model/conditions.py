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


class LayerConditions:
    """The conditions a rule may name that are not plain flags, over ``experts``, ``first_dense``
    and ``mla``: one definition for model.shape.Shape and check's ConfigShape."""

    def moe_layer(self, layer: int) -> bool:
        """Layer ``layer`` (global index) has routed experts."""
        return bool(self.experts) and layer >= self.first_dense

    def dense_layer(self, layer: int) -> bool:
        return not self.moe_layer(layer)

    @property
    def q_lora(self) -> bool:
        """MLA with a low-rank q projection (DeepSeek-V2), not one q_proj (V2-Lite)."""
        return bool(self.mla and self.mla.q_lora)

    @property
    def no_q_lora(self) -> bool:
        return bool(self.mla) and not self.mla.q_lora
