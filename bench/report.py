"""Write a `BenchResult` as report.json, report.md and PNG charts (the benchmark itself writes nothing).

- report.json: `{"environment": {...}, "results": [row, ...], "speedups": [...]}`, one row per
  backend, device and batch size, skipped and failed rows included with their reason;
- report.md: the environment, the batch-1 latency table, the speed-up ratios (folded against
  unfolded, onnxruntime against eager, GPU against CPU), throughput against batch size, and
  every skipped or failed row with its reason;
- latency.png: batch-1 p50 per backend and device, whiskers up to p90;
- throughput.png: items per second against batch size, one line per backend and device.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnfold.bench.run import BenchResult
from bnfold.bench.timing import BenchRow
from bnfold.models.plotting import pyplot

from .backends import backend_label

LATENCY_CHART = "latency.png"
THROUGHPUT_CHART = "throughput.png"


@dataclass
class ReportFiles:
    json: Path
    markdown: Path
    charts: list[Path] = field(default_factory=list)


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _named(backend: str) -> str:
    """A table's backend cell: the name people know, then the `--backends` key where they differ."""
    label = backend_label(backend)
    return label if label == backend else f"{label} (`{backend}`)"


def _title(env: dict[str, Any]) -> str:
    shape = "x".join(str(d) for d in env.get("input_shape", []))
    return f"{env.get('model', 'model')} ({shape} {env.get('dtype', 'float32')})"


def environment_table(env: dict[str, Any]) -> str:
    """The 'what ran' table every report starts with."""
    keys = [("date (UTC)", "date"), ("model", "model"), ("input shape (C,H,W)", "input_shape"),
            ("dtype", "dtype"), ("CPU", "cpu"), ("CPUs available / total", None), ("GPU", "gpu"),
            ("CUDA", "cuda"), ("threads (torch and onnxruntime)", "threads"),
            ("load average 1/5/15 min, at the end", "load_average"), ("torch", "torch"),
            ("onnxruntime", "onnxruntime"), ("onnxruntime providers", "onnxruntime_providers"),
            ("onnx", "onnx"), ("python", "python"), ("measured per backend and batch size", None),
            ("method", "method")]
    lines = ["| | |", "|---|---|"]
    for label, key in keys:
        if key is None and label.startswith("CPUs"):
            value: Any = f"{env.get('cpus_available')} / {env.get('cpu_count')}"
        elif key is None:
            value = f"{env.get('seconds_per_backend')} s after {env.get('warmup_s')} s warm-up"
        else:
            value = env.get(key)
            if value is None:
                value = "none" if key in ("gpu", "cuda") else "–"
            elif isinstance(value, list):
                value = ", ".join(str(v) for v in value)
        lines.append(f"| {label} | {value} |")
    return "\n".join(lines)


