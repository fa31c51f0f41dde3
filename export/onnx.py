"""ONNX export through optimum (task text-generation-with-past), int8 through onnxruntime.

The result is one directory: model.onnx (fp32, takes past_key_values.N.key/value), optionally
model.int8.onnx (dynamic int8 weights), the config and the tokenizer, which is what
atod_edge.backends.ort.OrtPolicy loads. The directory appears only when complete.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from atod_edge.errors import UserError
from atod_edge.io import atomic_path

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"


def export_onnx(model_dir: str | Path, out_dir: str | Path, int8: bool = False) -> Path:
    """Export an fp32 HF checkpoint directory to `out_dir` (model.onnx [+ model.int8.onnx])."""
    try:
        from optimum.exporters.onnx import main_export
    except ImportError:
        raise UserError("ONNX export needs optimum-onnx (pip install 'atod-edge[export]')") from None

    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        # the exporter is chatty (tracer warnings, tied-weight notes): keep the CLI output readable
        with warnings.catch_warnings(), _quiet_logs(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            main_export(str(model_dir), output=tmp, task="text-generation-with-past",
                        device="cpu", do_validation=False)
        if not (tmp / FP32_FILE).is_file():
            raise UserError(f"ONNX export of {model_dir} produced no {FP32_FILE}")
        if int8:
            quantize_int8(tmp / FP32_FILE, tmp / INT8_FILE)
    return out_dir


def quantize_int8(source: Path, target: Path) -> Path:
    """Dynamic (weight-only int8, activations quantized on the fly) quantization."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_logs():
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    return target


@contextlib.contextmanager
def _quiet_logs():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
