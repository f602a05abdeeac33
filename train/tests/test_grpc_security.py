"""A standard Python gRPC client (grpcio) against the real qserver binary with TLS, mutual TLS
and bearer tokens; also reflection v1alpha (what grpcio-reflection and older grpcurl ask).

Certificates are made at run time with the openssl command. Calls are generic (raw protobuf
bytes), so no generated stubs are needed. Needs target/release/qserver (built by `cargo test`
in `make test`; set QSERVER_BIN to use another) and is skipped with the reason when absent.
"""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc", reason="grpcio is not installed (make venv)")

REPO = Path(__file__).resolve().parents[2]
TOKEN = "py-s3cret"
QUERY = "Who lived longer, Nikola Tesla or Milutin Milankovic?"
HEALTH = "/grpc.health.v1.Health/Check"
REFORMULATE = "/qreformulate.v1.Reformulator/Reformulate"
REFLECTION_V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


def qserver_bin() -> Path:
    candidates = [os.environ.get("QSERVER_BIN")]
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(str(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "qserver"))
    candidates.append(str(REPO / "target" / "release" / "qserver"))
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    pytest.skip("target/release/qserver is missing: run `cargo build --release -p qserver` (make test does)")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}", "-days", "2",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def make_leaf(d: Path, name: str, ca: str, ext: str) -> None:
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-set_serial", str(abs(hash(name)) % 10**9), "-days", "2", "-out", f"{name}.pem",
            "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_leaf(d, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    make_leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    make_leaf(d, "rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def credentials(pki: Path, client: str | None = None):
    read = lambda name: (pki / name).read_bytes()  # noqa: E731
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=read("ca.pem"))
    return grpc.ssl_channel_credentials(
        root_certificates=read("ca.pem"), private_key=read(f"{client}.key"), certificate_chain=read(f"{client}.pem")
    )


def unary(channel, method: str):
    return channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def health_check(channel, timeout: float = 5.0) -> bytes:
    return unary(channel, HEALTH)(b"", timeout=timeout)


def string_field(number: int, text: str) -> bytes:
    data = text.encode()
    assert len(data) < 128
    return bytes([number << 3 | 2, len(data)]) + data


class Server:
    """qserver as a child process on 127.0.0.1:PORT, stopped by its PID."""

    def __init__(self, pki: Path, *flags: str, env: dict | None = None):
        self.port = free_port()
        self.log = pki / f"qserver-{self.port}.log"
        args = [str(qserver_bin()), "--listen", f"127.0.0.1:{self.port}", "--workers", "1",
                "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"), *flags]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("QSERVER_")}
        full_env.update(env or {})
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=full_env)

    def target(self) -> str:
        return f"localhost:{self.port}"

    def wait_serving(self, creds) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"qserver exited: {self.log.read_text()[-2000:]}"
            with grpc.secure_channel(self.target(), creds) as channel:
                try:
                    # grpc.health.v1 SERVING is field 1 = 1 (health answers NOT_SERVING while warming up).
                    if unary(channel, HEALTH)(string_field(1, "qreformulate.v1.Reformulator"), timeout=2) == b"\x08\x01":
                        return
                except grpc.RpcError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"qserver never SERVING: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def mtls_server(pki):
    server = Server(pki, "--tls-client-ca", str(pki / "ca.pem"), "--reflection", env={"QSERVER_AUTH_TOKENS": TOKEN})
    try:
        server.wait_serving(credentials(pki, "client"))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls_server(pki):
    server = Server(pki)
    try:
        server.wait_serving(credentials(pki))
        yield server
    finally:
        server.stop()


def bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


def test_tls_server_answers_a_client_trusting_its_ca(tls_server, pki):
    with grpc.secure_channel(tls_server.target(), credentials(pki)) as channel:
        reply, call = unary(channel, REFORMULATE).with_call(string_field(1, QUERY), timeout=30)
    assert reply.startswith(b"\x0a"), reply  # field 1: the subqueries
    request_id = dict(call.initial_metadata()).get("x-request-id")
    assert request_id and len(request_id) == 32


def test_plaintext_client_gets_nothing_from_a_tls_server(tls_server):
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_check(channel, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_with_the_right_token_answers_and_keeps_the_request_id(mtls_server, pki):
    with grpc.secure_channel(mtls_server.target(), credentials(pki, "client")) as channel:
        metadata = bearer(TOKEN) + (("x-request-id", "py-42"),)
        reply, call = unary(channel, REFORMULATE).with_call(string_field(1, QUERY), metadata=metadata, timeout=30)
    assert reply.startswith(b"\x0a"), reply
    assert dict(call.initial_metadata())["x-request-id"] == "py-42"


@pytest.mark.parametrize("metadata", [(), bearer("wrong"), (("authorization", TOKEN),)], ids=["none", "wrong", "no-scheme"])
def test_missing_or_wrong_token_is_unauthenticated(mtls_server, pki, metadata):
    with grpc.secure_channel(mtls_server.target(), credentials(pki, "client")) as channel:
        with pytest.raises(grpc.RpcError) as err:
            unary(channel, REFORMULATE)(string_field(1, QUERY), metadata=metadata, timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details()


def test_health_needs_no_token(mtls_server, pki):
    with grpc.secure_channel(mtls_server.target(), credentials(pki, "client")) as channel:
        assert health_check(channel) == b"\x08\x01"


@pytest.mark.parametrize("client", [None, "rogue"], ids=["no-cert", "other-ca"])
def test_mtls_refuses_clients_without_a_certificate_from_the_ca(mtls_server, pki, client):
    creds = credentials(pki) if client is None else grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / f"{client}.key").read_bytes(),
        certificate_chain=(pki / f"{client}.pem").read_bytes(),
    )
    with grpc.secure_channel(mtls_server.target(), creds) as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_check(channel, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("method", [REFLECTION_V1ALPHA, REFLECTION_V1], ids=["v1alpha", "v1"])
def test_reflection_lists_the_services(mtls_server, pki, method):
    list_services = string_field(7, "")
    with grpc.secure_channel(mtls_server.target(), credentials(pki, "client")) as channel:
        call = channel.stream_stream(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        replies = list(call(iter([list_services]), metadata=bearer(TOKEN), timeout=10))
    assert len(replies) == 1
    assert b"qreformulate.v1.Reformulator" in replies[0] and b"grpc.health.v1.Health" in replies[0]
