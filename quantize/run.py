"""One calibration of a build: where its store is, whether it is reused, on which device, on what
text — and the step that fills (or checks) the store before the converter shards it."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import IO_ERRNOS, UserError, io_error

from . import store as cstore
from model.tokenizer import load_tokenizer

from .calibrate import resolve_device
from .formats import QuantSpec


@dataclass
class CalibrationRun:
    """``store``: the calibration directory (``DIR/calibration``); ``reuse``: it must already hold
    a complete calibration of the same inputs (``--calibration PATH``); ``temporary``: remove it
    once the checkpoint is written; ``device``: ``cpu``, ``cuda`` or ``auto``; ``calib_text`` /
    ``tokenizer``: default the spec's text and the model's tokenizer."""

    store: Path
    reuse: bool = False
    temporary: bool = False
    device: str = "auto"
    calib_text: str | None = None
    tokenizer: object = None
    #: the dtype the layers were calibrated in (set by :meth:`calibrate`)
    compute_dtype: torch.dtype | None = None

    def calibrate(self, model_dir: Path, source, spec: QuantSpec, *, progress: bool = True,
                  timings: dict | None = None, pad=None):
        """Fill (resume, or check when reused) the store; return ``load_layer(i, dtype)``.
        ``pad``: calibrate with the hidden size padded (quantize.calib_padding.CalibPad)."""
        from .layerwise import calib_batches, calibrate_layerwise, compute_dtype, config_dtype

        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        store = Path(self.store)
        tokenizer = self.tokenizer if self.tokenizer is not None else load_tokenizer(model_dir)
        text = spec.read_calib_text() if self.calib_text is None else self.calib_text
        batches = calib_batches(spec, text, tokenizer)
        device = resolve_device(self.device)
        cdtype = compute_dtype(device, config_dtype(Path(model_dir)))
        self.compute_dtype = cdtype
        # the weights' identity: their bytes, read once (common.source_scan), before the store
        # is reused or resumed
        fp = cstore.fingerprint(Path(model_dir) / "config.json", batches, spec, device.type,
                                cdtype, weights=source.scan().weights_digest())
        if pad is not None:  # another model's function-equal twin: its own calibration
            fp["calibration_padding"] = pad.fingerprint()
        model = str(Path(model_dir).resolve())
        if self.reuse:
            man = cstore.check_reusable(store, fp, model)
        else:
            try:
                man = calibrate_layerwise(model_dir, source, spec, store, batches, device=device,
                                          fingerprint=fp, progress=progress, timings=timings,
                                          model=model, pad=pad)
            except OSError as e:
                if e.errno not in IO_ERRNOS:
                    raise
                raise io_error(e, store) from None
        timings["calibration"] = time.perf_counter() - t0
        n = man.get("num_layers")
        if n is None or cstore.num_layers(store) != n:
            raise UserError(f"calibration store {store} is missing layer files; delete it and "
                            f"calibrate again")
        cstore.verify_layers(store, man)  # read back: each layer as it was written
        return lambda i, dtype: cstore.load_layer(store, i, dtype)

    def done(self) -> None:
        """After the checkpoint is written: a temporary store goes."""
        if self.temporary:
            shutil.rmtree(self.store, ignore_errors=True)
