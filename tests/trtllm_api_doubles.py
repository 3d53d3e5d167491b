"""TEST DOUBLES of the ``tensorrt_llm`` package, one per API generation the engine worker
(builders/engine_worker.py) supports. Each is a tiny stand-in package written to a directory put
on the workers' PYTHONPATH; it builds no engine. It has only the names the worker uses, shaped as
in the upstream sources the README lists, records what they receive into
``$FAKE_TRTLLM_RECORD/rank{r}.json`` and writes placeholder files.

- ``LEGACY_1_0``: TensorRT-LLM 1.0/1.1 — ``BuildConfig`` a dataclass built with
  ``BuildConfig.from_dict(config, plugin_config=...)`` (which requires the size keys and, unlike
  the real one, refuses unknown keys so a misplaced one is seen), the KV cache type set with
  ``update_from_dict`` to a ``tensorrt_llm.bindings.KVCacheType``; no ``model_fields``.
- ``PYDANTIC_1_2``: TensorRT-LLM 1.2 (PR #8330) — ``BuildConfig`` a pydantic model with
  ``extra="forbid"`` and no ``from_dict``, ``kv_cache_type`` annotated with a Python
  ``KVCacheType`` enum, ``output_timing_cache: str = "model.cache"`` (not Optional: ``None`` is a
  validation error) and a ``build_model`` that, like TensorRT-LLM, writes that timing cache into
  the working directory; ``PluginConfig`` a pydantic model turning "enable"/"disable" into
  booleans/None.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

_COMMON = {
    "tensorrt_llm/logger.py": '''
        class _Logger:
            level = None

            def set_level(self, level):
                self.level = level

        logger = _Logger()
    ''',
    "tensorrt_llm/models/__init__.py": '''
        import json

        class _Quant:
            def __init__(self, d):
                self.quant_algo = d.get("quant_algo")

        class PretrainedConfig:
            def __init__(self, d):
                self.d, self.quantization = d, _Quant(d.get("quantization") or {})

            @classmethod
            def from_json_file(cls, path):
                with open(path) as f:
                    return cls(json.load(f))
    ''',
    "tensorrt_llm/commands/__init__.py": "",
    "tensorrt_llm/lora_manager.py": '''
        import dataclasses
        from typing import List

        @dataclasses.dataclass
        class LoraConfig:  # tensorrt_llm/lora_manager.py (1.0-1.2): the fields the worker sets
            lora_dir: List[str] = dataclasses.field(default_factory=list)
            lora_ckpt_source: str = "hf"
            max_lora_rank: int = 64
            lora_target_modules: List[str] = dataclasses.field(default_factory=list)
            max_loras: int = 4
            max_cpu_loras: int = 4
    ''',
    "tensorrt_llm/commands/build.py": '''
        import json
        import os

        from ..builder import record_of
        from ..logger import logger

        class _PlaceholderEngine:
            def __init__(self, record):
                self.record = record

            def save(self, out_dir):
                rank = self.record["rank"]
                with open(os.path.join(out_dir, f"rank{rank}.engine"), "wb") as f:
                    f.write(b"placeholder written by the fake tensorrt_llm, not an engine "
                            + json.dumps(self.record["build_config"], sort_keys=True).encode())
                if rank == 0:  # shaped like a real engine config.json
                    with open(os.path.join(out_dir, "config.json"), "w") as f:
                        json.dump({"version": "fake",
                                   "pretrained_config": self.record["pretrained_config"],
                                   "build_config": dict(self.record["build_config"],
                                                        plugin_config=self.record["plugin_config"])},
                                  f, sort_keys=True)
                rec = os.path.join(os.environ["FAKE_TRTLLM_RECORD"], f"rank{rank}.json")
                with open(rec, "w") as f:
                    json.dump(dict(self.record, saved_to=out_dir), f)

        def build_model(build_config, rank=0, ckpt_dir=None, model_config=None, model_cls=None,
                        dry_run=False, **kwargs):
            if os.environ.get("FAKE_TRTLLM_FAIL") == str(rank):
                raise RuntimeError(f"fake build failure in rank {rank}")
            build, plugin = record_of(build_config)
            if build.get("output_timing_cache"):  # as TensorRT-LLM: into the working directory
                with open(build["output_timing_cache"], "wb") as f:
                    f.write(b"timing cache")
            return _PlaceholderEngine({
                "rank": rank, "ckpt_dir": ckpt_dir, "build_config": build,
                "plugin_config": plugin, "kwargs": kwargs, "log_level": logger.level,
                "architecture": model_config.d["architecture"],
                "pretrained_config": model_config.d,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            })
    ''',
}

LEGACY_1_0 = dict(_COMMON, **{
    "tensorrt_llm/__init__.py": '''
        """TEST DOUBLE of tensorrt_llm 1.0/1.1's engine-building API (tests/trtllm_api_doubles.py)."""
        __version__ = "1.0.0"
    ''',
    "tensorrt_llm/bindings/__init__.py": '''
        import enum

        class KVCacheType(enum.Enum):  # a pybind11 enum in the real package
            CONTINUOUS = 0
            PAGED = 1
            DISABLED = 2
    ''',
    "tensorrt_llm/plugin/__init__.py": '''
        class PluginConfig:
            def __init__(self, **kwargs):
                self.kwargs, self.validated = kwargs, False

            @classmethod
            def from_arguments(cls, args):
                return cls(**vars(args))

            def validate(self):
                self.validated = True
    ''',
    "tensorrt_llm/builder.py": '''
        import dataclasses

        from .bindings import KVCacheType
        from .plugin import PluginConfig

        @dataclasses.dataclass
        class BuildConfig:
            max_input_len: int = 1024
            max_seq_len: int = None
            max_batch_size: int = 2048
            max_beam_width: int = 1
            max_num_tokens: int = 8192
            opt_num_tokens: int = None
            kv_cache_type: KVCacheType = None
            strongly_typed: bool = True
            input_timing_cache: str = None
            output_timing_cache: str = "model.cache"
            plugin_config: PluginConfig = dataclasses.field(default_factory=PluginConfig)
            lora_config: object = None  # tensorrt_llm.lora_manager.LoraConfig

            @classmethod
            def from_dict(cls, config, plugin_config=None):
                config = dict(config)
                kw = {k: config.pop(k) for k in ("max_input_len", "max_seq_len", "max_batch_size",
                                                 "max_beam_width", "max_num_tokens",
                                                 "opt_num_tokens")}
                for k, default in (("strongly_typed", True), ("input_timing_cache", None),
                                   ("output_timing_cache", None)):
                    kw[k] = config.pop(k, default)
                if config:  # the real one ignores them silently; the double makes it visible
                    raise AssertionError(f"from_dict got keys it does not read: {sorted(config)}")
                return cls(plugin_config=plugin_config or PluginConfig(), **kw)

            def update_from_dict(self, config):
                for name, value in config.items():
                    if not hasattr(self, name):
                        raise AttributeError(f"{self.__class__} object has no attribute {name}")
                    setattr(self, name, value)

        def record_of(build_config):
            d = {f.name: getattr(build_config, f.name)
                 for f in dataclasses.fields(build_config) if f.name != "plugin_config"}
            if d["lora_config"] is None:  # the records of builds without LoRA read as before
                d.pop("lora_config")
            else:
                d["lora_config"] = dataclasses.asdict(d["lora_config"])
            assert isinstance(d["kv_cache_type"], KVCacheType), d["kv_cache_type"]
            d["kv_cache_type"] = d["kv_cache_type"].name
            plugin = dict(build_config.plugin_config.kwargs,
                          validated=build_config.plugin_config.validated)
            return d, plugin
    ''',
})

PYDANTIC_1_2 = dict(_COMMON, **{
    "tensorrt_llm/__init__.py": '''
        """TEST DOUBLE of tensorrt_llm 1.2's engine-building API (tests/trtllm_api_doubles.py)."""
        __version__ = "1.2.1"
    ''',
    "tensorrt_llm/llmapi/__init__.py": "",
    "tensorrt_llm/llmapi/kv_cache_type.py": '''
        import enum

        class KVCacheType(str, enum.Enum):  # 1.2's Python wrapper of the C++ enum
            CONTINUOUS = "continuous"
            PAGED = "paged"
            DISABLED = "disabled"
    ''',
    "tensorrt_llm/plugin/__init__.py": '''
        from typing import Literal, Optional

        from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator

        class PluginConfig(BaseModel):
            model_config = ConfigDict(validate_assignment=True, extra="ignore")
            dtype: str = "float16"
            gpt_attention_plugin: Optional[str] = "auto"
            gemm_plugin: Optional[str] = None
            gemm_swiglu_plugin: Optional[Literal["fp8"]] = None
            low_latency_gemm_plugin: Optional[Literal["fp8"]] = None
            paged_kv_cache: Optional[bool] = None
            remove_input_padding: bool = True
            context_fmha: bool = True
            use_paged_context_fmha: bool = True
            use_fp8_context_fmha: bool = True
            use_fused_mlp: bool = True
            multiple_profiles: bool = False
            lora_plugin: Optional[str] = None  # the LoRA plugin's dtype (None: no plugin)
            _validated: bool = PrivateAttr(default=False)

            @field_validator("*", mode="before")
            @classmethod
            def convert_enable_disable(cls, value, info):
                if value == "enable":
                    return True
                if value == "disable":
                    return False if cls.model_fields[info.field_name].annotation is bool else None
                return value

            @classmethod
            def from_arguments(cls, args):
                return cls(**vars(args))

            def validate(self):  # as upstream: an instance method checking the SM version
                self._validated = True
    ''',
    "tensorrt_llm/builder.py": '''
        from typing import Optional

        from pydantic import BaseModel, ConfigDict, Field

        from .llmapi.kv_cache_type import KVCacheType
        from .lora_manager import LoraConfig
        from .plugin import PluginConfig

        class BuildConfig(BaseModel):
            model_config = ConfigDict(extra="forbid")
            max_input_len: int = 1024
            max_seq_len: Optional[int] = None
            max_batch_size: int = 2048
            max_beam_width: int = 1
            max_num_tokens: int = 8192
            opt_num_tokens: Optional[int] = None
            kv_cache_type: Optional[KVCacheType] = None
            strongly_typed: bool = True
            input_timing_cache: Optional[str] = None
            output_timing_cache: str = "model.cache"
            plugin_config: PluginConfig = Field(default_factory=PluginConfig)
            lora_config: Optional[LoraConfig] = None

        def record_of(build_config):
            d = build_config.model_dump(exclude={"plugin_config"})
            if d["lora_config"] is None:  # the records of builds without LoRA read as before
                d.pop("lora_config")
            assert isinstance(build_config.kv_cache_type, KVCacheType), d["kv_cache_type"]
            d["kv_cache_type"] = build_config.kv_cache_type.name
            plugin = build_config.plugin_config.model_dump(exclude={"dtype"})
            if plugin["lora_plugin"] is None:
                plugin.pop("lora_plugin")
            plugin["validated"] = build_config.plugin_config._validated
            return d, plugin
    ''',
})

GENERATIONS = {"1.0-from_dict": LEGACY_1_0, "1.2-pydantic": PYDANTIC_1_2}


def write_package(site: Path, files: dict) -> Path:
    for rel, text in files.items():
        p = site / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text).lstrip())
    return site
