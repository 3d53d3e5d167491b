"""Process memory: what the layer-by-layer loops (calibration, verification) call after freeing a
layer."""
from __future__ import annotations


def release_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise, and the process's RSS
    would creep layer by layer)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
