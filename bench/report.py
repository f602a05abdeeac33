"""Statistics, docs/benchmarks.md, docs/benchmarks.json and docs/benchmarks.png from one results dict."""
from __future__ import annotations

import json
import math
from pathlib import Path

# ------------------------------------------------------------------------------------------
# statistics


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (the smallest value with at least q% of the samples at or below it),
    the definition an HDR histogram (qclient) uses."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(samples: list[tuple[float, int]]) -> dict:
    """Latency statistics (ms) and token counts of per-query (latency_ms, generated_tokens) samples."""
    if not samples:
        raise ValueError("no samples")
    latencies = sorted(ms for ms, _ in samples)
    tokens = [t for _, t in samples]
    total_ms = sum(latencies)
    return {
        "count": len(samples),
        "mean_ms": total_ms / len(samples),
        "median_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "min_ms": latencies[0],
        "max_ms": latencies[-1],
        "tokens_total": sum(tokens),
        "mean_tokens": sum(tokens) / len(tokens),
        "min_tokens": min(tokens),
        "max_tokens": max(tokens),
        # Generated tokens per second of generation time (one request at a time).
        "tokens_per_s": sum(tokens) / (total_ms / 1000.0) if total_ms > 0 else 0.0,
    }


def summarize_qclient(report: dict) -> dict:
    """The same statistics from a `qclient bench --json` report (client or --server-side mode)."""
    latency = report["latency_ms"]
    count = int(latency["count"])
    if report.get("mode") == "server":
        tokens_total = int(report["generated_tokens"])
    else:
        tokens_total = int(report["server"]["generated_tokens"])
    total_ms = latency["mean_ms"] * count
    return {
        "count": count,
        "mean_ms": latency["mean_ms"],
        "median_ms": latency["median_ms"],
        "p90_ms": latency["p90_ms"],
        "p99_ms": latency["p99_ms"],
        "min_ms": latency["min_ms"],
        "max_ms": latency["max_ms"],
        "tokens_total": tokens_total,
        "mean_tokens": tokens_total / count if count else 0.0,
        "min_tokens": None,  # qclient reports totals only
        "max_tokens": None,
        "tokens_per_s": tokens_total / (total_ms / 1000.0) if total_ms > 0 else 0.0,
    }


def add_ratios(engines: list[dict], reference: str) -> None:
    """ratio = engine median / the reference engine's median (ours, end to end)."""
    ref = next((e for e in engines if e["key"] == reference and e.get("stats")), None)
    for e in engines:
        stats = e.get("stats")
        e["ratio"] = (stats["median_ms"] / ref["stats"]["median_ms"]) if (ref and stats) else None


# ------------------------------------------------------------------------------------------
# markdown


