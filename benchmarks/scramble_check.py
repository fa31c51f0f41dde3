"""Does export verification catch a broken tensor? Export MODEL (ONNX int8, GGUF q8_0 and
q4_k_m), reverse the rows of layer 0's k_proj in each file with the test suite's helpers, verify
(logit parity only) and print mean KL, top-1 agreement and pass/fail per file.

    python benchmarks/scramble_check.py tiny-student /tmp/scr-random     # random init: all pass
    python benchmarks/scramble_check.py TRAINED_CKPT /tmp/scr-trained    # a trained model: all fail
"""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "export"))
from test_export import _scramble_gguf, _scramble_onnx  # noqa: E402

from atod_edge.export import VerifyConfig, export_model, verify_dir  # noqa: E402

cfg = VerifyConfig(n_contexts=2, max_context_tokens=256, greedy_tokens=8, n_episodes=0, speed_tokens=8,
                   device="cpu", n_threads=1)
model, out = sys.argv[1], Path(sys.argv[2])
if out.exists():
    shutil.rmtree(out)
export_model(model, out, onnx=True, int8=True, gguf_quants=["q8_0", "q4_k_m"], verify=False, n_threads=1)
for name in ["onnx/model.int8.onnx", "agent.q8_0.gguf", "agent.q4_k_m.gguf"]:
    (_scramble_onnx if name.startswith("onnx") else _scramble_gguf)(out / name)
report = verify_dir(out, config=cfg)
for f in report["files"]:
    scrambled = "" if f["file"] == "onnx/model.onnx" else " (scrambled)"
    print(f"{model} {f['file']}{scrambled}: mean KL {f['parity']['mean_kl']:.4g}, "
          f"top-1 {f['parity']['top1_agreement']:.3f}, {f['status']}")
