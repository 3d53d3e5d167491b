"""Send requests with a LoRA adapter to the Triton repository of ``build_engine --lora ...``.

    python -m examples.lora_client --url 127.0.0.1:8000 --lora-dir out/lora/1 --task-id 1 \\
        --text "The capital of France is" --max-tokens 16

The first request carries the adapter (``lora_task_id`` + ``lora_weights`` + ``lora_config``, read
from OUTPUT/lora/<task id>/ as written); the second names the task id alone, which the tensorrtllm
backend serves from its LoRA cache (a task id it has not seen without weights is an error). The
tensors go as binary data of Triton's KServe v2 HTTP protocol (binary tensor extension): the
weights keep their dtype, bfloat16 (numpy ``|V2`` bits) included; no tritonclient is needed.
"""
from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

_TYPES = {np.dtype("<f2"): "FP16", np.dtype("<f4"): "FP32", np.dtype("V2"): "BF16",
          np.dtype("<i4"): "INT32", np.dtype("<u8"): "UINT64", np.dtype("<i8"): "INT64"}


def _binary(name: str, array: np.ndarray) -> tuple[dict, bytes]:
    data = np.ascontiguousarray(array).tobytes()
    return ({"name": name, "shape": list(array.shape), "datatype": _TYPES[array.dtype],
             "parameters": {"binary_data_size": len(data)}}, data)


def request_body(text: str, max_tokens: int, task_id: int | None = None,
                 lora_dir=None) -> tuple[bytes, int]:
    """(body, JSON header length) of one ensemble request; ``lora_dir``: send the adapter."""
    inputs = [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [text]},
              {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [max_tokens]}]
    blobs = []
    if task_id is not None:
        inputs.append({"name": "lora_task_id", "shape": [1, 1], "datatype": "UINT64",
                       "data": [int(task_id)]})
    if lora_dir is not None:
        for name in ("weights", "config"):
            head, data = _binary(f"lora_{name}", np.load(Path(lora_dir) / f"model.lora_{name}.npy"))
            inputs.append(head)
            blobs.append(data)
    header = json.dumps({"inputs": inputs, "outputs": [
        {"name": "text_output", "parameters": {"binary_data": False}}]}).encode()
    return header + b"".join(blobs), len(header)


def infer(url: str, text: str, max_tokens: int, task_id=None, lora_dir=None,
          model: str = "ensemble", timeout: float = 300) -> str:
    """The completion; an error answer raises RuntimeError with the server's message."""
    body, n = request_body(text, max_tokens, task_id, lora_dir)
    req = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=body, headers={
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(n)})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(e.read().decode(errors="replace")) from None
    return [o for o in out["outputs"] if o["name"] == "text_output"][0]["data"][0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="127.0.0.1:8000")
    p.add_argument("--lora-dir", type=Path, required=True, help="OUTPUT/lora/<task id>")
    p.add_argument("--task-id", type=int, required=True)
    p.add_argument("--text", default="The capital of France is")
    p.add_argument("--max-tokens", type=int, default=16)
    a = p.parse_args(argv)
    print("with the adapter's tensors:", infer(a.url, a.text, a.max_tokens, a.task_id, a.lora_dir))
    print("task id alone (cached):   ", infer(a.url, a.text, a.max_tokens, a.task_id))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
