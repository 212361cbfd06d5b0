"""deploy/ and the Dockerfile, offline: schemas, the links between manifests and kustomizations, the
pods' security fields, the Jobs' failure semantics, the fleet file, the probe, the publish step,
nginx's configuration rendered with the pods' environment, and Checkov with no failed check."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kv

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
KUSTOMIZATIONS = sorted(DEPLOY.rglob("kustomization.yaml"))
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
# The oldest Kubernetes release these manifests target and the newest whose schemas the pinned
# kubernetes-validate ships (it carries them in the package: nothing is downloaded).
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
UID = 10001
NAMESPACE = "ts-batch-classify"
CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

sys.path.insert(0, str(K8S))
import make_fleet  # noqa: E402
import probe  # noqa: E402
import publish_mar  # noqa: E402


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def one(rel: str, kind: str) -> dict:
    """The only document of `kind` in deploy/kubernetes/REL."""
    docs = [d for d in load(K8S / rel) if d["kind"] == kind]
    assert len(docs) == 1, f"{rel}: {len(docs)} {kind} documents"
    return docs[0]


def sts() -> dict:
    return one("statefulset.yaml", "StatefulSet")


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def pod_specs() -> dict[str, dict]:
    """Every pod template of the manifests, by kind/name."""
    return {f"{d['kind']}/{d['metadata']['name']}": pod_spec(d)
            for path in MANIFESTS for d in load(path) if "template" in d.get("spec", {})}


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def container(spec: dict, name: str) -> dict:
    return next(c for c in containers(spec) if c["name"] == name)


def volumes_of(spec: dict, c: dict) -> dict[str, dict]:
    """mountPath -> the volume a container mounts there."""
    by_name = {v["name"]: v for v in spec.get("volumes", [])}
    return {m["mountPath"]: by_name[m["name"]] for m in c.get("volumeMounts", [])}


def secrets_mounted(spec: dict, c: dict) -> set[str]:
    return {v["secret"]["secretName"] for v in volumes_of(spec, c).values() if "secret" in v}


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def read_properties(text: str) -> dict[str, str]:
    """key=value lines of a Java properties text (this project's files have no continuations)."""
    props = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def kustomization(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def kustomize_closure(path: Path) -> tuple[list[Path], list[Path], list[dict]]:
    """(resource files, component folders, generators) a kustomization pulls in, components included."""
    doc, root = kustomization(path), path.parent
    resources = [(root / r).resolve() for r in doc.get("resources", [])]
    comps = [(root / c).resolve() for c in doc.get("components", [])]
    generators = [dict(g, _root=root) for g in doc.get("configMapGenerator", [])]
    for comp in comps:
        sub_res, sub_comps, sub_gen = kustomize_closure(comp / "kustomization.yaml")
        resources += sub_res
        generators += sub_gen
    return resources, comps, generators


# --- schemas ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates_against_the_kubernetes_schemas(path, version):
    docs = load(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        try:  # strict: an unknown or misspelt field fails too
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError as e:  # an API version this release no longer serves
            pytest.fail(f"{path.name}: {e.message}")
        except kv.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: "
                        f"{'.'.join(map(str, e.path))}: {e.message}")
        assert doc["metadata"].get("namespace", doc["metadata"]["name"]) == NAMESPACE, path.name


def test_the_validator_rejects_a_broken_manifest():
    broken = sts()
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)
    broken = sts()
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


# --- kustomizations and images -----------------------------------------------------------------

def test_every_manifest_belongs_to_exactly_one_kustomization_and_every_file_exists():
    owners: dict[Path, list[Path]] = {}
    for path in KUSTOMIZATIONS:
        doc = kustomization(path)
        if doc["kind"] == "Component":
            continue
        resources, comps, generators = kustomize_closure(path)
        for r in resources:
            assert r.is_file(), f"{path}: {r}"
            owners.setdefault(r, []).append(path)
        for c in comps:
            assert (c / "kustomization.yaml").is_file(), f"{path}: {c}"
        for g in generators:
            for f in g.get("files", []) + g.get("envs", []):
                assert (g["_root"] / f).is_file(), f"{path}: {f}"
                # kustomize reads files only in or below the folder of the kustomization using them
                assert (g["_root"] / f).resolve().is_relative_to(g["_root"].resolve()), f
    assert {p.resolve(): len(owners.get(p.resolve(), [])) for p in MANIFESTS} == \
        {p.resolve(): 1 for p in MANIFESTS}


def test_every_pod_template_is_in_a_kustomization_with_the_pinned_images_and_its_config_maps():
    images = kustomization(K8S / "images" / "kustomization.yaml")["images"]
    pinned = {i["name"]: i for i in images}
    for i in images:  # qualified (a registry path), by digest, never a tag
        assert "/" in i["newName"] and DIGEST.fullmatch(i["digest"]) and "newTag" not in i, i
    for path in KUSTOMIZATIONS:
        if kustomization(path)["kind"] == "Component":
            continue
        resources, comps, generators = kustomize_closure(path)
        generated = {g["name"] for g in generators}
        for r in resources:
            for doc in load(r):
                if "template" not in doc.get("spec", {}):
                    continue
                assert K8S / "images" in comps, f"{path} runs pods without the pinned images"
                spec = pod_spec(doc)
                for c in containers(spec):
                    name, _, digest = c["image"].partition("@")
                    assert name in pinned and DIGEST.fullmatch(digest), c["image"]
                refs = {v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v}
                refs |= {e["valueFrom"]["configMapKeyRef"]["name"] for c in containers(spec)
                         for e in c.get("env", []) if "configMapKeyRef" in e.get("valueFrom", {})}
                assert refs <= generated, f"{r.name}: {refs - generated} not generated by {path}"


def test_storage_class_is_one_parameter_for_every_claim():
    claims = [d for d in load(K8S / "storage.yaml") if d["kind"] == "PersistentVolumeClaim"]
    assert {c["metadata"]["name"] for c in claims} == {"ts-model-store", "classify-data"}  # no keys claim
    patches = kustomization(DEPLOY / "kustomization.yaml")["patches"]
    patch = next(p for p in patches if p["target"] == {"kind": "PersistentVolumeClaim"})
    ops = yaml.safe_load(patch["patch"])
    assert ops[0]["path"] == "/spec/storageClassName" and ops[0]["value"]
    assert all("storageClassName" not in c["spec"] for c in claims)  # the parameter is the only place
    assert all(c["spec"]["accessModes"] == ["ReadWriteMany"] for c in claims)


def test_models_list_is_in_git_and_names_one_archive():
    env = (K8S / "models" / "models.env").read_text()
    values = dict(line.split("=", 1) for line in env.splitlines() if line and not line.startswith("#"))
    assert list(values) == ["models"]
    assert re.fullmatch(r"[A-Za-z0-9_.-]+\.mar", values["models"])
    generator = kustomization(K8S / "models" / "kustomization.yaml")["configMapGenerator"][0]
    assert generator["name"] == "ts-models" and "disableNameSuffixHash" not in generator.get("options", {})


# --- pods: identity, file system, resources ----------------------------------------------------

def test_every_pod_runs_without_a_service_account_token_as_the_images_uid_on_a_read_only_root():
    for name, spec in pod_specs().items():
        assert spec["automountServiceAccountToken"] is False, name
        pod = spec["securityContext"]
        assert (pod["runAsUser"], pod["runAsGroup"], pod["runAsNonRoot"]) == (UID, UID, True), name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], c["name"]
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            for key in ("cpu", "memory", "ephemeral-storage"):
                assert key in limits and key in requests, (name, c["name"], key)
        for v in spec.get("volumes", []):
            if "emptyDir" in v:
                assert v["emptyDir"].get("sizeLimit"), (name, v["name"])
    users = {arg for op, arg in dockerfile_instructions() if op == "USER"}
    assert users == {f"{UID}:{UID}"}
    assert any(op == "RUN" and f"useradd --uid {UID} --gid {UID}" in arg for op, arg in dockerfile_instructions())


