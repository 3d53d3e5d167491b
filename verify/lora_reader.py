"""The reference reader with a LoRA adapter applied as TensorRT-LLM's runtime applies a request's
``lora_weights`` / ``lora_config`` (written by convert/lora.py), and its check against HF + PEFT.

What is restated here, independently of the writer (which lays rows out with the shard rules):

* the module dims of ``LoraModule::createLoraModules`` (cpp/tensorrt_llm/runtime/loraModule.cpp)
  from the checkpoint's config.json: global sizes, per-rank x tp (q heads as the checkpoint has
  them, a duplicated kv head counted once per rank);
* a row is A [r, inDim] then B [outDim, r] (``LoraCache::copyToPages``); tp rank t takes the t-th
  contiguous slice of A's columns for the row-parallel modules (``attn_dense``, ``mlp_4h_to_h``:
  inTpSplitDim 1, ``splitTransposeCpu``) and of B's rows for the others (outTpSplitDim 0);
* the LoRA plugin adds x A^T B^T to the linear's output on each rank, before the all-reduce of a
  row-parallel linear; q/k/v are one fused linear whose three module outputs are concatenated.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from model.lora import LINEAR_MODULES, MODULE_IDS, SPLIT_IN

from .model import ReferenceModel

WEIGHTS, CONFIG = "model.lora_weights.npy", "model.lora_config.npy"
_NAMES = {v: k for k, v in MODULE_IDS.items()}


def read_lora(task_dir) -> tuple[torch.Tensor, np.ndarray]:
    """(weights [rows, max row] as float32, config [rows, 3]) of a converted adapter; bfloat16
    rows are read from their bits (``|V2``), float16 / float32 as they are."""
    d = Path(task_dir)
    try:
        w = np.load(d / WEIGHTS)
        c = np.load(d / CONFIG)
    except (OSError, ValueError) as e:
        raise UserError(f"{d}: cannot read the converted adapter ({e})") from None
    if w.ndim != 3 or c.ndim != 3 or w.shape[0] != 1 or c.shape[:2] != (1, w.shape[1]) or \
            c.shape[2] not in (3, 4) or c.dtype != np.int32:
        raise UserError(f"{d}: lora_weights {w.shape} / lora_config {c.shape} {c.dtype} are not "
                        f"[1, rows, max row] / [1, rows, 3] int32")
    if w.dtype == np.dtype("V2"):
        t = torch.from_numpy(w[0].view(np.int16).copy()).view(torch.bfloat16).float()
    else:
        t = torch.from_numpy(np.asarray(w[0], np.float32))
    return t, c[0]


class LoraReferenceModel(ReferenceModel):
    """ReferenceModel whose linears carry one adapter's LoRA terms (``task_dir``: the converted
    adapter; None: the base model)."""

    def __init__(self, ckpt_dir, task_dir, compute_dtype=None, *, lazy: bool = True):
        super().__init__(ckpt_dir, compute_dtype, lazy=lazy)
        c, hd, tp = self.config, self.head_size, self.tp
        hidden, inter = int(c["hidden_size"]), int(c.get("intermediate_size") or 0)
        q, kv = self.q_per_rank * tp * hd, self.kv_per_rank * tp * hd
        self.lora_dims = {"attn_q": (hidden, q), "attn_k": (hidden, kv), "attn_v": (hidden, kv),
                          "attn_dense": (q, hidden), "mlp_h_to_4h": (hidden, inter),
                          "mlp_gate": (hidden, inter), "mlp_4h_to_h": (inter, hidden)}
        self.lora = {} if task_dir is None else self._rows(task_dir)

    def _rows(self, task_dir) -> dict:
        """{(global layer, module): (A [r, in], B [out, r])} of the adapter's rows."""
        return self.rows_of(*read_lora(task_dir), where=task_dir)

    def rows_of(self, weights: torch.Tensor, config: np.ndarray, where="lora_config") -> dict:
        """As ``_rows``, from a request's tensors (weights [rows, max row] as float32, config
        [rows, 3]); set ``self.lora`` to the result to run with that adapter."""
        task_dir = where
        dt = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(self.config.get("dtype"))
        out = {}
        for row, (mod_id, layer, r) in zip(weights, config[:, :3].tolist()):
            name = _NAMES.get(mod_id)
            if name is None or not 0 <= layer < self.num_layers or r < 1:
                raise UserError(f"{task_dir}: lora_config row ({mod_id}, {layer}, {r}) names no "
                                f"module / layer of this checkpoint")
            fin, fout = self.lora_dims[name]
            if r * (fin + fout) > row.numel():
                raise UserError(f"{task_dir}: lora_weights has too few values for {name}")
            a = row[:r * fin].reshape(r, fin)
            b = row[r * fin:r * (fin + fout)].reshape(fout, r)
            if dt is not None:  # the engine holds them in its dtype (a float32 row: rounded)
                a, b = a.to(dt), b.to(dt)
            out[(layer, name)] = (a, b)
        return out

    def _term(self, layer: int, module: str, t: int):
        """(A, B) of ``module`` on tp rank ``t``, or (None, output width) without a row."""
        fin, fout = self.lora_dims[module]
        got = self.lora.get((layer, module))
        split_in = module in SPLIT_IN
        if got is None:
            return None, fout if split_in else fout // self.tp
        a, b = got
        if split_in:
            k = fin // self.tp
            return a[:, t * k:(t + 1) * k], b
        k = fout // self.tp
        return a, b[t * k:(t + 1) * k]

    def _lin(self, p: int, t: int, name: str):
        params = super()._lin(p, t, name)
        _, _, rest = name.partition("transformer.layers.")
        local, _, short = rest.partition(".")
        modules = LINEAR_MODULES.get(short)
        if not self.lora or modules is None:
            return params
        layer = self.stage_layers[p][int(local)]
        terms = [self._term(layer, m, t) for m in modules]
        if all(a is None for a, _ in terms):
            return params
        return {**params, "lora": terms}


def verify_adapters(ckpt, model_dir, lora_root, tasks, input_ids=None) -> list[tuple[dict, bool]]:
    """For each (task id, adapter dir): the reader with the converted adapter against HF + PEFT
    (float32), with the checkpoint dtype's tolerance (verify/compare.py)."""
    from peft import PeftModel

    from .compare import compare_with_hf, tolerance_for
    from .float_model import load_hf

    out = []
    for task_id, adapter_dir in tasks:
        ref = LoraReferenceModel(ckpt, Path(lora_root) / str(task_id))
        hf = PeftModel.from_pretrained(load_hf(model_dir), str(adapter_dir)).float().eval()
        report = compare_with_hf(ckpt, hf, input_ids=input_ids, reference=ref)
        rel_tol, min_agree = tolerance_for(ref.config)
        ok = math.isfinite(report["rel_err"]) and report["rel_err"] < rel_tol and \
            report["argmax_agreement"] >= min_agree
        report.update(rel_tolerance=rel_tol, min_argmax_agreement=min_agree, passed=ok,
                      task_id=task_id, adapter=str(adapter_dir))
        out.append((report, ok))
    return out
