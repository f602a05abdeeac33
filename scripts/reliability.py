#!/usr/bin/env python3
"""Reliability suite of qserver (issue 10): `make reliability`.

Runs the release qserver on 127.0.0.1 only, drives it with grpcio generic calls (raw protobuf
bytes: no generated stubs), stops every process it starts by its PID, and writes the measured
figures to docs/reliability.md. Sections: sustained load, SIGTERM under load, kill -9 and
restart, corrupt models, adversarial clients, a bounded randomised run, the bad-input catalogue.

Bounded in time: about 3 minutes plus --fuzz-secs (default 600; RELIABILITY_FUZZ_SECS).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
SERVICE = "/qreformulate.v1.Reformulator/"
REFORMULATE = SERVICE + "Reformulate"
EVALUATE = SERVICE + "Evaluate"
BENCHMARK = SERVICE + "Benchmark"
HEALTH = "/grpc.health.v1.Health/Check"
KNOWN = "Who lived longer, Nikola Tesla or Milutin Milankovic?"
C = grpc.StatusCode

# --- protobuf wire encoding (enough for the requests of reformulate.proto) -----------------


def varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def f_bytes(num: int, data: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(data)) + data


def f_str(num: int, text: str) -> bytes:
    return f_bytes(num, text.encode("utf-8", "surrogatepass"))


def f_var(num: int, n: int) -> bytes:
    return varint(num << 3) + varint(n)


def f_float(num: int, x: float) -> bytes:
    return varint(num << 3 | 5) + struct.pack("<f", x)


def options(max_new_tokens=0, num_beams=0, num_return_sequences=0, do_sample=False, temperature=0.0, seed=0,
            ignore_eos=False, truncate=False, unguarded=False) -> bytes:
    out = b""
    for num, v in ((1, max_new_tokens), (2, num_beams), (3, num_return_sequences), (4, int(do_sample)), (6, seed),
                   (7, int(ignore_eos)), (8, int(truncate)), (9, int(unguarded))):
        if v:
            out += f_var(num, v)
    if temperature != 0.0:
        out += f_float(5, temperature)
    return out


def reformulate_req(query: str, opts: bytes | None = None, skip_cache=True) -> bytes:
    out = f_str(1, query)
    if opts is not None:
        out += f_bytes(2, opts)
    if skip_cache:
        out += f_var(3, 1)
    return out


def evaluate_req(query: str, expected: list[str], kind="", opts: bytes | None = None) -> bytes:
    out = f_str(1, query) + b"".join(f_str(2, e) for e in expected)
    if kind:
        out += f_str(3, kind)
    if opts is not None:
        out += f_bytes(4, opts)
    return out


def benchmark_req(queries: list[str], repeat: int, warmup=0, opts: bytes | None = None) -> bytes:
    out = b"".join(f_str(1, q) for q in queries) + f_var(2, repeat) + f_var(3, warmup)
    if opts is not None:
        out += f_bytes(4, opts)
    return out


def parse_fields(data: bytes) -> dict[int, list]:
    """Top-level fields of a message: number -> values (bytes for length-delimited)."""
    fields: dict[int, list] = collections.defaultdict(list)
    i = 0
    while i < len(data):
        key, i = read_varint(data, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = read_varint(data, i)
        elif wt == 1:
            v, i = data[i:i + 8], i + 8
        elif wt == 5:
            v, i = data[i:i + 4], i + 4
        elif wt == 2:
            n, i = read_varint(data, i)
            v, i = data[i:i + n], i + n
        else:
            raise ValueError(f"wire type {wt}")
        fields[num].append(v)
    return fields


def read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def subqueries(reply: bytes) -> list[str]:
    return [v.decode() for v in parse_fields(reply).get(1, [])]


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


STARTED: list[subprocess.Popen] = []  # every process this run started, stopped by PID at exit


class Server:
    """qserver as a child process on 127.0.0.1:PORT, logging to a file; stopped by its PID."""

    def __init__(self, args, *flags: str, model: Path | None = None, tag="qserver"):
        self.port = free_port()
        self.log = Path(args.workdir) / f"{tag}-{self.port}.log"
        cmd = [args.qserver, "--listen", f"127.0.0.1:{self.port}", "--model", str(model or args.model), *flags]
        if args.ort_dylib:
            cmd += ["--ort-dylib", args.ort_dylib]
        env = {k: v for k, v in os.environ.items() if not k.startswith("QSERVER_")}
        self.started = time.monotonic()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        STARTED.append(self.proc)
        self.channel = grpc.insecure_channel(self.target())

    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, limit=180.0) -> float:
        """Seconds from exec to SERVING on the Reformulator's health."""
        deadline = self.started + limit
        call = unary(self.channel, HEALTH)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qserver exited {self.proc.returncode}: {self.tail()}")
            try:
                if call(f_str(1, "qreformulate.v1.Reformulator"), timeout=1) == b"\x08\x01":
                    return time.monotonic() - self.started
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"qserver never SERVING in {limit} s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:]

    def stop(self, sig=signal.SIGTERM, wait=40.0) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def unary(channel, method: str):
    return channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def call_code(fn, *a, **kw) -> tuple[grpc.StatusCode, bytes | str, float]:
    t = time.monotonic()
    try:
        reply = fn(*a, **kw)
        return C.OK, reply, time.monotonic() - t
    except grpc.RpcError as e:
        return e.code(), e.details() or "", time.monotonic() - t


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def load_queries() -> list[str]:
    path = REPO / "datasets" / "dev.jsonl"
    return [json.loads(line)["query"] for line in path.read_text().splitlines() if line.strip()]


# --- 1. sustained load -----------------------------------------------------------------------


