"""A small terminal plot of one metric over training steps, drawn with eighth-height blocks."""

from __future__ import annotations

import math

from rich.style import Style
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

BLOCKS = " ▁▂▃▄▅▆▇█"
LABEL_WIDTH = 8


def resample(values: list[float], width: int) -> list[float]:
    """Fit `values` into exactly `width` columns: bin means when longer, repeated when shorter."""
    if width <= 0 or not values:
        return []
    if len(values) <= width:
        # stretch: each value spans the same number of columns (a step plot)
        return [values[col * len(values) // width] for col in range(width)]
    out = []
    for col in range(width):
        lo = col * len(values) // width
        hi = max(lo + 1, (col + 1) * len(values) // width)
        chunk = values[lo:hi]
        out.append(sum(chunk) / len(chunk))
    return out


def format_value(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.1e}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def render_bars(values: list[float], width: int, height: int, style: Style | str = "") -> list[Text]:
    """Rows (top first) of a bar chart of `values` scaled between their min and max."""
    columns = resample(values, max(1, width - LABEL_WIDTH))
    if not columns:
        return [Text(" " * width) for _ in range(height)]
    lo, hi = min(columns), max(columns)
    span = hi - lo
    levels = height * 8
    # a flat series sits at mid-height rather than vanishing at the bottom
    heights = [levels // 2 if span == 0 else round(1 + (v - lo) / span * (levels - 1)) for v in columns]
    rows = []
    for row in range(height):
        base = (height - 1 - row) * 8
        label = format_value(hi) if row == 0 else format_value(lo) if row == height - 1 else ""
        line = Text(label.rjust(LABEL_WIDTH - 1)[: LABEL_WIDTH - 1] + "│", style="dim")
        cells = "".join(BLOCKS[max(0, min(8, h - base))] for h in heights)
        line.append(cells, style=style)
        rows.append(line)
    return rows


class CurvePlot(Widget):
    """One metric: a title line with the last value, then the curve (or a note if there is none)."""

    COMPONENT_CLASSES = {"curveplot--bar"}
    DEFAULT_CSS = """
    CurvePlot { height: 1fr; min-height: 4; }
    CurvePlot > .curveplot--bar { color: $accent; }
    """

    points: reactive[tuple[tuple[int, float], ...]] = reactive((), layout=False)

    def __init__(self, key: str, title: str, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.key = key
        self.title = title

    def set_points(self, points: list[tuple[int, float]]) -> None:
        self.points = tuple(points)

    def render(self) -> Text:
        width, height = self.size.width, self.size.height
        head = Text(self.title, style="bold", no_wrap=True, overflow="ellipsis")
        if self.points:
            head.append(f"  {format_value(self.points[-1][1])}")
            head.append(f"  @{self.points[-1][0]}", style="dim")
        head.truncate(width, overflow="ellipsis")
        lines = [head]
        plot_height = max(1, height - 1)
        if not self.points:
            lines.append(Text("  no data yet", style="dim italic"))
        else:
            lines += render_bars([v for _, v in self.points], width, plot_height, style=self.get_component_rich_style("curveplot--bar"))
        out = Text()
        for i, line in enumerate(lines[:height]):
            if i:
                out.append("\n")
            out.append_text(line)
        return out
