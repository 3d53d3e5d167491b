"""What a run returns to the CLI: its exit status and what build.json records."""
from __future__ import annotations

from dataclasses import dataclass, field

from common.digests import Digests

EXIT_OK, EXIT_MISMATCH, EXIT_NO_ENGINE = 0, 1, 3


@dataclass
class BuildResult:
    """``exit_code``: the run's status; ``manifest``: whether build.json is written (not after a
    --verify mismatch); ``inputs``, ``timings``, ``extra`` (build.json "options" beyond the flags:
    the quantization recipe and its gate), ``engines`` (the engine record), ``layout`` (head
    padding): build.json's fields; ``digests``: what the run's writers hashed while writing, so
    build.json need not read those files back; ``outputs``: the names under OUTPUT this run
    wrote, the only ones build.json lists."""

    exit_code: int = EXIT_OK
    manifest: bool = True
    inputs: object = None
    timings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    engines: dict | None = None
    layout: dict | None = None
    digests: Digests = field(default_factory=Digests)
    outputs: list = field(default_factory=list)