def latency_table(result: BenchResult, batch_size: int = 1) -> str:
    """Latency per backend and device at one batch size, skipped rows shown with their status."""
    lines = ["| backend | device | p50 ms | p90 ms | p99 ms | mean ms | iterations | status |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in result.rows:
        if row.batch_size != batch_size:
            continue
        status = row.status if row.ok else f"{row.status} (reason below)"
        if row.warning:
            status += f" ⚠ {row.warning}"
        lines.append(f"| {_named(row.backend)} | {row.device} | {_ms(row.p50_ms)} | {_ms(row.p90_ms)} | "
                     f"{_ms(row.p99_ms)} | {_ms(row.mean_ms)} | {row.iterations} | {status} |")
    return "\n".join(lines)


def speedup_table(result: BenchResult) -> str:
    if not result.speedups:
        return "_No pair of rows to compare (every comparison needs both of its rows measured)._"
    lines = ["| comparison | baseline | candidate | speed-up (p50 baseline / p50 candidate) |",
             "|---|---|---|---:|"]
    for s in result.speedups:
        lines.append(f"| {s.label} | {s.baseline} | {s.candidate} | {s.factor:.2f}x |")
    return "\n".join(lines)


def throughput_table(result: BenchResult) -> str:
    sizes = sorted({r.batch_size for r in result.rows})
    keys = list(dict.fromkeys((r.backend, r.device) for r in result.rows))
    lines = ["| backend | device | " + " | ".join(f"bs={b} items/s" for b in sizes) + " |",
             "|---|---|" + "---:|" * len(sizes)]
    for backend, device in keys:
        cells = []
        for b in sizes:
            row = result.row(backend, device, b)
            cells.append(_rate(row.items_per_s) if row is not None and row.ok else "–")
        if any(c != "–" for c in cells):
            lines.append(f"| {_named(backend)} | {device} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def not_measured_table(result: BenchResult) -> str:
    """Every row without figures, grouped by device and reason so that one cause reads once."""
    groups: dict[tuple[str, str, str], dict[str, list[Any]]] = {}
    for r in result.rows:
        if not r.ok:
            group = groups.setdefault((r.device, r.status, r.reason), {"backends": [], "sizes": []})
            if r.backend not in group["backends"]:
                group["backends"].append(r.backend)
            if r.batch_size not in group["sizes"]:
                group["sizes"].append(r.batch_size)
    if not groups:
        return "_Every requested row was measured._"
    lines = ["| device | backends | batch sizes | status | reason |", "|---|---|---|---|---|"]
    for (device, status, reason), group in groups.items():
        lines.append(f"| {device} | {', '.join(_named(b) for b in group['backends'])} | "
                     f"{', '.join(str(b) for b in sorted(group['sizes']))} | {status} | {reason.replace('|', '/')} |")
    return "\n".join(lines)


def notes_table(result: BenchResult) -> str:
    seen = dict.fromkeys(r.backend for r in result.rows)
    lines = ["| backend | what is timed |", "|---|---|"]
    for backend in seen:
        note = next((r.note for r in result.rows if r.backend == backend and r.note), "")
        lines.append(f"| {_named(backend)} | {note} |")
    return "\n".join(lines)


def render_markdown(result: BenchResult, chart_names: list[str] | None = None, *, heading: str = "#") -> str:
    """report.md's text; `heading` lets `bnfold pipeline` nest it under its own title."""
    env = result.environment
    h2 = heading + "#"
    parts = [
        f"{heading} Benchmark: {_title(env)}",
        "Figures are per call (one batch). Ratios compare rows measured interleaved in the same "
        "process; absolute CPU figures from a shared machine are noisy, the ratios less so.",
        *([f"**Warning: {env['warning']}.**"] if env.get("warning") else []),
        f"{h2} Environment", environment_table(env),
        f"{h2} Latency at batch size 1", latency_table(result, 1),
        f"{h2} Speed-ups at batch size 1", speedup_table(result),
        f"{h2} Throughput against batch size", throughput_table(result),
        f"{h2} Skipped and failed rows", not_measured_table(result),
        f"{h2} What each backend times", notes_table(result),
    ]
    if chart_names:
        parts.append(f"{h2} Charts")
        parts += [f"![{Path(name).stem}]({name})" for name in chart_names]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Charts


def _threads(env: dict[str, Any]) -> str:
    n = env.get("threads")
    return f"{n} thread" if n == 1 else f"{n} threads"


def _versus(p50: float, baseline: float | None) -> str:
    """A row's p50 against the baseline's, in words a reader does not have to invert."""
    if baseline is None:
        return ""
    ratio = baseline / p50
    if abs(ratio - 1) < 0.005:
        return "same as eager"
    return f"{ratio:.2f}x faster than eager" if ratio > 1 else f"{1 / ratio:.2f}x slower than eager"


def plot_latency(result: BenchResult, path: Path) -> Path:
    """latency.png: `latency_figure`, saved."""
    plt = pyplot()
    fig = latency_figure(result)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def latency_figure(result: BenchResult) -> Any:
    """Horizontal bars of batch-1 p50 per backend and device on a linear axis from 0, whiskers to p90.

    Each bar has its p50 written beside it and its ratio to eager on the same device, so that the
    reader gets the figures without reading them off an axis (a logarithmic axis made bar lengths
    lie about ratios). The 8-connection HTTP row is drawn too: its p50 is the latency under that
    load, and its requests per second are written beside it.
    """
    plt = pyplot()
    rows = [r for r in result.rows if r.batch_size == 1 and r.ok and r.p50_ms]
    backends = list(dict.fromkeys(r.backend for r in rows))
    devices = list(dict.fromkeys(r.device for r in rows)) or ["cpu"]
    height = 0.8 / len(devices)
    fig, ax = plt.subplots(figsize=(9, 0.55 * max(len(backends), 2) * max(len(devices), 1) + 1.6))
    right = max([max(r.p90_ms or 0.0, r.p50_ms) for r in rows], default=1.0)  # type: ignore[type-var]
    for i, device in enumerate(devices):
        eager = next((r.p50_ms for r in rows if r.backend == "eager" and r.device == device), None)
        ys, p50s, whiskers, texts = [], [], [], []
        for j, backend in enumerate(backends):
            row = next((r for r in rows if r.backend == backend and r.device == device), None)
            if row is None:
                continue
            ys.append(j + (i - (len(devices) - 1) / 2) * height)
            p50s.append(row.p50_ms)
            whiskers.append(max((row.p90_ms or row.p50_ms) - row.p50_ms, 0.0))  # type: ignore[operator]
            words = [f"{_ms(row.p50_ms)} ms"]
            if backend == "http-8conn":
                words.append(f"p50 under load, {_rate(row.items_per_s)} requests/s")
            elif backend != "eager":
                words.append(_versus(row.p50_ms, eager))  # type: ignore[arg-type]
            if row.warning:
                words.append("noisy, see report.md")
            texts.append(", ".join(w for w in words if w))
        if ys:
            ax.barh(ys, p50s, height=height, xerr=[[0] * len(ys), whiskers], capsize=3, label=device)
            for y, v, w, text in zip(ys, p50s, whiskers, texts):
                ax.text(v + w + right * 0.01, y, text, va="center", fontsize=8)
    ax.set_yticks(range(len(backends)), [backend_label(b) for b in backends])
    ax.invert_yaxis()
    ax.set_xlim(0, right * 1.9)   # room on the right for the written figures
    ax.set_xlabel("latency at batch size 1, ms (bar: p50, whisker: p90; linear axis from 0)")
    env = result.environment
    ax.set_title(f"{_title(env)}: {env.get('cpu')}" + (f" / {env['gpu']}" if env.get("gpu") else "")
                 + f", {_threads(env)}", fontsize=9)
    ax.legend(title="device", fontsize=8, loc="upper right")
    skipped = sorted({f"{backend_label(r.backend)} on {r.device}" for r in result.rows
                      if r.batch_size == 1 and not r.ok})
    if skipped:
        fig.text(0.01, 0.005, "not measured (reasons in report.md): " + "; ".join(skipped), fontsize=7,
                 wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.05 if skipped else 0, 1, 1))
    return fig


def plot_throughput(result: BenchResult, path: Path) -> Path:
    """Items per second against batch size, one line per in-process backend and device."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = list(dict.fromkeys((r.backend, r.device) for r in result.rows if not r.backend.startswith(("http", "grpc"))))
    for backend, device in keys:
        points = sorted((r.batch_size, r.items_per_s) for r in result.rows
                        if (r.backend, r.device) == (backend, device) and r.ok and r.items_per_s)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=f"{backend_label(backend)} ({device})")
    sizes = sorted({r.batch_size for r in result.rows})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("items / s (batch size / mean latency)")
    ax.set_title(f"{_title(result.environment)}, {_threads(result.environment)}", fontsize=9)
    if ax.lines:
        ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to report.json")


def write_report(result: BenchResult, out_dir: str | os.PathLike) -> ReportFiles:
    """Write report.json, latency.png, throughput.png and report.md into `out_dir` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    json_path.write_text(json.dumps(result.to_dict(), indent=2, default=_json_default) + "\n")
    charts = [plot_latency(result, out / LATENCY_CHART), plot_throughput(result, out / THROUGHPUT_CHART)]
    md_path = out / "report.md"
    md_path.write_text(render_markdown(result, [c.name for c in charts]))
    return ReportFiles(json_path, md_path, charts)


def summary_lines(result: BenchResult) -> list[str]:
    """A few lines for the terminal: batch-1 p50 per measured row, then the headline ratios."""
    env = result.environment
    lines = [f"model: {env['source']}, input {'x'.join(map(str, env.get('input_shape', [])))}, "
             f"{env.get('threads')} thread(s)"] if env.get("source") else []
    not_measured: dict[tuple[str, str, str], list[str]] = {}
    for row in result.rows:
        if row.batch_size != 1:
            continue
        if row.ok:
            lines.append(f"  {row.backend:<14} {row.device:<5} p50 {_ms(row.p50_ms):>8} ms  "
                         f"p90 {_ms(row.p90_ms):>8} ms  n={row.iterations}"
                         + (f"  warning: {row.warning}" if row.warning else ""))
        else:
            not_measured.setdefault((row.device, row.status, row.reason), []).append(row.backend)
    for (device, status, reason), backends in not_measured.items():
        lines.append(f"  {status} on {device} ({', '.join(backends)}): {reason}")
    noisy = {(r.backend, r.device) for r in result.rows if r.batch_size == 1 and r.warning}
    for s in result.speedups:
        parts = [tuple(side.split("@", 1)) for side in (s.baseline, s.candidate)]
        caveat = "  (from a noisy row: not a result)" if any(p in noisy for p in parts) else ""
        lines.append(f"  {s.label}: {s.factor:.2f}x{caveat}")
    if result.environment.get("warning"):
        lines.append(f"  warning: {result.environment['warning']}")
    return lines


__all__ = ["ReportFiles", "write_report", "render_markdown", "latency_table", "speedup_table",
           "throughput_table", "environment_table", "summary_lines", "plot_latency", "latency_figure", "plot_throughput"]
