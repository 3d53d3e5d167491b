"""Triton's ModelConfig protobuf schema (from tritonclient): building config.pbtxt text from
config dicts, parsing it back, and the small helpers every model config uses."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from common.errors import UserError

_PB2 = None


def model_config_pb2():
    """``tritonclient.grpc.model_config_pb2``: Triton's own ModelConfig schema.

    ``tritonclient/grpc/__init__.py`` imports grpcio, which is only installed with the
    ``tritonclient[grpc]`` extra; without it the same generated module is loaded from its file
    (it needs only protobuf).
    """
    global _PB2
    if _PB2 is not None:
        return _PB2
    try:
        import google.protobuf  # noqa: F401
    except ImportError as e:
        raise UserError(f"protobuf is not installed ({e}); pip install protobuf") from None
    try:
        from tritonclient.grpc import model_config_pb2 as pb2
    except Exception:  # noqa: BLE001 - RuntimeError when grpcio is absent
        spec = importlib.util.find_spec("tritonclient")
        if spec is None or not spec.submodule_search_locations:
            raise UserError("tritonclient is not installed; pip install tritonclient") from None
        path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
        if not path.is_file():
            raise UserError(f"{path} is missing from the tritonclient install") from None
        mspec = importlib.util.spec_from_file_location("_tritonclient_model_config_pb2", path)
        pb2 = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(pb2)
    _PB2 = pb2
    return pb2


def render(config: dict) -> str:
    """A config dict (ModelConfig field names) → config.pbtxt text: read into Triton's
    ModelConfig message (an unknown field or enum value fails here) and printed by protobuf's
    own text format (fields at their proto3 default are left out; Triton reads them the same)."""
    from google.protobuf import json_format, text_format

    try:
        message = json_format.ParseDict(config, model_config_pb2().ModelConfig())
    except json_format.ParseError as e:  # a bug in this package, not a user mistake
        raise RuntimeError(f"bad ModelConfig for {config.get('name')}: {e}") from e
    return ("# Written by build_engine (builders/triton) and checked against Triton's "
            "ModelConfig schema.\n" + text_format.MessageToString(message))


def parse_config(text: str, where: str = "config.pbtxt"):
    """Parse config.pbtxt text with Triton's ModelConfig schema; UserError on failure."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, model_config_pb2().ModelConfig())
    except text_format.ParseError as e:
        raise UserError(f"{where}: not a valid Triton model config: {e}") from None


def tensor(spec, logits_type: str) -> dict:
    """A tensor spec (name, data type, dims, flags: "o" optional, "s" reshape to a scalar,
    "r" ragged) → a ModelInput/ModelOutput dict; "LOGITS" stands for ``logits_type``."""
    name, dtype, dims, flags = spec[:4]
    t = {"name": name, "data_type": logits_type if dtype == "LOGITS" else dtype,
         "dims": list(dims)}
    if "s" in flags:
        t["reshape"] = {"shape": []}
    if "o" in flags:
        t["optional"] = True
    if "r" in flags:
        t["allow_ragged_batch"] = True
    return t


def string_params(values: dict) -> dict:
    return {k: {"string_value": str(v)} for k, v in values.items()}


def pb_bool(v: bool) -> str:
    return "true" if v else "false"


def dynamic_batching(b: int, opts) -> dict:
    """``opts``: TritonOptions (queue delay and size)."""
    return {"preferred_batch_size": [b],
            "max_queue_delay_microseconds": opts.max_queue_delay_microseconds,
            "default_queue_policy": {"max_queue_size": opts.max_queue_size}}


def cpu_instances(count: int) -> list:
    return [{"count": count, "kind": "KIND_CPU"}]


