"""What `atod-edge export --calibrate` buys at Q4_K_M: the same checkpoint quantized without and with
an importance matrix from the student's own train-split episodes, verified side by side in one
report (the same student reference, the same paired eval episodes).

    python benchmarks/bench_calibrate.py MODEL [--calibrate 16] [--episodes 10] [--out DIR] [--json FILE] [--md FILE]

Prints report.md (logit parity on expert and on-policy contexts, the paired agent table) and the
KL of each file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="checkpoint dir or model name")
    parser.add_argument("--quant", default="q4_k_m")
    parser.add_argument("--calibrate", type=int, default=16, help="calibration episodes (train split)")
    parser.add_argument("--episodes", type=int, default=10, help="paired eval episodes per file")
    parser.add_argument("--contexts", type=int, default=8, help="expert and on-policy contexts")
    parser.add_argument("--env", default=None, help="env (default: the checkpoint's run, else household)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", help="keep the files here (default: a temporary dir)")
    parser.add_argument("--json", help="write both files' parity and agent rows to this JSON file")
    parser.add_argument("--md", help="write the report (markdown, with this command) to this file")
    args = parser.parse_args(argv)

    from atod_edge.export import VerifyConfig, export_model, verify_dir
    from atod_edge.io import atomic_write_json
    from atod_edge.export.report import render_markdown

    config = VerifyConfig(n_contexts=args.contexts, on_policy_contexts=args.contexts, n_episodes=args.episodes,
                          env=args.env or "", n_threads=args.threads or 0, device="cpu")

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="atod-calibrate-") as tmp:
        out = Path(args.out or tmp)
        export_model(args.model, out, onnx=False, gguf_quants=[args.quant], verify=False,
                     config=config, n_threads=args.threads, progress=say)
        calibrated = export_model(args.model, out / "calibrated", onnx=False, gguf_quants=[args.quant],
                                  verify=False, config=config, n_threads=args.threads, progress=say,
                                  calibrate=args.calibrate)
        manifest = json.loads((out / "export.json").read_text())
        entry = dict(calibrated["files"][0], file=f"calibrated/{calibrated['files'][0]['file']}")
        entry.pop("status", None)
        manifest["files"].append({k: entry[k] for k in ("file", "format", "type", "calibrated")})
        atomic_write_json(out / "export.json", manifest)
        report = verify_dir(out, config=config, progress=say)

    markdown = render_markdown(report)
    print(markdown)
    if args.md:
        from atod_edge.io import atomic_write_text

        command = "python benchmarks/bench_calibrate.py " + " ".join(argv if argv is not None else sys.argv[1:])
        atomic_write_text(args.md, f"{markdown.rstrip()}\n\nMeasured with `{command}`.\n")
    rows = [{"file": f["file"], "calibrated": f.get("calibrated"), "parity": f.get("parity"),
             "parity_on_policy": f.get("parity_on_policy"), "agent": f.get("agent")} for f in report["files"]]
    for row in rows:
        own = row["parity_on_policy"] or {}
        print(f"{row['file']}: mean KL {row['parity']['mean_kl']:.4g} (expert contexts), "
              f"{own.get('mean_kl', float('nan')):.4g} (on-policy)")
    if args.json:
        atomic_write_json(args.json, {"model": args.model, "quant": args.quant, "env": report["env"],
                                      "calibration_episodes": args.calibrate, "student": report["student"],
                                      "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
