"""Re-export: the error type lives in common/ so that quantize/ can use it without importing the
converter."""
from common.errors import UserError

__all__ = ["UserError"]
