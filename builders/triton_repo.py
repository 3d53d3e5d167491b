"""Former home of the Triton repository writers, now the package ``builders.triton``; this
module keeps the old import path working for callers not yet updated."""
from builders.triton import *  # noqa: F401,F403
from builders.triton import __all__  # noqa: F401
