"""modelopt's unified HF checkpoint (``--target pytorch``): checkpoint.py writes it, tensors.py
computes its quantized tensors (a whole calibrated model, or layer by layer from the calibration
store), config.py its JSON and which formats have one. Every format answer is the recipe's
(``Recipe.unified``, quantize/recipes/)."""
from .checkpoint import write_unified_checkpoint  # noqa: F401
from .config import check_supported, hf_quant_config, quantization_config  # noqa: F401
from .tensors import model_tensors, weight_only_int8  # noqa: F401
