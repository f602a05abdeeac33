"""Checks of deploy/: the Kubernetes manifests against the Kubernetes schemas and the
project's rules for them, the Dockerfile with hadolint, the image's liveness script against a
real qserver. Run by `make test` (tools from deploy/requirements.txt)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonpatch
import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1]
ROOT = DEPLOY.parent
K8S = DEPLOY / "k8s"
K8S_TLS = DEPLOY / "k8s-tls"
DOCKERFILE = DEPLOY / "Dockerfile"
ALIVE = DEPLOY / "qserver-alive.sh"
# The oldest Kubernetes with GA gRPC probes, and the newest schema the validator ships.
K8S_VERSIONS = ["1.27.0", "1.37.0"]
POD_LABELS = {"app.kubernetes.io/name": "qreformulate", "app.kubernetes.io/component": "server"}
GRPC_PORT, METRICS_PORT = 50051, 9090


# ---- rendering (what `kubectl kustomize` does for these two kustomizations) ----------------


def load_docs(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomization(directory: Path) -> dict:
    (doc,) = load_docs(directory / "kustomization.yaml")
    return doc


def render(directory: Path, extra_patches: tuple[str, ...] = ()) -> list[dict]:
    """Resources (files or kustomization directories), then `images`, then JSON 6902 patches."""
    k = kustomization(directory)
    docs: list[dict] = []
    for resource in k.get("resources", []):
        path = (directory / resource).resolve()
        docs.extend(render(path) if path.is_dir() else load_docs(path))
    for image in k.get("images", []):
        for doc in docs:
            for c in pod_spec(doc).get("containers", []) if doc["kind"] == "Deployment" else []:
                if c["image"].split(":")[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    patches = list(k.get("patches", [])) + [{"path": p, "target": {"kind": "Deployment"}} for p in extra_patches]
    for patch in patches:
        ops = load_docs(directory / patch["path"])[0]
        target = patch["target"]
        matched = [
            i
            for i, d in enumerate(docs)
            if d["kind"] == target["kind"] and target.get("name", d["metadata"]["name"]) == d["metadata"]["name"]
        ]
        assert matched, f"{patch['path']}: no {target} in the rendered resources"
        for i in matched:
            docs[i] = jsonpatch.apply_patch(docs[i], ops)
    return docs


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def qserver_container(docs: list[dict]) -> dict:
    (c,) = [c for c in pod_spec(one(docs, "Deployment"))["containers"] if c["name"] == "qserver"]
    return c


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


BASE = render(K8S)
TLS = render(K8S_TLS)
MTLS = render(K8S_TLS, extra_patches=("mtls.yaml",))
VARIANTS = {"base": BASE, "tls": TLS, "mtls": MTLS}


# ---- structure ------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest():
    listed = set(kustomization(K8S)["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"deploy/k8s/kustomization.yaml resources {sorted(listed)} != files {sorted(on_disk)}"


def test_tls_overlay_patch_files_exist():
    text = (K8S_TLS / "kustomization.yaml").read_text()
    named = set(re.findall(r"path: (\S+\.yaml)", text))  # the commented-out mtls.yaml too
    assert {"tls.yaml", "mtls.yaml"} <= named
    on_disk = {p.name for p in K8S_TLS.glob("*.yaml")} - {"kustomization.yaml"}
    assert named == on_disk


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory", [K8S, K8S_TLS], ids=["base", "tls"])
def test_render_matches_kubectl_kustomize(directory):
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    theirs = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=key)
    ours = sorted(VARIANTS["base" if directory == K8S else "tls"], key=key)
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)


# ---- Kubernetes schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_match_kubernetes_schema(variant, version):
    for doc in VARIANTS[variant]:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{variant}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {e.message}")


def test_schema_check_rejects_a_misspelt_field():
    broken = copy.deepcopy(one(BASE, "Deployment"))
    pod_spec(broken)["automountServiceAcountToken"] = False
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


# ---- the project's rules ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_is_locked_down(variant):
    spec = pod_spec(one(VARIANTS[variant], "Deployment"))
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert not sc.get("privileged"), c["name"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_guaranteed_qos(variant):
    for c in pod_spec(one(VARIANTS[variant], "Deployment"))["containers"]:
        r = c["resources"]
        assert set(r["limits"]) >= {"cpu", "memory"}, c["name"]
        assert r["requests"] == r["limits"], f"{c['name']}: requests {r['requests']} != limits {r['limits']}"


def test_workers_match_cpu():
    c = qserver_container(BASE)
    assert env_of(c)["QSERVER_WORKERS"] == str(c["resources"]["limits"]["cpu"])


def test_base_probes():
    c = qserver_container(BASE)
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["grpc"] == {"port": GRPC_PORT}, probe
    assert c["livenessProbe"]["exec"]["command"] == ["/opt/qreformulate/bin/qserver-alive"]
    # The liveness script reads the metrics endpoint on loopback, port 9090.
    assert env_of(c)["QSERVER_METRICS_LISTEN"].endswith(f":{METRICS_PORT}")


@pytest.mark.parametrize("variant", ["tls", "mtls"])
def test_tls_probes_do_not_use_plaintext_grpc(variant):
    c = qserver_container(VARIANTS[variant])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in c[probe], f"{probe}: kubelet's gRPC probe cannot speak TLS"
    assert c["livenessProbe"] == qserver_container(BASE)["livenessProbe"]


def test_network_policy():
    deployment = one(BASE, "Deployment")
    policy = one(BASE, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == POD_LABELS
    assert POD_LABELS.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert policy["egress"] == [], "qserver needs no outbound traffic"
    by_port = {}
    for rule in policy["ingress"]:
        (port,) = rule["ports"]
        assert rule["from"], "a rule without `from` admits everyone"
        by_port[port["port"]] = rule["from"]
    assert set(by_port) == {GRPC_PORT, METRICS_PORT}
    assert by_port[METRICS_PORT] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    for peer in by_port[GRPC_PORT]:
        assert peer["podSelector"]["matchLabels"] == {"qreformulate-client": "true"}, peer
    container_ports = {p["containerPort"] for p in qserver_container(BASE)["ports"]}
    assert container_ports == {GRPC_PORT, METRICS_PORT}


def test_services():
    plain = one(BASE, "Service", "qreformulate")["spec"]
    headless = one(BASE, "Service", "qreformulate-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert not headless.get("publishNotReadyAddresses")
    for spec in (plain, headless):
        assert spec["selector"] == POD_LABELS
    assert [p["name"] for p in headless["ports"]] == ["grpc"]


@pytest.mark.parametrize("variant", ["tls", "mtls"])
def test_tls_secrets_are_mounted_read_only(variant):
    docs = VARIANTS[variant]
    spec = pod_spec(one(docs, "Deployment"))
    secret_volumes = {v["name"] for v in spec["volumes"] if "secret" in v}
    assert secret_volumes == {"tls", "auth"}
    mounts = {m["name"]: m for m in qserver_container(docs)["volumeMounts"]}
    env = env_of(qserver_container(docs))
    wanted = ["QSERVER_TLS_CERT", "QSERVER_TLS_KEY", "QSERVER_AUTH_TOKENS_FILE"]
    if variant == "mtls":
        wanted.append("QSERVER_TLS_CLIENT_CA")
    else:
        assert "QSERVER_TLS_CLIENT_CA" not in env
    for name in wanted:
        inside = [m for v, m in mounts.items() if v in secret_volumes and env[name].startswith(m["mountPath"] + "/")]
        assert len(inside) == 1 and inside[0]["readOnly"] is True, f"{name}={env[name]} is not in a read-only Secret"


def test_base_needs_no_secret():
    spec = pod_spec(one(BASE, "Deployment"))
    assert not any("secret" in v for v in spec.get("volumes", []))
    assert not any(k.startswith(("QSERVER_TLS", "QSERVER_AUTH")) for k in env_of(qserver_container(BASE)))


def server_source() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "server" / "src").rglob("*.rs"))


# Options other work on qserver is adding; until the server has them, they are reported, not failed.
PENDING_OPTIONS = ("QSERVER_TLS_", "QSERVER_AUTH_", "QSERVER_MAX_CONNECTION_AGE")


def test_env_names_are_qserver_flags():
    """Every QSERVER_* the manifests or the image set is one of qserver's options."""
    source = server_source()
    names = set(env_of(qserver_container(MTLS)))
    names |= set(re.findall(r"\b(QSERVER_[A-Z_]+)=", instructions(DOCKERFILE.read_text())))
    names = {n for n in names if n.startswith("QSERVER_")}
    unknown = sorted(n for n in names if f'"{n}"' not in source)
    pending = [n for n in unknown if n.startswith(PENDING_OPTIONS)]
    assert not [n for n in unknown if n not in pending], f"not qserver options: {unknown}"
    for n in pending:
        prefix = next(p for p in PENDING_OPTIONS if n.startswith(p))
        if prefix in source:
            pytest.fail(f"{n} is not qserver's name for its {prefix}* option")
    if pending:
        pytest.skip(f"this qserver does not have these options yet: {pending}")


