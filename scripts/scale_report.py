#!/usr/bin/env python3
"""Scaling report: peak RSS, load time and decode time against model bytes.

Reads the results.json of `bench run suites/scale.yaml` and writes, next to it,
README.md (a table per case and a least-squares slope of peak RSS against the bytes a
case holds) and memory.svg (peak RSS against the reference's bytes, one line per scheme,
with the bound 1.3 x (reference + quantized copy) + the fixed overhead drawn).

Usage: scripts/scale_report.py [RUN_DIR]   (default reports/scale)

The bound is the one the harness promises: peak RSS <= 1.3 x (stored reference bytes +
one quantized copy) + FIXED_OVERHEAD. The reference's bytes are the bf16 case's weight
bytes (every model of the suite is held at bf16); a case's quantized copy is its own
weight bytes.
"""
import json
import math
import sys
from pathlib import Path

FIXED_OVERHEAD = 512 * 2**20  # bytes: the process, tokenizer, buffers, allocator slack
SLOPE_BOUND = 1.3
MIB = 2**20


def load(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    params = {m["name"]: m["parameters"] for m in results["models"]}
    cases = [c for c in results["cases"] if c.get("memory") and c["memory"].get("peak_rss_bytes")]
    reference = {c["model"]: c["memory"]["total_bytes"] for c in cases if c["scheme"] == "bf16"}
    rows = []
    for c in cases:
        ref = reference.get(c["model"])
        if ref is None:
            continue
        copy = c["memory"]["total_bytes"]
        peak = c["memory"]["peak_rss_bytes"]
        latency = c.get("latency") or {}
        decode = (latency.get("decode") or {}).get("median")
        rows.append(
            {
                "model": c["model"],
                "scheme": c["scheme"],
                "params": params[c["model"]],
                "ref": ref,
                "copy": copy,
                "peak": peak,
                "bound": SLOPE_BOUND * (ref + copy) + FIXED_OVERHEAD,
                "load_s": latency.get("load_s"),
                "quantize_s": latency.get("quantize_s"),
                "decode_ms": decode,
            }
        )
    rows.sort(key=lambda r: (r["ref"], r["scheme"]))
    return results, rows


def slope(points):
    """Least-squares slope and intercept of y on x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    b = sxy / sxx if sxx else float("nan")
    return b, my - b * mx


def fmt_s(v):
    return "–" if v is None else f"{v:.2f}"


def table(rows):
    out = [
        "| model | parameters | scheme | reference MiB | copy MiB | peak RSS MiB | bound MiB | within | "
        "load s | quantize s | decode ms/token | ns/token/parameter |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        per_param = "–" if r["decode_ms"] is None else f"{r['decode_ms'] * 1e6 / r['params']:.3f}"
        decode = "–" if r["decode_ms"] is None else f"{r['decode_ms']:.1f}"
        out.append(
            f"| {r['model']} | {r['params']:,} | {r['scheme']} | {r['ref'] / MIB:.0f} | {r['copy'] / MIB:.0f} | "
            f"{r['peak'] / MIB:.0f} | {r['bound'] / MIB:.0f} | {'yes' if r['peak'] <= r['bound'] else 'NO'} | "
            f"{fmt_s(r['load_s'])} | {fmt_s(r['quantize_s'])} | {decode} | {per_param} |"
        )
    return "\n".join(out)


def svg(rows, width=720, height=440):
    """Peak RSS against reference bytes, log-log, one polyline per scheme, the bound dashed."""
    left, right, top, bottom = 80, 170, 30, 60
    xs = [r["ref"] for r in rows]
    ys = [r["peak"] for r in rows] + [r["bound"] for r in rows]
    x0, x1 = math.log10(min(xs) / 1.5), math.log10(max(xs) * 1.5)
    y0, y1 = math.log10(min(ys) / 1.5), math.log10(max(ys) * 1.5)

    def px(x):
        return left + (math.log10(x) - x0) / (x1 - x0) * (width - left - right)

    def py(y):
        return height - bottom - (math.log10(y) - y0) / (y1 - y0) * (height - top - bottom)

    colours = {"bf16": "#1f77b4", "int8-dynamic": "#2ca02c", "int4-block": "#d62728"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="18" font-size="14">Peak RSS against the reference model\'s bytes '
        "(log-log)</text>",
    ]
    for exp in range(int(math.floor(x0)), int(math.ceil(x1)) + 1):
        for m in (1, 2, 5):
            v = m * 10**exp
            if x0 <= math.log10(v) <= x1:
                x = px(v)
                parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - bottom}" stroke="#eee"/>')
                parts.append(f'<text x="{x:.1f}" y="{height - bottom + 16}" text-anchor="middle">{v / MIB:,.0f}</text>')
    for exp in range(int(math.floor(y0)), int(math.ceil(y1)) + 1):
        for m in (1, 2, 5):
            v = m * 10**exp
            if y0 <= math.log10(v) <= y1:
                y = py(v)
                parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#eee"/>')
                parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v / MIB:,.0f}</text>')
    parts.append(
        f'<text x="{(left + width - right) / 2:.0f}" y="{height - 20}" text-anchor="middle">'
        "reference (bf16) MiB</text>"
    )
    parts.append(
        f'<text x="18" y="{(top + height - bottom) / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 18 {(top + height - bottom) / 2:.0f})">peak RSS MiB</text>'
    )
    legend_y = top + 10
    for scheme in sorted({r["scheme"] for r in rows}):
        pts = [r for r in rows if r["scheme"] == scheme]
        colour = colours.get(scheme, "#555")
        line = " ".join(f"{px(r['ref']):.1f},{py(r['peak']):.1f}" for r in pts)
        bound = " ".join(f"{px(r['ref']):.1f},{py(r['bound']):.1f}" for r in pts)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<polyline points="{bound}" fill="none" stroke="{colour}" stroke-dasharray="5,4"/>')
        for r in pts:
            parts.append(f'<circle cx="{px(r["ref"]):.1f}" cy="{py(r["peak"]):.1f}" r="3.5" fill="{colour}"/>')
        lx = width - right + 12
        parts.append(f'<line x1="{lx}" y1="{legend_y}" x2="{lx + 20}" y2="{legend_y}" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{lx + 26}" y="{legend_y + 4}">{scheme}</text>')
        legend_y += 18
    lx = width - right + 12
    parts.append(f'<line x1="{lx}" y1="{legend_y}" x2="{lx + 20}" y2="{legend_y}" stroke="#555" stroke-dasharray="5,4"/>')
    parts.append(f'<text x="{lx + 26}" y="{legend_y + 4}">bound</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main():
    run_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "reports/scale")
    results, rows = load(run_dir)
    if not rows:
        sys.exit(f"scale_report.py: {run_dir}/results.json has no case with a peak RSS and a bf16 reference")
    prov = results["provenance"]
    lines = [
        "# Scaling: memory and time against model size",
        "",
        f"`bench run suites/scale.yaml` on {prov.get('cpu', 'this CPU')}, {prov.get('threads', '?')} threads, "
        f"{prov.get('started_at', '')}. Seeded weights at bf16: the shapes of SmolLM2-135M, bloom-560m, "
        "bloom-1b7 and Llama-2-7B. Written by `scripts/scale_report.py` from results.json.",
        "",
        f"Bound: peak RSS <= {SLOPE_BOUND} x (reference bytes + the case's quantized copy) + "
        f"{FIXED_OVERHEAD // MIB} MiB of fixed overhead (process, tokenizer, activation buffers).",
        "",
        table(rows),
        "",
        "Slope of peak RSS against the bytes a case holds (reference + copy), least squares over the sizes:",
        "",
    ]
    for scheme in sorted({r["scheme"] for r in rows}):
        pts = [(r["ref"] + r["copy"], r["peak"]) for r in rows if r["scheme"] == scheme]
        if len(pts) >= 2:
            b, a = slope(pts)
            lines.append(f"- {scheme}: {b:.3f} bytes of RSS per byte held, intercept {a / MIB:.0f} MiB")
    lines += ["", "![peak RSS against model bytes](memory.svg)", ""]
    (run_dir / "README.md").write_text("\n".join(lines))
    (run_dir / "memory.svg").write_text(svg(rows))
    print(f"wrote {run_dir / 'README.md'} and {run_dir / 'memory.svg'}")


if __name__ == "__main__":
    main()
