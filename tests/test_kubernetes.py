"""deploy/kubernetes and the Dockerfile, offline: schemas, the links between the manifests,
the fleet file, the probe and the auth proxy (against a fake TorchServe on loopback)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import yaml
from kubernetes_validate import utils as kv

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "kubernetes"
MANIFESTS = sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
# The oldest Kubernetes release these manifests target and the newest whose schemas the pinned
# kubernetes-validate ships (it carries them in the package: nothing is downloaded).
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
BIND_KEYS = ("inference_address", "management_address", "metrics_address")

sys.path.insert(0, str(DEPLOY))
import auth_proxy  # noqa: E402
import make_fleet  # noqa: E402
import probe  # noqa: E402


def load(name: str) -> list[dict]:
    """The documents of deploy/kubernetes/NAME."""
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def one(name: str, kind: str) -> dict:
    """The only document of `kind` in NAME."""
    docs = [d for d in load(name) if d["kind"] == kind]
    assert len(docs) == 1, f"{name}: {len(docs)} {kind} documents"
    return docs[0]


def pod_specs() -> dict[str, dict]:
    """Every pod spec of the manifests, by the manifest's kind/name."""
    specs = {}
    for path in MANIFESTS:
        for doc in load(path.name):
            if doc["kind"] == "Pod":
                specs[f"Pod/{doc['metadata']['name']}"] = doc["spec"]
            elif "template" in doc.get("spec", {}):
                specs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc["spec"]["template"]["spec"]
    return specs


def container(spec: dict, name: str) -> dict:
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def read_properties(text: str) -> dict[str, str]:
    """key=value lines of a Java properties text (this project's files have no continuations)."""
    props = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


# --- schemas ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_validates_against_the_kubernetes_schemas(path, version):
    docs = load(path.name)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        try:  # strict: an unknown or misspelt field fails too
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError as e:  # an API version this release no longer serves
            pytest.fail(f"{path.name}: {e.message}")
        except kv.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: "
                        f"{'.'.join(map(str, e.path))}: {e.message}")


