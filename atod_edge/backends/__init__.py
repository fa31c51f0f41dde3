"""Policy backends beyond PyTorch: ONNX Runtime (`ort.OrtPolicy`) and llama.cpp
(`llamacpp.LlamaCppPolicy`). Each is imported lazily by `atod_edge.policy.load_policy`, so the
heavy runtimes load only when a model file of their kind is opened."""
