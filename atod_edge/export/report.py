"""The verification report: report.json (machine-readable), report.md (for people) and report.png
(success with its paired 95% interval, and KL, per file), side by side."""

from __future__ import annotations

from pathlib import Path

from atod_edge.io import atomic_path, atomic_write_json, atomic_write_text

PLOT = "report.png"


def write_report(out_dir: str | Path, report: dict) -> None:
    out_dir = Path(out_dir)
    if report.get("verified") and report.get("files"):
        report["plot"] = PLOT if write_plot(out_dir / PLOT, report) else None
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


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _points(agent: dict) -> tuple[str, str]:
    if "points_vs_student" not in agent:
        return "-", "-"
    lo, hi = agent["points_ci95"]
    return f"{agent['points_vs_student']:+.1f}", f"[{_num(lo, '{:+.1f}')}, {_num(hi, '{:+.1f}')}]"


def render_markdown(report: dict) -> str:
    student = report.get("student", {})
    verdict = "PASS" if report.get("passed") else "FAIL"
    contexts = report.get("contexts", {})
    lines = [f"# Export verification: {verdict}", "",
             f"- student: `{report.get('source', '?')}`"]
    if report.get("env"):
        lines.append(f"- env: `{report['env']}` ({report.get('env_source', '?')})")
    lines.append(f"- contexts: {contexts.get('count', 0)} from {contexts.get('source', '?')}")
    on_policy = report.get("on_policy_contexts") or {}
    if on_policy.get("count"):
        lines.append(f"- on-policy contexts: {on_policy['count']} from {on_policy.get('source', '?')}")
    agent = student.get("agent")
    if agent:
        lines.append(f"- student success: {agent['successes']}/{agent['episodes']} "
                     f"({100 * agent['success_rate']:.1f}%) on {report.get('env', '?')} eval, greedy")
    speed = student.get("speed") or {}
    lines.append(f"- student (PyTorch) decode: {_num(speed.get('decode_tokens_per_s'), '{:.0f}')} tok/s, "
                 f"first token {_num(speed.get('first_token_s'), '{:.4f}')} s")
    if report.get("serving"):
        lines.append(f"- serve: `{report['serving']['gguf']}` (see SERVE.md and Modelfile)")

    lines += ["", "## Logit parity", "",
              "| file | type | size | max abs logit diff | mean KL | p99 KL | top-1 | on-policy mean KL | "
              "on-policy top-1 | greedy seq | decode tok/s | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in report.get("files", []):
        parity = f.get("parity") or {}
        own = f.get("parity_on_policy") or {}
        greedy = f.get("greedy") or {}
        lines.append(
            f"| {f['file']} | {f['type']} | {_mib(f.get('bytes'))} | {_num(parity.get('max_abs_logit_diff'))} | "
            f"{_num(parity.get('mean_kl'))} | {_num(parity.get('p99_kl'))} | "
            f"{_num(parity.get('top1_agreement'), '{:.3f}')} | {_num(own.get('mean_kl'))} | "
            f"{_num(own.get('top1_agreement'), '{:.3f}')} | "
            f"{_num(greedy.get('greedy_sequence_agreement'), '{:.2f}')} | "
            f"{_num((f.get('speed') or {}).get('decode_tokens_per_s'), '{:.0f}')} | {f['status'].upper()} |")

    if agent:
        lines += ["", f"## Agent, paired: the same {agent['episodes']} seeded {report.get('env', '?')} eval "
                  "episodes for every file (greedy)", "",
                  "| who | success | vs student (points) | 95% interval | invalid actions | loop rate | "
                  "mean turns |", "|---|---|---|---|---|---|---|",
                  f"| PyTorch student | {_pct(agent['success_rate'])} | | | {_pct(agent.get('invalid_rate'))} | "
                  f"{_pct(agent.get('loop_rate'))} | {_num(agent.get('mean_turns'), '{:.1f}')} |"]
        for f in report.get("files", []):
            a = f.get("agent")
            if not a:
                lines.append(f"| {f['file']} | - | - | - | - | - | - |")
                continue
            diff, interval = _points(a)
            lines.append(f"| {f['file']} | {_pct(a['success_rate'])} | {diff} | {interval} | "
                         f"{_pct(a.get('invalid_rate'))} | {_pct(a.get('loop_rate'))} | "
                         f"{_num(a.get('mean_turns'), '{:.1f}')} |")
        lines += ["", "Loop: the same action 3 or more times in a row. 95% interval of the paired "
                  "difference (file minus student): Agresti-Min (1/2 added to each cell of the 2x2 table)."]
    if report.get("plot"):
        lines += ["", f"![success and KL per file]({report['plot']})"]

    notes = []
    for f in report.get("files", []):
        for reason in f.get("failures", []):
            notes.append(f"- **{f['file']} fails**: {reason}")
        for warning in f.get("warnings", []):
            notes.append(f"- {f['file']}: {warning}")
        if f.get("calibrated"):
            c = f["calibrated"]
            notes.append(f"- {f['file']}: quantized with an importance matrix from {c['tokens']} tokens of the "
                         f"student's own {c['episodes']} greedy {c['env']} {c['split']} episodes")
        if f.get("providers"):
            notes.append(f"- {f['file']}: ONNX Runtime providers in use: {', '.join(f['providers'])}")
        if f.get("tensor_types"):
            types = ", ".join(f"{k} x{v}" for k, v in sorted(f["tensor_types"].items()))
            notes.append(f"- {f['file']}: tensor types {types}")
    if notes:
        lines += ["", "## Notes", *notes]
    return "\n".join(lines) + "\n"


def write_plot(path: Path, report: dict) -> bool:
    """Two panels: success per file (student as a line, paired 95% intervals as error bars) and
    mean KL per file on expert and on-policy contexts (log scale). False when matplotlib is
    missing or nothing can be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    files = report.get("files", [])
    names = [f["file"].replace("onnx/", "") for f in files]
    x = list(range(len(files)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))

    student = (report.get("student") or {}).get("agent")
    if student:
        rates = [100 * f["agent"]["success_rate"] if f.get("agent") else float("nan") for f in files]
        errors = [[0.0] * len(files), [0.0] * len(files)]      # below, above each bar
        for i, f in enumerate(files):
            a = f.get("agent") or {}
            if "points_ci95" in a:
                lo, hi = a["points_ci95"]
                errors[0][i] = min(a["points_vs_student"] - lo, 100.0)
                errors[1][i] = min(hi - a["points_vs_student"], 100.0)
        left.bar(x, rates, color="#4c72b0", yerr=errors, capsize=4)
        left.axhline(100 * student["success_rate"], color="black", linestyle="--", label="PyTorch student")
        left.legend(loc="lower right")
    left.set_title(f"success, {report.get('env', '?')} eval (paired 95% interval)")
    left.set_ylabel("success %")
    left.set_ylim(0, 100)

    width = 0.4
    for offset, key, label in ((-width / 2, "parity", "expert contexts"),
                               (width / 2, "parity_on_policy", "on-policy contexts")):
        values = [max((f.get(key) or {}).get("mean_kl", float("nan")), 1e-9) for f in files]
        right.bar([i + offset for i in x], values, width=width, label=label)
    right.set_yscale("log")
    right.set_title("mean KL(student || file)")
    right.legend(loc="upper left")
    for ax in (left, right):
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return True
