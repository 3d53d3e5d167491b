"""The model's Hugging Face tokenizer (transformers imported on first use: not on the float path)."""
from __future__ import annotations

from pathlib import Path

from common.errors import UserError


def load_tokenizer(hf_dir: Path, purpose: str = "calibration", fix: str = ""):
    """The model's HF tokenizer; UserError naming ``purpose`` (and ``fix``, an extra remedy) when
    the directory has none that loads."""
    from transformers import AutoTokenizer

    from .config import pretrained_config

    try:  # the model's config from the run's one parse, not reread by AutoTokenizer
        kw = {"config": pretrained_config(hf_dir)}
    except Exception:  # no usable config.json: AutoTokenizer's own reading and its error
        kw = {}
    try:
        return AutoTokenizer.from_pretrained(hf_dir, **kw)
    except Exception as e:  # transformers raises many types for a missing/broken tokenizer
        raise UserError(f"{purpose} needs the model's tokenizer but {hf_dir} has none that loads "
                        f"({type(e).__name__}); add tokenizer files to the model directory"
                        f"{fix}") from None