def test_release_keeps_line_tables_and_dist_strips():
    profiles = tomllib.loads((ROOT / "Cargo.toml").read_text())["profile"]
    assert profiles["release"].get("strip", "none") in ("none", False)
    assert profiles["dist"]["inherits"] == "release"
    assert profiles["dist"]["strip"] in ("debuginfo", "symbols", True)


# ---- Dockerfile ----------------------------------------------------------------------------


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint is not installed (make venv installs deploy/requirements.txt)"
    return found


def instructions(dockerfile: str) -> str:
    """The Dockerfile without comments, continuation lines joined."""
    lines = [ln for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#")]
    return re.sub(r"\\\n\s*", " ", "\n".join(lines))


def test_hadolint_passes():
    out = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN cd /tmp && apt-get update\n")
    out = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3007" in out.stdout, out.stdout


def test_dockerfile_rules():
    text = instructions(DOCKERFILE.read_text())
    runtime = text[text.rindex("\nFROM ") :]
    user = re.findall(r"^USER (\S+)", runtime, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"\bQSERVER_LISTEN=0\.0\.0\.0:50051\b", runtime)
    assert "--profile dist" in text and "target/dist/qserver" in text
    (health,) = re.findall(r"^HEALTHCHECK .* CMD (\[.*\])$", runtime, re.M)
    cmd = json.loads(health)
    assert cmd[:2] == ["/bin/sh", "-c"] and cmd[2].startswith("/opt/qreformulate/bin/qclient ")
    assert " health " in cmd[2] and cmd[2].endswith("|| exit 1"), "Docker reserves exit code 2"
    # Nothing secret-looking is baked in.
    for m in re.finditer(r"^(ENV|ARG) (.*)$", text, re.M):
        assert not re.search(r"(TOKEN|SECRET|PASSWORD|_KEY)\w*=", m.group(2), re.I), m.group(0)
    assert not re.search(r"^COPY .*\.(pem|key|crt)\b", text, re.M)


def dockerfile_healthcheck() -> list[str]:
    (health,) = re.findall(r"^HEALTHCHECK .* CMD (\[.*\])$", instructions(DOCKERFILE.read_text()), re.M)
    return json.loads(health)


# ---- qserver-alive (the liveness probe) ----------------------------------------------------


def run_alive(port: int, state: Path, stall: int) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        QSERVER_ALIVE_METRICS_PORT=str(port),
        QSERVER_ALIVE_STATE=str(state),
        QSERVER_ALIVE_STALL_SECS=str(stall),
    )
    return subprocess.run(["bash", str(ALIVE)], env=env, capture_output=True, text=True, timeout=20)


