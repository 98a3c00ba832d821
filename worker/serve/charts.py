"""Line charts as inline SVG, drawn on the server: a load's memory and CPU against its limits.

Hand-written rather than a charting library: two charts of at most 120 points
need ~60 lines, no JavaScript, and nothing a Content-Security-Policy must allow.
Only numbers we compute and our own labels go into the SVG; labels are escaped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

from loadwarden.worker._text import human_bytes

__all__ = ["human_bytes", "human_seconds", "line_chart"]

#: Two charts side by side within the console's 1180 px column.
WIDTH, HEIGHT = 550, 220
LEFT, RIGHT, TOP, BOTTOM = 70, 16, 28, 32


def human_seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def line_chart(
    title: str,
    points: Sequence[tuple[float, float]],
    *,
    limit: float | None,
    limit_label: str,
    fmt: Callable[[float], str],
    css_class: str,
) -> Markup:
    """A chart of ``points`` (seconds, value) with the limit as a dashed line across it."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    t_max = max((t for t, _ in points), default=0.0) or 1.0
    top = max([v for _, v in points] + [limit or 0.0]) * 1.08 or 1.0

    def x(t: float) -> float:
        return LEFT + plot_w * t / t_max

    def y(v: float) -> float:
        return TOP + plot_h * (1 - v / top)

    parts = [
        f'<svg class="chart {escape(css_class)}" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<text class="chart-title" x="{LEFT}" y="18">{escape(title)}</text>',
        f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}"/>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        value = top * fraction
        parts.append(
            f'<text class="tick" x="{LEFT - 6}" y="{y(value) + 4:.1f}" '
            f'text-anchor="end">{escape(fmt(value))}</text>'
        )
    parts.append(
        f'<text class="tick" x="{LEFT}" y="{HEIGHT - 10}">0 s</text>'
        f'<text class="tick" x="{WIDTH - RIGHT}" y="{HEIGHT - 10}" text-anchor="end">'
        f"{escape(human_seconds(t_max))}</text>"
    )
    if limit is not None:
        parts.append(
            f'<line class="limit" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(limit):.1f}" '
            f'y2="{y(limit):.1f}"/><text class="limit-label" x="{WIDTH - RIGHT - 4}" '
            f'y="{y(limit) - 5:.1f}" text-anchor="end">{escape(limit_label)} '
            f"{escape(fmt(limit))}</text>"
        )
    if points:
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
        parts.append(f'<polyline class="series" points="{coords}"/>')
        parts.extend(
            f'<circle class="point" cx="{x(t):.1f}" cy="{y(v):.1f}" r="2.5"/>' for t, v in points
        )
    else:
        parts.append(
            f'<text class="empty" x="{LEFT + plot_w / 2}" y="{TOP + plot_h / 2}" '
            'text-anchor="middle">no samples (the load ended before the first)</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
