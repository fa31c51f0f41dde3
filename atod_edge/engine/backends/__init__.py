"""Policy backends and the dispatch that picks one for a model file.

The shared interface (`Policy`, `SamplingParams`, `Generation`) and the PyTorch backend live in
`atod_edge.engine.policy`; the backends here import it, never the other way round. `load_policy` sits
above them all: it opens any agent file with the backend of its kind, importing ONNX Runtime
(`ort.OrtPolicy`) or llama.cpp (`llamacpp.LlamaCppPolicy`) only when a file of that kind is opened.
"""

from __future__ import annotations

from pathlib import Path

from atod_edge.engine.policy import Policy, TorchPolicy


def is_torch_model(path: str) -> bool:
    """Whether load_policy opens `path` with the PyTorch backend (not a .gguf or ONNX export)."""
    p = Path(path)
    return p.suffix != ".gguf" and not _is_onnx(p)


def _is_onnx(p: Path) -> bool:
    return p.suffix == ".onnx" or (p.is_dir() and (p / "model.onnx").is_file() and not list(p.glob("*.safetensors")))


def load_policy(path: str, device: str = "cpu", **kwargs) -> Policy:
    """Any agent file: an HF checkpoint dir or preset (torch), a .onnx file or ONNX export dir
    (onnxruntime), a .gguf file (llama.cpp)."""
    p = Path(path)
    if p.suffix == ".gguf":
        from atod_edge.engine.backends.llamacpp import LlamaCppPolicy

        return LlamaCppPolicy.load(path, **kwargs)
    if _is_onnx(p):
        from atod_edge.engine.backends.ort import OrtPolicy

        return OrtPolicy.load(path, device=device, **kwargs)
    return TorchPolicy.load(path, device=device, **kwargs)