def test_only_nginx_listens_in_the_replica_pods_and_torchserve_binds_loopback():
    spec = pod_spec(sts())
    listening = {c["name"] for c in spec["containers"] if c.get("ports")}
    assert listening == {"nginx"}
    config = read_properties((K8S / "config.properties").read_text())
    for key in ("inference_address", "management_address", "metrics_address"):
        assert config[key].startswith("http://127.0.0.1:"), key
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert config[key] == "127.0.0.1", key
    nginx = env_of(container(spec, "nginx"))
    ports = {p["name"]: p["containerPort"] for p in container(spec, "nginx")["ports"]}
    for listen, port in (("PROXY_LISTEN", "inference"), ("PROXY_MANAGEMENT_LISTEN", "management"),
                         ("PROXY_METRICS_LISTEN", "metrics")):
        assert nginx[listen]["value"] == f"0.0.0.0:{ports[port]}"
    for backend, key in (("PROXY_BACKEND", "inference_address"), ("PROXY_MANAGEMENT_BACKEND", "management_address"),
                         ("PROXY_METRICS_BACKEND", "metrics_address")):
        assert nginx[backend]["value"] == config[key]
    assert not any("hostNetwork" in s or "hostPort" in json.dumps(s) for s in pod_specs().values())


def test_configmap_differs_from_the_repository_settings_only_where_intended():
    cluster = read_properties((K8S / "config.properties").read_text())
    local = read_properties((REPO / "config.properties").read_text())
    assert cluster.keys() == local.keys()
    differences = {k: cluster[k] for k in cluster if cluster[k] != local[k]}
    assert differences == {
        "disable_token_authorization": "true",  # nginx checks the tokens; loopback only
        "allowed_urls": "file:///app/model_store/[A-Za-z0-9_][A-Za-z0-9._-]*[.]mar",  # the pods' own store
        "default_startup_timeout": "600",  # real models load for minutes
        "metrics_config": "/app/handler/metrics.yaml",  # the image's copy of the handler's declaration
    }
    store = volumes_of(pod_spec(sts()), container(pod_spec(sts()), "torchserve"))
    assert store["/app/model_store"]["persistentVolumeClaim"]["claimName"] == "ts-model-store"
    assert int(cluster["default_startup_timeout"]) < _probe_window(container(pod_spec(sts()), "torchserve"))


