"""Pre-quantized inputs: a Hugging Face model directory whose config.json carries a
``quantization_config`` (GPTQ / AWQ int4 from AutoGPTQ / GPTQModel / AutoAWQ, compressed-tensors
``pack-quantized`` from llm-compressor) converted to TensorRT-LLM's groupwise int4 tensors without
calibration, tensor by tensor, in numpy (no torch: convert/ imports none).

* scheme.py  -- ``quantization_config`` -> :class:`SourceQuant`, and every plan-time refusal (one
  line: an unknown ``quant_method``, ``desc_act``, bits other than 4, a mixed or unsupported scheme);
* int4.py    -- each packer's int32 words -> TensorRT-LLM's int4 layout (two signed nibbles a byte
  along the output dimension, ``[out/2, in]``), the scales and the zero points of a slice;
* source.py  -- :class:`PrequantSource`: the source checkpoint seen by the float plan, each packed
  linear presented as a virtual ``<linear>.weight`` of its unpacked shape, so the float plan's
  tensor-parallel split and fusion rules apply unchanged.

quantize/recipes/prequantized/ turns each planned virtual weight into its TensorRT-LLM tensors.
"""
