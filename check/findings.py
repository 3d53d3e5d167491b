"""One finding of ``check``: what TensorRT-LLM would say, where, and whether it stops the load."""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import UserError


class NotChecked(UserError):
    """The checkpoint uses a model class or format check/'s table does not restate (exit 2 from
    ``build_engine check``; the engine target says so and builds anyway)."""


@dataclass
class Finding:
    kind: str            # config, rank_file, preprocess, missing, shape, dtype, extra, gpu
    message: str         # TensorRT-LLM's words
    rank: int | None = None
    name: str | None = None
    fatal: bool = True

    def as_dict(self) -> dict:
        return {"kind": self.kind, "rank": self.rank, "name": self.name, "fatal": self.fatal,
                "message": self.message}
