"""Verification, beside the flow: a CPU reader that runs a written checkpoint (TensorRT-LLM's or
modelopt's unified one) with TensorRT-LLM's semantics and quantized kernels, and perplexity."""
