"""Shared by the quantization tests: the tiny model shape they calibrate, a tokenizer, and a
calibration killed mid-way."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# hidden and every per-rank input size (tp 1 and 2) a multiple of 128, the AWQ group;
# 8 heads, 4 kv heads, head_dim 32
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
            vocab_size=1000, num_hidden_layers=2)


def byte_tokenizer(text: str) -> list[int]:
    """UTF-8 bytes as token ids: a tokenizer for tiny random models (vocab >= 256)."""
    return list(text.encode("utf-8"))


_KILLED_RUN = textwrap.dedent("""
    import os, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    import quantize.store as cs
    from convert_helper import convert_checkpoint
    from quantize.formats import QuantSpec
    from quantize.run import CalibrationRun
    from quant_common import byte_tokenizer

    real = cs.finish_layer
    def finish_then_die(store, i, *a):
        real(store, i, *a)
        if i == 1:
            os.kill(os.getpid(), 9)  # SIGKILL: no clean-up of any kind
    cs.finish_layer = finish_then_die
    spec = QuantSpec.create(**{spec!r})
    convert_checkpoint({hf!r}, {out!r}, progress=False, quant=spec, **{convert!r},
                       calibration=CalibrationRun(store={store!r}, device="cpu",
                                                  calib_text=open({text!r}).read(),
                                                  tokenizer=byte_tokenizer))
""")


def run_killed_after_layer_1(hf, out, store, text_file, spec: dict, **convert):
    """Run a layer-wise calibration into ``store`` in a subprocess that SIGKILLs itself right
    after layer 1 is saved; returns the finished process (returncode -9 when it died there)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    script = _KILLED_RUN.format(repo=os.path.dirname(tests), tests=tests, hf=str(hf), out=str(out),
                                store=str(store), text=str(text_file), spec=spec, convert=convert)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
