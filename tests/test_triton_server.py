"""A real Triton Inference Server (2.51.0, from PyPI's nvidia-pytriton wheel) serving the generated
repositories on CPU; the generated text must equal the Hugging Face model's greedy text.

The only GPU part of each repository, the ``tensorrt_llm`` model (C++ backend ``tensorrtllm``, or
the LLM-API Python model's ``tensorrt_llm`` package), is replaced by a named TEST DOUBLE:

* tests/triton_doubles/cpu_tensorrt_llm/model.py — a Python-backend model with the same name,
  inputs and outputs (the generated config.pbtxt, backend changed to "python"), greedy decoding
  on the TRT-LLM checkpoint with the CPU reference reader;
* tests/triton_doubles/llmapi_site/tensorrt_llm/ — a stand-in ``tensorrt_llm`` package (``LLM``,
  ``SamplingParams``) that the generated LLM-API model.py imports, greedy decoding on the unified
  HF checkpoint with the same reader.

Everything else (ensemble, preprocessing, postprocessing, BLS, the LLM-API model.py, model.yaml,
the launch flags) is served byte for byte as generated. Setup (``bash setup.sh``) makes
``.venv-triton``: a venv of Debian's /usr/bin/python3.11 (the Python-backend stub links its
libpython) with numpy<2 (numpy 2 corrupts tensors crossing the stub), CPU torch, transformers and
the wheel; see docs/triton-test-server.md. Every wait is bounded; servers are stopped
by PID.
"""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOUBLES = REPO / "tests" / "triton_doubles"
VENV = Path(os.environ.get("TRITON_TEST_VENV", REPO / ".venv-triton"))
SITE = VENV / "lib" / "python3.11" / "site-packages"
TRITON = SITE / "pytriton" / "tritonserver"
PROMPT = "The capital of France is"
NEW_TOKENS = 8
READY_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 300

pytestmark = [pytest.mark.triton_server, pytest.mark.slow]


# --- the server -------------------------------------------------------------------------------

def _need_server():
    if not (TRITON / "bin" / "tritonserver").is_file() or \
            not (TRITON / "backends" / "python" / "triton_python_backend_stub").is_file():
        pytest.fail(f"no tritonserver under {TRITON} (with the Python 3.11 backend stub): run "
                    f"`bash setup.sh`, which makes {VENV.name}")


def _python_env(tmp: Path, extra_paths=()) -> Path:
    """A venv without packages of its own whose site-packages add .venv-triton's, this project
    and ``extra_paths``: put first on PATH, it is what the Python-backend stub imports from
    (the stub ignores PYTHONPATH)."""
    env_dir = tmp / "pyenv"
    subprocess.run(["/usr/bin/python3.11", "-m", "venv", "--without-pip", str(env_dir)],
                   check=True, timeout=120)
    lines = [f"import site; site.addsitedir({str(SITE)!r})", str(REPO)]
    lines += [str(p) for p in extra_paths]
    (env_dir / "lib" / "python3.11" / "site-packages" / "build_engine_tests.pth").write_text(
        "\n".join(lines) + "\n")
    return env_dir


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _rank0_flags(repo: Path) -> list[str]:
    """The flags launch_triton.sh (triton_repo.json "launch") gives rank 0's tritonserver, less
    the ports (chosen free here) and the repository path (the served copy)."""
    launch = json.loads((repo / "triton_repo.json").read_text())["launch"]
    start = launch.index("-n") + 3  # mpirun ... -n 1 <tritonserver> <flags...>
    end = launch.index(":") if ":" in launch else len(launch)
    return [a for a in launch[start:end]
            if not a.startswith(("--model-repository=", "--http-port=", "--grpc-port=",
                                 "--metrics-port="))]


class Server:
    def __init__(self, repo: Path, tmp: Path, extra_paths=()):
        _need_server()
        env_dir = _python_env(tmp, extra_paths)
        self.http, grpc, metrics = _free_ports(3)
        env = dict(os.environ)
        env["PATH"] = f"{env_dir / 'bin'}:{env['PATH']}"
        env["LD_LIBRARY_PATH"] = f"{SITE / 'nvidia_pytriton.libs'}:" + env.get("LD_LIBRARY_PATH",
                                                                                 "")
        env.pop("PYTHONPATH", None)
        flags = [f.replace("shm-region-prefix-name=prefix0_",
                           f"shm-region-prefix-name=bet{os.getpid()}_{self.http}_")
                 for f in _rank0_flags(repo)]
        self.log = tmp / "tritonserver.log"
        cmd = [str(TRITON / "bin" / "tritonserver"), f"--model-repository={repo}",
               f"--backend-directory={TRITON / 'backends'}", f"--http-port={self.http}",
               f"--grpc-port={grpc}", f"--metrics-port={metrics}", "--allow-sagemaker=false",
               *flags]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=tmp, start_new_session=True)
        self._wait_ready()

    def _tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    def _wait_ready(self):
        end = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"tritonserver exited ({self.proc.returncode}):\n"
                                     f"{self._tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/health/ready",
                                            timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"tritonserver not ready in {READY_TIMEOUT_S}s:\n{self._tail()}")

    def post(self, path: str, body: dict) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path}: HTTP {e.code} {e.read()[:2000]!r}\n"
                                 f"{self._tail()}") from None

    def generate(self, model: str, body: dict) -> dict:
        return json.loads(self.post(f"/v2/models/{model}/generate", body))

    def generate_stream(self, model: str, body: dict) -> list[dict]:
        raw = self.post(f"/v2/models/{model}/generate_stream", body).decode()
        events = [json.loads(line[len("data:"):]) for line in raw.splitlines()
                  if line.startswith("data:")]
        assert events, raw
        for e in events:
            assert "error" not in e, e
        return events

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the stubs go too
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


