"""Peer benchmark: qserver (over gRPC and in-process) against PyTorch, Optimum ONNX Runtime
(fp32 and int8), CTranslate2 int8, llama.cpp (GGUF Q8_0 and Q4_0) and a hand-written Python ONNX
Runtime loop, on the same model files, the same queries and one thread each; then qserver under
load and with its cache.

    .venv/bin/python bench/peers.py [--queries N] [--base] [--out docs]      (make bench-peers)

Models:
  * the shipped model (--model, int8 ONNX) with its PyTorch checkpoint (--checkpoint; the fp32
    ONNX export, the CTranslate2 conversion and the GGUF files are made from it under --work), natural-length
    greedy decoding up to --max-new-tokens (64);
  * random models with the exact flan-t5-small (and, with --base, flan-t5-base) shapes, made
    under --work by qr_train.random_model + qr_train.export and kept between runs, with every
    engine forced to generate exactly --fixed-tokens (16) tokens.

Writes OUT/benchmarks.md, OUT/benchmarks.json and OUT/benchmarks.png.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "train"))

import report  # noqa: E402
from server import QServer, ServerError, install_sigterm_handler, version  # noqa: E402

ONNX_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
ENGINE_KEYS = ("ours-grpc", "ours-inproc", "ours-grpc-onnx", "ours-grpc-q4", "pytorch", "optimum-fp32", "optimum-int8", "ct2",
               "llamacpp-q8_0", "llamacpp-q4_0", "loop")
DONE = ".complete"
# qserver run again with other flags, one gRPC row each: (engine key, row name, flags, what they change).
VARIANTS = {
    "onnx": ("ours-grpc-onnx", "qserver (gRPC, ONNX Runtime decoder)", ["--decoder", "onnx"],
             "every decoder step on ONNX Runtime (decoder_model.onnx, decoder_with_past_model.onnx) instead of "
             "the native int8 decoder"),
    "q4": ("ours-grpc-q4", "qserver (gRPC, 4-bit native weights)", ["--native-weights", "q4"],
           "the native decoder's step weights in 4-bit blocks (answers differ slightly from int8, "
           "docs/performance.md)"),
}
GROUNDING_FILE = "grounding.json"  # qr_train.grounding.FILE_NAME: read by qserver, not by the peers


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------
# model preparation (cached under --work)


def _python_module(args: list[str]) -> None:
    """`python -m qr_train....` from train/, as documented for the model pipeline."""
    command = [sys.executable, "-m", *args]
    log("$ " + " ".join(command))
    env = dict(os.environ, PYTHONPATH=str(REPO / "train"))
    done = subprocess.run(command, cwd=REPO / "train", env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def _stamp(checkpoint: Path) -> str:
    """Identifies a checkpoint's weights (size and mtime of each file) to invalidate derived files."""
    h = hashlib.sha256()
    for f in sorted(checkpoint.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _cached(out: Path, stamp: str) -> bool:
    return (out / DONE).exists() and (out / DONE).read_text().strip() == stamp


def _mark(out: Path, stamp: str) -> None:
    (out / DONE).write_text(stamp + "\n")


def _ensure_made(checkpoint: Path, out: Path, what: str, make) -> Path:
    """make(checkpoint, out) once per checkpoint content; later runs reuse `out`."""
    stamp = _stamp(checkpoint)
    if not _cached(out, stamp):
        log(f"{what} of {rel(checkpoint)} -> {rel(out)}")
        make(checkpoint, out)
        _mark(out, stamp)
    return out


def ensure_fp32_export(checkpoint: Path, out: Path) -> Path:
    from qr_train.export import export_fp32

    return _ensure_made(checkpoint, out, "exporting fp32 ONNX", export_fp32)


def ensure_ct2(checkpoint: Path, out: Path) -> Path:
    from engines import convert_ctranslate2

    return _ensure_made(checkpoint, out, "converting to CTranslate2 int8_float32", convert_ctranslate2)


def ensure_gguf(checkpoint: Path, out: Path) -> Path:
    from engines import convert_gguf

    return _ensure_made(checkpoint, out, "converting to GGUF (Q8_0, Q4_0)", convert_gguf)


def add_gguf(files: dict, checkpoint: Path, out: Path) -> None:
    """files["gguf"], or the reason there is none (the llama.cpp rows then say it)."""
    try:
        files["gguf"] = ensure_gguf(checkpoint, out)
    except Exception as e:  # noqa: BLE001 -- the other engines can still be measured
        files["gguf_missing"] = f"GGUF conversion (qr_train.gguf) failed: {type(e).__name__}: {e}"
        files["gguf_failed"] = True


def ensure_random_model(shape: str, root: Path) -> dict:
    """random_model + export (int8 and fp32), once; later runs reuse the directory."""
    base = root / shape
    ckpt, int8, fp32 = base / "pytorch", base / "int8", base / "fp32"
    if not (base / DONE).exists():
        log(f"making a random {shape} model under {rel(base)} (once; kept for later runs)")
        _python_module(["qr_train.random_model", shape, str(ckpt)])
        _python_module(["qr_train.export", str(ckpt), str(int8), "--fp32-dir", str(fp32)])
        _mark(fp32, _stamp(ckpt))
        (base / DONE).write_text("ok\n")
    link_checkpoint(int8, ckpt)
    files = dict(checkpoint=ckpt, int8=int8, fp32=fp32, ct2=None, gguf=None)
    try:
        files["ct2"] = ensure_ct2(ckpt, base / "ct2")
    except Exception as e:  # noqa: BLE001 -- the other engines can still be measured
        files["ct2_missing"] = f"CTranslate2 conversion failed: {type(e).__name__}: {e}"
        files["ct2_failed"] = True
    add_gguf(files, ckpt, base / "gguf")
    return files


def link_checkpoint(model_dir: Path, checkpoint: Path) -> None:
    """model_dir/pytorch -> checkpoint: the layout of the shipped model, where qserver's native
    decoder finds its weights (pytorch/model.safetensors)."""
    link = model_dir / "pytorch"
    if not link.exists():
        link.symlink_to(os.path.relpath(checkpoint, model_dir))


def without_grounding(model_dir: Path, out: Path) -> Path:
    """A directory of symbolic links to model_dir's entries, grounding.json left out."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name != GROUNDING_FILE:
            (out / f.name).symlink_to(f.resolve())
    return out


def check_same_shapes(onnx_dir: Path, checkpoint: Path) -> str | None:
    keys = ("d_model", "d_ff", "d_kv", "num_layers", "num_decoder_layers", "num_heads", "vocab_size")
    a = json.loads((onnx_dir / "config.json").read_text())
    b = json.loads((checkpoint / "config.json").read_text())
    diff = [k for k in keys if a.get(k) != b.get(k)]
    if diff:
        return (f"{rel(checkpoint)} does not have the shapes of {rel(onnx_dir)} "
                f"({', '.join(f'{k} {b.get(k)} vs {a.get(k)}' for k in diff)})")
    if (onnx_dir / "tokenizer.json").read_bytes() != (checkpoint / "tokenizer.json").read_bytes():
        return f"{rel(checkpoint)}/tokenizer.json differs from {rel(onnx_dir)}/tokenizer.json"
    return None


def describe_model(onnx_dir: Path) -> str:
    c = json.loads((onnx_dir / "config.json").read_text())
    size = sum((onnx_dir / f).stat().st_size for f in ONNX_FILES) / 2**20
    return (f"T5, d_model {c.get('d_model')}, {c.get('num_layers')}+{c.get('num_decoder_layers')} layers, "
            f"{c.get('num_heads')} heads, d_ff {c.get('d_ff')}, vocab {c.get('vocab_size')}; "
            f"int8 ONNX files {size:.1f} MiB")


# ------------------------------------------------------------------------------------------
# measurements


def load_queries(path: Path, n: int) -> list[str]:
    queries = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                queries.append(json.loads(line)["query"])
            if len(queries) == n:
                break
    if len(queries) < n:
        log(f"{rel(path)} has only {len(queries)} queries; using them all")
    return queries


def write_queries(queries: list[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"query": q}) + "\n" for q in queries))
    return path


class Section:
    """One model's table: engines measured on the same files, queries and decoding length."""

    def __init__(self, key: str, title: str, short_title: str, description: str, fixed: bool, max_new_tokens: int):
        self.data = dict(key=key, title=title, short_title=short_title, description=description,
                         fixed_tokens=max_new_tokens if fixed else None, max_new_tokens=max_new_tokens,
                         engines=[], notes=[])
        self.fixed = fixed
        self.max_new_tokens = max_new_tokens
        #: (queries, qserver's subqueries for each) when answers are compared (natural length only).
        self.reference: tuple[list[str], list[list[str]]] | None = None

    def add(self, key: str, name: str, detail: str = "", stats: dict | None = None, error: str | None = None,
            raw: dict | None = None, skipped: str | None = None) -> None:
        """One row: stats, or the error that stopped it, or why it was not measured (skipped)."""
        self.data["engines"].append(dict(key=key, name=name, detail=detail, stats=stats, error=error, raw=raw,
                                         skipped=skipped))


def check_fixed(section: Section, name: str, stats: dict) -> None:
    want = section.max_new_tokens * stats["count"]
    if section.fixed and stats["tokens_total"] != want:
        raise AssertionError(f"{name} generated {stats['tokens_total']} tokens over {stats['count']} queries, "
                             f"not {want} ({section.max_new_tokens} each)")


def measure_ours(section: Section, args, model_dir: Path, queries: list[str], query_file: Path, work: Path,
                 wanted: set[str], constrained: bool = False, variant: str | None = None) -> None:
    """qserver (1 worker, 1 thread, no cache) on model_dir: over gRPC and through the Benchmark RPC.

    constrained=True is the model directory as shipped, grounding.json included: one extra gRPC row.
    variant (a key of VARIANTS) runs the same server with that variant's flags: one gRPC row.
    """
    flags = ["--max-new-tokens", str(section.max_new_tokens), "--warmup", str(args.warmup)]
    if section.fixed:
        flags.append("--ignore-eos")
    server_args = ["--workers", "1", "--intra-op-threads", str(args.threads), "--cache-capacity", "0"]
    detail_cmd = (f"`qserver --workers 1 --intra-op-threads {args.threads} --cache-capacity 0 "
                  f"--model {rel(model_dir)}`")
    if variant:
        key, name, variant_args, what = VARIANTS[variant]
        server_args += variant_args
        runs = [(key, name, ["--concurrency", "1"],
                 f"{detail_cmd} `{' '.join(variant_args)}`: {what}; `qclient bench --concurrency 1 {' '.join(flags)}`")]
        runs = [r for r in runs if r[0] in wanted]
    elif constrained:
        runs = [("ours-grpc-constraint", "qserver (gRPC, shipped dir with grounding.json)", ["--concurrency", "1"],
                 f"{detail_cmd}: the model directory as shipped, so qserver applies grounded decoding and "
                 f"the output guards of its grounding.json (the peers decode plain greedy); "
                 f"`qclient bench --concurrency 1 {' '.join(flags)}`")]
        if "ours-grpc" not in wanted:
            return
    else:
        runs = [("ours-grpc", "qserver (gRPC, end to end)", ["--concurrency", "1"],
                 f"{detail_cmd}, driven by `qclient bench --concurrency 1 {' '.join(flags)}` over loopback gRPC"),
                ("ours-inproc", "qserver (in-process, Benchmark RPC)", ["--server-side"],
                 f"the same server, `qclient bench --server-side {' '.join(flags)}`: timed inside the server, "
                 "no network")]
        runs = [r for r in runs if r[0] in wanted]
    if not runs:
        return
    tag = section.data["key"] + ("-constraint" if constrained else "") + (f"-{variant}" if variant else "")
    try:
        with QServer(args.qserver, args.qclient, model_dir, server_args,
                     work / "logs" / f"qserver-{tag}.log", args.health_timeout) as server:
            log(f"{tag}: qserver up at {server.addr}")
            if not section.fixed and not constrained and args.compare_answers:
                try:  # the reference answers the other engines' outputs are compared with
                    section.reference = (queries[: args.compare_answers], server.reformulate(
                        queries[: args.compare_answers], "--max-new-tokens", str(section.max_new_tokens)))
                except ServerError as e:
                    log(f"could not get qserver's answers: {e}")
            for key, name, extra, detail in runs:
                log(f"{section.data['key']}: {name}")
                try:
                    raw = server.bench(query_file, *extra, *flags)
                    if raw.get("errors"):
                        raise ServerError(f"{raw['errors']} failed requests: {raw.get('errors_by_code')}")
                    stats = report.summarize_qclient(raw)
                    check_fixed(section, name, stats)
                    section.add(key, name, detail, stats=stats, raw=raw)
                except Exception as e:  # noqa: BLE001 -- one engine failing must not stop the rest
                    log(f"FAILED {name}: {e}")
                    section.add(key, name, detail, error=f"{type(e).__name__}: {e}")
    except ServerError as e:
        log(f"FAILED to start qserver: {e}")
        for key, name, _, detail in runs:
            section.add(key, name, detail, error=f"ServerError: {e}")


def measure_python(section: Section, key: str, name: str, factory, queries: list[str], warmup: int) -> None:
    """Load the engine, warm it up on the first queries, measure every query once, unload it."""
    import engines

    log(f"{section.data['key']}: {name}")
    engine = None
    try:
        engine = factory()
        engine.run(queries[:warmup])
        samples = engine.run(queries)
        stats = report.summarize(samples)
        check_fixed(section, engine.name, stats)
        raw = dict(first_query_answer=engine.answer(queries[0])[0])
        if section.reference:
            # Same model files, same greedy search: does it give qserver's answers?
            from qr_train.subqueries import split

            ref_queries, ref_answers = section.reference
            same = sum(split(engine.answer(q)[0], q) == a for q, a in zip(ref_queries, ref_answers))
            raw["same_answers_as_qserver"] = f"{same}/{len(ref_queries)}"
        section.add(key, engine.name, engine.detail, stats=stats, raw=raw)
    except Exception as e:  # noqa: BLE001
        log(f"FAILED {name}: {e}")
        detail = getattr(engine, "detail", "")
        section.add(key, getattr(engine, "name", name), detail, error=f"{type(e).__name__}: {e}")
        if not isinstance(e, (engines.EngineError, AssertionError)):
            traceback.print_exc()
    finally:
        if engine is not None:
            engine.close()
        del engine


def measure_section(section: Section, args, files: dict, queries: list[str], query_file: Path, work: Path,
                    wanted: set[str]) -> dict:
    import engines

    n, fixed, t = section.max_new_tokens, section.fixed, args.threads
    # qserver reads grounding.json when the model directory has one; the peers cannot. For equal work
    # it runs on a copy without it (files["server"]), and once more on the directory as shipped.
    measure_ours(section, args, files.get("server", files["int8"]), queries, query_file, work, wanted)
    if files.get("server"):
        measure_ours(section, args, files["int8"], queries, query_file, work, wanted, constrained=True)
    for variant in VARIANTS:
        measure_ours(section, args, files.get("server", files["int8"]), queries, query_file, work, wanted,
                     variant=variant)
    peers = [
        ("pytorch", "PyTorch generate (fp32)", "checkpoint",
         lambda: engines.PyTorchEngine(files["checkpoint"], n, fixed, t)),
        ("optimum-fp32", "Optimum ORT (fp32)", "fp32",
         lambda: engines.OptimumEngine(files["fp32"], "fp32", n, fixed, t)),
        ("optimum-int8", "Optimum ORT (int8)", "int8",
         lambda: engines.OptimumEngine(files["int8"], "int8", n, fixed, t)),
        ("ct2", "CTranslate2 (int8_float32)", "ct2",
         lambda: engines.CTranslate2Engine(files["ct2"], files["int8"] / "tokenizer.json", n, fixed, t)),
        ("llamacpp-q8_0", "llama.cpp (Q8_0)", "gguf",
         lambda: engines.LlamaCppEngine(files["gguf"] / "model-q8_0.gguf", "Q8_0", n, fixed, t)),
        ("llamacpp-q4_0", "llama.cpp (Q4_0)", "gguf",
         lambda: engines.LlamaCppEngine(files["gguf"] / "model-q4_0.gguf", "Q4_0", n, fixed, t)),
        ("loop", "Python ORT loop (int8)", "int8",
         lambda: engines.OnnxLoopEngine(files["int8"], n, fixed, t)),
    ]
    for key, name, needs, factory in peers:
        if key not in wanted:
            continue
        if files.get(needs) is None:
            reason = files.get(f"{needs}_missing", f"no {needs} files")
            if files.get(f"{needs}_failed"):
                section.add(key, name, error=reason)
            else:
                section.add(key, name, skipped=reason)
            continue
        measure_python(section, key, name, factory, queries, args.warmup)
    report.add_ratios(section.data["engines"], "ours-grpc")
    agreement = [f"{e['name']} {e['raw']['same_answers_as_qserver']}" for e in section.data["engines"]
                 if (e.get("raw") or {}).get("same_answers_as_qserver")]
    if agreement:
        section.data["notes"].append(
            f"Same subqueries as qserver on the first {len(section.reference[0])} queries (a check that every "
            f"engine runs the same model; int8 and fp32 may differ slightly): {', '.join(agreement)}.")
    return section.data


def load_row(engine: str, concurrency: int, raw: dict) -> dict:
    """One row of the load table from `qclient bench --json`."""
    lat = raw["latency_ms"]
    return dict(engine=engine, concurrency=concurrency, requests=raw["requests"], errors=raw["errors"],
                throughput_rps=raw["throughput_rps"], p50_ms=lat["median_ms"], p99_ms=lat["p99_ms"],
                mean_ms=lat["mean_ms"], mean_tokens=raw["server"]["mean_generated_tokens"], raw=raw)


def measure_load(args, model_dir: Path, query_file: Path, repeat_file: Path, work: Path, levels: list[int],
                 queries: list[str], ct2_dir: Path | None) -> tuple[dict, dict]:
    """qclient bench at several concurrencies (server defaults, cache off); at the highest, the server without
    continuous batching and CTranslate2's own batching beside it; then the cache hit."""
    flags = ["--max-new-tokens", str(args.max_new_tokens)]
    conc = dict(description="", rows=[], error=None)
    conc["description"] = (
        f"`qserver --cache-capacity 0 --model {rel(model_dir)}` with its default worker count "
        "({workers}, one per available core, 1 intra-op thread each) and its default continuous batching for "
        "this CPU ({batching}); `qclient bench --concurrency C "
        f"--requests {args.load_requests} --warmup C {' '.join(flags)}` over one HTTP/2 connection, "
        f"cycling through the same {args.queries} queries, natural-length greedy decoding. At the highest "
        "concurrency, the same server with `--max-batch-requests 1` (no continuous batching), and CTranslate2's own "
        "batching on the same queries and CPU budget: `translate_batch` of the same number of requests, "
        "`max_batch_size` 8, `inter_threads` 2 x `intra_threads` 1, in-process (no RPC), plain greedy (qserver's "
        "rows are grounded, as shipped).")
    cache = dict(error=None)
    try:
        with QServer(args.qserver, args.qclient, model_dir, ["--cache-capacity", "0"],
                     work / "logs" / "qserver-load.log", args.health_timeout) as server:
            conc["workers"] = server.log_field("workers") or str(args.workers_default)
            conc["description"] = conc["description"].replace("{workers}", conc["workers"])
            # The batch size follows the native kernel (qserver's Kernel::batch_requests), so say which ran.
            batch = server.log_field("max_batch_requests") or "?"
            kernel = (server.log_field("kernel") or "?").strip('"')
            conc["batching"] = f"`--max-batch-requests {batch}` with the {kernel} kernel"
            conc["description"] = conc["description"].replace("{batching}", conc["batching"])
            for c in levels:
                log(f"load: concurrency {c}")
                raw = server.bench(query_file, "--concurrency", str(c), "--requests", str(args.load_requests),
                                   "--warmup", str(c), *flags)
                lat = raw["latency_ms"]
                conc["rows"].append(load_row("qserver", c, raw))
            top = max(levels, default=0)
            log("cache: the repeated query computed every time (cache off)")
            # Also the tail at fixed work: one query, so answer length cannot spread the percentiles.
            miss = server.bench(repeat_file, "--concurrency", "1", "--requests", str(args.cache_requests),
                                "--warmup", "5", *flags)
            cache.update(miss_median_ms=miss["latency_ms"]["median_ms"], miss_p99_ms=miss["latency_ms"]["p99_ms"],
                         miss_requests=miss["requests"], miss_errors=miss["errors"],
                         miss_tokens=miss["server"]["mean_generated_tokens"])
        if top:
            log(f"load: concurrency {top} without continuous batching")
            with QServer(args.qserver, args.qclient, model_dir, ["--cache-capacity", "0", "--max-batch-requests", "1"],
                         work / "logs" / "qserver-load-unbatched.log", args.health_timeout) as server:
                raw = server.bench(query_file, "--concurrency", str(top), "--requests", str(args.load_requests),
                                   "--warmup", str(top), *flags)
                conc["rows"].append(load_row("qserver --max-batch-requests 1", top, raw))
    except Exception as e:  # noqa: BLE001
        log(f"FAILED load measurement: {e}")
        conc["error"] = f"{type(e).__name__}: {e}"
        cache["error"] = "not measured: " + conc["error"]
        return conc, cache
    if top and ct2_dir is not None:
        log("load: CTranslate2 translate_batch, max_batch_size 8, 2 x 1 threads")
        try:
            import engines

            conc["rows"].append(engines.ctranslate2_batched(ct2_dir, model_dir / "tokenizer.json", queries,
                                                            args.load_requests, args.max_new_tokens))
        except Exception as e:  # noqa: BLE001
            log(f"FAILED CTranslate2 batched load: {e}")
            conc["error"] = f"CTranslate2 batched: {type(e).__name__}: {e}"
    try:
        with QServer(args.qserver, args.qclient, model_dir, [],
                     work / "logs" / "qserver-cache.log", args.health_timeout) as server:
            log("cache: the repeated query answered from the cache")
            raw = server.bench(repeat_file, "--concurrency", "1", "--requests", str(args.cache_requests),
                               "--warmup", "1", *flags)
            if raw["server"]["cached"] != raw["ok"]:
                raise AssertionError(f"only {raw['server']['cached']} of {raw['ok']} answers came from the cache")
            cache.update(requests=raw["requests"], cached=raw["server"]["cached"],
                         median_ms=raw["latency_ms"]["median_ms"], p99_ms=raw["latency_ms"]["p99_ms"],
                         mean_ms=raw["latency_ms"]["mean_ms"], raw=raw)
    except Exception as e:  # noqa: BLE001
        log(f"FAILED cache measurement: {e}")
        cache["error"] = f"{type(e).__name__}: {e}"
    return conc, cache


# ------------------------------------------------------------------------------------------
# environment


def machine() -> dict:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), memory_gib=mem,
                os=f"{platform.system()} {platform.release()}", load_before=_load())


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _busy(load: str) -> bool:
    try:
        return float(load.split()[0]) > 0.5
    except (ValueError, IndexError):
        return False