class MetricsStub:
    """An HTTP endpoint that serves the metrics text we set: drives the script's decision
    through states a real server passes through only by luck of timing (a stall)."""

    def __init__(self):
        self.text = ""
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = stub.text.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def set(self, tokens: int, in_flight: int, reformulate_ok: int = 0, evaluate_ok: int = 0, cache_hits: int = 0):
        self.text = (
            f"qreformulate_cache_hits_total {cache_hits}\n"
            f"qreformulate_generated_tokens_total {tokens}\n"
            f"qreformulate_in_flight_requests {in_flight}\n"
            f'qreformulate_requests_total{{code="OK",rpc="Evaluate"}} {evaluate_ok}\n'
            f'qreformulate_requests_total{{code="OK",rpc="Reformulate"}} {reformulate_ok}\n'
            f'qreformulate_requests_total{{code="DEADLINE_EXCEEDED",rpc="Reformulate"}} {reformulate_ok}\n'
        )


@pytest.fixture
def stub():
    s = MetricsStub()
    yield s
    s.server.shutdown()


def test_alive_fails_only_when_work_stalls(stub, tmp_path):
    state = tmp_path / "state"
    stub.set(tokens=10, in_flight=0)
    assert run_alive(stub.port, state, stall=1).returncode == 0  # idle
    stub.set(tokens=10, in_flight=3)
    assert run_alive(stub.port, state, stall=60).returncode == 0  # busy, within the window
    time.sleep(1.1)
    # Cache hits, answers from the cache and timed-out requests are no model progress.
    stub.set(tokens=10, in_flight=3, reformulate_ok=50, cache_hits=50)
    stalled = run_alive(stub.port, state, stall=1)
    assert stalled.returncode == 1 and "no model progress" in stalled.stdout, stalled.stdout
    stub.set(tokens=11, in_flight=3)
    assert run_alive(stub.port, state, stall=1).returncode == 0  # a token: progress again
    time.sleep(1.1)
    stub.set(tokens=11, in_flight=3, evaluate_ok=1)
    assert run_alive(stub.port, state, stall=1).returncode == 0  # a finished Evaluate counts
    time.sleep(1.1)
    stub.set(tokens=11, in_flight=0, evaluate_ok=1)
    assert run_alive(stub.port, state, stall=1).returncode == 0  # idle is never a stall


