"""An independent restatement of the model's identity as README defines it (build.json's
``inputs.weights_blake3``): one BLAKE3 over the lines ``name<TAB>dtype<TAB>[shape]<TAB>BLAKE3 of
the tensor's bytes`` of every tensor, sorted, whatever files hold them (dtype as safetensors
names it). Read with the safetensors library, not with common.source_scan."""
from __future__ import annotations

import blake3
import numpy as np
from safetensors.numpy import load_file

_ST = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64"}


def restated_identity(files) -> str:
    lines = []
    for f in files:
        for name, t in load_file(str(f)).items():
            digest = blake3.blake3(np.ascontiguousarray(t).tobytes()).hexdigest()
            lines.append(f"{name}\t{_ST[t.dtype]}\t{list(t.shape)}\t{digest}\n")
    return blake3.blake3("".join(sorted(lines)).encode()).hexdigest()
