"""Charts as self-contained SVG text, for files a person opens: a run's curves.svg and evaluate.py's report.

No plotting library and no JavaScript: each chart is a few hundred lines of SVG that any browser, editor or
image viewer shows, and that tests can parse as XML. Every drawn number is also in the chart's text (a
<title> per point), so a reader can hover it and a test can check it.
"""

import html
import math

WIDTH, HEIGHT, PAD = 720, 360, (60, 20, 30, 50)  # left, right, top, bottom margins
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _ticks(low: float, high: float, n: int = 5) -> list[float]:
    """About n round numbers spanning [low, high]."""
    if high <= low:
        return [low]
    step = 10 ** math.floor(math.log10((high - low) / n))
    for k in (1, 2, 5, 10):
        if (high - low) / (k * step) <= n:
            step *= k
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _number(x: float) -> str:
    return f"{x:.4g}"


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str) -> str:
    """Lines of (x, y) points, one per series, on shared axes; a series with one point is a dot."""
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    left, right, top, bottom = PAD
    w, h = WIDTH - left - right, HEIGHT - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
           f"<title>{html.escape(title)}</title>", f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{PAD[0]}" y="18" font-size="13">{html.escape(title)}</text>']
    if not points:
        out.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no data yet</text></svg>')
        return "\n".join(out) + "\n"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)
    sx = lambda x: left + (x - x0) / (x1 - x0) * w  # noqa: E731
    sy = lambda y: top + (y1 - y) / (y1 - y0) * h  # noqa: E731
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{_number(t)}</text>')
    for t in _ticks(x0, x1):
        out.append(f'<text x="{sx(t):.1f}" y="{top + h + 16}" text-anchor="middle">{_number(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#888"/>')
    out.append(f'<text x="{left + w / 2}" y="{HEIGHT - 8}" text-anchor="middle">{html.escape(x_label)}</text>')
    out.append(f'<text transform="translate(14 {top + h / 2}) rotate(-90)" text-anchor="middle">'
               f'{html.escape(y_label)}</text>')
    for k, (name, values) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        values = [(x, y) for x, y in values if math.isfinite(y)]
        if len(values) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
            out.append(f'<polyline class="series" data-name="{html.escape(name)}" fill="none" stroke="{colour}" '
                       f'stroke-width="1.5" points="{path}"/>')
        for x, y in values:
            out.append(f'<circle class="point" data-series="{html.escape(name)}" data-x="{x}" data-y="{y!r}" '
                       f'cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{2.5 if len(values) > 1 else 4}" fill="{colour}">'
                       f"<title>{html.escape(name)}: step {x}, {_number(y)}</title></circle>")
        out.append(f'<rect x="{left + w - 150}" y="{top + 8 + 18 * k}" width="12" height="3" fill="{colour}"/>'
                   f'<text x="{left + w - 132}" y="{top + 13 + 18 * k}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def interval_chart(rows: list[tuple[str, float, float, float]], title: str, x_label: str, mark: float = 0.5,
                   low: float = 0.0, high: float = 1.0) -> str:
    """One row per (label, value, interval low, interval high): a dot at the value and a bar for the interval,
    on an axis from low to high with a dashed line at `mark` (50%: no difference)."""
    left, right, top, bottom = 200, 30, 30, 45
    row_h = 28
    height = top + bottom + row_h * max(1, len(rows))
    w = WIDTH - left - right
    sx = lambda x: left + (min(max(x, low), high) - low) / (high - low) * w  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
           f"<title>{html.escape(title)}</title>", f'<rect width="{WIDTH}" height="{height}" fill="white"/>']
    for t in _ticks(low, high, 10):
        out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" y2="{height - bottom}" stroke="#eee"/>'
                   f'<text x="{sx(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{_number(t)}</text>')
    out.append(f'<line x1="{sx(mark):.1f}" x2="{sx(mark):.1f}" y1="{top - 6}" y2="{height - bottom}" stroke="#555" '
               'stroke-dasharray="4 3"/>')
    out.append(f'<text x="{left + w / 2}" y="{height - 8}" text-anchor="middle">{html.escape(x_label)}</text>')
    for i, (label, value, lo, hi) in enumerate(rows):
        y = top + row_h * i + row_h / 2
        out.append(f'<text x="{left - 10}" y="{y + 4:.1f}" text-anchor="end">{html.escape(label)}</text>')
        if not all(math.isfinite(v) for v in (value, lo, hi)):
            out.append(f'<text x="{left + 4}" y="{y + 4:.1f}" fill="#888">not judged</text>')
            continue
        tip = f"{label}: {_number(value)} [{_number(lo)}, {_number(hi)}]"
        out.append(f'<g class="row" data-label="{html.escape(label)}" data-value="{value!r}" data-low="{lo!r}" '
                   f'data-high="{hi!r}"><title>{html.escape(tip)}</title>'
                   f'<line x1="{sx(lo):.1f}" x2="{sx(hi):.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#1f77b4" '
                   f'stroke-width="3"/><circle cx="{sx(value):.1f}" cy="{y:.1f}" r="5" fill="#1f77b4"/></g>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
