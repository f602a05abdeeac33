"""Our own service as a benchmark subject: start `qserver` on a free port, wait for SERVING,
drive it with `qclient bench --json`, and always stop it again."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from pathlib import Path


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class QServer:
    """`with QServer(...) as server:` runs qserver for the duration of the block.

    The process is terminated (then killed) on exit from the block, whatever happened inside.
    """

    def __init__(self, binary: Path, client: Path, model_dir: Path, args: list[str], log_path: Path,
                 health_timeout_s: float = 180.0):
        self.binary = Path(binary)
        self.client = Path(client)
        self.model_dir = Path(model_dir)
        self.args = list(args)
        self.log_path = Path(log_path)
        self.health_timeout_s = health_timeout_s
        self.proc: subprocess.Popen | None = None
        self.addr = ""
        self.command: list[str] = []

    def __enter__(self) -> "QServer":
        for attempt in range(3):
            try:
                self._start()
                return self
            except ServerError:
                self.stop()
                # A port taken between free_port() and the bind is the one failure worth retrying.
                if attempt == 2 or "in use" not in _tail(self.log_path).lower():
                    raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        port = free_port()
        self.addr = f"127.0.0.1:{port}"
        self.command = [str(self.binary), "--listen", self.addr, "--model", str(self.model_dir), *self.args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        try:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + self.health_timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(f"qserver exited with status {code} before SERVING: {' '.join(self.command)}\n"
                                  f"--- {self.log_path} ---\n{_tail(self.log_path)}")
            health = subprocess.run(
                [str(self.client), "--addr", self.addr, "--connect-timeout-ms", "1000", "--timeout-ms", "2000",
                 "health"], capture_output=True, text=True)
            if health.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"qserver at {self.addr} not SERVING after {self.health_timeout_s:.0f} s "
                    f"(last health answer: {(health.stdout + health.stderr).strip()!r}): {' '.join(self.command)}\n"
                    f"--- {self.log_path} ---\n{_tail(self.log_path)}")
            time.sleep(0.3)

    def log_field(self, name: str) -> str | None:
        """A `name=value` field of the server's log (e.g. the worker count it chose)."""
        match = re.search(rf"\b{re.escape(name)}=(\S+)", self.log_path.read_text(errors="replace"))
        return match.group(1) if match else None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)

    def bench(self, query_file: Path, *flags: str, timeout_s: float = 3600) -> dict:
        """`qclient bench FILE --json FLAGS...` against this server; the parsed JSON report."""
        if self.proc is None or self.proc.poll() is not None:
            raise ServerError(f"qserver is not running (log: {self.log_path})\n{_tail(self.log_path)}")
        command = [str(self.client), "--addr", self.addr, "bench", str(query_file), "--json", *flags]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise ServerError(f"{' '.join(command)} took over {timeout_s:.0f} s") from e
        if done.returncode != 0:
            raise ServerError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}\n"
                              f"--- {self.log_path} ---\n{_tail(self.log_path, 10)}")
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError as e:
            raise ServerError(f"{' '.join(command)} printed no JSON: {done.stdout[:500]!r}") from e


    def reformulate(self, queries: list[str], *flags: str, timeout_s: float = 600) -> list[list[str]]:
        """`qclient reformulate --json FLAGS` on the queries: each one's subqueries."""
        command = [str(self.client), "--addr", self.addr, "reformulate", "--json", *flags]
        stdin = "".join(json.dumps({"query": q}) + "\n" for q in queries)
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise ServerError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        return [json.loads(line)["subqueries"] for line in done.stdout.splitlines() if line.strip()]


def install_sigterm_handler() -> None:
    """Turn SIGTERM into SystemExit so `finally`/`with` blocks stop the servers we started."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, handler)


def version(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


__all__ = ["QServer", "ServerError", "free_port", "install_sigterm_handler", "version"]