def versions(qserver: Path) -> dict:
    out = {"python": platform.python_version(), "qserver": version(qserver).replace("qserver ", "")}
    for pkg in ("onnxruntime", "torch", "transformers", "optimum", "optimum-onnx", "ctranslate2", "llama-cpp-python",
                "gguf", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True)
        return rev.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=60,
                   help="measured queries per engine: the first N of --query-file (default 60)")
    p.add_argument("--warmup", type=int, default=5, help="untimed queries before each engine's measurement")
    p.add_argument("--query-file", type=Path, default=REPO / "datasets" / "dev.jsonl")
    p.add_argument("--model", type=Path, default=REPO / "models" / "qreformulate-t5",
                   help="the shipped int8 ONNX model directory")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="its PyTorch checkpoint (default: MODEL/pytorch)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="natural-length limit for the shipped model")
    p.add_argument("--fixed-tokens", type=int, default=16, help="forced length for the random models")
    p.add_argument("--shapes", default="flan-t5-small",
                   help="comma-separated random model shapes to compare at fixed length ('' for none)")
    p.add_argument("--base", action="store_true", help="also flan-t5-base (PyTorch on it is ~1 s per query)")
    p.add_argument("--engines", default=",".join(ENGINE_KEYS), help=f"subset of {','.join(ENGINE_KEYS)}")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for every engine (qserver --intra-op-threads, torch, ONNX Runtime, CTranslate2); "
                        "above 1 the report goes to benchmarks-N-threads.*; the load and cache sections always "
                        "use the server's defaults (one worker per core, 1 thread each)")
    p.add_argument("--concurrency", default="1,2,4,8", help="levels for the load table ('' to skip it)")
    p.add_argument("--load-requests", type=int, default=None,
                   help="measured requests per concurrency level (default: 2 x --queries)")
    p.add_argument("--cache-requests", type=int, default=200)
    p.add_argument("--compare-answers", type=int, default=10,
                   help="on the shipped model, compare each engine's answers with qserver's on this many queries")
    p.add_argument("--no-cache", action="store_true", help="skip the cache-hit measurement")
    p.add_argument("--qserver", type=Path, default=REPO / "target" / "release" / "qserver")
    p.add_argument("--qclient", type=Path, default=REPO / "target" / "release" / "qclient")
    p.add_argument("--work", type=Path, default=REPO / "target" / "bench",
                   help="derived models, logs and query files (kept between runs)")
    p.add_argument("--out", type=Path, default=REPO / "docs", help="where benchmarks.{md,json,png} go")
    p.add_argument("--health-timeout", type=float, default=180.0, help="seconds to wait for qserver SERVING")
    args = p.parse_args(argv)
    args.checkpoint = args.checkpoint or args.model / "pytorch"
    args.load_requests = args.load_requests or 2 * args.queries
    bad = set(args.engines.split(",")) - set(ENGINE_KEYS)
    if bad:
        p.error(f"unknown engines {sorted(bad)}; choose from {','.join(ENGINE_KEYS)}")
    if args.warmup >= args.queries:
        p.error("--warmup must be below --queries")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    install_sigterm_handler()
    started = time.monotonic()
    wanted = set(args.engines.split(","))
    shapes = [s for s in args.shapes.split(",") if s]
    if args.base and "flan-t5-base" not in shapes:
        shapes.append("flan-t5-base")
    levels = [int(c) for c in args.concurrency.split(",") if c]
    if wanted & {"ours-grpc", "ours-inproc"} or levels or not args.no_cache:
        for binary in (args.qserver, args.qclient):
            if not binary.exists():
                log(f"{binary} is missing: run `cargo build --release -p qserver -p qclient` "
                    "(make bench-peers does)")
                return 2
    work = args.work.resolve()
    missing = [f for f in (*ONNX_FILES, "config.json", "tokenizer.json") if not (args.model / f).exists()]
    if missing:
        log(f"{args.model} is not a model directory (no {', '.join(missing)}); pass --model DIR")
        return 2
    args.workers_default = os.cpu_count()

    import torch

    torch.set_num_threads(args.threads)
    results = dict(
        generated_at=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/peers.py", *(argv or sys.argv[1:])]),
        machine=machine(), versions=versions(args.qserver), commit=git_commit(),
        settings=dict(queries=args.queries, warmup=args.warmup, query_file=rel(args.query_file), threads=args.threads,
                      max_new_tokens=args.max_new_tokens, fixed_tokens=args.fixed_tokens),
        models=[], concurrency=None, cache_hit=None, failures=[])
    # Other work on the cores (a load average well above zero before we start) makes numbers noisy: say so.
    results["machine"]["shared"] = _busy(results["machine"]["load_before"])

    queries = load_queries(args.query_file, args.queries)
    args.queries = len(queries)
    results["settings"]["queries"] = len(queries)
    query_file = write_queries(queries, work / f"queries-{len(queries)}.jsonl")
    repeat_file = write_queries([queries[0]], work / "query-repeat.jsonl")

    # 1. Every model file first, so no export runs between measurements.
    plans = []
    shipped = dict(int8=args.model.resolve(), checkpoint=None, fp32=None, ct2=None, gguf=None)
    notes = []
    if args.checkpoint.exists() and (args.checkpoint / "config.json").exists():
        mismatch = check_same_shapes(args.model, args.checkpoint)
        if mismatch:
            notes.append(mismatch)
        shipped["checkpoint"] = args.checkpoint.resolve()
        stamp_dir = work / ("shipped-" + hashlib.sha256(str(args.checkpoint.resolve()).encode()).hexdigest()[:8])
        try:
            shipped["fp32"] = ensure_fp32_export(shipped["checkpoint"], stamp_dir / "fp32")
        except Exception as e:  # noqa: BLE001
            shipped["fp32_missing"], shipped["fp32_failed"] = f"fp32 export failed: {type(e).__name__}: {e}", True
        try:
            shipped["ct2"] = ensure_ct2(shipped["checkpoint"], stamp_dir / "ct2")
        except Exception as e:  # noqa: BLE001
            shipped["ct2_missing"] = f"CTranslate2 conversion failed: {type(e).__name__}: {e}"
            shipped["ct2_failed"] = True
        add_gguf(shipped, shipped["checkpoint"], stamp_dir / "gguf")
    else:
        missing = f"no PyTorch checkpoint at {rel(args.checkpoint)}"
        for k in ("checkpoint", "fp32", "ct2", "gguf"):
            shipped[f"{k}_missing"] = missing
        notes.append(missing + ": PyTorch, Optimum fp32, CTranslate2 and llama.cpp were not measured on this model "
                     "(pass --checkpoint DIR).")
    shipped_dir_key = hashlib.sha256(str(args.model.resolve()).encode()).hexdigest()[:8]
    if (args.model / GROUNDING_FILE).exists():
        shipped["server"] = without_grounding(args.model.resolve(), work / f"plain-{shipped_dir_key}" / args.model.name)
        notes.append(f"`{rel(args.model)}` ships a {GROUNDING_FILE} (grounded decoding and output guards), which qserver "
                     "applies and the peers cannot. The rows *qserver (gRPC, end to end)* and *qserver (in-process)* run "
                     f"on a copy of the directory without it (`{rel(shipped['server'])}`, plain greedy like every "
                     "peer); the row *qserver (gRPC, shipped dir with grounding.json)* is the directory as shipped.")
    title = f"Shipped model `{rel(args.model)}`"
    section = Section("shipped", title, f"shipped model ({rel(args.model)}), natural length",
                      f"{describe_model(args.model)}. Natural-length greedy decoding, at most "
                      f"{args.max_new_tokens} new tokens: engines may stop at different lengths, compare tokens/s "
                      "as well as latency."
                      + (f" The fp32 ONNX export, the CTranslate2 model and the GGUF files are made from the PyTorch checkpoint "
                         f"`{rel(args.checkpoint)}` (loaded as fp32)." if shipped["checkpoint"] else ""),
                      fixed=False, max_new_tokens=args.max_new_tokens)
    section.data["notes"] += notes
    plans.append((section, shipped))
    for shape in shapes:
        files = ensure_random_model(shape, work)
        plans.append((Section(
            shape, f"{shape} shape, random weights, exactly {args.fixed_tokens} new tokens",
            f"{shape} (random), {args.fixed_tokens} tokens",
            f"{describe_model(files['int8'])}. Random weights made by `qr_train.random_model {shape}` and exported "
            f"by `qr_train.export` (the shipped model's pipeline), kept in `{rel(work / shape)}`. Every engine "
            f"generates exactly {args.fixed_tokens} tokens per query (ignore_eos for qserver, llama.cpp and the Python loop, "
            f"min_new_tokens = max_new_tokens for PyTorch and Optimum, min/max_decoding_length for "
            "CTranslate2; checked for every query), so all do identical work.",
            fixed=True, max_new_tokens=args.fixed_tokens), files))
    log(f"models ready after {time.monotonic() - started:.0f} s")

    # 2. The per-model tables.
    for section, files in plans:
        results["models"].append(measure_section(section, args, files, queries, query_file, work, wanted))

    # 3. Load and cache on the shipped model.
    if levels or not args.no_cache:
        conc, cache = measure_load(args, args.model.resolve(), query_file, repeat_file, work, levels, queries,
                                   shipped.get("ct2"))
        results["concurrency"] = conc if levels else None
        results["cache_hit"] = None if args.no_cache else cache

    for model in results["models"]:
        for e in model["engines"]:
            if e.get("error"):
                results["failures"].append(dict(model=model["key"], engine=e["name"], error=e["error"]))
    for part in ("concurrency", "cache_hit"):
        if results.get(part) and results[part].get("error"):
            results["failures"].append(dict(model="shipped", engine=part, error=results[part]["error"]))
    results["machine"]["load_after"] = _load()
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    written = report.write_all(results, args.out)
    log(f"done in {results['wall_seconds']:.0f} s: " + ", ".join(rel(p) for p in written))
    print(report.render_markdown(results))
    if results["failures"]:
        log(f"{len(results['failures'])} measurement(s) failed; see the report")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
