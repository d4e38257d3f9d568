"""Inline SVG charts with titles, axes and units: no script, no network."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

__all__ = [
    "PALETTE",
    "bars",
    "histogram",
    "lines",
    "nice_ticks",
    "stacked_bars",
    "waterfall",
]

#: Colour per series; colour-blind friendly (Okabe-Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999")
_FONT = 'font-family="system-ui, sans-serif" font-size="12"'
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 150, 36, 46


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``high``."""
    if not high > 0 or not math.isfinite(high):
        return [0.0, 1.0]
    # The charts are in milliseconds: below a thousandth there is nothing to tell apart
    # (and a step of 1e-10 or less rounds to 0, or its logarithm fails for a subnormal).
    high = max(high, 0.001)
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    ticks = [0.0]
    while ticks[-1] < high - 1e-9:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _fmt(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.3g}"


def _frame(width: int, height: int, title: str, body: list[str]) -> str:
    label = escape(title)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" aria-label="{label}" {_FONT}>'
        f"<title>{label}</title>"
        f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-weight="bold" '
        f'font-size="14">{label}</text>' + "".join(body) + "</svg>"
    )


def _axes(
    width: int,
    height: int,
    x_ticks: Sequence[float],
    y_ticks: Sequence[float] | None,
    x_label: str,
    y_label: str,
    x_text: Sequence[str] | None = None,
    left: int = _LEFT,
) -> tuple[list[str], float, float]:
    """Axis lines, ticks and labels; returns the parts and the plot's width and height."""
    _LEFT = left
    plot_w = width - _LEFT - _RIGHT
    plot_h = height - _TOP - _BOTTOM
    x_max = x_ticks[-1] or 1.0
    parts = [
        f'<line x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{_LEFT + plot_w}" y2="{_TOP + plot_h}" '
        'stroke="#333"/>',
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + plot_h}" stroke="#333"/>',
    ]
    for i, tick in enumerate(x_ticks):
        x = _LEFT + plot_w * (tick / x_max)
        text = x_text[i] if x_text is not None else _fmt(tick)
        parts.append(
            f'<line x1="{x:.1f}" y1="{_TOP + plot_h}" x2="{x:.1f}" y2="{_TOP + plot_h + 4}" '
            f'stroke="#333"/><text x="{x:.1f}" y="{_TOP + plot_h + 16}" '
            f'text-anchor="middle">{escape(text)}</text>'
        )
    parts.append(
        f'<text x="{_LEFT + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
    )
    if y_ticks is not None:
        y_max = y_ticks[-1] or 1.0
        for tick in y_ticks:
            y = _TOP + plot_h - plot_h * (tick / y_max)
            parts.append(
                f'<line x1="{_LEFT - 4}" y1="{y:.1f}" x2="{_LEFT + plot_w}" y2="{y:.1f}" '
                f'stroke="#ddd"/><text x="{_LEFT - 7}" y="{y + 4:.1f}" text-anchor="end">'
                f"{_fmt(tick)}</text>"
            )
    parts.append(
        f'<text transform="translate(16 {_TOP + plot_h / 2:.1f}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    return parts, plot_w, plot_h


def histogram(
    title: str, values: Sequence[float], budget: float | None, bins: int = 30, width: int = 720
) -> str:
    """Runs per duration bin, with the budget as a labelled red line."""
    height = 240
    high = max(max(values, default=0.0), budget or 0.0) * 1.05 or 1.0
    x_ticks = nice_ticks(high)
    x_max = x_ticks[-1]
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int(value / x_max * bins))] += 1
    y_ticks = nice_ticks(max(counts) or 1)
    parts, plot_w, plot_h = _axes(
        width, height, x_ticks, y_ticks, "duration (ms)", "runs"
    )
    bar_w = plot_w / bins
    for i, count in enumerate(counts):
        if count:
            h = plot_h * count / y_ticks[-1]
            parts.append(
                f'<rect x="{_LEFT + i * bar_w + 0.5:.1f}" y="{_TOP + plot_h - h:.1f}" '
                f'width="{max(bar_w - 1, 0.5):.1f}" height="{h:.1f}" fill="{PALETTE[0]}">'
                f"<title>{count} runs</title></rect>"
            )
    if budget is not None:
        x = _LEFT + plot_w * budget / x_max
        over = sum(1 for v in values if v > budget)
        parts.append(
            f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{_TOP + plot_h}" stroke="#c00" '
            f'stroke-width="2" stroke-dasharray="6 3"/><text x="{x + 5:.1f}" y="{_TOP + 12}" '
            f'fill="#c00">budget {_fmt(budget)} ms: {over} of {len(values)} over</text>'
        )
    return _frame(width, height, title, parts)


def _left(labels: Sequence[str]) -> int:
    return max(_LEFT, 14 + 7 * max((len(label) for label in labels), default=0))


def bars(
    title: str,
    items: Sequence[tuple[str, float, str]],
    unit: str,
    width: int = 720,
    colours: Sequence[str] | None = None,
) -> str:
    """Horizontal bars: ``(label, value, value text)``, one per row."""
    row_h = 26
    height = _TOP + _BOTTOM + row_h * max(1, len(items))
    x_ticks = nice_ticks(max((v for _, v, _ in items), default=1.0) or 1.0)
    _LEFT = _left([label for label, _, _ in items])
    parts, plot_w, _ = _axes(width, height, x_ticks, None, unit, "", left=_LEFT)
    for i, (label, value, text) in enumerate(items):
        y = _TOP + i * row_h + 4
        w = plot_w * value / x_ticks[-1]
        parts.append(
            f'<text x="{_LEFT - 7}" y="{y + 14}" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{_LEFT}" y="{y}" width="{w:.1f}" height="{row_h - 8}" '
            f'fill="{colours[i] if colours else PALETTE[i % len(PALETTE)]}">'
            f"<title>{escape(label)}: {escape(text)}</title>"
            f'</rect><text x="{_LEFT + w + 5:.1f}" y="{y + 14}">{escape(text)}</text>'
        )
    return _frame(width, height, title, parts)