def section_load(args, queries, report):
    server = Server(args, "--cache-capacity", "0", tag="load")
    try:
        ready = server.wait_serving()
        stop = threading.Event()
        codes = collections.Counter()
        details: dict[str, str] = {}
        lat: list[float] = []
        lock = threading.Lock()
        rss: list[tuple[float, int]] = []
        t0 = time.monotonic()

        def client(i):
            rng = random.Random(i)
            with grpc.insecure_channel(server.target()) as ch:
                call = unary(ch, REFORMULATE)
                while not stop.is_set():
                    code, detail, dt = call_code(call, reformulate_req(rng.choice(queries)), timeout=60)
                    with lock:
                        codes[code.name] += 1
                        if code == C.OK:
                            lat.append(dt)
                        else:
                            details.setdefault(code.name, str(detail)[:200])

        def sampler():
            while not stop.is_set():
                v = rss_kib(server.proc.pid)
                if v:
                    rss.append((time.monotonic() - t0, v))
                stop.wait(args.rss_every)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        threads.append(threading.Thread(target=sampler))
        rss.append((0.0, rss_kib(server.proc.pid) or 0))
        for t in threads:
            t.start()
        time.sleep(args.load_secs)
        stop.set()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        rss.append((wall, rss_kib(server.proc.pid) or 0))
        alive = server.proc.poll() is None
    finally:
        server.stop()
    unexpected = {k: v for k, v in codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
    values = [v for _, v in rss]
    report["load"] = dict(
        clients=args.clients, secs=args.load_secs, ready_secs=ready, wall=wall, codes=dict(codes), details=details,
        unexpected=unexpected, calls=sum(codes.values()), qps=codes["OK"] / wall, p50_ms=pct(lat, 0.5) * 1e3,
        p99_ms=pct(lat, 0.99) * 1e3, max_ms=max(lat, default=0) * 1e3, rss_first=values[0], rss_last=values[-1],
        rss_max=max(values), rss_samples=len(values), rss_series=rss, alive=alive,
    )
    log(f"load: {dict(codes)} p50 {report['load']['p50_ms']:.0f} ms p99 {report['load']['p99_ms']:.0f} ms "
        f"rss {values[0]}..{max(values)}..{values[-1]} KiB")


# --- 2. SIGTERM under load -------------------------------------------------------------------


def section_sigterm(args, queries, report):
    runs = []
    for run in range(args.sigterm_runs):
        server = Server(args, "--cache-capacity", "0", "--grace-period-secs", "10", tag=f"sigterm{run}")
        server.wait_serving()
        outcomes = collections.Counter()
        in_flight_outcomes = collections.Counter()
        details: dict[str, str] = {}
        lock = threading.Lock()
        stop = threading.Event()
        term_at = [None]

        def client(i):
            rng = random.Random(100 + i)
            with grpc.insecure_channel(server.target()) as ch:
                call = unary(ch, REFORMULATE)
                while not stop.is_set():
                    started = time.monotonic()
                    # Heavier calls (beams, 48 tokens) so that many are in flight and queued at SIGTERM.
                    req = reformulate_req(rng.choice(queries), options(max_new_tokens=48, num_beams=4, ignore_eos=True))
                    code, detail, _ = call_code(call, req, timeout=60)
                    with lock:
                        outcomes[code.name] += 1
                        if term_at[0] is not None and started < term_at[0]:
                            in_flight_outcomes[code.name] += 1
                        if code != C.OK:
                            details.setdefault(code.name, str(detail)[:200])
                    if term_at[0] is not None and code != C.OK:
                        return  # the server is going away: this client stops

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.sigterm_clients)]
        for t in threads:
            t.start()
        time.sleep(3)
        with lock:
            term_at[0] = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        try:
            rc = server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rc = "did not exit in 60 s"
        exit_secs = time.monotonic() - term_at[0]
        stop.set()
        for t in threads:
            t.join(timeout=90)
        server.stop()
        lost = sum(v for k, v in in_flight_outcomes.items() if k not in ("OK", "UNAVAILABLE"))
        runs.append(dict(run=run + 1, outcomes=dict(outcomes), in_flight=dict(in_flight_outcomes), lost=lost,
                         rc=rc, exit_secs=exit_secs, details=details))
        log(f"sigterm run {run + 1}: in flight {dict(in_flight_outcomes)} lost {lost} rc {rc} in {exit_secs:.1f} s")
    report["sigterm"] = runs


# --- 3. kill -9 and restart ------------------------------------------------------------------


def section_restart(args, report):
    runs = []
    server = Server(args, tag="restart0")
    first = server.wait_serving()
    for run in range(args.restart_runs):
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        killed_rc = server.proc.returncode
        server.channel.close()
        server = Server(args, tag=f"restart{run + 1}")
        secs = server.wait_serving()
        code, reply, _ = call_code(unary(server.channel, REFORMULATE), reformulate_req(KNOWN), timeout=30)
        runs.append(dict(run=run + 1, killed_rc=killed_rc, serving_secs=secs, answer=code.name,
                         subqueries=subqueries(reply) if code == C.OK else reply))
        log(f"restart run {run + 1}: SERVING after {secs:.2f} s, answer {code.name}")
    server.stop()
    report["restart"] = dict(first_start_secs=first, runs=runs)


# --- 4. corrupt models -----------------------------------------------------------------------


def nan_safetensors(path: Path) -> str:
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    packed = {"F32": struct.pack("<f", float("nan")), "F16": struct.pack("<e", float("nan")), "BF16": b"\xc0\x7f"}
    name, info = next((k, v) for k, v in sorted(header.items()) if k != "__metadata__" and v["dtype"] in packed)
    start = 8 + n + info["data_offsets"][0]
    nan = packed[info["dtype"]]
    data[start:start + len(nan)] = nan
    path.write_bytes(bytes(data))
    return name