def _probe_window(c: dict) -> int:
    startup = c["startupProbe"]
    return startup["periodSeconds"] * startup["failureThreshold"]


# --- secrets and network ------------------------------------------------------------------------

def test_each_pod_holds_only_the_tokens_it_needs_and_no_keys_volume():
    server = pod_spec(sts())
    assert secrets_mounted(server, container(server, "torchserve")) == set()
    assert secrets_mounted(server, container(server, "nginx")) == {"ts-inference-token", "ts-management-token"}
    job = pod_spec(one("classify/job.yaml", "Job"))
    assert {s for c in containers(job) for s in secrets_mounted(job, c)} == {"ts-inference-token"}
    rollout = pod_spec(one("rollout/job.yaml", "Job"))
    assert secrets_mounted(rollout, container(rollout, "rollout")) == {"ts-inference-token", "ts-management-token"}
    for name, spec in pod_specs().items():
        for v in spec.get("volumes", []):
            assert v.get("persistentVolumeClaim", {}).get("claimName") != "ts-keys", name
            assert "key" not in v["name"], name
    assert not (K8S / "auth_proxy.py").exists()


def _peers(rule: dict) -> set[str]:
    out = set()
    for peer in rule.get("from", []) + rule.get("to", []):
        if "namespaceSelector" in peer:
            ns = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            out.add(f"ns:{ns}" + (":dns" if "podSelector" in peer else ""))
        else:
            out.add(peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"])
    return out


def test_network_policies_deny_by_default_and_open_each_port_to_its_clients_only():
    policies = {d["metadata"]["name"]: d["spec"] for d in load(K8S / "network-policies.yaml")}
    deny = policies["default-deny"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    server = pod_spec(sts())
    ports = {p["name"]: p["containerPort"] for p in container(server, "nginx")["ports"]}
    labels = sts()["spec"]["template"]["metadata"]["labels"]
    replicas = next(p for p in policies.values() if p["podSelector"].get("matchLabels", {}).items() <= labels.items()
                    and p["podSelector"].get("matchLabels"))
    allowed = {}
    for rule in replicas["ingress"]:
        for port in rule["ports"]:
            allowed.setdefault(port["port"], set()).update(_peers(rule))
    # The classify Job reads the management API (describe, versions) with a token that cannot write:
    # that it works under these rules is run in tests/images (make test-images), not read here.
    assert allowed == {ports["inference"]: {"classify", "rollout"}, ports["management"]: {"classify", "rollout"},
                       ports["metrics"]: {"ns:monitoring"}}
    for name in ("ts-replicas", "classify", "rollout"):
        dns = [r for r in policies[name]["egress"] if _peers(r) == {"ns:kube-system:dns"}]
        assert len(dns) == 1 and {p["port"] for p in dns[0]["ports"]} == {53}, name
    assert len(replicas["egress"]) == 1  # DNS only
    egress = {name: {p["port"] for r in policies[name]["egress"] if _peers(r) == {"torchserve"} for p in r["ports"]}
              for name in ("classify", "rollout")}
    assert egress == {"classify": {ports["inference"], ports["management"]},
                      "rollout": {ports["inference"], ports["management"]}}
    for name, manifest in (("classify", "classify/job.yaml"), ("rollout", "rollout/job.yaml")):
        template_labels = one(manifest, "Job")["spec"]["template"]["metadata"]["labels"]
        assert policies[name]["podSelector"]["matchLabels"].items() <= template_labels.items()


def test_services_reach_nginx_ports_and_the_load_balanced_one_only_inference():
    services = {s["metadata"]["name"]: s for s in load(K8S / "services.yaml")}
    server = pod_spec(sts())
    ports = {p["name"]: p["containerPort"] for p in container(server, "nginx")["ports"]}
    headless = services[sts()["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    # fleet URLs reach the pod IP directly: the Service port must equal the container port
    assert {p["port"] for p in headless["spec"]["ports"]} == set(ports.values())
    assert {(p["targetPort"], p["port"]) for p in headless["spec"]["ports"]} == {(k, v) for k, v in ports.items()}
    assert [p["targetPort"] for p in services["ts-inference"]["spec"]["ports"]] == ["inference"]
    assert (make_fleet.INFERENCE_PORT, make_fleet.MANAGEMENT_PORT) == (ports["inference"], ports["management"])
    labels = sts()["spec"]["template"]["metadata"]["labels"]
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()


# --- replicas: probes, disruption, placement ---------------------------------------------------

def test_startup_and_readiness_mean_models_ready_and_liveness_reads_no_volume():
    server = container(pod_spec(sts()), "torchserve")
    modes = {kind: server[kind]["exec"]["command"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert all(cmd[:2] == ["python", "/app/deploy/kubernetes/probe.py"] for cmd in modes.values())
    assert {k: v[2:] for k, v in modes.items()} == {"startupProbe": ["ready"], "readinessProbe": ["ready"],
                                                    "livenessProbe": ["live"]}
    mounts = [m["mountPath"] for m in server["volumeMounts"]]
    for cmd in modes.values():
        assert not any(arg.startswith(m) for arg in cmd for m in mounts if m != "/tmp")
    parsed = probe.get_args_parser().parse_args(["ready"])
    assert parsed.url.startswith("http://127.0.0.1:") and parsed.management_url.startswith("http://127.0.0.1:")


def test_disruption_budget_spread_and_graceful_stop():
    pdb = one("pdb.yaml", "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"] == sts()["spec"]["selector"]["matchLabels"]
    assert pdb["maxUnavailable"] == 1 and pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    spec = pod_spec(sts())
    keys = {(t["topologyKey"], t["whenUnsatisfiable"]) for t in spec["topologySpreadConstraints"]}
    assert keys == {("kubernetes.io/hostname", "DoNotSchedule"), ("topology.kubernetes.io/zone", "ScheduleAnyway")}
    server, nginx = container(spec, "torchserve"), container(spec, "nginx")
    assert server["resources"]["requests"]["cpu"] == "8"  # docs/fleet.md: 8 cores a GPU
    assert server["resources"]["limits"]["nvidia.com/gpu"] == server["resources"]["requests"]["nvidia.com/gpu"] == 1
    ts_wait = int(server["lifecycle"]["preStop"]["exec"]["command"][1])
    nginx_stop = nginx["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert "kill -QUIT 1" in nginx_stop  # graceful: nginx finishes what it holds
    nginx_wait = int(re.match(r"sleep (\d+);", nginx_stop).group(1))
    assert nginx_wait < ts_wait < spec["terminationGracePeriodSeconds"]


# --- the Jobs -----------------------------------------------------------------------------------

def classify_job() -> dict:
    return one("classify/job.yaml", "Job")


def test_job_failure_semantics_follow_the_exit_codes():
    spec = classify_job()["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"] > 1
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["backoffLimitPerIndex"] >= 1 and spec["maxFailedIndexes"] == 0
    assert spec["activeDeadlineSeconds"] > 0
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "FailIndex", "onExitCodes": {"operator": "In", "values": [2]}} in rules
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert len(rules) == 2  # exit 1 (too many failed files) and 3 (unreachable) are retried per index
    assert pod_spec(classify_job())["restartPolicy"] == "Never"


def test_each_run_writes_under_its_own_folder_named_by_the_job_uid():
    spec = pod_spec(classify_job())
    classify = container(spec, "classify")
    args = classify["args"]
    output = args[args.index("--output") + 1]
    assert output.startswith("/data/results/$(JOB_UID)/") and "$(JOB_COMPLETION_INDEX)" in output
    for c in (classify, container(spec, "run-folder")):
        assert env_of(c)["JOB_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.labels['batch.kubernetes.io/controller-uid']"
    assert container(spec, "run-folder")["command"] == ["mkdir", "-p", str(Path(output).parent)]
    assert volumes_of(spec, classify)["/data/results"]["persistentVolumeClaim"]["claimName"] == "classify-data"
    images = next(m for m in classify["volumeMounts"] if m["mountPath"] == "/data/images")
    assert images["readOnly"] is True


def test_job_command_is_one_the_classifier_accepts_for_every_index():
    """The Job's args, with each index Kubernetes substitutes, parse with the real classifier."""
    from client import classify_dir
    from client.shards import parse_shard

    spec = classify_job()["spec"]
    classify = container(pod_spec(classify_job()), "classify")
    assert classify["command"] == ["python", "/app/scripts/classify_dir.py"]
    parser = classify_dir.get_args_parser()
    args = classify["args"]
    assert float(args[args.index("--max-failed-share") + 1]) == 0.05
    outputs = set()
    for index in range(spec["completions"]):
        argv = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)).replace("$(JOB_UID)", "uid-1") for a in args]
        parsed = parser.parse_args(argv)
        assert parsed.fleet == "/fleet/fleet.yaml" and parsed.resume
        assert parse_shard(parsed.shard) == (index, spec["completions"])
        outputs.add(parsed.output)
    assert len(outputs) == spec["completions"]  # no two shards write one file


def test_rollout_job_publishes_then_rolls_out_the_archive_kept_in_git():
    from client import manage

    job = one("rollout/job.yaml", "Job")
    spec = pod_spec(job)
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["podReplacementPolicy"] == "Failed"
    rollout, publish = container(spec, "rollout"), container(spec, "publish")
    for c in (rollout, publish):
        assert env_of(c)["TS_MODELS"]["valueFrom"]["configMapKeyRef"] == {"name": "ts-models", "key": "models"}
    argv = [a.replace("$(TS_MODELS)", "digits-2.0.mar") for a in rollout["args"]]
    parsed = manage.get_args_parser().parse_args(argv)
    assert (parsed.command, str(parsed.fleet), parsed.mar) == ("rollout", "/fleet/fleet.yaml", "digits-2.0.mar")
    assert str(parsed.model_store) == "/app/model_store"
    published = publish_mar.get_args_parser().parse_args(publish["args"])
    assert str(published.store) == str(parsed.model_store)
    # only the publish step writes the store
    for c in containers(spec):
        store = next((m for m in c.get("volumeMounts", []) if m["name"] == "model-store"), None)
        if store:
            assert store.get("readOnly", False) is (c["name"] != "publish"), c["name"]


@pytest.mark.parametrize("manifest,management", [("classify/job.yaml", False), ("rollout/job.yaml", True)])
def test_fleet_generator_args_match_the_statefulset_and_the_mounted_tokens(manifest, management):
    spec = pod_spec(one(manifest, "Job"))
    fleet = container(spec, "fleet")
    assert fleet["command"] == ["python", "/app/deploy/kubernetes/make_fleet.py"]
    args = make_fleet.get_args_parser().parse_args(fleet["args"])
    assert args.replicas is None  # counted from DNS: scaling the StatefulSet needs no other change
    assert args.namespace == "$(POD_NAMESPACE)"
    assert env_of(fleet)["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert (args.statefulset, args.service) == (sts()["metadata"]["name"], sts()["spec"]["serviceName"])
    main = next(c for c in spec["containers"] if any(m["name"] == "fleet" for m in c["volumeMounts"]))
    mounted = volumes_of(spec, main)
    token_dir = str(Path(args.token_file).parent)
    assert mounted[token_dir]["secret"]["secretName"] == "ts-inference-token"
    if management:
        assert mounted[str(Path(args.management_token_file).parent)]["secret"]["secretName"] == "ts-management-token"
    else:
        assert args.management_token_file is None


# --- make_fleet.py ------------------------------------------------------------------------------

def test_fleet_file_lists_every_replica_with_its_token_files():
    text = make_fleet.fleet_yaml(3, "ml", "/t/inference", management_token_file="/t/management")
    assert text.startswith("# fleet.yaml: one entry per TorchServe replica\n")
    replicas = yaml.safe_load(text)["replicas"]
    assert [r["name"] for r in replicas] == ["ts-0", "ts-1", "ts-2"]
    assert replicas[2] == {"name": "ts-2", "inference_url": "http://ts-2.ts.ml.svc.cluster.local:8090",
                           "management_url": "http://ts-2.ts.ml.svc.cluster.local:8091",
                           "token_file": "/t/inference", "management_token_file": "/t/management"}
    assert all("key_file" not in r for r in replicas)
    assert "management_token_file" not in make_fleet.fleet_yaml(1, "ml", "/t/inference")


def test_fleet_replicas_are_counted_from_the_headless_services_dns(tmp_path, capsys):
    records = {"ts.ml.svc.cluster.local": ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]}
    records.update({f"ts-{i}.ts.ml.svc.cluster.local": [f"10.0.0.{i + 1}"] for i in range(4)})
    out = tmp_path / "fleet.yaml"
    argv = ["--namespace", "ml", "--token-file", "/t/inference", "--output", str(out), "--wait", "0"]
    args = make_fleet.get_args_parser().parse_args(argv)
    assert make_fleet.main(args, lookup=lambda host: records.get(host, [])) == 0
    assert len(yaml.safe_load(out.read_text())["replicas"]) == 4
    del records["ts-2.ts.ml.svc.cluster.local"]  # a pod being replaced: wait, then give up with 3
    sleeps = []
    assert make_fleet.main(args, lookup=lambda host: records.get(host, []), sleep=sleeps.append) == 3
    assert "no consistent set" in capsys.readouterr().err


@pytest.mark.parametrize("flags,needle", [
    (["--replicas", "0", "--namespace", "ml", "--token-file", "/t"], "--replicas"),
    (["--replicas", "2", "--namespace", "ML_1", "--token-file", "/t"], "--namespace"),
    (["--replicas", "2", "--namespace", "ml", "--token-file", "token"], "--token-file"),
])
def test_fleet_generator_rejects_bad_flags_in_one_line(flags, needle):
    done = subprocess.run([sys.executable, str(K8S / "make_fleet.py"), *flags], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and needle in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- publish_mar.py -----------------------------------------------------------------------------

def test_publish_copies_under_a_temporary_name_checks_the_hash_and_is_idempotent(tmp_path):
    store, incoming = tmp_path / "store", tmp_path / "incoming"
    store.mkdir(), incoming.mkdir()
    source = incoming / "digits-2.0.mar"
    source.write_bytes(b"PK archive bytes")
    digest = publish_mar.sha256_of(source)
    assert publish_mar.publish(source, store).startswith("published")
    assert (store / source.name).read_bytes() == source.read_bytes()
    assert [p.name for p in store.iterdir()] == [source.name]  # no temporary file left
    source.unlink()
    assert "already published" in publish_mar.publish(source, store, digest)
    source.write_bytes(b"another archive")
    with pytest.raises(ValueError, match="expected"):  # the copy's hash is checked even when replacing
        publish_mar.publish(source, store, "0" * 64, replace=True)
    assert (store / source.name).read_bytes() == b"PK archive bytes"  # the old one untouched
    assert [p.name for p in store.iterdir()] == [source.name]
    for bad, needle in ((incoming / "x.zip", "not a .mar"), (source, "64 lowercase hex")):
        with pytest.raises(ValueError, match=needle):
            publish_mar.publish(bad, store, "xyz" if needle.startswith("64") else None)


def test_publish_refuses_to_replace_an_archive_with_other_bytes_unless_told(tmp_path, capsys):
    """A replica restarting later would serve another model under the same name and version."""
    store, incoming = tmp_path / "store", tmp_path / "incoming"
    store.mkdir(), incoming.mkdir()
    (store / "digits-1.0.mar").write_bytes(b"the model the replicas serve")
    source = incoming / "digits-1.0.mar"
    source.write_bytes(b"a retrained model under the same name")
    args = publish_mar.get_args_parser().parse_args([str(source), str(store)])
    assert publish_mar.main(args) == 2
    err = capsys.readouterr().err
    assert "already published with other bytes" in err and "--replace" in err and err.count("\n") == 1
    assert (store / "digits-1.0.mar").read_bytes() == b"the model the replicas serve"
    args = publish_mar.get_args_parser().parse_args([str(source), str(store), "--replace"])
    assert publish_mar.main(args) == 0
    assert (store / "digits-1.0.mar").read_bytes() == source.read_bytes()
    assert sorted(p.name for p in store.iterdir()) == ["digits-1.0.mar"]


# --- probe.py against a fake TorchServe ---------------------------------------------------------

class FakeTorchServe:
    """/ping, /models and /models/NAME the way TorchServe 0.12 answers them with token auth off."""

    def __init__(self):
        self.health = (200, "Healthy")
        self.models = {"tiny": [{"modelVersion": "1.0", "isDefault": True, "workers": [{"status": "READY"}]}]}

    def answer(self, path: str) -> tuple[int, object]:
        if path == "/ping":
            return self.health[0], {"status": self.health[1]}
        if path == "/models":
            return 200, {"models": [{"modelName": n} for n in self.models]}
        name = path.removeprefix("/models/")
        return (200, self.models[name]) if name in self.models else (404, {"code": 404})


@contextmanager
def serve(fake: FakeTorchServe):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            status, payload = fake.answer(self.path)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_probe_is_ready_only_when_every_model_has_a_ready_worker_and_live_while_loading():
    fake = FakeTorchServe()
    with serve(fake) as url:
        assert probe.probe("ready", url, url, 5) is None
        fake.models["tiny"][0]["workers"] = [{"status": "UNLOADING"}]
        assert "no READY worker" in probe.probe("ready", url, url, 5)
        assert probe.probe("live", url, url, 5) is None
        fake.models.clear()  # "Healthy" with nothing registered: not ready
        assert probe.probe("ready", url, url, 5) == "no model registered"
        fake.health = (500, "Partial Healthy")
        assert "500" in probe.probe("ready", url, url, 5)
        assert probe.probe("live", url, url, 5) is None
    assert "no answer" in probe.probe("live", url, url, 2)  # stopped: nothing listens there any more


# --- nginx with the pods' environment -----------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()),
                    reason="nginx is not installed (make install installs it)")
def test_nginx_container_environment_renders_a_configuration_nginx_accepts(tmp_path):
    """render.sh with the nginx container's own environment (ports moved to free loopback ones,
    mounted paths to temporary copies) writes a config that `nginx -t` accepts."""
    spec = pod_spec(sts())
    nginx = container(spec, "nginx")
    assert nginx["args"] == ["sh", "/etc/ts-nginx/render.sh", "--foreground"]
    mounted = volumes_of(spec, nginx)
    assert mounted["/etc/ts-nginx"]["configMap"]["name"] == "ts-nginx"
    assert mounted["/etc/torchserve"]["configMap"]["name"] == "ts-config"
    generator = next(g for g in kustomization(DEPLOY / "kustomization.yaml")["configMapGenerator"]
                     if g["name"] == "ts-nginx")
    config_dir = tmp_path / "etc-ts-nginx"
    config_dir.mkdir()
    for f in generator["files"]:
        shutil.copy(DEPLOY / f, config_dir / Path(f).name)
    assert (config_dir / "render.sh").is_file()
    mapping = {"/etc/ts-nginx": str(config_dir), "/etc/torchserve": str(tmp_path / "etc-torchserve"),
               "/etc/ts-tokens/inference": str(tmp_path / "inference"),
               "/etc/ts-tokens/management": str(tmp_path / "management"), "/run/nginx": str(tmp_path / "run")}
    for path in list(mapping.values())[1:]:
        Path(path).mkdir()
    shutil.copy(K8S / "config.properties", tmp_path / "etc-torchserve" / "config.properties")
    (tmp_path / "inference" / "token").write_text(secrets.token_hex(24) + "\n")
    (tmp_path / "management" / "token").write_text(secrets.token_hex(24) + "\n")
    env = dict(os.environ)
    for name, item in env_of(nginx).items():
        value = item["value"]
        for mount, local in mapping.items():
            if value.startswith(mount + "/") or value == mount:
                value = local + value[len(mount):]
        if name.endswith("LISTEN"):
            value = f"127.0.0.1:{free_port()}"
        if name.endswith("_LOG"):
            value = str(tmp_path / "run" / f"{name.lower()}.log")
        env[name] = value
    done = subprocess.run(["sh", str(config_dir / "render.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = (tmp_path / "run" / "nginx.conf").read_text()
    assert "client_max_body_size 67108864;" in rendered  # the cluster config's max_request_size
    assert "server 127.0.0.1:8082;" in rendered  # the metrics port is there


# --- the images ---------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines()
            if line.strip()]


def stages() -> dict[str, list[tuple[str, str]]]:
    """The Dockerfile's stages by name, each with its own instructions and those of its base stage."""
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for op, arg in dockerfile_instructions():
        if op == "FROM":
            image, _, name = arg.partition(" AS ")
            current = name.strip()
            out[current] = list(out.get(image.strip(), [])) + [(op, arg)]
        elif current is not None:  # an ARG before the first FROM (BASE) belongs to no stage
            out[current].append((op, arg))
    return out


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            found[name.lower().replace("_", "-")] = version
    return found


def image_packages(stage: str) -> list[str]:
    """The packages a stage installs: the lock its one pip step names (deploy/lock.py)."""
    names = []
    for op, arg in stages()[stage]:
        if op == "RUN" and re.match(r"(--mount\S+\s+)?pip\s+install", arg):
            raise AssertionError(f"{stage}: a pip step other than pip-locked: {arg}")
        if op == "RUN" and "pip-locked" in arg.split():
            words = arg.split()
            lock = words[words.index("pip-locked") + 2]
            assert words[words.index("pip-locked") + 1] == "-r" and lock == f"requirements-{stage}.lock", arg
            names += [line.split("==")[0] for line in (REPO / lock).read_text().splitlines()
                      if line and not line.startswith("#")]
    return names


def test_requirements_are_split_into_runtime_and_test_lists():
    runtime = pins()
    test = (REPO / "requirements-test.txt").read_text()
    assert "pytest" not in runtime and "kubernetes-validate" not in runtime
    assert re.search(r"^pytest==\S+$", test, re.M) and re.search(r"^kubernetes-validate==\S+$", test, re.M)
    install = (REPO / "scripts" / "install.sh").read_text()
    assert "-r requirements.txt" in install and "-r requirements-test.txt" in install


def test_images_are_two_stages_each_installing_only_pinned_packages_it_needs():
    all_stages = stages()
    (op, arg), (op2, base) = dockerfile_instructions()[:2]
    assert op == "ARG" and re.fullmatch(r"BASE=python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", arg)
    assert op2 == "FROM" and base == "${BASE} AS base"
    assert {"client", "server"} <= all_stages.keys()
    for stage in ("client", "server"):  # every line pinned and hashed (tests/test_lock.py: equal to .venv)
        lines = [line for line in (REPO / f"requirements-{stage}.lock").read_text().splitlines()
                 if line and not line.startswith("#")]
        assert lines and all(re.fullmatch(r"\S+==\S+ --hash=sha256:[0-9a-f]{64}", line) for line in lines)
    client = {n.lower() for n in image_packages("client")}
    # scikit-learn is there on purpose: its metrics fill the batch report (client/report.py)
    assert not client & {"torch", "torchvision", "torchserve", "pytest"}
    assert "matplotlib" in client  # classify_dir --class-folders draws the confusion matrix
    server = {n.lower() for n in image_packages("server")}
    assert {"torch", "torchserve", "pyyaml"} <= server
    assert not server & {"matplotlib", "scikit-learn", "pytest", "kubernetes-validate", "torch-model-archiver"}
    for stage in ("client", "server"):
        copied = [arg for op, arg in all_stages[stage] if op == "COPY"]
        assert not any(arg.split()[0] in (".", "./") for arg in copied), f"{stage} copies the whole repository"
        assert not any(a.startswith(("tests", "training", "benchmarks")) for arg in copied for a in arg.split())
    assert any(op == "HEALTHCHECK" and "probe.py" in arg for op, arg in all_stages["server"])


def test_files_the_pods_run_are_in_the_image_they_run():
    copied = {}
    for stage, steps in stages().items():
        files = set()
        for op, arg in steps:
            if op == "COPY":
                *sources, dest = arg.split()
                for s in sources:
                    files |= {str(p.relative_to(REPO)) for p in (REPO / s).rglob("*")} if s.endswith("/") else {s}
        copied[stage] = files
    for name, spec in pod_specs().items():
        for c in containers(spec):
            stage = c["image"].split("@")[0].rsplit("-", 1)[1]
            probes = [c.get(k, {}).get("exec", {}).get("command", []) for k in
                      ("startupProbe", "readinessProbe", "livenessProbe")]
            for word in c.get("command", []) + c.get("args", []) + sum(probes, []):
                if word.startswith("/app/") and word.endswith((".py", ".sh")):
                    assert word[len("/app/"):] in copied[stage], (name, c["name"], word)


def test_client_image_packages_cover_what_the_client_commands_import():
    """Import the Job's commands and list the distributions they load: all in the client image."""
    code = """
import importlib.metadata as md, json, sys
sys.path.insert(0, sys.argv[1])
before = set(sys.modules)  # the interpreter's own start-up (site hooks) is not the client's
import client.classify_dir, client.manage, make_fleet, publish_mar
tops = {m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)
dists = md.packages_distributions()
print(json.dumps(sorted({d for t in tops for d in dists.get(t, [])})))
"""
    done = subprocess.run([sys.executable, "-c", code, str(K8S)], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    import importlib.metadata as md
    loaded = {d.lower().replace("_", "-") for d in json.loads(done.stdout)}
    allowed = {n.lower().replace("_", "-") for n in image_packages("client")}
    frontier = list(allowed)
    while frontier:  # and what those require
        try:
            requires = md.requires(frontier.pop()) or []
        except md.PackageNotFoundError:  # a dependency for another platform (a marker excludes it)
            continue
        for req in requires:
            if "extra ==" in req:
                continue
            name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower().replace("_", "-")
            if name not in allowed:
                allowed.add(name)
                frontier.append(name)
    assert loaded - {"ts-batch-classify"} <= allowed


# --- Checkov ------------------------------------------------------------------------------------

@pytest.mark.parametrize("target,framework", [("deploy/kubernetes", "kubernetes"), ("Dockerfile", "dockerfile")])
def test_checkov_finds_no_failed_check_and_every_skip_is_inline_with_a_reason(target, framework):
    assert CHECKOV.is_file(), f"{CHECKOV} missing: `make install` installs Checkov in .venv-checkov"
    flag = "-d" if (REPO / target).is_dir() else "-f"
    done = subprocess.run([str(CHECKOV), flag, target, "--framework", framework, "--skip-download",
                           "--output", "json"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    report = json.loads(done.stdout)
    report = report[0] if isinstance(report, list) else report
    if "results" not in report:  # --quiet with nothing failed prints only the summary
        summary = report
        skipped = []
    else:
        summary, skipped = report["summary"], report["results"]["skipped_checks"]
        failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
        assert failed == []
    assert summary["failed"] == 0 and summary["parsing_errors"] == 0
    assert summary["passed"] > 0 and summary["resource_count"] > 0
    for check in skipped:
        reason = check["check_result"].get("suppress_comment") or ""
        assert len(reason.strip()) > 20, (check["check_id"], check["resource"])