def stacked_bars(
    title: str,
    rows: Sequence[tuple[str, Sequence[tuple[str, float]]]],
    unit: str,
    width: int = 720,
) -> str:
    """One horizontal bar per row, split into named parts; each part labelled in place."""
    row_h = 30
    kinds: list[str] = []
    for _, parts_ in rows:
        kinds += [k for k, _ in parts_ if k not in kinds]
    colours = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(kinds)}
    height = _TOP + _BOTTOM + 22 + row_h * max(1, len(rows))
    total = max((sum(v for _, v in p) for _, p in rows), default=1.0) or 1.0
    x_ticks = nice_ticks(total)
    _LEFT = _left([label for label, _ in rows])
    parts, plot_w, _ = _axes(width, height, x_ticks, None, unit, "", left=_LEFT)
    key_x = _LEFT
    for kind in kinds:  # the key sits right under the title, in reading order
        parts.append(
            f'<rect x="{key_x}" y="{_TOP - 8}" width="10" height="10" fill="{colours[kind]}"/>'
            f'<text x="{key_x + 14}" y="{_TOP + 1}">{escape(kind)}</text>'
        )
        key_x += 24 + 7 * len(kind)
    for i, (label, segments) in enumerate(rows):
        y = _TOP + 22 + i * row_h
        x = float(_LEFT)
        parts.append(f'<text x="{_LEFT - 7}" y="{y + 15}" text-anchor="end">{escape(label)}</text>')
        for kind, value in segments:
            w = plot_w * value / x_ticks[-1]
            parts.append(
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 10}" '
                f'fill="{colours[kind]}"><title>{escape(label)}: {escape(kind)} '
                f"{value:.1f} {escape(unit)}</title></rect>"
            )
            if w > 34:
                parts.append(
                    f'<text x="{x + 3:.1f}" y="{y + 14}" fill="#fff">{escape(kind)}</text>'
                )
            x += w
        parts.append(
            f'<text x="{x + 5:.1f}" y="{y + 15}">{sum(v for _, v in segments):.1f}</text>'
        )
    return _frame(width, height, title, parts)


def lines(
    title: str,
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    x_label: str,
    y_label: str,
    x_text: Sequence[str],
    x_count: int,
    width: int = 720,
) -> str:
    """Lines over ``x_count`` evenly spaced slots; each line is named at its end."""
    height = 280
    high = max((v for _, pts in series for _, v in pts), default=1.0) or 1.0
    y_ticks = nice_ticks(high)
    slots = max(1, x_count - 1)
    x_ticks = [float(i) for i in range(0, x_count, max(1, x_count // 5))]
    parts, plot_w, plot_h = _axes(
        width,
        height,
        [*x_ticks[:-1], float(slots)] if len(x_ticks) > 1 else [0.0, float(slots)],
        y_ticks,
        x_label,
        y_label,
        x_text=[x_text[int(t)] for t in x_ticks[:-1]] + [x_text[-1]]
        if len(x_ticks) > 1
        else [x_text[0], x_text[-1]],
    )
    ends: list[tuple[float, float, str, str]] = []
    for i, (name, points) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        xy = [
            (_LEFT + plot_w * x / slots, _TOP + plot_h - plot_h * y / y_ticks[-1])
            for x, y in points
        ]
        if not xy:
            continue
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2">'
            f"<title>{escape(name)}</title></polyline>"
        )
        parts.extend(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in xy
        )
        ends.append((xy[-1][1], xy[-1][0], name, colour))
    # Each line is named at its end; names are moved apart so that none overlaps.
    placed: list[float] = []
    for y, x, name, colour in sorted(ends):
        label_y = max(y + 4, placed[-1] + 13) if placed else y + 4
        placed.append(label_y)
        parts.append(
            f'<text x="{x + 6:.1f}" y="{label_y:.1f}" fill="{colour}">{escape(name)}</text>'
        )
    return _frame(width, height, title, parts)


def waterfall(
    title: str, stages: Sequence[tuple[str, float, float, int]], total_ms: float, width: int = 720
) -> str:
    """A request's stages as bars from their start offset, nested ones indented."""
    row_h = 22
    height = _TOP + _BOTTOM + row_h * max(1, len(stages))
    x_ticks = nice_ticks(total_ms or 1.0)
    _LEFT = _left(["   " * s[3] + s[0] for s in stages])
    parts, plot_w, _ = _axes(
        width, height, x_ticks, None, "time since the request started (ms)", "", left=_LEFT
    )
    names = sorted({s[0] for s in stages})
    colours = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    for i, (name, start, duration, depth) in enumerate(stages):
        y = _TOP + i * row_h + 3
        x = _LEFT + plot_w * start / x_ticks[-1]
        w = max(1.0, plot_w * duration / x_ticks[-1])
        parts.append(
            f'<text x="{8 + 14 * depth}" y="{y + 12}">{"└ " if depth else ""}{escape(name)}</text>'
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 6}" '
            f'fill="{colours[name]}"><title>{escape(name)}: {duration:.1f} ms from '
            f"{start:.1f} ms</title></rect>"
            f'<text x="{x + w + 4:.1f}" y="{y + 12}">{duration:.1f} ms</text>'
        )
    return _frame(width, height, title, parts)