# --- repositories -----------------------------------------------------------------------------

def _build(out: Path, *flags, model: str = "smollm2") -> Path:
    """build_engine as a user runs it here (no TensorRT-LLM: exit 3 with checkpoint + triton)."""
    res = subprocess.run([sys.executable, "-m", "builders", "--model", model, "--output",
                          str(out), "--no-progress", *flags], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode in (0, 3), res.stderr[-3000:]
    return out / "triton"


def _serve_copy_with_standin(repo: Path, ckpt: Path, dst: Path) -> Path:
    """A copy of ``repo`` whose tensorrt_llm model is the CPU stand-in; everything else is
    checked to be byte for byte the generated files."""
    from google.protobuf import text_format

    from builders.triton import parse_config
    from builders.triton.model_config import model_config_pb2

    shutil.copytree(repo, dst, symlinks=True)
    cfg_path = dst / "tensorrt_llm" / "config.pbtxt"
    cfg = parse_config(cfg_path.read_text())
    assert cfg.backend == "tensorrtllm"
    cfg.backend = "python"
    cfg.parameters["standin_checkpoint_dir"].string_value = str(ckpt)
    cfg.parameters["standin_max_new_tokens_cap"].string_value = str(NEW_TOKENS)
    cfg_path.write_text("# TEST DOUBLE: tests/triton_doubles/cpu_tensorrt_llm (backend python)\n"
                        + text_format.MessageToString(cfg))
    assert text_format.Parse(cfg_path.read_text(), model_config_pb2().ModelConfig()).input == \
        parse_config((repo / "tensorrt_llm" / "config.pbtxt").read_text()).input
    shutil.copy(DOUBLES / "cpu_tensorrt_llm" / "model.py", dst / "tensorrt_llm" / "1" / "model.py")
    _same_files(repo, dst, skip=("tensorrt_llm/config.pbtxt", "tensorrt_llm/1/model.py"))
    return dst


def _same_files(a: Path, b: Path, skip=()):
    fa = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    fb = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert [f for f in fb if f not in skip] == [f for f in fa if f not in skip]
    for f in fa:
        if f not in skip:
            assert filecmp.cmp(a / f, b / f, shallow=False), f


_HF = {}


def _hf_greedy(model_dir: Path, prompt: str, new_tokens: int) -> str:
    """The Hugging Face model's greedy completion (fp32), decoded as postprocessing does."""
    key = (str(model_dir), prompt, new_tokens)
    if key not in _HF:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                 attention_mask=torch.ones_like(ids))
        _HF[key] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return _HF[key]


# --- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 3])
def test_engine_repository_on_real_tritonserver(tmp_path, smollm2_dir, tp):
    """tp 1 (with the BLS model) and tp 3 (SmolLM2: 9 heads, 3 kv heads): POST
    /v2/models/ensemble/generate (and /v2/models/tensorrt_llm_bls/generate) return the HF greedy
    text."""
    out = tmp_path / "out"
    bls = ("--triton-bls",) if tp == 1 else ()  # the BLS model once per wiring is enough
    repo = _build(out, "--tp", str(tp), *bls, "--max-batch-size", "4")
    served = _serve_copy_with_standin(repo, out / "checkpoint", tmp_path / "served")
    expected = _hf_greedy(smollm2_dir, PROMPT, NEW_TOKENS)
    assert expected.strip()
    server = Server(served, tmp_path)
    try:
        body = {"text_input": PROMPT, "max_tokens": NEW_TOKENS}
        assert server.generate("ensemble", body)["text_output"] == expected
        if bls:
            assert server.generate("tensorrt_llm_bls", body)["text_output"] == expected
    finally:
        server.stop()


def test_decoupled_streaming_on_real_tritonserver(tmp_path, smollm2_dir):
    """--decoupled: generate_stream with "stream": true streams the completion token by token
    through the ensemble and the BLS model; the pieces join to the HF greedy text."""
    out = tmp_path / "out"
    repo = _build(out, "--decoupled", "--triton-bls", "--max-batch-size", "4")
    served = _serve_copy_with_standin(repo, out / "checkpoint", tmp_path / "served")
    expected = _hf_greedy(smollm2_dir, PROMPT, NEW_TOKENS)
    server = Server(served, tmp_path)
    try:
        body = {"text_input": PROMPT, "max_tokens": NEW_TOKENS, "stream": True}
        for model in ("ensemble", "tensorrt_llm_bls"):
            events = server.generate_stream(model, body)
            pieces = [e.get("text_output", "") for e in events]
            assert len([p for p in pieces if p]) > 1, pieces  # really streamed
            assert "".join(pieces) == expected, (model, pieces)
    finally:
        server.stop()


