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


def same_row_max_on_every_rank(model, o_cols, down_cols):
    """Weight-only: each rank's slice of a row-parallel weight is quantized per output channel, so
    tp 1 and tp N differ unless each row's max |w| lies in every rank's slice. Put it there: at the
    o_proj inputs ``o_cols`` and down_proj inputs ``down_cols`` (columns every tp 1 / 2 / 4 slice,
    padded or not, holds), so that tp N must equal tp 1 exactly: any padding that is not neutral
    shows."""
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            for w, cols in ((layer.self_attn.o_proj.weight, o_cols),
                            (layer.mlp.down_proj.weight, down_cols)):
                amax = w.abs().amax(dim=1)
                for c in cols:
                    w[:, c] = amax * torch.where(w[:, c] < 0, -1.0, 1.0)
    return model


def assert_same_rank_files(a, b, ranks: int) -> None:
    """Every rank file of checkpoints ``a`` and ``b`` holds the same tensor names and values."""
    import torch
    from safetensors.torch import load_file

    for r in range(ranks):
        ta, tb = (load_file(d / f"rank{r}.safetensors") for d in (a, b))
        assert sorted(ta) == sorted(tb)
        for name in ta:
            assert torch.equal(ta[name], tb[name]), (r, name)


def calibrated_if_needed(model, spec, text):
    """modelopt's calibration of a copy of ``model`` for ``spec`` over ``text`` (byte tokens), or
    None for a format that needs none (weight-only)."""
    if not spec.needs_calibration:
        return None
    import copy

    from quantize.calibrate import calibrate

    return calibrate(copy.deepcopy(model), spec, text, tokenizer=byte_tokenizer, progress=False)

