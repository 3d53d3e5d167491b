"""``ModelSource``: the model of one run, opened once. Its config.json is parsed once here and every
stage reads the normalised config and the shape from it instead of reopening the directory.

The safetensors shards are read by ``convert.source.SourceCheckpoint`` (its read paths need torch,
which model/ does not import); ``directory`` is what it and the calibration open."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import read_config
from .registry import pads_heads_by_default, resolve_model
from .shape import Shape, model_shape
from .tokenizer import load_tokenizer


@dataclass(frozen=True)
class ModelSource:
    """``name``: as given (``--model``: a directory or a bundled example); ``directory``: the HF
    model directory; ``raw``: config.json as parsed; ``config``: normalised as transformers'
    AutoConfig does; ``shape``: the unpadded shape (a layout pads it); ``pads_heads``: the name
    implies --pad-heads (the bundled ``llama``)."""

    name: str
    directory: Path
    raw: dict
    config: object
    shape: Shape
    pads_heads: bool = False
    _tokenizers: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, name_or_dir) -> "ModelSource":
        """Resolve ``--model`` (a bundled example is prepared on first use) and read its config."""
        name = str(name_or_dir)
        directory = resolve_model(name)
        raw, config = read_config(directory)
        return cls(name, directory, raw, config, model_shape(config), pads_heads_by_default(name))

    def tokenizer(self, purpose: str = "calibration", fix: str = ""):
        """The model's tokenizer, loaded on first use (one line naming ``purpose`` when there is
        none that loads)."""
        if "tok" not in self._tokenizers:
            self._tokenizers["tok"] = load_tokenizer(self.directory, purpose, fix)
        return self._tokenizers["tok"]