def test_the_validator_rejects_a_broken_manifest():
    sts = one("statefulset.yaml", "StatefulSet")
    sts["spec"]["replicas"] = "three"
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, KUBERNETES_VERSIONS[-1], strict=True)
    sts = one("statefulset.yaml", "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, KUBERNETES_VERSIONS[-1], strict=True)
    with pytest.raises(kv.SchemaNotFoundError):  # what TorchServe's own chart uses for its autoscaler
        kv.validate({"apiVersion": "autoscaling/v2beta1", "kind": "HorizontalPodAutoscaler",
                     "metadata": {"name": "ts"}, "spec": {}}, KUBERNETES_VERSIONS[0])


def test_kustomization_applies_the_server_manifests_and_their_files_exist():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert all((DEPLOY / r).is_file() for r in resources)
    on_demand = {"classify-job.yaml", "toolbox.yaml"}
    assert set(resources) == {p.name for p in MANIFESTS} - on_demand


# --- the StatefulSet and its Services ----------------------------------------------------------

def test_statefulset_service_name_is_the_headless_service_and_selects_its_pods():
    sts = one("statefulset.yaml", "StatefulSet")
    services = {s["metadata"]["name"]: s for s in load("services.yaml")}
    headless = services[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True  # management reaches unready pods
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()


def test_inference_service_targets_the_auth_proxy_never_management():
    service = next(s for s in load("services.yaml") if s["metadata"]["name"] == "ts-inference")
    assert service["spec"].get("clusterIP") != "None"
    spec = one("statefulset.yaml", "StatefulSet")["spec"]["template"]["spec"]
    ports = {p["name"]: (c["name"], p["containerPort"]) for c in spec["containers"] for p in c["ports"]}
    assert [ports[p["targetPort"]][0] for p in service["spec"]["ports"]] == ["auth-proxy"]


def test_probes_exec_the_ping_probe_with_the_pods_key():
    spec = one("statefulset.yaml", "StatefulSet")["spec"]["template"]["spec"]
    server = container(spec, "torchserve")
    modes = {}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = server[kind]["exec"]["command"]
        assert command[:2] == ["python", "/app/deploy/kubernetes/probe.py"], kind
        modes[kind] = command[2]
    assert modes == {"startupProbe": "live", "readinessProbe": "ready", "livenessProbe": "live"}
    assert '/ping"' in (DEPLOY / "probe.py").read_text()
    env = {e["name"]: e for e in server["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_gpu_is_requested_and_limited():
    server = container(one("statefulset.yaml", "StatefulSet")["spec"]["template"]["spec"], "torchserve")
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["resources"]["requests"]["nvidia.com/gpu"] == 1


def test_prometheus_scrapes_the_metrics_port():
    template = one("statefulset.yaml", "StatefulSet")["spec"]["template"]
    notes = template["metadata"]["annotations"]
    server = container(template["spec"], "torchserve")
    metrics = next(p for p in server["ports"] if p["name"] == "metrics")
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(metrics["containerPort"]) == "8082"
    assert notes["prometheus.io/path"] == "/metrics"


def test_pod_disruption_budget_selects_the_statefulset_pods():
    pdb = one("pdb.yaml", "PodDisruptionBudget")
    sts = one("statefulset.yaml", "StatefulSet")
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1


def test_configmap_keeps_the_repository_settings_but_the_bind_addresses():
    config_map = next(d for d in load("config.yaml") if d["metadata"]["name"] == "ts-config")
    cluster = read_properties(config_map["data"]["config.properties"])
    local = read_properties((REPO / "config.properties").read_text())
    assert cluster.keys() == local.keys()
    assert cluster["disable_token_authorization"] == "false"
    for key in BIND_KEYS:
        assert local[key].startswith("http://127.0.0.1:")
        assert cluster[key] == local[key].replace("127.0.0.1", "0.0.0.0")
    assert {k: v for k, v in cluster.items() if k not in BIND_KEYS} == \
        {k: v for k, v in local.items() if k not in BIND_KEYS}


def test_every_pod_runs_as_the_uid_that_can_read_the_key_files():
    for name, spec in pod_specs().items():
        assert spec["securityContext"]["runAsUser"] == 1000, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
    assert "--uid 1000" in (REPO / "Dockerfile").read_text()


# --- the Job and the fleet file ----------------------------------------------------------------

def test_job_is_indexed_with_one_shard_per_completion():
    job = one("classify-job.yaml", "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    shards = spec["completions"]
    assert spec["parallelism"] == shards and shards > 1
    args = container(spec["template"]["spec"], "classify")["args"]
    assert args[:2] == ["python", "/app/scripts/classify_dir.py"]
    assert args[args.index("--shard") + 1] == f"$(JOB_COMPLETION_INDEX)/{shards}"
    assert args[args.index("--fleet") + 1] == "/fleet/fleet.yaml"
    assert "$(JOB_COMPLETION_INDEX)" in args[args.index("--output") + 1]  # one result file a shard


def test_job_command_is_one_the_classifier_accepts_for_every_index():
    """The Job's args, with each index Kubernetes substitutes, parse and name a valid shard."""
    from client import classify_dir

    spec = one("classify-job.yaml", "Job")["spec"]
    args = container(spec["template"]["spec"], "classify")["args"]
    outputs = set()
    for index in range(spec["completions"]):
        argv = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)) for a in args[2:]]
        parsed = classify_dir.get_args_parser().parse_args(argv)
        assert parsed.fleet == "/fleet/fleet.yaml" and parsed.resume
        assert classify_dir.parse_shard(parsed.shard) == (index, spec["completions"])
        outputs.add(parsed.output)
    assert len(outputs) == spec["completions"]  # no two shards write one file


@pytest.mark.parametrize("manifest,kind", [("classify-job.yaml", "Job"), ("toolbox.yaml", "Pod")])
def test_fleet_generator_inputs_match_the_statefulset(manifest, kind):
    sts = one("statefulset.yaml", "StatefulSet")
    doc = one(manifest, kind)
    spec = doc["spec"]["template"]["spec"] if kind == "Job" else doc["spec"]
    fleet = container(spec, "fleet")
    args = fleet["args"]
    assert args[:2] == ["python", "/app/deploy/kubernetes/make_fleet.py"]
    flag = {args[i]: args[i + 1] for i in range(2, len(args) - 1) if args[i].startswith("--")}
    env = {e["name"]: e.get("value") for e in fleet["env"]}
    assert int(env[flag["--replicas"][2:-1]]) == sts["spec"]["replicas"]
    assert flag["--namespace"] == "$(POD_NAMESPACE)"
    assert flag["--statefulset"] == sts["metadata"]["name"]
    assert flag["--service"] == sts["spec"]["serviceName"]
    main = next(c for c in spec["containers"] if any(m["name"] == "fleet" for m in c["volumeMounts"]))
    keys = next(m for m in main["volumeMounts"] if m["name"] == "keys")
    assert keys["mountPath"] == flag["--key-dir"] and keys["readOnly"] is True
    server = container(sts["spec"]["template"]["spec"], "torchserve")
    assert next(m for m in server["volumeMounts"] if m["name"] == "keys")["mountPath"] == flag["--key-dir"]


def test_fleet_file_for_three_replicas_matches_the_format(tmp_path):
    out = tmp_path / "fleet.yaml"
    done = subprocess.run([sys.executable, str(DEPLOY / "make_fleet.py"), "--replicas", "3",
                           "--namespace", "ml", "--output", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert text.startswith("# fleet.yaml: one entry per TorchServe replica\n")
    entries = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    expected = "replicas:\n" + "\n".join(
        f"  - name: ts-{i}\n"
        f"    inference_url: http://ts-{i}.ts.ml.svc.cluster.local:8080\n"
        f"    management_url: http://ts-{i}.ts.ml.svc.cluster.local:8081\n"
        f"    key_file: /keys/ts-{i}/key_file.json" for i in range(3))
    assert entries == expected
    assert yaml.safe_load(text)["replicas"][2] == {
        "name": "ts-2", "inference_url": "http://ts-2.ts.ml.svc.cluster.local:8080",
        "management_url": "http://ts-2.ts.ml.svc.cluster.local:8081",
        "key_file": "/keys/ts-2/key_file.json"}


@pytest.mark.parametrize("flags,needle", [(["--replicas", "0", "--namespace", "ml"], "--replicas"),
                                          (["--replicas", "2", "--namespace", "ML_1"], "--namespace"),
                                          (["--replicas", "2", "--namespace", "ml", "--key-dir", "keys"],
                                           "--key-dir")])
def test_fleet_generator_rejects_bad_flags_in_one_line(flags, needle):
    done = subprocess.run([sys.executable, str(DEPLOY / "make_fleet.py"), *flags],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and needle in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- the image ---------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines()
            if line.strip()]


def test_dockerfile_copies_requirements_and_installs_them():
    steps = dockerfile_instructions()
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3.11-slim")
    copy = steps.index(("COPY", "requirements.txt ."))
    install = next(i for i, (op, arg) in enumerate(steps)
                   if op == "RUN" and "pip install -r requirements.txt" in arg)
    assert copy < install < steps.index(("COPY", ". ."))
    assert any(op == "RUN" and "openjdk-17-jre-headless" in arg for op, arg in steps)
    user = [arg for op, arg in steps if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert ("ENTRYPOINT", '["tini", "-g", "--"]') in steps


def test_files_the_pods_run_are_in_the_image():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert ".venv" in ignored  # the image builds its own
    used = set()
    for spec in pod_specs().values():
        for c in spec.get("initContainers", []) + spec["containers"]:
            probes = [c.get(k, {}).get("exec", {}).get("command", []) for k in ("startupProbe",
                                                                                  "readinessProbe",
                                                                                  "livenessProbe")]
            for word in c.get("args", []) + sum(probes, []):
                if word.startswith("/app/") and word.endswith((".py", ".sh")):
                    used.add(word[len("/app/"):])
    assert {"deploy/kubernetes/start-torchserve.sh", "deploy/kubernetes/probe.py",
            "deploy/kubernetes/auth_proxy.py", "deploy/kubernetes/make_fleet.py"} <= used
    for rel in used:
        assert (REPO / rel).is_file(), rel
        assert not any(Path(rel).match(pattern) or rel.startswith(pattern + "/") for pattern in ignored), rel


# --- probe and auth proxy against a fake TorchServe ----------------------------------------------

class FakeTorchServe:
    """/ping, /predictions and /token the way TorchServe 0.12 answers them, keys in a key file."""

    def __init__(self, key_file: Path):
        self.key_file = key_file
        self.keys = {"inference": "inf00001", "management": "mgt00001", "API": "api00001"}
        self.health = (200, "Healthy")
        self.renewals = 0
        self.seen: list[tuple[str, str, bytes]] = []
        self.write()

    def write(self) -> None:
        self.key_file.write_text(json.dumps({k: {"key": v} for k, v in self.keys.items()}))

    def answer(self, port_kind: str, method: str, path: str, auth: str, body: bytes) -> tuple[int, dict]:
        url = urlsplit(path)
        if port_kind == "management" and url.path == "/token":
            if auth != f"Bearer {self.keys['API']}":
                return 400, {"code": 400, "type": "InvalidKeyException", "message": "bad key"}
            kind = parse_qs(url.query)["type"][0]
            self.renewals += 1
            self.keys[kind] = f"{kind[:3]}R{self.renewals:04d}"  # never a previous key
            self.write()
            return 200, {}
        if auth != f"Bearer {self.keys['inference']}":
            return 400, {"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed"}
        self.seen.append((method, url.path, body))
        if url.path == "/ping":
            return self.health[0], {"status": self.health[1]}
        return 200, [{"label": "red", "index": 0, "probability": 1.0, "bytes": len(body)}]


@contextmanager
def serve(fake: FakeTorchServe):
    """The fake's inference and management APIs on free loopback ports: (inference, management) URLs."""
    servers = []
    for port_kind in ("inference", "management"):
        class Handler(BaseHTTPRequestHandler):
            kind = port_kind

            def do_GET(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, payload = fake.answer(self.kind, self.command, self.path,
                                              self.headers.get("Authorization", ""), body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        yield tuple(f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def test_probe_is_ready_only_when_ping_says_healthy_and_live_while_workers_load(tmp_path):
    fake = FakeTorchServe(tmp_path / "key_file.json")
    with serve(fake) as (inference, management):
        assert probe.probe("ready", inference, management, str(fake.key_file), 5) is None
        fake.health = (500, "Partial Healthy")
        assert "500" in probe.probe("ready", inference, management, str(fake.key_file), 5)
        assert probe.probe("live", inference, management, str(fake.key_file), 5) is None


def test_probe_renews_an_expired_inference_key_with_the_api_key(tmp_path):
    fake = FakeTorchServe(tmp_path / "key_file.json")
    with serve(fake) as (inference, management):
        fake.keys["inference"] = "expired0"  # the server no longer takes the file's key
        assert probe.probe("ready", inference, management, str(fake.key_file), 5) is None
        assert fake.renewals == 1
        assert json.loads(fake.key_file.read_text())["inference"]["key"] == fake.keys["inference"]


def test_probe_fails_without_server_or_key_file(tmp_path):
    fake = FakeTorchServe(tmp_path / "key_file.json")
    with serve(fake) as (inference, management):
        pass  # stopped: nothing listens there any more
    assert "no answer" in probe.probe("live", inference, management, str(fake.key_file), 2)
    assert "no key file" in probe.probe("live", inference, management, str(tmp_path / "none.json"), 2)


def test_probe_key_file_defaults_to_the_pods_folder_on_the_key_volume(monkeypatch):
    monkeypatch.setenv("POD_NAME", "ts-1")
    monkeypatch.setenv("TS_KEY_ROOT", "/keys")
    assert probe.default_key_file() == "/keys/ts-1/key_file.json"


@contextmanager
def proxy(fake: FakeTorchServe, inference: str, management: str, token_file: Path):
    keys = auth_proxy.Keys(str(fake.key_file), management, keys={})
    handler = auth_proxy.make_handler(inference, auth_proxy.Token(str(token_file)), keys, 1024, 10)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_auth_proxy_forwards_with_the_pods_own_key_and_renews_it(tmp_path):
    fake = FakeTorchServe(tmp_path / "key_file.json")
    token_file = tmp_path / "token"
    token_file.write_text("shared-token-0123456789\n")
    shared = {"Authorization": "Bearer shared-token-0123456789"}
    with serve(fake) as (inference, management), proxy(fake, inference, management, token_file) as url:
        answer = requests.post(f"{url}/predictions/tiny", data=b"abc", headers=shared, timeout=10)
        assert answer.status_code == 200 and answer.json()[0]["bytes"] == 3
        assert fake.seen[-1] == ("POST", "/predictions/tiny", b"abc")
        fake.keys["inference"] = "expired0"
        assert requests.get(f"{url}/ping", headers=shared, timeout=10).json() == {"status": "Healthy"}
        assert fake.renewals == 1


def test_auth_proxy_refuses_a_wrong_token_and_follows_a_rotated_one(tmp_path):
    fake = FakeTorchServe(tmp_path / "key_file.json")
    token_file = tmp_path / "token"
    token_file.write_text("shared-token-0123456789")
    with serve(fake) as (inference, management), proxy(fake, inference, management, token_file) as url:
        for headers in ({}, {"Authorization": f"Bearer {fake.keys['inference']}"},
                        {"Authorization": "Bearer shared-token-0123456780"}):
            assert requests.get(f"{url}/ping", headers=headers, timeout=10).status_code == 401
        assert fake.seen == []  # nothing reached TorchServe
        too_big = requests.post(f"{url}/predictions/tiny", data=b"x" * 2048, timeout=10,
                                headers={"Authorization": "Bearer shared-token-0123456789"})
        assert too_big.status_code == 413
        token_file.write_text("rotated-token-9876543210")
        rotated = {"Authorization": "Bearer rotated-token-9876543210"}
        assert requests.get(f"{url}/ping", headers=rotated, timeout=10).status_code == 200