def corrupt_cases(model: Path):
    def remove(name):
        return lambda d: (d / name).unlink()

    def truncate(name):
        def f(d):
            p = d / name
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return f

    def write(name, text):
        return lambda d: (d / name).write_text(text)

    cases = [
        ("model directory missing", lambda d: shutil.rmtree(d)),
        ("encoder_model.onnx missing", remove("encoder_model.onnx")),
        ("decoder_model.onnx missing", remove("decoder_model.onnx")),
        ("decoder_with_past_model.onnx missing", remove("decoder_with_past_model.onnx")),
        ("tokenizer.json missing", remove("tokenizer.json")),
        ("config.json missing", remove("config.json")),
        ("encoder_model.onnx truncated to half", truncate("encoder_model.onnx")),
        ("decoder_with_past_model.onnx truncated to half", truncate("decoder_with_past_model.onnx")),
        ("encoder_model.onnx is 0 bytes", write("encoder_model.onnx", "")),
        ("encoder replaced by the decoder graph",
         lambda d: shutil.copy(d / "decoder_model.onnx", d / "encoder_model.onnx")),
        ("decoder replaced by the encoder graph",
         lambda d: shutil.copy(d / "encoder_model.onnx", d / "decoder_model.onnx")),
        ("tokenizer.json not JSON", write("tokenizer.json", "{ this is not json")),
        ("tokenizer.json valid JSON, not a tokenizer", write("tokenizer.json", '{"version": "1.0"}')),
        ("config.json not JSON", write("config.json", "not json")),
        ("grounding.json not JSON", write("grounding.json", "{ broken")),
        ("grounding.json wrong shape", write("grounding.json", '{"words": 42}')),
    ]
    if (model / "pytorch" / "model.safetensors").is_file():
        cases.append(("NaN weight in pytorch/model.safetensors (--decoder auto)",
                      lambda d: nan_safetensors(d / "pytorch" / "model.safetensors")))
        cases.append(("pytorch/model.safetensors truncated", truncate("pytorch/model.safetensors")))
    # With a checkpoint, --decoder auto runs the decoder natively and never parses the ONNX decoders:
    # the same damage again with the ONNX decoder.
    onnx = [(name, damage, ("--decoder", "onnx")) for name, damage in cases if "decoder" in name.split()[0]]
    return [(name, damage, ()) for name, damage in cases] + onnx


def section_corrupt(args, report):
    results = []
    for name, damage, flags in corrupt_cases(Path(args.model)):
        d = Path(args.workdir) / "model-copy"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(args.model, d)
        damage(d)
        server = Server(args, "--workers", "1", *flags, model=d, tag="corrupt")
        try:
            rc = server.proc.wait(timeout=args.corrupt_secs)
        except subprocess.TimeoutExpired:
            rc = None
        served = False
        if rc is None:  # still running: did it come up on a damaged model?
            try:
                with grpc.insecure_channel(server.target()) as ch:  # fresh: the first one may be backing off
                    served = unary(ch, HEALTH)(f_str(1, "qreformulate.v1.Reformulator"), timeout=5) == b"\x08\x01"
            except grpc.RpcError:
                pass
            server.stop(signal.SIGKILL)
        text = server.log.read_text(errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("qserver:") or " ERROR " in line]
        first_error = (errors or [line for line in lines if " INFO " not in line] or [""])[0]
        # Without the run's temporary path and the log timestamp, for the report.
        first_error = first_error.replace(str(d), "MODEL").split("Z ", 1)[-1] if "Z ERROR" in first_error else \
            first_error.replace(str(d), "MODEL")
        results.append(dict(case=name + (f" ({' '.join(flags)})" if flags else ""), rc=rc, served=served, error=first_error[:300],
                            ok=rc == 1 and bool(first_error)))
        log(f"corrupt {name}: rc {rc} {first_error[:120]}")
    report["corrupt"] = results


# --- 5. adversarial clients ------------------------------------------------------------------


