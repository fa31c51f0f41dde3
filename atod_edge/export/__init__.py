"""Export a student to ONNX and GGUF, quantize, and verify the files act like the student.

    from atod_edge.export import export_model, verify_dir, VerifyConfig
    report = export_model("runs/x/checkpoint", "dist/", onnx=True, int8=True,
                          gguf_quants=["f16", "q8_0", "q4_k_m"])
    report["passed"]     # False when any file fails verification (the CLI exits 1)

The runtimes that load these files live in the core (atod_edge.engine.backends); this package only
writes files and checks them.
"""

from .pipeline import DEFAULT_QUANTS, export_model, verify_dir
from .verify import VerifyConfig

__all__ = ["DEFAULT_QUANTS", "VerifyConfig", "export_model", "verify_dir", "exit_code"]


def exit_code(report: dict) -> int:
    """0 when every exported file passed verification, else 1."""
    return 0 if report.get("passed") else 1
