"""Test helpers: pre-quantized model directories written with each packer's OWN format, restated
here from the packers' sources, independently of convert/prequant (loops as the packers write
them, not the converter's word-wide bit operations):

* AutoGPTQ ``QuantLinear.pack`` (``qlinear_cuda_old``): ``intweight`` [in, out]; ``qweight``
  [in/8, out] with row ``r`` |= ``intweight[8r + j] << 4j``; ``zeros - 1`` packed the same way
  along the output into ``qzeros`` [in/g, out/8] (GPTQModel's ``gptq_v2``: ``zeros``);
  ``scales`` [in/g, out] float16; ``g_idx`` [in] = i // g.
* AutoAWQ ``WQLinear_GEMM.from_linear``: ``qweight`` [in, out/8], column ``c`` |=
  ``intweight[:, 8c + order_map[i]] << 4i`` with ``order_map = [0, 2, 4, 6, 1, 3, 5, 7]``;
  ``qzeros`` [in/g, out/8] the same; ``scales`` [in/g, out] float16.
* llm-compressor's fp8 (compressed-tensors ``float-quantized``): ``weight`` e4m3 = w / scale,
  ``weight_scale`` float32 [1] (per tensor) or [out, 1] (per channel), scale = amax / 448.
* compressed-tensors ``pack_to_int32``: the signed value + 8, ``packed[:, k] |= value[:, 8k+i] << 4i``
  (``packed_dim=1``); the zero point packed along dim 0; ``weight_scale`` [out, in/g];
  ``weight_shape`` [2] int32.

The codes, scales and zero points are a round-to-nearest quantization of the float model's weights
(any valid triple serves: the test is the conversion, not the quantizer); ``dequantized`` gives the
source's own dequantization ``scale * (q - zero)`` for the HF reference model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HF_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def rtn(w: torch.Tensor, g: int, sym: bool, dtype=torch.float16):
    """[out, in] float -> (q uint codes 0..15 [out, in], scale [out, in/g] in ``dtype``, zero codes
    [out, in/g]): symmetric zero 8, asymmetric from each group's min/max."""
    out, inp = w.shape
    wg = w.double().reshape(out, inp // g, g)
    if sym:
        scale = (wg.abs().amax(-1) / 7.5).clamp(min=1e-4).to(dtype)
        zero = torch.full(scale.shape, 8, dtype=torch.int64)
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-4).to(dtype)
        zero = torch.round(-lo / scale.double()).clamp(0, 15).long()
    q = torch.round(wg / scale.double()[..., None] + zero[..., None]).clamp(0, 15).long()
    return q.reshape(out, inp), scale, zero


def dequantized(q, scale, zero, g):
    """The source's dequantization, scale * (q - zero), in float64."""
    s = scale.double().repeat_interleave(g, dim=1)
    return s * (q - zero.repeat_interleave(g, dim=1)).double()


def _u32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.uint32).view(np.int32))


