"""The capability table: what runs where, format x GPU generation x LoRA x family x target, each
cell with the upstream reference it restates. The one table of GPU facts in the project: the main
command checks its plan against it before any work (``pipeline/preflight.py`` ``gpu_capability``:
a refused cell is one line naming the fix, exit 2, nothing written; a warned cell one
``build_engine: warning:`` line), ``build_engine check --gpu`` checks a checkpoint with its engine
cells (:func:`refusals`), and README's GPU table is generated from it
(``tools/support_matrix.py``, kept equal by ``tests/test_capability.py``).

A :class:`Cell` selects runs by ``field`` (``quant_algo``, ``kv_cache_quant_algo``,
``moe_quant_algo``: a mixture-of-experts model's format, ``lora_quant_algo``: the format of a
run that serves LoRA adapters (``Run.lora``, a plain boolean until a flag sets it), or ``any``:
every run) and ``values``, optionally narrowed to
``targets`` and to the families it does NOT hold for (``except_families``); its condition is a
GPU range (``min_sm`` <= SM < ``below_sm``, which only a known GPU can break) or, with no range,
the combination itself. ``level``: ``refuse`` (impossible) or ``warn`` (untested / not
documented).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import UserError
from model.families import ARCHITECTURES

#: lower-case names (spaces, dashes and underscores dropped) → SM
GPUS = {
    "v100": 70, "t4": 75, "a100": 80, "a30": 80, "a800": 80, "a10": 86, "a10g": 86, "a40": 86,
    "a6000": 86, "rtx3090": 86, "l4": 89, "l40": 89, "l40s": 89, "rtx4090": 89, "rtx6000ada": 89,
    "h100": 90, "h800": 90, "h200": 90, "h20": 90, "gh200": 90, "b200": 100, "b100": 100,
    "gb200": 100, "b300": 103, "gb300": 103, "rtx5090": 120, "rtxpro6000": 120,
}
#: the generations README's table has a column for: (label, a representative SM)
GENERATIONS = (("Volta", 70), ("Turing", 75), ("Ampere", 80), ("Ada", 89), ("Hopper", 90),
               ("Blackwell", 100), ("Blackwell (RTX)", 120))

REFUSE, WARN = "refuse", "warn"
ENGINE, PYTORCH = "engine", "pytorch"
SQ = ("W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
      "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
      "W8A8_SQ_PER_TENSOR_PLUGIN")
#: the families whose NVFP4 engine checkpoints are written here, tensor for tensor modelopt 0.47's
#: export (TensorRT-LLM 1.2's ``fp4_quantize`` swaps every ColumnLinear / RowLinear of any model
#: class; quantize/recipes/nvfp4 ``ENGINE_FAMILIES``)
NVFP4_ENGINE_FAMILIES = ("llama", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")

_BUILDER = "tensorrt_llm/builder.py build() (issue 28)"
_CUTLASS_MOE = ("tensorrt_llm/_torch/modules/fused_moe/fused_moe_cutlass.py "
                "CutlassFusedMoE._QUANT_SUPPORT_TABLE")


def sm_of_name(name: str) -> int | None:
    """The SM of a GPU's marketing name (``NVIDIA H100 80GB HBM3``): the longest name of the
    table it contains; None: not in the table."""
    key = re.sub(r"[\s_\-]", "", name.lower())
    hits = [k for k in GPUS if k in key]
    return GPUS[max(hits, key=len)] if hits else None


@dataclass(frozen=True)
class Cell:
    field: str                 # quant_algo, kv_cache_quant_algo, moe_quant_algo or lora
    values: tuple
    min_sm: int = 0
    below_sm: int = 10_000
    what: str = ""
    source: str = ""
    fix: str = ""
    level: str = REFUSE
    targets: tuple[str, ...] = (ENGINE, PYTORCH)
    except_families: tuple[str, ...] | None = None
    families: tuple[str, ...] | None = None   # the cell holds for these families only

    @property
    def gpu(self) -> bool:
        """A GPU range (else: the combination itself is the cell)."""
        return self.min_sm > 0 or self.below_sm < 10_000

    def holds_on(self, sm: int) -> bool:
        return self.min_sm <= sm < self.below_sm


CELLS = (
    # --- GPU generation ---
    Cell("quant_algo", ("FP8",), min_sm=89, what="FP8 GEMMs need Ada / Hopper (SM 89) or newer",
         source="TensorRT-LLM support matrix; modelopt support matrix",
         fix="use --awq or --smoothquant on this GPU"),
    Cell("kv_cache_quant_algo", ("FP8",), min_sm=89,
         what="an FP8 KV cache needs Ada / Hopper (SM 89) or newer",
         source="TensorRT-LLM support matrix", fix="use --kv-cache-dtype int8 on this GPU"),
    Cell("moe_quant_algo", ("FP8",), min_sm=89, what="FP8 mixture of experts needs SM 89 or newer",
         source=_BUILDER, fix="use --awq or a weight-only format on this GPU"),
    Cell("quant_algo", SQ, below_sm=100, what="SmoothQuant (INT8) engines are refused on "
         "Blackwell (SM 100) and newer", source=_BUILDER, fix="use --fp8 on Blackwell",
         targets=(ENGINE,)),
    Cell("quant_algo", ("W4A16_AWQ", "W4A8_AWQ"), below_sm=100, what="INT4 AWQ engines are "
         "refused on Blackwell (SM 100) and newer", source=_BUILDER,
         fix="use --fp8 on Blackwell", targets=(ENGINE,)),
    Cell("quant_algo", SQ + ("W4A16_AWQ",), below_sm=100, level=WARN, targets=(PYTORCH,),
         what="the PyTorch backend's INT8 / INT4 AWQ kernels on Blackwell (SM 100) and newer are "
         "untested here", source=_BUILDER + ", for the engine flow", fix="prefer --fp8 there"),
    Cell("kv_cache_quant_algo", ("INT8",), below_sm=100, what="an INT8 KV cache is refused on "
         "Blackwell (SM 100) and newer", source=_BUILDER, fix="use --kv-cache-dtype fp8"),
    Cell("quant_algo", ("W4A8_AWQ",), min_sm=89, below_sm=100,
         what="W4A8 AWQ (FP8 activations) runs on Ada / Hopper (SM 89 / 90) only",
         source=f"{_CUTLASS_MOE} (W4A8_AWQ: SM 89, 90); tests/unittest/trt/quantization/"
         "test_weight_only_groupwise_quant_matmul.py skip_neither_ada_nor_hopper",
         fix="drop --awq-act fp8 (W4A16_AWQ)"),
    Cell("quant_algo", ("FP8_PER_CHANNEL_PER_TOKEN",), min_sm=89, below_sm=100,
         what="FP8 rowwise runs on Ada / Hopper (SM 89 / 90) only",
         source="tests/integration/defs/accuracy/test_cli_flow.py (skip_pre_ada, "
         "skip_post_blackwell)", fix="use --fp8"),
    Cell("quant_algo", ("FP8_PER_CHANNEL_PER_TOKEN",), min_sm=90, level=WARN,
         what="FP8 rowwise is documented for Hopper (SM 90); Ada is untested here",
         source="TensorRT-LLM docs (FP8 rowwise: Hopper); test_cli_flow.py skip_pre_ada",
         fix="use --fp8"),
    Cell("quant_algo", ("NVFP4",), min_sm=100, what="NVFP4 needs Blackwell (SM 100) or newer",
         source=f"{_CUTLASS_MOE} (NVFP4: SM 100, 103, 120, 121)", fix="use --fp8 or --awq"),
    Cell("kv_cache_quant_algo", ("NVFP4",), min_sm=100,
         what="an NVFP4 KV cache needs Blackwell (SM 100) or newer",
         source="TensorRT-LLM docs, features/quantization.md (NVFP4 KV cache); cpp/tensorrt_llm/"
         "common/attentionOp.cpp (E2M1 KV cache: DATA_TYPE_E2M1)", fix="use --kv-cache-dtype fp8"),
    Cell("quant_algo", SQ + ("W4A16_AWQ",), min_sm=80, what="INT8 SmoothQuant and INT4 AWQ "
         "need Ampere (SM 80) or newer", source="nvidia-modelopt support matrix (INT8 SmoothQuant, "
         "W4A16 AWQ: Ampere and later)", fix="use a weight-only format (--int8-weight-only)"),
    Cell("any", (True,), min_sm=80, level=WARN,
         what="TensorRT-LLM 1.x is not tested before Ampere (SM 80)",
         source=f"{_CUTLASS_MOE} (unquantized: SM >= 80)", fix="use an Ampere or newer GPU"),
    # --- LoRA (a plain boolean until a flag sets it) ---
    Cell("lora_quant_algo", SQ, what="LoRA does not combine with SmoothQuant (SmoothQuantAttention "
         "asserts lora_layer_params is None)", source="tensorrt_llm/quantization/layers.py; "
         "NVIDIA/TensorRT-LLM#2604, #12703", fix="use --fp8 or --awq with LoRA",
         targets=(ENGINE,)),
    Cell("lora_quant_algo", ("FP8_PER_CHANNEL_PER_TOKEN",), what="LoRA does not combine with FP8 rowwise (Fp8RowwiseAttention "
         "asserts lora_layer_params is None)", source="tensorrt_llm/quantization/layers.py; "
         "NVIDIA/TensorRT-LLM#2603, PR #10320", fix="use --fp8 with LoRA", targets=(ENGINE,)),
    Cell("lora_quant_algo", ("NVFP4",), what="LoRA does not combine with NVFP4 (FP4Linear asserts "
         "lora_runtime_params is None)", source="tensorrt_llm/quantization/layers.py; "
         "NVIDIA/TensorRT-LLM PR #12229 (closed)", fix="use --fp8 with LoRA", targets=(ENGINE,)),
    # --- format x target ---
    Cell("kv_cache_quant_algo", ("NVFP4",), what="TensorRT-LLM 1.2 takes an NVFP4 KV cache on its "
         "PyTorch backend only (its engine flow's quantization offers an INT8 or FP8 KV cache)",
         source="examples/quantization/quantize.py --kv_cache_dtype int8|fp8; "
         "tensorrt_llm/_torch/modules/linear.py load_kv_scales (NVFP4 KV cache)",
         fix="use --target pytorch, or --kv-cache-dtype fp8", targets=(ENGINE,)),
    # --- family x target ---
    Cell("quant_algo", ("NVFP4",), what="NVFP4 engine checkpoints are written for the Llama / "
         "Mistral, Qwen2, Qwen3, Gemma 2 / 3, Phi-3 and Mixtral families only (those tested "
         "against modelopt 0.47's export)", source="tensorrt_llm/quantization/quantize.py "
         "fp4_quantize; issue 27",
         fix="use --target pytorch", targets=(ENGINE,), except_families=NVFP4_ENGINE_FAMILIES),
    Cell("quant_algo", ("NVFP4",), level=WARN, targets=(ENGINE,), families=("gemma2", "gemma3"),
         what="TensorRT-LLM 1.2's own Gemma flow does not make NVFP4 checkpoints (it allows "
         "weight-only, SmoothQuant, FP8 and INT4 / W4A8 AWQ); its engine builder has no such check "
         "(fp4_quantize swaps every linear) but no NVIDIA build of an NVFP4 Gemma engine is known",
         source="tensorrt_llm/models/gemma/model.py GemmaForCausalLM.assert_valid_quant_algo",
         fix="prefer --target pytorch for NVFP4 Gemma"),
    Cell("family", ("deepseek_v2",), min_sm=90, what="multi-head latent attention (DeepSeek-V2) "
         "engines need TensorRT-LLM's MLA kernels: Hopper (SM 90)", source="examples/models/"
         "contrib/deepseek_v2 (Hopper); cpp/tensorrt_llm/kernels/mlaKernels.cu",
         fix="build the engines on a Hopper GPU", targets=(ENGINE,)),
)


def lora_cell(quant_algo) -> Cell | None:
    """The table's LoRA cell of a format in the engine flow (None: TensorRT-LLM's LoRA plugin runs
    on its linears)."""
    return next((c for c in broken(Run(quant_algo, lora=True)) if c.field == "lora_quant_algo"),
                None)


def parse_gpu(text: str) -> tuple[str, int]:
    """(label, SM) of ``--gpu NAME|sm_XX``; ``UserError`` naming the known names otherwise."""
    key = re.sub(r"[\s_\-]", "", text.lower())
    m = re.fullmatch(r"(?:sm)?(\d{2,3})", key)
    if m:
        return f"sm_{m.group(1)}", int(m.group(1))
    if key in GPUS:
        return text, GPUS[key]
    raise UserError(f"--gpu {text!r}: unknown GPU; give sm_XX (e.g. sm_90) or one of "
                    f"{', '.join(sorted(GPUS))}")


@dataclass(frozen=True)
class Run:
    """What the table is asked about: one build's format, model and target (``sm`` None: no GPU
    known, so no GPU cell applies)."""

    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    moe: bool = False
    lora: bool = False
    family: str | None = None
    target: str = ENGINE
    sm: int | None = None

    def value(self, field: str):
        if field == "any":  # a cell of every run
            return True
        if field == "moe_quant_algo":
            return self.quant_algo if self.moe else None
        if field == "lora_quant_algo":
            return self.quant_algo if self.lora else None
        return getattr(self, field)


def _selects(cell: Cell, run: Run) -> bool:
    if run.target not in cell.targets or run.value(cell.field) not in cell.values:
        return False
    if cell.families is not None and run.family not in cell.families:
        return False
    return cell.except_families is None or run.family not in cell.except_families


def broken(run: Run) -> list[Cell]:
    """The cells ``run`` breaks, in the table's order (refusals and warnings alike)."""
    out = []
    for cell in CELLS:
        if not _selects(cell, run):
            continue
        if cell.gpu and (run.sm is None or cell.holds_on(run.sm)):
            continue
        out.append(cell)
    return out


