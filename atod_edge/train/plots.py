"""Learning-curve PNGs for a run directory (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from atod_edge.io import read_jsonl

PANELS = [("success", "rollout success"), ("eval_success", "eval success"), ("reward", "reward"),
          ("episode_len", "turns per episode"), ("kappa", "kappa / rho"), ("mean_turn_weight", "mean turn weight"),
          ("mean_abs_log_ratio", "|lp_T - lp_S|"), ("loss", "surrogate loss")]
SFT_PANELS = [("loss", "SFT loss (response NLL)"), ("eval_success", "eval success"), ("lr", "learning rate"),
              ("grad_norm", "gradient norm")]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Write run_dir/curves.png from metrics.jsonl; returns its path (None if no metrics)."""
    return _plot_metrics(Path(run_dir), PANELS, (2, 4), (16, 7), out)


def plot_sft(work_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Write the SFT work dir's curves.png from its metrics.jsonl (None if no metrics)."""
    return _plot_metrics(Path(work_dir), SFT_PANELS, (1, 4), (16, 3.8), out)


def _plot_metrics(run_dir: Path, panels: list[tuple[str, str]], grid: tuple[int, int],
                  size: tuple[float, float], out: str | Path | None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows, _ = read_jsonl(path)
    if not rows:
        return None
    fig, axes = plt.subplots(*grid, figsize=size)
    for ax, (key, title) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            # markers where a line would be invisible: sparse eval points, a one-step run
            marker = "o" if key == "eval_success" or len(points) == 1 else None
            ax.plot(*zip(*points), marker=marker, label=key)
        if key == "kappa":
            rho = [(r["step"], r["rho"]) for r in rows if "rho" in r]
            if rho:
                ax.plot(*zip(*rho), label="rho")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(out)
    return out