def pack_gptq(q, scale, zero, g, v2=False) -> dict:
    intweight = q.T.contiguous().numpy().astype(np.uint32)       # [in, out]
    qweight = np.zeros((intweight.shape[0] // 8, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 8):
            qweight[row] |= intweight[j] << (4 * (j - i))
        i += 8
        row += 1
    zeros = zero.T.contiguous().numpy().astype(np.int64) - (0 if v2 else 1)
    zeros = zeros.astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 8), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + 8):
            qzeros[:, col] |= zeros[:, j] << (4 * (j - i))
        i += 8
        col += 1
    inp = q.shape[1]
    return {"qweight": _u32(qweight), "qzeros": _u32(qzeros), "scales": scale.T.contiguous(),
            "g_idx": torch.arange(inp, dtype=torch.int32) // g}


def pack_awq(q, scale, zero, g) -> dict:
    def pack(a: np.ndarray) -> np.ndarray:
        out = np.zeros((a.shape[0], a.shape[1] // 8), dtype=np.uint32)
        for col in range(a.shape[1] // 8):
            for i in range(8):
                out[:, col] |= a[:, col * 8 + AWQ_ORDER_MAP[i]].astype(np.uint32) << (i * 4)
        return out
    return {"qweight": _u32(pack(q.T.contiguous().numpy())),
            "qzeros": _u32(pack(zero.T.contiguous().numpy())), "scales": scale.T.contiguous()}


def pack_ct(q, scale, zero, g, sym) -> dict:
    def pack(value: np.ndarray, packed_dim: int) -> np.ndarray:   # value: signed int
        v = (value + 8).astype(np.uint32)
        if packed_dim == 1:
            packed = np.zeros((v.shape[0], v.shape[1] // 8), dtype=np.uint32)
            for i in range(8):
                packed |= v[:, i::8] << 4 * i
        else:
            packed = np.zeros((v.shape[0] // 8, v.shape[1]), dtype=np.uint32)
            for i in range(8):
                packed |= v[i::8, :] << 4 * i
        return packed
    out = {"weight_packed": _u32(pack(q.numpy() - 8, 1)), "weight_scale": scale.contiguous(),
           "weight_shape": torch.tensor(list(q.shape), dtype=torch.int32)}
    if not sym:
        out["weight_zero_point"] = _u32(pack(zero.numpy() - 8, 0))
    return out


def fp8_input_scale(strategy: str) -> dict:
    """A static per-tensor input scale (llm-compressor's ``FP8`` scheme) for a per-tensor source."""
    return {"input_scale": torch.tensor([0.05], dtype=torch.float32)} if strategy == "tensor" else {}


def fp8_e4m3(w: torch.Tensor, strategy: str):
    """llm-compressor's fp8 weight (``FP8`` / ``FP8_DYNAMIC``): scale = amax / 448 per tensor or
    per output row, e4m3 = w / scale -> ({weight, weight_scale}, the dequantized weight)."""
    amax = w.abs().amax() if strategy == "tensor" else w.abs().amax(dim=1, keepdim=True)
    scale = (amax.float() / 448.0).reshape(-1 if strategy == "tensor" else w.shape[0], 1)
    scale = scale.reshape(1) if strategy == "tensor" else scale
    q = (w.float() / (scale if strategy == "channel" else scale[0])).to(torch.float8_e4m3fn)
    deq = q.float() * (scale if strategy == "channel" else scale[0])
    return {"weight": q, "weight_scale": scale}, deq


def quantization_config(method: str, g: int, sym: bool, v2: bool = False) -> dict:
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": g, "sym": sym, "desc_act": False,
                "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True,
                "version": "gemm"}
    if method.startswith("fp8-"):
        return {"quant_method": "compressed-tensors", "format": "float-quantized",
                "quantization_status": "compressed", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                    "num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                    "strategy": method[4:]}, "input_activations": {
                    "num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
                    if method == "fp8-tensor" else {
                    "num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                          "output_activations": None,
                                          "weights": {"num_bits": 4, "type": "int",
                                                      "symmetric": sym, "strategy": "group",
                                                      "group_size": g, "actorder": None}}}}


def write_prequantized(hf_dir, out_dir, method: str, g: int, sym: bool, v2: bool = False,
                       dtype=torch.float16):
    """The float HF model in ``hf_dir`` quantized and packed as ``method`` into ``out_dir``;
    returns {HF linear prefix: (q, scale, zero)} and the state dict with the source's
    dequantized weights (for the HF reference model)."""
    from safetensors.torch import load_file

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    out_dir.mkdir(parents=True)
    state = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(f))
    tensors, codes, deq = {}, {}, {}
    for name, t in state.items():
        prefix = name[:-len("weight")]
        if name.endswith(".weight") and any(prefix.endswith(lin + ".") for lin in HF_LINEARS) \
                and method.startswith("fp8-"):
            packed, deq[name] = fp8_e4m3(t.to(dtype), method[4:])
            codes[prefix] = packed
            tensors.update({prefix + k: v for k, v in packed.items()})
            tensors.update({prefix + k: v for k, v in fp8_input_scale(method[4:]).items()})
        elif name.endswith(".weight") and any(prefix.endswith(lin + ".") for lin in HF_LINEARS):
            q, s, z = rtn(t.float(), g, sym, dtype)
            codes[prefix] = (q, s, z)
            deq[name] = dequantized(q, s, z, g).float()
            packed = {"gptq": lambda: pack_gptq(q, s, z, g, v2), "awq": lambda: pack_awq(q, s, z, g),
                      "compressed-tensors": lambda: pack_ct(q, s, z, g, sym)}[method]()
            tensors.update({prefix + k: v for k, v in packed.items()})
        else:
            tensors[name] = t.to(dtype)
            deq[name] = t.to(dtype).float()
    save_file(tensors, str(out_dir / "model.safetensors"))
    config = json.loads((hf_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config(method, g, sym, v2)
    config["dtype"] = str(dtype).replace("torch.", "")
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return codes, deq