def line(cell: Cell, label: str | None, sm: int | None) -> str:
    """The one line of a broken cell: what, where, the fix, the source."""
    where = f" on {label} (SM {sm})" if cell.gpu else ""
    return f"{cell.what}{where}: {cell.fix} ({cell.source})"


def refusals(config: dict, sm: int) -> list[tuple[str, str]]:
    """(what, source) of every engine GPU cell a checkpoint's config.json breaks on SM ``sm``
    (``build_engine check --gpu``)."""
    q = config.get("quantization") or {}
    run = Run(q.get("quant_algo"), q.get("kv_cache_quant_algo"), moe=bool(config.get("moe")),
              family=ARCHITECTURES.get(config.get("architecture")), sm=sm)
    return [(c.what, c.source) for c in broken(run) if c.gpu and c.level == REFUSE]


def verdict(algo_field: str, value, sm: int, target: str = ENGINE) -> str:
    """README's cell for one format on one SM: "yes", "refused" or "untested"."""
    kw = {"quant_algo": None, "kv_cache_quant_algo": None, algo_field: value}
    # the GPU cells, and a format's own cells on a target (an NVFP4 KV cache on engines)
    levels = {c.level for c in broken(Run(**kw, target=target, sm=sm))
              if c.gpu or (c.field == algo_field and c.except_families is None
                           and c.families is None)}
    return "refused" if REFUSE in levels else "untested" if WARN in levels else "yes"