def test_alive_survives_a_damaged_state_file(stub, tmp_path):
    state = tmp_path / "state"
    state.write_text("garbage\n")
    stub.set(tokens=1, in_flight=2)
    assert run_alive(stub.port, state, stall=1).returncode == 0


def test_alive_fails_without_metrics(stub, tmp_path):
    stub.text = "something_else 1\n"
    out = run_alive(stub.port, tmp_path / "state", stall=1)
    assert out.returncode == 1 and "qreformulate_in_flight_requests" in out.stdout
    port = free_port()
    out = run_alive(port, tmp_path / "state", stall=1)
    assert out.returncode == 1 and "no metrics endpoint" in out.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def built(name: str) -> Path | None:
    """$QSERVER_BIN / $QCLIENT_BIN, else the release build in $CARGO_TARGET_DIR or ./target."""
    explicit = os.environ.get(f"{name.upper()}_BIN")
    if explicit:
        return Path(explicit)
    dirs = [Path(os.environ["CARGO_TARGET_DIR"])] if os.environ.get("CARGO_TARGET_DIR") else []
    for d in dirs + [ROOT / "target"]:
        if (d / "release" / name).exists():
            return d / "release" / name
    return None


@pytest.fixture
def qserver(tmp_path):
    """The real qserver on loopback with its metrics endpoint, as the image runs it."""
    server, client = built("qserver"), built("qclient")
    if server is None or client is None:
        pytest.skip("qserver/qclient are not built (make test builds them first)")
    env = dict(os.environ)
    ort = sorted((ROOT / ".ort").glob("libonnxruntime.so.*"))
    if ort:
        env["ORT_DYLIB_PATH"] = str(ort[-1])
    grpc, metrics = free_port(), free_port()
    log = (tmp_path / "qserver.log").open("w")
    proc = subprocess.Popen(
        [str(server), "--listen", f"127.0.0.1:{grpc}", "--metrics-listen", f"127.0.0.1:{metrics}", "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # One check per call (the flag for waiting has changed between qclient versions).
        deadline = time.monotonic() + 60
        while True:
            up = subprocess.run(
                [str(client), "--addr", f"127.0.0.1:{grpc}", "health"], capture_output=True, text=True, timeout=30
            )
            if up.returncode == 0 or time.monotonic() > deadline or proc.poll() is not None:
                break
            time.sleep(0.2)
        assert up.returncode == 0, up.stderr + (tmp_path / "qserver.log").read_text()
        yield client, grpc, metrics
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_alive_and_healthcheck_against_qserver(qserver, tmp_path):
    client, grpc, metrics = qserver
    state = tmp_path / "state"
    first = run_alive(metrics, state, stall=1)
    assert first.returncode == 0, first.stdout + first.stderr
    assert state.read_text().split()[0] == "0"  # no tokens generated yet
    answer = subprocess.run(
        [str(client), "--addr", f"127.0.0.1:{grpc}", "reformulate", "--skip-cache", "weather in paris and rome"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert answer.returncode == 0, answer.stderr
    assert run_alive(metrics, state, stall=1).returncode == 0
    assert int(state.read_text().split()[0]) > 0, "the script did not see the generated tokens"
    # The image's HEALTHCHECK command, with this server's port and the client built here.
    sh, flag, script = dockerfile_healthcheck()
    script = script.replace("/opt/qreformulate/bin/qclient", str(client)).replace(":50051", f":{grpc}")
    health = subprocess.run([sh, flag, script], capture_output=True, text=True, timeout=30)
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stdout + health.stderr
    # Against a port where nothing listens it reports unhealthy, with Docker's code 1.
    script = script.replace(f":{grpc}", f":{free_port()}")
    down = subprocess.run([sh, flag, script], capture_output=True, text=True, timeout=30)
    assert down.returncode == 1, down.stdout + down.stderr
