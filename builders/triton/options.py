"""Options of the Triton repository writers: the ``--triton-*`` flags and their checks."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from common.errors import UserError

# V1 (static batching) is not offered: tensorrtllm_backend deprecated it, and in-flight batching
# serves every engine this project builds (paged KV cache, packed inputs, attention plugin).
BATCHING_STRATEGIES = ("inflight_fused_batching", "inflight_batching")
SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")
TARGETS = ("engine", "pytorch", "none")


@dataclass(frozen=True)
class TritonOptions:
    """Options of the Triton repository writers (the ``add_triton_arguments`` flags)."""

    triton_target: str | None = None            # None: the target's own layout (engine/pytorch)
    tokenizer_dir: str | None = None
    triton_max_batch_size: int | None = None     # None: min(64, the engine's max_batch_size)
    decoupled: bool = False
    batching_strategy: str = "inflight_fused_batching"
    batch_scheduler_policy: str = "guaranteed_no_evict"
    kv_cache_free_gpu_mem_fraction: float = 0.9
    enable_kv_cache_reuse: bool = False
    enable_chunked_context: bool = False
    exclude_input_in_output: bool = True
    max_queue_delay_microseconds: int = 0
    max_queue_size: int = 0
    triton_instance_count: int = 1
    triton_bls: bool = False
    triton_model_root: str | None = None
    triton_copy_tokenizer: bool = False
    force: bool = False

    @classmethod
    def from_any(cls, options) -> "TritonOptions":
        """From a TritonOptions, a mapping or an argparse Namespace (unknown names ignored, so the
        whole ``build_engine`` Namespace can be passed)."""
        if options is None:
            opts = cls()
        elif isinstance(options, cls):
            opts = options
        else:
            src = vars(options) if isinstance(options, argparse.Namespace) else dict(options)
            kw = {f.name: src[f.name] for f in fields(cls) if f.name in src}
            if kw.get("tokenizer_dir") is not None:
                kw["tokenizer_dir"] = str(kw["tokenizer_dir"])
            if kw.get("triton_model_root") is not None:
                kw["triton_model_root"] = str(kw["triton_model_root"])
            opts = cls(**kw)
        opts.validate()
        return opts

    def validate(self) -> None:
        def whole(name, value, low):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"--{name.replace('_', '-')} must be a whole number >= {low} "
                                f"(got {value!r})")

        if self.triton_target is not None and self.triton_target not in TARGETS:
            raise UserError(f"--triton-target must be one of {', '.join(TARGETS)} "
                            f"(got {self.triton_target!r})")
        if self.triton_max_batch_size is not None:
            whole("triton_max_batch_size", self.triton_max_batch_size, 1)
        whole("max_queue_delay_microseconds", self.max_queue_delay_microseconds, 0)
        whole("max_queue_size", self.max_queue_size, 0)
        whole("triton_instance_count", self.triton_instance_count, 1)
        if str(self.batching_strategy).lower() == "v1":
            raise UserError("--batching-strategy V1 (static batching) is deprecated by Triton's "
                            "tensorrtllm backend and not offered; use inflight_fused_batching "
                            "(the default)")
        if self.batching_strategy not in BATCHING_STRATEGIES:
            raise UserError(f"--batching-strategy must be one of {', '.join(BATCHING_STRATEGIES)}"
                            f" (got {self.batching_strategy!r})")
        if self.batch_scheduler_policy not in SCHEDULER_POLICIES:
            raise UserError(f"--batch-scheduler-policy must be one of "
                            f"{', '.join(SCHEDULER_POLICIES)} "
                            f"(got {self.batch_scheduler_policy!r})")
        f = self.kv_cache_free_gpu_mem_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise UserError(f"--kv-cache-free-gpu-mem-fraction must be in (0, 1] (got {f!r})")
        root = self.triton_model_root
        if root is not None and (not root.startswith("/") or "${" in root):
            raise UserError(f"--triton-model-root must be an absolute path on the serving host, "
                            f"e.g. /models (got {root!r})")

    def for_target(self, target: str) -> "TritonOptions":
        """These options for the repository of ``target`` ("engine" or "pytorch"): an unset
        --triton-target becomes it; a different one is refused (never silently ignored)."""
        if self.triton_target not in (None, target):
            raise UserError(f"--triton-target {self.triton_target} does not apply to --target "
                            f"{target}, which writes the {target} repository (the default) or "
                            f"none (--triton-target none)")
        return replace(self, triton_target=target)

    def as_dict(self) -> dict:
        return asdict(self)


def add_triton_arguments(parser: argparse.ArgumentParser):
    """Add the Triton repository options to ``parser`` as one argument group; return the group.

    Defaults are those a ``tools/fill_template.py`` user of the NVIDIA docs would pass
    (decoupled_mode False, inflight_fused_batching, exclude_input_in_output True, no queue delay,
    KV-cache reuse off) and the backend's own defaults otherwise (kv_cache_free_gpu_mem_fraction
    0.9, guaranteed_no_evict).
    """
    g = parser.add_argument_group(
        "triton", "Triton model repository (DIR/triton): tensorrtllm_backend's "
                  "inflight_batcher_llm layout for engines, or the LLM-API layout (pytorch)")
    g.add_argument("--triton-target", choices=TARGETS, default=None,
                   help="engine: ensemble/preprocessing/tensorrt_llm/postprocessing for the "
                        "TensorRT engines (TensorRT-LLM <= 1.2; --target engine); pytorch: the "
                        "LLM-API Python model (--target pytorch, no engines); none: no "
                        "repository (default: the one that --target writes)")
    g.add_argument("--tokenizer-dir", type=Path, default=None,
                   help="tokenizer for pre/postprocessing (default: the HF model dir; required "
                        "with --from-checkpoint)")
    _add_scheduling_arguments(g)
    g.add_argument("--triton-instance-count", type=int, default=1,
                   help="instances of the preprocessing/postprocessing (and BLS) models "
                        "(default: 1)")
    g.add_argument("--triton-bls", action="store_true",
                   help="also write tensorrt_llm_bls, a Python BLS model with the ensemble's "
                        "inputs and outputs (default: off)")
    g.add_argument("--triton-model-root", default=None, metavar="ROOT",
                   help="absolute path at which the output dir will be mounted on the serving "
                        "host (e.g. /models): paths inside it are written as ROOT/...; "
                        "default: this host's absolute paths")
    g.add_argument("--triton-copy-tokenizer", action="store_true",
                   help="copy the tokenizer files into the repository (self-contained repo)")
    return g


def _add_scheduling_arguments(g) -> None:
    """How the tensorrt_llm model batches, schedules and queues requests, and its KV cache."""
    g.add_argument("--triton-max-batch-size", type=int, default=None,
                   help="Triton max_batch_size of every model (default: the engine's "
                        "max_batch_size, at most 64; TensorRT-LLM's scheduler may still run "
                        "more requests at once)")
    g.add_argument("--decoupled", action="store_true",
                   help="decoupled transaction policy: needed for streaming (stream=true, "
                        "generate_stream) (default: off)")
    g.add_argument("--batching-strategy", default="inflight_fused_batching",
                   metavar="{" + ",".join(BATCHING_STRATEGIES) + "}",
                   help="gpt_model_type of the tensorrt_llm model (default: "
                        "inflight_fused_batching; V1 static batching is deprecated upstream and "
                        "refused)")
    g.add_argument("--batch-scheduler-policy", choices=SCHEDULER_POLICIES,
                   default="guaranteed_no_evict",
                   help="TensorRT-LLM capacity scheduler (default: guaranteed_no_evict)")
    g.add_argument("--kv-cache-free-gpu-mem-fraction", type=float, default=0.9,
                   help="fraction of the free GPU memory (after weights) for the KV cache "
                        "(default: 0.9)")
    g.add_argument("--enable-kv-cache-reuse", action=argparse.BooleanOptionalAction,
                   default=False, help="reuse KV-cache blocks across requests with a common "
                                       "prefix (default: off)")
    g.add_argument("--enable-chunked-context", action=argparse.BooleanOptionalAction,
                   default=False, help="chunked prefill (default: off)")
    g.add_argument("--exclude-input-in-output", action=argparse.BooleanOptionalAction,
                   default=True, help="return only the completion, not prompt + completion "
                                      "(default: on)")
    g.add_argument("--max-queue-delay-microseconds", type=int, default=0,
                   help="dynamic batcher delay (default: 0)")
    g.add_argument("--max-queue-size", type=int, default=0,
                   help="requests queued before new ones are rejected (default: 0 = unbounded)")


