"""The verification report: report.json (machine-readable) and report.md (for people), side by side."""

from __future__ import annotations

from pathlib import Path

from atod_edge.io import atomic_write_json, atomic_write_text


def write_report(out_dir: str | Path, report: dict) -> None:
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", render_markdown(report))


def _num(value, fmt: str = "{:.3g}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    return fmt.format(value)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def render_markdown(report: dict) -> str:
    student = report.get("student", {})
    verdict = "PASS" if report.get("passed") else "FAIL"
    lines = [f"# Export verification: {verdict}", "",
             f"- student: `{report.get('source', '?')}`",
             f"- contexts: {report.get('contexts', {}).get('count', 0)} from "
             f"{report.get('contexts', {}).get('source', '?')}"]
    agent = student.get("agent")
    if agent:
        lines.append(f"- student success: {agent['successes']}/{agent['episodes']} "
                     f"({100 * agent['success_rate']:.1f}%) on {report.get('env', '?')} eval, greedy")
    speed = student.get("speed") or {}
    lines.append(f"- student (PyTorch) decode: {_num(speed.get('decode_tokens_per_s'), '{:.0f}')} tok/s, "
                 f"first token {_num(speed.get('first_token_s'), '{:.4f}')} s")
    lines += ["", "| file | type | size | max abs logit diff | mean KL | p99 KL | top-1 | greedy seq | "
              "success (pts vs student) | decode tok/s | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in report.get("files", []):
        parity = f.get("parity") or {}
        greedy = f.get("greedy") or {}
        a = f.get("agent")
        success = "-" if not a else f"{100 * a['success_rate']:.1f}% ({a['points_vs_student']:+.1f})"
        lines.append(
            f"| {f['file']} | {f['type']} | {_mib(f.get('bytes'))} | {_num(parity.get('max_abs_logit_diff'))} | "
            f"{_num(parity.get('mean_kl'))} | {_num(parity.get('p99_kl'))} | "
            f"{_num(parity.get('top1_agreement'), '{:.3f}')} | "
            f"{_num(greedy.get('greedy_sequence_agreement'), '{:.2f}')} | {success} | "
            f"{_num((f.get('speed') or {}).get('decode_tokens_per_s'), '{:.0f}')} | {f['status'].upper()} |")
    notes = []
    for f in report.get("files", []):
        for reason in f.get("failures", []):
            notes.append(f"- **{f['file']} fails**: {reason}")
        for warning in f.get("warnings", []):
            notes.append(f"- {f['file']}: {warning}")
        if f.get("providers"):
            notes.append(f"- {f['file']}: ONNX Runtime providers in use: {', '.join(f['providers'])}")
        if f.get("tensor_types"):
            types = ", ".join(f"{k} x{v}" for k, v in sorted(f["tensor_types"].items()))
            notes.append(f"- {f['file']}: tensor types {types}")
    if notes:
        lines += ["", "## Notes", *notes]
    return "\n".join(lines) + "\n"
