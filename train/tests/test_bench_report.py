"""The peer benchmark's statistics and report formatting, on made-up numbers (no engine runs)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import report  # noqa: E402


def test_summarize_nearest_rank_and_tokens_per_second():
    samples = [(float(ms), 16) for ms in range(1, 101)]  # 1..100 ms, 16 tokens each
    s = report.summarize(samples)
    assert s["count"] == 100
    assert s["median_ms"] == 50 and s["p90_ms"] == 90 and s["p99_ms"] == 99
    assert s["mean_ms"] == pytest.approx(50.5)
    assert s["min_tokens"] == s["max_tokens"] == 16
    # 1600 tokens over 5050 ms of generation.
    assert s["tokens_per_s"] == pytest.approx(1600 / 5.05)


def test_qclient_reports_and_ratios():
    client = {"mode": "client", "latency_ms": {"count": 10, "mean_ms": 20.0, "median_ms": 19.0, "p90_ms": 25.0,
                                               "p99_ms": 30.0, "min_ms": 15.0, "max_ms": 30.0},
              "server": {"generated_tokens": 160}}
    server = {"mode": "server", "generated_tokens": 160,
              "latency_ms": {"count": 10, "mean_ms": 18.0, "median_ms": 17.1, "p90_ms": 22.0, "p99_ms": 28.0,
                             "min_ms": 14.0, "max_ms": 28.0}}
    a, b = report.summarize_qclient(client), report.summarize_qclient(server)
    assert a["tokens_per_s"] == pytest.approx(800.0) and a["mean_tokens"] == 16
    engines = [dict(key="ours-grpc", name="ours", stats=a), dict(key="ours-inproc", name="in", stats=b),
               dict(key="pytorch", name="pt", stats=None, error="boom\nmore")]
    report.add_ratios(engines, "ours-grpc")
    assert engines[0]["ratio"] == 1.0
    assert engines[1]["ratio"] == pytest.approx(0.9)
    assert engines[2]["ratio"] is None
    table = report.engine_table(engines)
    assert "| ours | 20.0 | 19.0 | 25.0 | 30.0 | 16.0 | 800 | 1.00× |" in table
    assert "failed: boom" in table and "more" not in table


def _results(engines, threads=None):
    settings = dict(queries=3, warmup=1, query_file="q.jsonl")
    if threads is not None:
        settings["threads"] = threads
    return dict(
        generated_at="2026-01-01T00:00:00+00:00", command="bench/peers.py --queries 3", commit="abc",
        machine=dict(cpu="Test CPU", cores=2, memory_gib=8, os="Linux", load_before="0 0 0", load_after="0 0 0"),
        versions={k: "1" for k in ("qserver", "python", "onnxruntime", "torch", "transformers", "optimum",
                                   "optimum-onnx", "ctranslate2")},
        settings=settings,
        models=[dict(key="m", title="Model", short_title="m", description="desc", engines=engines, notes=["n"])],
        concurrency=None, cache_hit=None, failures=[])


def test_thread_count_names_the_report_and_the_method(tmp_path):
    engines = [dict(key="ours-grpc", name="qserver (gRPC)", detail="d", stats=report.summarize([(10.0, 5)]),
                    error=None)]
    report.add_ratios(engines, "ours-grpc")
    one = report.write_all(_results(engines, threads=1), tmp_path)
    assert [p.name for p in one] == ["benchmarks.md", "benchmarks.json", "benchmarks.png"]
    assert "One thread for every engine" in one[0].read_text()
    assert "--intra-op-threads 1 " in one[0].read_text()
    two = report.write_all(_results(engines, threads=2), tmp_path)
    assert [p.name for p in two] == ["benchmarks-2-threads.md", "benchmarks-2-threads.json",
                                     "benchmarks-2-threads.png"]
    text = two[0].read_text()
    assert "2 threads for every engine" in text and "--intra-op-threads 2 " in text
    assert "intra_threads=2" in text and "spinning off" in text
    # The one-thread report is left as it was.
    assert "One thread for every engine" in one[0].read_text()


def test_write_all(tmp_path):
    stats = report.summarize([(10.0, 5), (12.0, 7), (30.0, 6)])
    engines = [dict(key="ours-grpc", name="qserver (gRPC)", detail="d", stats=stats, error=None),
               dict(key="ct2", name="CTranslate2", detail="", stats=report.summarize([(300.0, 6)]), error=None)]
    report.add_ratios(engines, "ours-grpc")
    results = dict(
        generated_at="2026-01-01T00:00:00+00:00", command="bench/peers.py --queries 3", commit="abc",
        machine=dict(cpu="Test CPU", cores=2, memory_gib=8, os="Linux", load_before="0 0 0", load_after="0 0 0"),
        versions={k: "1" for k in ("qserver", "python", "onnxruntime", "torch", "transformers", "optimum",
                                   "optimum-onnx", "ctranslate2")},
        settings=dict(queries=3, warmup=1, query_file="q.jsonl"),
        models=[dict(key="m", title="Model", short_title="m", description="desc", engines=engines, notes=["n"])],
        concurrency=dict(description="c", error=None, rows=[dict(concurrency=1, requests=3, errors=0,
                                                                  throughput_rps=50.0, p50_ms=19.0, p99_ms=30.0,
                                                                  mean_ms=20.0, mean_tokens=6.0)]),
        cache_hit=dict(error=None, requests=5, cached=5, median_ms=0.3, p99_ms=0.5, miss_median_ms=19.0,
                       miss_p99_ms=28.5, miss_requests=5, miss_errors=0, miss_tokens=12.0),
        failures=[])
    md, js, png = report.write_all(results, tmp_path)
    text = md.read_text()
    assert "| qserver (gRPC) | 17.3 | 12.0 | 30.0 | 30.0 | 6.0 (5–7) |" in text
    assert "| CTranslate2 | 300 | 300 | 300 | 300 | 6 | 20 | 25.00× |" in text
    assert "| 1 | 3 | 50.0 | 19.0 | 30.0 | 20.0 | 6.0 | 0 |" in text
    assert "median 0.30 ms" in text
    assert "p99 28.5 ms (p99 / median 1.50), 0 errors" in text
    assert json.loads(js.read_text())["models"][0]["engines"][0]["ratio"] == 1.0
    assert png.read_bytes()[:4] == b"\x89PNG"
