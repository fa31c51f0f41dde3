"""The inference engine: the policy interface every backend implements, sampling, batching,
precision, the PyTorch policy with its KV cache, and the ONNX Runtime and llama.cpp backends."""