@pytest.mark.parametrize("decoupled", [False, True])
def test_llmapi_repository_on_real_tritonserver(tmp_path, smollm2_dir, decoupled):
    """--target pytorch: the LLM-API repository (our model.py, model.yaml) with the stand-in
    tensorrt_llm package returns the HF greedy text for POST /v2/models/tensorrt_llm/generate,
    and with --decoupled streams it (generate_stream, "streaming": true)."""
    out = tmp_path / "out"
    repo = _build(out, "--target", "pytorch", *(["--decoupled"] if decoupled else []))
    expected = _hf_greedy(smollm2_dir, PROMPT, NEW_TOKENS)
    server = Server(repo, tmp_path, extra_paths=[DOUBLES / "llmapi_site"])  # served as generated
    try:
        body = {"text_input": PROMPT, "sampling_param_max_tokens": NEW_TOKENS}
        if decoupled:
            events = server.generate_stream("tensorrt_llm", {**body, "streaming": True})
            pieces = [e.get("text_output", "") for e in events]
            assert len([p for p in pieces if p]) > 1, pieces
            assert "".join(pieces) == expected, pieces
        else:
            assert server.generate("tensorrt_llm", body)["text_output"] == expected
    finally:
        server.stop()


def test_gemma3_engine_repository_on_real_tritonserver(tmp_path):
    """A family added on the spec structure (issue 24): the real Gemma-3-270M (bundled ``gemma3``
    example), its repository carrying the per-layer attention windows, served through the
    ensemble with the CPU stand-in (which runs Gemma's semantics from the checkpoint): the HF
    greedy text."""
    from builders.triton import parse_config
    from examples.gemma3 import prepare_gemma3

    hf_dir = prepare_gemma3()
    out = tmp_path / "out"
    repo = _build(out, "--max-batch-size", "2", model="gemma3")
    cfg = parse_config((repo / "tensorrt_llm" / "config.pbtxt").read_text())
    windows = cfg.parameters["max_attention_window_size"].string_value.split(",")
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    assert len(windows) == hf_cfg["num_hidden_layers"] and len(set(windows)) == 2, windows
    served = _serve_copy_with_standin(repo, out / "checkpoint", tmp_path / "served")
    expected = _hf_greedy(hf_dir, PROMPT, NEW_TOKENS)
    assert expected.strip()
    server = Server(served, tmp_path)
    try:
        assert server.generate("ensemble", {"text_input": PROMPT, "max_tokens": NEW_TOKENS})[
            "text_output"] == expected
    finally:
        server.stop()


def _hf_peft_greedy(model_dir: Path, adapter: Path, prompt: str, new_tokens: int) -> str:
    """HF + PEFT's greedy completion (fp32), decoded as postprocessing does."""
    import torch
    from transformers import AutoTokenizer

    from lora_helper import peft_model

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = peft_model(model_dir, adapter)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False,
                             attention_mask=torch.ones_like(ids))
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_lora_requests_on_real_tritonserver(tmp_path, smollm2_dir):
    """--lora A B: requests with adapter 1's tensors, adapter 2's tensors, task 1 alone (cached)
    and none return HF + PEFT's greedy text per adapter (and HF's without); a task id the server
    has not seen, without weights, is Triton's error answer and the server goes on serving.
    The client is examples/lora_client.py (binary tensors over KServe v2 HTTP)."""
    from examples.lora_client import infer
    from lora_helper import make_adapter

    a = make_adapter(smollm2_dir, tmp_path / "a", r=8, alpha=16, std=0.02, seed=1)
    b = make_adapter(smollm2_dir, tmp_path / "b", r=4, alpha=8, std=0.03, seed=3, rslora=True,
                     targets=["q_proj", "v_proj", "up_proj", "down_proj"])
    out = tmp_path / "out"
    repo = _build(out, "--lora", str(a), str(b), "--max-batch-size", "4")
    served = _serve_copy_with_standin(repo, out / "checkpoint", tmp_path / "served")
    want = {1: _hf_peft_greedy(smollm2_dir, a, PROMPT, NEW_TOKENS),
            2: _hf_peft_greedy(smollm2_dir, b, PROMPT, NEW_TOKENS),
            None: _hf_greedy(smollm2_dir, PROMPT, NEW_TOKENS)}
    assert len(set(want.values())) == 3, want  # each adapter changes the text
    server = Server(served, tmp_path)
    url = f"127.0.0.1:{server.http}"
    try:
        for task in (1, 2):
            assert infer(url, PROMPT, NEW_TOKENS, task, out / "lora" / str(task)) == want[task]
        assert infer(url, PROMPT, NEW_TOKENS, 1) == want[1]  # from the cache
        with pytest.raises(RuntimeError, match="LoRA task 7 not found in cache"):
            infer(url, PROMPT, NEW_TOKENS, 7)
        assert infer(url, PROMPT, NEW_TOKENS) == want[None]  # and the server still serves
    finally:
        server.stop()
