"""The MoE format reference: nvidia-modelopt 0.47's ``export_tensorrt_llm_checkpoint`` of a Hugging
Face model loaded with transformers 4.57.1 (modelopt's export walks transformers 4's per-expert
modules and fails on transformers 5's fused ``MixtralExperts``).

Run by tests/test_moe.py in a subprocess with the private transformers 4 copy first on PYTHONPATH
(setup.sh installs it into .cache/; see ``hf4_dir``). Usage::

    python tests/hf4_export.py HF_DIR OUT_ROOT --tp 1 2 4 [--dtype float16] [--ids IDS.pt]
        [--quant ALGO] [--kv int8|fp8] [--awq-block-size G] [--calib-text FILE] [--unified]
        [--decoder-type llama|qwen] [--unified-only]

(``--quant W8A16 --unified``: modelopt's INT8_WEIGHT_ONLY_CFG on the weights alone, as
``--target pytorch`` writes it; the TensorRT-LLM exports are then of that model.)

writes ``OUT_ROOT/tp{N}/`` (config.json + rank*.safetensors) per tp, and with ``--ids`` the
float32 logits of the transformers-4 model on those ids to ``OUT_ROOT/logits.pt`` (so a test can
check that both transformers versions read the same weights). With ``--quant``/``--kv`` the model
is first calibrated by this repository's ``quantize.calibrate.calibrate`` (the same modelopt config
and calibration batches as build_engine; byte tokenizer, 4 x 64 tokens of FILE).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HF4_DIR = REPO / ".cache" / "hf4-transformers-4.57.1"


def hf4_dir() -> Path | None:
    """The private transformers 4.57.1 copy, or None when setup.sh has not installed it."""
    return HF4_DIR if (HF4_DIR / "transformers").is_dir() else None


def main() -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("out_root")
    ap.add_argument("--tp", type=int, nargs="+", default=[1])
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--ids")
    ap.add_argument("--quant")
    ap.add_argument("--kv")
    ap.add_argument("--awq-block-size", type=int)
    ap.add_argument("--calib-text")
    ap.add_argument("--decoder-type", default="llama",
                    help="modelopt's decoder_type (qwen: Qwen2-MoE / Qwen3-MoE)")
    ap.add_argument("--unified", action="store_true",
                    help="also export_hf_checkpoint (float32) to OUT_ROOT/unified")
    ap.add_argument("--unified-only", action="store_true",
                    help="export_hf_checkpoint only (no TensorRT-LLM export)")
    a = ap.parse_args()
    assert transformers.__version__.startswith("4."), transformers.__version__
    model = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32).eval()
    # config.json from transformers 5 holds rope_parameters; transformers 4 reads rope_theta
    raw = json.loads((Path(a.hf_dir) / "config.json").read_text())
    theta = (raw.get("rope_parameters") or {}).get("rope_theta", raw.get("rope_theta"))
    if theta is not None:
        model.config.rope_theta = theta
    # transformers 4 leaves the weights as views into the mmap'd safetensors file, at whatever
    # alignment the file gives (24 bytes mod 64 for the tiny Mixtral's experts), and torch's CPU
    # linear of ONE token row (an expert that gets a single token) rounds differently for a
    # weight not 16-byte aligned (measured: up to 1.1e-5 on a random 512x256 linear). Fresh copies
    # (64-byte aligned, as transformers 5's fused experts and our per-expert copies are) keep the
    # reference's numbers independent of the file layout.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    out = Path(a.out_root)
    out.mkdir(parents=True, exist_ok=True)
    if a.ids:
        with torch.no_grad():
            logits = model(input_ids=torch.load(a.ids)).logits.float()
        torch.save(logits, out / "logits.pt")
    if a.quant or a.kv:
        import sys

        sys.path.insert(0, str(REPO))
        from quant_common import byte_tokenizer
        from quantize.calibrate import calibrate
        from quantize.formats import QuantSpec

        spec = QuantSpec.create(a.quant, kv_cache_dtype=a.kv, awq_block_size=a.awq_block_size,
                                calib_size=4, calib_seq_len=64, calib_batch_size=2)
        if a.quant == "W8A16" and (a.unified or a.unified_only):  # modelopt's INT8_WEIGHT_ONLY
            # _CFG: the weights alone
            import modelopt.torch.quantization as mtq

            model = mtq.quantize(model, copy.deepcopy(mtq.INT8_WEIGHT_ONLY_CFG), None)
        if spec.needs_calibration:
            text = Path(a.calib_text).read_text(encoding="utf-8")
            calibrate(model, spec, text, tokenizer=byte_tokenizer, progress=False)
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    if a.unified or a.unified_only:
        from modelopt.torch.export import export_hf_checkpoint

        # on a copy: the export packs the weights in place (AWQ), which the exports below read
        export_hf_checkpoint(copy.deepcopy(model), dtype=torch.float32,
                             export_dir=out / "unified")
    for tp in [] if a.unified_only else a.tp:  # on a copy: the export re-smooths and pads (AWQ vocab) the model in place
        export_tensorrt_llm_checkpoint(copy.deepcopy(model), decoder_type=a.decoder_type,
                                       dtype=getattr(torch, a.dtype), export_dir=out / f"tp{tp}",
                                       inference_tensor_parallel=tp)


if __name__ == "__main__":
    main()