def section_adversarial(args, report):
    out = {}
    server = Server(args, "--cache-capacity", "0", tag="idle")
    try:
        server.wait_serving()
        release = threading.Event()

        def never():
            release.wait(60)
            return
            yield  # noqa: unreachable: a request stream that sends nothing until released

        idle_ch = grpc.insecure_channel(server.target())
        stream = idle_ch.stream_unary(EVALUATE, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        futures = [stream.future(never(), timeout=120) for _ in range(args.idle_streams)]
        time.sleep(2)
        codes = collections.Counter()
        lat = []
        with grpc.insecure_channel(server.target()) as ch:
            for i in range(10):
                code, _, dt = call_code(unary(ch, REFORMULATE), reformulate_req(f"{KNOWN} {i}"), timeout=10)
                codes[code.name] += 1
                lat.append(dt)
        release.set()
        stream_codes = collections.Counter()
        for f in futures:
            try:
                f.result(timeout=30)
                stream_codes["OK"] += 1
            except grpc.RpcError as e:
                stream_codes[e.code().name] += 1
            except grpc.FutureTimeoutError:
                stream_codes["no answer in 30 s"] += 1
        idle_ch.close()
        out["idle"] = dict(streams=args.idle_streams, reformulate=dict(codes), max_ms=max(lat) * 1e3,
                           stream_ends=dict(stream_codes), alive=server.proc.poll() is None)
        log(f"idle streams: reformulate {dict(codes)} max {max(lat) * 1e3:.0f} ms; streams ended {dict(stream_codes)}")
    finally:
        server.stop()

    flags = ("--workers", "1", "--cache-capacity", "0", "--max-call-secs", "5", "--max-call-tokens", "1000000000")
    server = Server(args, *flags, tag="bench")
    try:
        server.wait_serving()
        huge = benchmark_req([KNOWN], 100_000, 0, options(max_new_tokens=48, num_beams=8, ignore_eos=True))
        with grpc.insecure_channel(server.target()) as ch:
            t0 = time.monotonic()
            fut = unary(ch, BENCHMARK).future(huge, timeout=60)
            time.sleep(0.5)
            codes = collections.Counter()
            lat = []
            for i in range(5):
                code, detail, dt = call_code(unary(ch, REFORMULATE), reformulate_req(f"{KNOWN} {i}"), timeout=2)
                codes[code.name] += 1
                lat.append(dt)
            try:
                fut.result()
                bench = ("OK", "")
            except grpc.RpcError as e:
                bench = (e.code().name, e.details())
            bench_secs = time.monotonic() - t0
        out["benchmark"] = dict(flags=" ".join(flags), reformulate=dict(codes), max_ms=max(lat) * 1e3,
                                bench_code=bench[0], bench_detail=bench[1], bench_secs=bench_secs,
                                alive=server.proc.poll() is None)
        log(f"huge benchmark: reformulate {dict(codes)}; benchmark {bench[0]} after {bench_secs:.1f} s")
    finally:
        server.stop()
    report["adversarial"] = out


# --- 6. randomised run -----------------------------------------------------------------------

FUZZ_EXPECTED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE", "DEADLINE_EXCEEDED"}
ODD = ["\u200b", "\u200d", "\ufeff", "\u00ad", "\u202e", "\x00", "\x07", "\u3000", "\u00a0", "\ue000", "\U0001f600",
       "\u0301", "\ufffd", "\u2028", "\U000e0041", "\t", "\n", "\r", "é", "中", "ß", "İ", "𝒜"]


def random_text(rng: random.Random, queries: list[str]) -> str:
    kind = rng.random()
    if kind < 0.3:
        return rng.choice(queries)
    if kind < 0.45:  # a real query with odd characters spliced in
        q = list(rng.choice(queries))
        for _ in range(rng.randint(1, 8)):
            q.insert(rng.randint(0, len(q)), rng.choice(ODD))
        return "".join(q)
    if kind < 0.6:
        return "".join(rng.choice(ODD) for _ in range(rng.randint(0, 20)))
    if kind < 0.7:  # huge: over --max-query-chars, sometimes over the token limit only
        return rng.choice(["a ", "Tesla ", "\u200b", "中"]) * rng.randint(500, 5000)
    if kind < 0.85:
        return "".join(chr(rng.randint(1, 0xFFFF)) for _ in range(rng.randint(1, 200))).encode(
            "utf-8", "replace").decode("utf-8", "replace")
    return "".join(chr(rng.randint(32, 126)) for _ in range(rng.randint(0, 300)))


def random_options(rng: random.Random) -> bytes | None:
    if rng.random() < 0.3:
        return None
    pick = lambda small, big: rng.choice([0, 1, rng.randint(0, small), rng.randint(0, big)])  # noqa: E731
    return options(
        max_new_tokens=pick(32, 2**32 - 1), num_beams=pick(8, 2**32 - 1), num_return_sequences=pick(8, 2**32 - 1),
        do_sample=rng.random() < 0.3, temperature=rng.choice([0.0, 0.7, 1.5, -1.0, float("nan"), float("inf"), 1e30]),
        seed=rng.getrandbits(64), ignore_eos=rng.random() < 0.1, truncate=rng.random() < 0.5,
        unguarded=rng.random() < 0.2,
    )


def random_call(rng: random.Random, ch, queries) -> tuple[str, tuple]:
    """(method, (code, reply or message, seconds))."""
    r = rng.random()
    if r < 0.75:
        opts = random_options(rng)
        # Bound the work of one call: long generations only with small beams.
        return "Reformulate", call_code(unary(ch, REFORMULATE), reformulate_req(random_text(rng, queries), opts,
                                                                              rng.random() < 0.8), timeout=20)
    if r < 0.85:
        n = rng.randint(0, 4)
        reqs = [evaluate_req(random_text(rng, queries), [random_text(rng, queries)[:50] for _ in range(rng.randint(0, 3))],
                             rng.choice(["", "chaining", "x" * rng.randint(0, 300)]),
                             random_options(rng) if rng.random() < 0.3 else None) for _ in range(n)]
        stream = ch.stream_unary(EVALUATE, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        return "Evaluate", call_code(stream, iter(reqs), timeout=30)
    if r < 0.93:
        req = benchmark_req([random_text(rng, queries) for _ in range(rng.randint(0, 3))],
                            rng.choice([0, 1, 2, 3, 10**9]), rng.choice([0, 1, 10**9]),
                            random_options(rng) if rng.random() < 0.5 else None)
        return "Benchmark", call_code(unary(ch, BENCHMARK), req, timeout=30)
    method = rng.choice([REFORMULATE, BENCHMARK])
    garbage = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
    return "garbage bytes", call_code(unary(ch, method), garbage, timeout=10)


def section_fuzz(args, queries, report):
    server = Server(args, "--max-call-secs", "10", "--max-call-tokens", "200000", tag="fuzz")
    try:
        server.wait_serving()
        ch0 = grpc.insecure_channel(server.target())
        before = subqueries(unary(ch0, REFORMULATE)(reformulate_req(KNOWN), timeout=30))
        counts = collections.Counter()
        by_method = collections.Counter()
        unexpected = []
        lock = threading.Lock()
        deadline = time.monotonic() + args.fuzz_secs
        crashed = [None]

        def worker(i):
            rng = random.Random(args.seed * 1000 + i)
            with grpc.insecure_channel(server.target()) as ch:
                while time.monotonic() < deadline and crashed[0] is None:
                    method, (code, detail, _) = random_call(rng, ch, queries)
                    with lock:
                        counts[code.name] += 1
                        by_method[(method, code.name)] += 1
                        if code.name not in FUZZ_EXPECTED and len(unexpected) < 20:
                            unexpected.append((method, code.name, str(detail)[:120]))
                    if server.proc.poll() is not None:
                        crashed[0] = server.proc.returncode

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.fuzz_clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        alive = server.proc.poll() is None
        after = subqueries(unary(ch0, REFORMULATE)(reformulate_req(KNOWN), timeout=30)) if alive else None
        ch0.close()
    finally:
        server.stop()
    report["fuzz"] = dict(secs=args.fuzz_secs, wall=wall, clients=args.fuzz_clients, seed=args.seed,
                          counts=dict(counts), by_method={f"{m} {c}": n for (m, c), n in sorted(by_method.items())},
                          unexpected=unexpected, crashed=crashed[0], alive=alive, before=before, after=after,
                          same=before == after)
    log(f"fuzz: {dict(counts)} crashed {crashed[0]} known query same: {before == after}")


# --- 7. bad-input catalogue ------------------------------------------------------------------

IA, RE, OR, OK, UA = "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE", "OK", "UNIMPLEMENTED"
E2E_Q = "e2e.rs bad_queries_are_invalid_argument"
E2E_O = "e2e.rs out_of_range_options_are_invalid_argument"
E2E_EV = "e2e.rs evaluate_rejects_bad_examples_and_empty_streams"
E2E_B = "e2e.rs benchmark_rejects_bad_sizes"
BAD = "bad_inputs.rs bad_inputs_get_their_codes"


def catalogue():
    """(case, method, request or list of stream messages, expected code, covering integration test)."""
    R = lambda q, o=None: reformulate_req(q, o, skip_cache=False)  # noqa: E731
    ex = lambda q="Tesla Mekong length", e=("Mekong Length",), k="", o=None: evaluate_req(q, list(e), k, o)  # noqa: E731
    rows = [
        ("Reformulate: empty query", "R", R(""), IA, E2E_Q),
        ("Reformulate: spaces only", "R", R("   "), IA, E2E_Q),
        ("Reformulate: tabs and newlines only", "R", R("\t\n\r "), IA, E2E_Q),
        ("Reformulate: zero-width spaces only", "R", R("\u200b\u200b\u200b"), IA,
         "budgets.rs invisible_queries_are_refused_and_answers_hold_no_separator"),
        ("Reformulate: BOM + word joiner only", "R", R("\ufeff\u2060"), IA, BAD),
        ("Reformulate: control characters only", "R", R("\x00\x01\x07"), IA, BAD),
        ("Reformulate: Hangul fillers only", "R", R("\u3164\u115f"), IA, BAD),
        ("Reformulate: tag characters only", "R", R("\U000e0041\U000e0042"), IA, BAD),
        ("Reformulate: query of 2001 characters", "R", R("a" * 2001), IA, E2E_Q),
        ("Reformulate: 1000 two-byte characters, over the token limit", "R", R("é" * 1000), IA, BAD),
        ("Reformulate: 2000 two-byte characters (4000 bytes), truncate on", "R", R("é" * 2000, options(truncate=True)),
         OK, BAD),
        ("Reformulate: over --max-input-tokens, truncate off", "R", R("Tesla " * 300), IA, E2E_Q),
        ("Reformulate: over --max-input-tokens, truncate on", "R", R("Tesla " * 300, options(truncate=True)), OK, E2E_Q),
        ("Reformulate: max_new_tokens 257", "R", R(KNOWN, options(max_new_tokens=257)), IA, E2E_O),
        ("Reformulate: max_new_tokens 2^32-1", "R", R(KNOWN, options(max_new_tokens=2**32 - 1)), IA, BAD),
        ("Reformulate: num_beams 9", "R", R(KNOWN, options(num_beams=9)), IA, E2E_O),
        ("Reformulate: num_beams 2^32-1", "R", R(KNOWN, options(num_beams=2**32 - 1)), IA, BAD),
        ("Reformulate: greedy with num_return_sequences 2", "R", R(KNOWN, options(num_return_sequences=2)), IA, E2E_O),
        ("Reformulate: beams 2 returning 3", "R", R(KNOWN, options(num_beams=2, num_return_sequences=3)), IA, E2E_O),
        ("Reformulate: do_sample with num_beams 4", "R", R(KNOWN, options(do_sample=True, num_beams=4)), IA, E2E_O),
        ("Reformulate: temperature -1", "R", R(KNOWN, options(do_sample=True, temperature=-1.0)), IA, E2E_O),
        ("Reformulate: temperature NaN", "R", R(KNOWN, options(do_sample=True, temperature=float("nan"))), IA, BAD),
        ("Reformulate: temperature +Inf", "R", R(KNOWN, options(do_sample=True, temperature=float("inf"))), IA, BAD),
        ("Reformulate: 9 samples", "R", R(KNOWN, options(do_sample=True, num_return_sequences=9)), IA, E2E_O),
        ("Reformulate: temperature -1 without do_sample (ignored)", "R", R(KNOWN, options(temperature=-1.0)), OK, BAD),
        ("Reformulate: undecodable bytes", "R", b"\xff\xff\xff", IA,
         "budgets.rs undecodable_and_abandoned_calls_are_answered_and_counted"),
        ("Reformulate: query field with invalid UTF-8", "R", f_bytes(1, b"\xc3\x28 Tesla"), IA, BAD),
        ("Reformulate: unknown field 99 (ignored)", "R", R(KNOWN) + f_var(99, 1), OK, BAD),
        ("Reformulate: message over --max-request-bytes (5 MiB)", "R", R("a" * (5 << 20)), OR,
         "security.rs message_size_limits_hold_both_ways"),
        ("Reformulate: RTL override and emoji around a real query", "R", R("\u202e" + KNOWN + " \U0001f600"), OK, BAD),
        ("Evaluate: empty stream", "E", [], IA, E2E_EV),
        ("Evaluate: example without expected subqueries (predictions only)", "E", [ex(e=())], OK, E2E_EV),
        ("Evaluate: second example with a blank query", "E", [ex(), ex(q="   ")], IA, E2E_EV),
        ("Evaluate: example with an empty query", "E", [ex(q="")], IA, BAD),
        ("Evaluate: expected subquery blank (accepted)", "E", [ex(e=("  ",))], OK, BAD),
        ("Evaluate: label over --max-label-chars", "E", [ex(e=("x" * 4001,))], IA,
         "budgets.rs evaluate_echoes_labels_only_when_asked_and_limits_labels_and_response"),
        ("Evaluate: kind of 300 characters", "E", [ex(k="k" * 300)], OK, BAD),
        ("Evaluate: bad options in one example", "E", [ex(), ex(o=options(num_beams=9))], IA, BAD),
        ("Evaluate: undecodable message", "E", [b"\xff\xff\xff"], IA,
         "budgets.rs undecodable_and_abandoned_calls_are_answered_and_counted"),
        ("Benchmark: no queries", "B", benchmark_req([], 1), IA, E2E_B),
        ("Benchmark: repeat 0 (server default)", "B", benchmark_req([KNOWN], 0), OK, BAD),
        ("Benchmark: repeat over --max-benchmark-runs", "B", benchmark_req([KNOWN], 100_001), IA, E2E_B),
        ("Benchmark: warmup 10^9", "B", benchmark_req([KNOWN], 1, 10**9), IA, BAD),
        ("Benchmark: one blank query among good ones", "B", benchmark_req([KNOWN, " "], 1), IA, E2E_B),
        ("Benchmark: over the token budget", "B",
         benchmark_req([KNOWN], 100_000, 0, options(max_new_tokens=256, num_beams=8)), IA,
         "budgets.rs benchmark_over_the_token_budget_is_refused_up_front"),
        ("Benchmark: bad options", "B", benchmark_req([KNOWN], 1, 0, options(num_beams=9)), IA, BAD),
        ("Unknown method on the service", "X", b"", UA, BAD),
    ]
    return rows


def section_catalogue(args, report):
    server = Server(args, tag="catalogue")
    results = []
    try:
        server.wait_serving()
        ch = server.channel
        for case, method, req, expected, test in catalogue():
            if method == "R":
                code, detail, _ = call_code(unary(ch, REFORMULATE), req, timeout=60)
            elif method == "B":
                code, detail, _ = call_code(unary(ch, BENCHMARK), req, timeout=60)
            elif method == "E":
                stream = ch.stream_unary(EVALUATE, request_serializer=lambda b: b, response_deserializer=lambda b: b)
                code, detail, _ = call_code(stream, iter(req), timeout=60)
            else:
                code, detail, _ = call_code(unary(ch, SERVICE + "Nope"), req, timeout=10)
            msg = "" if code == C.OK else str(detail)
            results.append(dict(case=case, expected=expected, got=code.name, message=msg[:160], test=test,
                                ok=code.name == expected))
        alive = server.proc.poll() is None
    finally:
        server.stop()
    report["catalogue"] = dict(rows=results, alive=alive)
    log(f"catalogue: {sum(r['ok'] for r in results)}/{len(results)} as expected")


# --- report ----------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def git(*a) -> str:
    return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()


def md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def write_markdown(args, report, path: Path):
    L = []
    w = L.append
    meta = report["meta"]
    w("# Reliability\n")
    w("Measured by `make reliability` (scripts/reliability.py): the release qserver on 127.0.0.1 only, driven "
      "by grpcio generic calls; every process it starts is stopped by its PID. Rewritten on each run.\n")
    w(f"- Date: {meta['date']}")
    w(f"- Commit: `{meta['commit']}`{' (with uncommitted changes)' if meta['dirty'] else ''}")
    w(f"- CPU: {meta['cpu']}, {meta['cores']} cores visible; other processes were using the CPUs too "
      "(a parallel build/test), so latencies are upper bounds.")
    w(f"- Model: `{meta['model']}`; qserver `{meta['qserver']}`")
    w(f"- Command: `{meta['argv']}`; total wall time {meta['wall']:.0f} s\n")
    w("Verdicts: " + ", ".join(f"{k}: **{v}**" for k, v in report["verdicts"].items()) + "\n")

    if "load" in report:
        r = report["load"]
        w(f"## 1. Sustained load: {r['clients']} clients x {r['secs']} s of Reformulate\n")
        w("Mixed queries from datasets/dev.jsonl, `skip_cache` on and `--cache-capacity 0`, default flags otherwise "
          "(workers = cores, `--max-concurrent-requests 64`). One channel per client, 60 s deadline per call.\n")
        w("| calls | OK | other codes | unexpected | answered/s | p50 | p99 | max |")
        w("|---|---|---|---|---|---|---|---|")
        other = {k: v for k, v in r["codes"].items() if k != "OK"}
        w(f"| {r['calls']} | {r['codes'].get('OK', 0)} | {other or 'none'} | {sum(r['unexpected'].values())} | "
          f"{r['qps']:.1f} | {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms | {r['max_ms']:.0f} ms |\n")
        if r["details"]:
            w(f"First message per non-OK code: {r['details']}\n")
        w(f"RSS (VmRSS from /proc/PID/status every {args.rss_every:g} s, {r['rss_samples']} samples): first "
          f"{r['rss_first'] / 1024:.1f} MiB, last {r['rss_last'] / 1024:.1f} MiB, max {r['rss_max'] / 1024:.1f} MiB. "
          f"Server alive at the end: {r['alive']}.\n")
        series = r["rss_series"]
        step = max(1, len(series) // 12)
        w("RSS over time: " + ", ".join(f"{t:.0f} s {v / 1024:.1f}" for t, v in series[::step]) + " (MiB)\n")

    if "sigterm" in report:
        w(f"## 2. SIGTERM under load ({len(report['sigterm'])} runs)\n")
        w(f"{args.sigterm_clients} clients loop on Reformulate; after 3 s the server gets SIGTERM "
          "(`--grace-period-secs 10`). A call in flight at SIGTERM is lost when it ends with neither OK nor "
          "UNAVAILABLE (grpcio always yields a status; CANCELLED or any other code counts as lost). A client stops at "
          "its first non-OK answer after SIGTERM.\n")
        w("| run | calls in flight at SIGTERM: outcomes | lost | all calls | exit code | SIGTERM to exit |")
        w("|---|---|---|---|---|---|")
        for r in report["sigterm"]:
            w(f"| {r['run']} | {r['in_flight']} | {r['lost']} | {r['outcomes']} | {r['rc']} | {r['exit_secs']:.2f} s |")
        det = {k: v for r in report["sigterm"] for k, v in r["details"].items()}
        w(f"\nMessages seen: {md_escape(det)}\n")

    if "restart" in report:
        r = report["restart"]
        w("## 3. kill -9 and restart\n")
        w(f"Time from exec to SERVING (grpc.health.v1 Check of qreformulate.v1.Reformulator, polled every 50 ms). "
          f"First cold start: {r['first_start_secs']:.2f} s.\n")
        w("| run | exit of the killed server | exec to SERVING | first Reformulate after restart |")
        w("|---|---|---|---|")
        for x in r["runs"]:
            w(f"| {x['run']} | {x['killed_rc']} | {x['serving_secs']:.2f} s | {x['answer']} {md_escape(x['subqueries'])} |")
        w("")

    if "corrupt" in report:
        w("## 4. Corrupt models\n")
        w("Each case damages a fresh copy of the shipped model and starts qserver on it (`--workers 1`). Expected: "
          "exit code 1 (never a signal, never SERVING) with a clear error. With the shipped PyTorch checkpoint, "
          "`--decoder auto` runs the decoder steps natively from it, so the decoder cases are repeated with "
          "`--decoder onnx`. A server still running after the wait is killed by its PID and reported as such.\n")
        w("| case | exit code | as expected | first error line |")
        w("|---|---|---|---|")
        for r in report["corrupt"]:
            rc = r["rc"] if r["rc"] is not None else ("SERVING" if r["served"] else f"still running after {args.corrupt_secs} s")
            w(f"| {r['case']} | {rc} | {'yes' if r['ok'] else '**no**'} | `{md_escape(r['error'])}` |")
        w("")

    if "adversarial" in report:
        a = report["adversarial"]
        w("## 5. Adversarial clients\n")
        if "idle" in a:
            i = a["idle"]
            w(f"- {i['streams']} Evaluate streams that send nothing (one connection), then 10 Reformulate calls from "
              f"another connection (10 s deadline): {i['reformulate']}, slowest {i['max_ms']:.0f} ms. The idle streams "
              f"then closed without a message ended with {i['stream_ends']}. Server alive: {i['alive']}.")
        if "benchmark" in a:
            b = a["benchmark"]
            w(f"- A Benchmark of 100 000 runs (8 beams, 48 tokens, ignore_eos) with `{b['flags']}`, and 5 Reformulate "
              f"calls with a 2 s deadline meanwhile: {b['reformulate']}, slowest {b['max_ms']:.0f} ms. The Benchmark "
              f"ended with {b['bench_code']} after {b['bench_secs']:.1f} s: \"{md_escape(b['bench_detail'])}\". "
              f"Server alive: {b['alive']}.")
        w("")

    if "fuzz" in report:
        f = report["fuzz"]
        w(f"## 6. Randomised gRPC run ({f['secs']:.0f} s, {f['clients']} clients, seed {f['seed']})\n")
        w("Random valid and invalid Reformulate (75 %), Evaluate (10 %), Benchmark (8 %) calls and random garbage "
          "bytes (7 %): dataset queries, queries with zero-width/RTL/control/emoji characters spliced in, invisible-only "
          "strings, huge strings (1 000 to 25 000 characters), random code points; options with random and "
          "out-of-range values (2^32-1, NaN/Inf/negative temperatures). Server flags `--max-call-secs 10 "
          f"--max-call-tokens 200000`. Expected codes: {sorted(FUZZ_EXPECTED)}.\n")
        w(f"- Calls: {sum(f['counts'].values())} in {f['wall']:.0f} s; by code: {f['counts']}")
        w(f"- Unexpected codes: {len(f['unexpected'])} {f['unexpected'] or ''}")
        w(f"- Crashes: {0 if f['crashed'] is None else 1} (server alive at the end: {f['alive']})")
        w(f"- Known query before and after: {f['before']} / {f['after']} (same: {f['same']})\n")
        w("| method and code | calls |")
        w("|---|---|")
        for k, v in f["by_method"].items():
            w(f"| {k} | {v} |")
        w("")

    if "catalogue" in report:
        c = report["catalogue"]
        rows = c["rows"]
        w(f"## 7. Bad-input catalogue ({len(rows)} cases; {sum(r['ok'] for r in rows)} as expected)\n")
        w("Each case against one server with default flags; the last column names the integration test "
          "(server/tests/) that checks the same case in `make test`.\n")
        w("| # | case | expected | got | message | integration test |")
        w("|---|---|---|---|---|---|")
        for n, r in enumerate(rows, 1):
            got = r["got"] if r["ok"] else f"**{r['got']}**"
            w(f"| {n} | {md_escape(r['case'])} | {r['expected']} | {got} | {md_escape(r['message'])} | {r['test']} |")
        w(f"\nServer alive after the catalogue: {c['alive']}.\n")
    path.write_text("\n".join(L) + "\n")


def verdicts(report) -> dict:
    v = {}
    if "load" in report:
        v["load"] = "pass" if not report["load"]["unexpected"] and report["load"]["alive"] else "FAIL"
    if "sigterm" in report:
        v["sigterm"] = "pass" if all(r["lost"] == 0 and r["rc"] == 0 for r in report["sigterm"]) else "FAIL"
    if "restart" in report:
        v["restart"] = "pass" if all(r["answer"] == "OK" for r in report["restart"]["runs"]) else "FAIL"
    if "corrupt" in report:
        v["corrupt models"] = "pass" if all(r["ok"] for r in report["corrupt"]) else "FAIL"
    if "adversarial" in report:
        a = report["adversarial"]
        ok = all(list(x["reformulate"]) == ["OK"] and x["alive"] for x in a.values())
        v["adversarial"] = "pass" if ok else "FAIL"
    if "fuzz" in report:
        f = report["fuzz"]
        v["randomised"] = "pass" if not f["unexpected"] and f["crashed"] is None and f["same"] else "FAIL"
    if "catalogue" in report:
        c = report["catalogue"]
        v["catalogue"] = "pass" if all(r["ok"] for r in c["rows"]) and c["alive"] else "FAIL"
    return v


def find_qserver() -> str:
    candidates = [os.environ.get("QSERVER_BIN")]
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(str(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "qserver"))
    candidates.append(str(REPO / "target" / "release" / "qserver"))
    return next((c for c in candidates if c and Path(c).is_file()), "")


def find_ort() -> str:
    found = sorted((REPO / ".ort").glob("**/libonnxruntime.so*"))
    return str(found[0]) if found else ""


SECTIONS = ["load", "sigterm", "restart", "corrupt", "adversarial", "fuzz", "catalogue"]


def main() -> int:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qserver", default=env("QSERVER_BIN") or find_qserver(), help="qserver binary (QSERVER_BIN)")
    p.add_argument("--model", default=str(REPO / "models" / "qreformulate-t5"))
    p.add_argument("--ort-dylib", default=env("ORT_DYLIB_PATH") or find_ort())
    p.add_argument("--out", default=str(REPO / "docs" / "reliability.md"))
    p.add_argument("--json", default="", help="also write the raw figures as JSON here")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--load-secs", type=float, default=float(env("RELIABILITY_LOAD_SECS", "60")))
    p.add_argument("--rss-every", type=float, default=3.0)
    p.add_argument("--sigterm-runs", type=int, default=3)
    p.add_argument("--sigterm-clients", type=int, default=32)
    p.add_argument("--restart-runs", type=int, default=3)
    p.add_argument("--corrupt-secs", type=float, default=15.0, help="longest wait for a corrupt-model server to exit")
    p.add_argument("--idle-streams", type=int, default=64)
    p.add_argument("--fuzz-secs", type=float, default=float(env("RELIABILITY_FUZZ_SECS", "600")))
    p.add_argument("--fuzz-clients", type=int, default=8)
    p.add_argument("--seed", type=int, default=int(env("RELIABILITY_SEED", "10")))
    args = p.parse_args()
    if not args.qserver:
        sys.exit("qserver is not built: run `cargo build --release -p qserver` or set QSERVER_BIN")
    wanted = [s for s in args.sections.split(",") if s]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        sys.exit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    queries = load_queries()
    t0 = time.monotonic()
    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="qreliability-") as work:
        args.workdir = work
        try:
            for name in wanted:
                log(f"section {name}")
                if name == "load":
                    section_load(args, queries, report)
                elif name == "sigterm":
                    section_sigterm(args, queries, report)
                elif name == "restart":
                    section_restart(args, report)
                elif name == "corrupt":
                    section_corrupt(args, report)
                elif name == "adversarial":
                    section_adversarial(args, report)
                elif name == "fuzz":
                    section_fuzz(args, queries, report)
                elif name == "catalogue":
                    section_catalogue(args, report)
        finally:
            for proc in STARTED:  # by PID, whatever happened above
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
    report["verdicts"] = verdicts(report)
    report["meta"] = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=git("rev-parse", "HEAD"),
        dirty=bool(git("status", "--porcelain", "--untracked-files=no")), cpu=cpu_model(), cores=os.cpu_count(),
        model=os.path.relpath(args.model, REPO), qserver=args.qserver, argv=" ".join(["scripts/reliability.py", *sys.argv[1:]]),
        wall=time.monotonic() - t0,
    )
    write_markdown(args, report, Path(args.out))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    log(f"verdicts {report['verdicts']}; wrote {args.out}")
    return 0 if all(v == "pass" for v in report["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