def ms(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _tokens(stats: dict) -> str:
    if stats["min_tokens"] is None:
        return f"{stats['mean_tokens']:.1f}"
    if stats["min_tokens"] == stats["max_tokens"]:
        return f"{stats['min_tokens']}"
    return f"{stats['mean_tokens']:.1f} ({stats['min_tokens']}–{stats['max_tokens']})"


def engine_table(engines: list[dict]) -> str:
    rows = ["| engine | mean ms | median ms | p90 ms | p99 ms | new tokens / query | tokens/s | median vs ours e2e |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in engines:
        s = e.get("stats")
        if not s:
            if e.get("error"):
                reason = "failed: " + e["error"].splitlines()[0]
            else:
                reason = "not measured: " + (e.get("skipped") or "not run").splitlines()[0]
            rows.append(f"| {e['name']} | – | – | – | – | – | – | {_cell(reason, 90)} |")
            continue
        ratio = f"{e['ratio']:.2f}×" if e.get("ratio") is not None else "–"
        rows.append(f"| {e['name']} | {ms(s['mean_ms'])} | {ms(s['median_ms'])} | {ms(s['p90_ms'])} | "
                    f"{ms(s['p99_ms'])} | {_tokens(s)} | {s['tokens_per_s']:.0f} | {ratio} |")
    return "\n".join(rows)


def _cell(text: str, limit: int) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def concurrency_table(rows: list[dict]) -> str:
    out = ["| engine | concurrency | requests | throughput req/s | p50 ms | p99 ms | mean ms | new tokens / request "
           "| errors |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        conc = "—" if r.get("concurrency") is None else r["concurrency"]
        out.append(f"| {r.get('engine', 'qserver')} | {conc} | {r['requests']} | {r['throughput_rps']:.1f} | "
                   f"{ms(r['p50_ms'])} | {ms(r['p99_ms'])} | {ms(r['mean_ms'])} | {r['mean_tokens']:.1f} | "
                   f"{r['errors']} |")
    return "\n".join(out)


def render_markdown(results: dict) -> str:
    m, v, s = results["machine"], results["versions"], results["settings"]
    lines = [
        "# Benchmarks: qreformulate against its peers",
        "",
        "Generated by `bench/peers.py` (`make bench-peers`); every number, this file, "
        "`benchmarks.json` and `benchmarks.png` are rewritten by each run. Do not edit by hand.",
        "",
        "## Setup",
        "",
        f"- Date: {results['generated_at']}",
        f"- Machine: {m['cpu']}, {m['cores']} cores visible, {m['memory_gib']:.0f} GiB RAM, {m['os']}; "
        f"load average before the run {m['load_before']}, after {m.get('load_after', '?')}"
        + (" (other work was running on these cores while measuring: treat small differences as noise)"
           if m.get("shared") else ""),
        f"- Versions: qserver {v['qserver']}, Python {v['python']}, onnxruntime {v['onnxruntime']}, "
        f"torch {v['torch']}, transformers {v['transformers']}, optimum {v['optimum']}"
        f" (optimum-onnx {v['optimum-onnx']}), ctranslate2 {v['ctranslate2']}"
        + (f", llama-cpp-python {v['llama-cpp-python']} (gguf {v.get('gguf', '?')})" if "llama-cpp-python" in v else ""),
        f"- Commit: {results.get('commit', 'unknown')}",
        f"- Command: `{results['command']}`",
        "",
        "## Method",
        "",
        f"- The same {s['queries']} queries for every engine: the first {s['queries']} of `{s['query_file']}`, "
        f"run one at a time, each once, after {s['warmup']} untimed warm-up queries (the first ones of the same list).",
        f"- {_threads_phrase(s)} for every engine: qserver with `--workers 1 --intra-op-threads {s.get('threads', 1)} "
        f"--cache-capacity 0`, `torch.set_num_threads({s.get('threads', 1)})`, ONNX Runtime "
        f"`intra_op_num_threads={s.get('threads', 1)}`, CTranslate2 `intra_threads={s.get('threads', 1)}`, "
        f"llama.cpp `n_threads={s.get('threads', 1)}`"
        + (" (ONNX Runtime sessions with spinning off, as qserver runs them)" if s.get("threads", 1) > 1 else "")
        + ". Greedy decoding everywhere, batch size 1.",
        "- Latency is per query, text in to text out: tokenization, encoder, decoder loop, detokenization. "
        "For *qserver (gRPC)* it is measured by `qclient bench --concurrency 1` (one HTTP/2 connection on "
        "loopback), so it includes the gRPC round trip; *qserver (in-process)* is the Benchmark RPC, timed "
        "inside the server, and shows what the network adds.",
        "- Percentiles are nearest-rank (qclient uses an HDR histogram, 3 significant digits); tokens/s is "
        "generated tokens (end-of-sequence excluded) per second of generation time; the ratio is the engine's "
        "median over the median of *qserver (gRPC)* on the same model (below 1 = faster than our service).",
        "",
    ]
    for model in results["models"]:
        lines += [f"## {model['title']}", "", model["description"], ""]
        for e in model["engines"]:
            if e.get("detail"):
                lines.append(f"- *{e['name']}*: {e['detail']}")
        lines += ["", engine_table(model["engines"]), ""]
        for note in model.get("notes", []):
            lines += [f"Note: {note}", ""]
    conc = results.get("concurrency")
    if conc:
        lines += ["## Throughput under load (qserver, shipped model)", "", conc["description"], ""]
        if conc.get("rows"):
            lines += [concurrency_table(conc["rows"]), ""]
        if conc.get("error"):
            lines += [f"Failed: {_cell(conc['error'].splitlines()[0], 300)}", ""]
    cache = results.get("cache_hit")
    if cache and cache.get("miss_p99_ms"):
        ratio = cache["miss_p99_ms"] / cache["miss_median_ms"]
        lines += ["## Tail latency at fixed work (qserver, shipped model)", "",
                  f"The same query ({cache['miss_tokens']:.0f} new tokens) computed {cache['miss_requests']} times "
                  f"at concurrency 1, cache off, same server as the load table: median {ms(cache['miss_median_ms'])} ms, "
                  f"p99 {ms(cache['miss_p99_ms'])} ms (p99 / median {ratio:.2f}), {cache['miss_errors']} errors. "
                  "Over the 60 different queries of the tables above, p99 / median also reflects answers of "
                  "different lengths.", ""]
    if cache:
        lines += ["## Response cache", ""]
        if cache.get("error"):
            lines += [f"Failed: {_cell(cache['error'].splitlines()[0], 300)}", ""]
        else:
            lines += [
                f"Cache hit (same query repeated {cache['requests']} times after one miss, server with its "
                f"default cache): median {ms(cache['median_ms'])} ms end to end over gRPC "
                f"(p99 {ms(cache['p99_ms'])} ms; {cache['cached']} of {cache['requests']} answers reported as "
                f"cached), against a median of {ms(cache['miss_median_ms'])} ms for the same query computed "
                "(cache disabled).", ""]
    if results.get("failures"):
        lines += ["## Engines that failed", ""]
        for f in results["failures"]:
            lines.append(f"- {f['model']} / {f['engine']}: {_cell(f['error'].splitlines()[0], 400)}")
        lines.append("")
    lines += ["![median latency per engine](benchmarks.png)", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# chart


def render_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in results["models"] if any(e.get("stats") for e in m["engines"])]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        engines = [e for e in model["engines"] if e.get("stats")]
        names = [e["name"] for e in engines][::-1]
        medians = [e["stats"]["median_ms"] for e in engines][::-1]
        colors = ["#d62728" if e["key"].startswith("ours") else "#1f77b4" for e in engines][::-1]
        ax.barh(names, medians, color=colors)
        if max(medians) / max(min(medians), 1e-9) > 10:
            ax.set_xscale("log")
        for y, value in enumerate(medians):
            ax.text(value, y, f" {ms(value)}", va="center", fontsize=8)
        ax.set_xlabel("median latency per query, ms" + (" (log scale)" if ax.get_xscale() == "log" else ""))
        ax.set_title(model["short_title"], fontsize=10)
        if ax.get_xscale() == "log":
            ax.set_xlim(min(medians) / 2, max(medians) * 3)
        else:
            ax.set_xlim(0, max(medians) * 1.25)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"qreformulate vs peers, {_threads_phrase(results['settings']).lower()}, batch 1 ({results['machine']['cpu']}, {results['generated_at'][:10]})",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _threads_phrase(settings: dict) -> str:
    n = settings.get("threads", 1)
    return "One thread" if n == 1 else f"{n} threads"


def report_name(threads: int) -> str:
    """benchmarks.* for the standard one-thread run, benchmarks-N-threads.* otherwise."""
    return "benchmarks" if threads == 1 else f"benchmarks-{threads}-threads"


def write_all(results: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = report_name(results["settings"].get("threads", 1))
    md, js, png = out_dir / f"{name}.md", out_dir / f"{name}.json", out_dir / f"{name}.png"
    md.write_text(render_markdown(results))
    js.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    render_chart(results, png)
    return [md, js, png]
