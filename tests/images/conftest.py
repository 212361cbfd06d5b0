"""`make test-images`: both images built, and the pods and Jobs of deploy/ run with podman as the
rendered manifests declare them (tests/images/kube.py), under nftables rules made from the
NetworkPolicies. One session: two replica pods (the StatefulSet's template as ts-0 and ts-1), the
Jobs run against them, everything removed at the end (pods, network, rules, folders)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import archive, wait_for
from tests.images import kube
from tests.tiny_model import make_tiny_run

REPO = kube.REPO
IMAGES_SH = REPO / "scripts" / "images.sh"
APP_UID = 10001
REPLICAS = 2  # the manifest asks for 3 (one a GPU node); two show a fleet on this machine's 2 cores
DIGITS = [str(d) for d in range(10)]
NGINX_PORTS = [8090, 8091, 8092]
SESSION_LABEL = "ts-batch-classify.test-session"  # the pid of the pytest that made the pod


def remove_leftovers() -> None:
    """Pods, networks and rules an earlier session left behind when it was killed (its pid gone):
    the pods keep the manifests' names (ts-0, ...), which a new session needs."""
    from core.readiness import pid_alive
    listed = podman("pod", "ps", "--filter", f"label={SESSION_LABEL}", "--format", "{{.Name}} {{.Labels}}",
                    check=False).stdout
    for line in listed.splitlines():
        name, labels = line.split(" ", 1)
        found = re.search(re.escape(SESSION_LABEL) + r":(\d+)", labels)
        if found and not pid_alive(int(found.group(1))):
            podman("pod", "rm", "-f", "-t", "0", name, check=False)
    for network in podman("network", "ls", "--format", "{{.Name}}", check=False).stdout.split():
        if network.startswith("tsbc-") and network[5:].isdigit() and not pid_alive(int(network[5:])):
            podman("network", "rm", "-f", network, check=False)
            subprocess.run(["nft", "delete", "table", "bridge", f"tsbc_{network[5:]}"], capture_output=True)


def podman(*args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ...: exit {done.returncode}\n{done.stderr[-3000:]}")
    return done


def write_digits(folder: Path, count: int, start: int = 0) -> list[str]:
    """`count` of scikit-learn's handwritten digits as PNGs in class folders (real data, no download)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    paths = []
    for i in range(start, start + count):
        k = i % len(digits.images)
        pixels = (digits.images[k] * (255 / 16)).round().astype(np.uint8)
        path = folder / str(digits.target[k]) / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").resize((32, 32)).convert("RGB").save(path)
        paths.append(path.relative_to(folder).as_posix())
    return paths


def group_writable(path: Path) -> Path:
    """What fsGroup does to a volume: group APP_UID, group-writable, setgid folders."""
    path.mkdir(parents=True, exist_ok=True)
    for p in [path, *path.rglob("*")]:
        os.chown(p, -1, APP_UID)
        p.chmod(0o2775 if p.is_dir() else 0o664)
    return path


@dataclass
class Cluster:
    """The pods of one session on one podman network, and the folders that stand in for volumes."""
    root: Path
    network: str
    gateway: str
    images: dict[str, str]
    maps: dict[str, dict[str, str]]
    policies: list[dict]
    namespace: str
    replicas: dict[str, str] = field(default_factory=dict)  # pod name -> IP
    pods: dict[str, tuple[dict, str]] = field(default_factory=dict)  # every pod: labels, IP
    table: str = field(default_factory=lambda: f"tsbc_{os.getpid()}")

    # --- volumes ---------------------------------------------------------------------------------
    def claim(self, name: str) -> Path:
        return self.root / "claims" / name

    def secret(self, name: str) -> Path:
        return self.root / "secrets" / name

    def write_token(self, secret: str, text: str) -> None:
        """A Secret's `token`, replaced in one rename as the kubelet swaps a Secret volume's files."""
        folder = self.secret(secret)
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
        staged = folder / ".token.new"
        staged.write_text(text)
        os.chown(staged, 0, APP_UID)
        staged.chmod(0o440)  # defaultMode 0440, readable through the pods' group
        staged.replace(folder / "token")

    def volumes_for(self, pod: kube.Pod) -> dict[str, Path]:
        out = {}
        for volume in pod.spec.get("volumes", []):
            name = volume["name"]
            if "configMap" in volume:
                folder = self.root / "configmaps" / volume["configMap"]["name"]
                if not folder.exists():
                    folder.mkdir(parents=True)
                    for key, value in self.maps[volume["configMap"]["name"]].items():
                        (folder / key).write_text(value)
                        (folder / key).chmod(0o644)
                out[name] = folder
            elif "secret" in volume:
                out[name] = self.secret(volume["secret"]["secretName"])
            elif "persistentVolumeClaim" in volume:
                out[name] = self.claim(volume["persistentVolumeClaim"]["claimName"])
            elif "emptyDir" in volume:
                folder = self.root / "pods" / pod.name / name
                folder.mkdir(parents=True, exist_ok=True)
                folder.chmod(0o777)  # an emptyDir is world-writable
                out[name] = folder
            else:
                raise AssertionError(f"{pod.name}: volume {name} of a kind this check does not run")
        return out

    # --- pods ------------------------------------------------------------------------------------
    def create_pod(self, pod: kube.Pod) -> str:
        """The pod's network namespace (its infra container) on the network; its IP. The policy
        rules are applied for it before any of its containers runs."""
        pod.volumes = self.volumes_for(pod)
        args = ["pod", "create", "--name", pod.name, "--network", self.network, "--hostname", pod.name]
        for host, ip in pod.hosts:
            args += ["--add-host", f"{host}:{ip}"]
        for key, value in {**pod.labels, SESSION_LABEL: str(os.getpid())}.items():
            args += ["--label", f"{key}={value}"]
        podman(*args)
        podman("pod", "start", pod.name)
        infra = podman("pod", "inspect", pod.name, "--format", "{{.InfraContainerID}}").stdout.strip()
        ip = podman("inspect", infra, "--format",
                    f"{{{{(index .NetworkSettings.Networks \"{self.network}\").IPAddress}}}}").stdout.strip()
        self.pods[pod.name] = (pod.labels, ip)
        self.apply_policies()
        return ip

    def apply_policies(self) -> None:
        script = kube.policy_rules(self.table, self.policies, self.pods, NGINX_PORTS, self.gateway)
        subprocess.run(["nft", "delete", "table", "bridge", self.table], capture_output=True)
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, capture_output=True)

    def start_containers(self, pod: kube.Pod, restart: str) -> None:
        for init in pod.containers("initContainers"):
            done = subprocess.run(kube.podman_run(pod, init, self.maps, self.images, "no", detach=False),
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{pod.name}: init container {init['name']} exit {done.returncode}:\n" \
                                         f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
        for container in pod.containers():
            subprocess.run(kube.podman_run(pod, container, self.maps, self.images, restart), check=True,
                           capture_output=True, text=True, timeout=600)

    def remove_pod(self, name: str) -> None:
        podman("pod", "rm", "-f", "-t", "10", name, check=False)
        self.pods.pop(name, None)

    def exec(self, container: str, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return podman("exec", container, *command, check=False, timeout=timeout)

    def replica_ready(self, name: str) -> bool:
        """The StatefulSet's startup/readiness probes, run as the kubelet would: probe.py ready in the
        torchserve container, a TCP connect to nginx's inference port."""
        if self.exec(f"{name}-torchserve", "python", "/app/deploy/kubernetes/probe.py", "ready").returncode != 0:
            return False
        try:
            socket.create_connection((self.replicas[name], 8090), timeout=2).close()
            return True
        except OSError:
            return False

    def fleet_for_host(self, path: Path) -> Path:
        """The same replicas for a client on this machine: the pods' addresses, the same token file."""
        from client.fleet import write_fleet
        return write_fleet(path, [{"name": f"{n}.ts", "inference_url": f"http://{ip}:8090",
                                   "management_url": f"http://{ip}:8091",
                                   "token_file": self.secret("ts-inference-token") / "token",
                                   "management_token_file": self.secret("ts-management-token") / "token"}
                                  for n, ip in sorted(self.replicas.items())])

    def service_hosts(self) -> list[tuple[str, str]]:
        """The headless Service's DNS records (make_fleet.py counts the replicas from them)."""
        domain = f"ts.{self.namespace}.svc.cluster.local"
        return [(domain, ip) for _, ip in sorted(self.replicas.items())] + \
               [(f"{n}.{domain}", ip) for n, ip in sorted(self.replicas.items())]

    def run_job(self, job: dict, *, extra_args: list[str] | None = None, name: str | None = None,
                wait: bool = True) -> "JobRun":
        """A Job as its controller runs it: one pod per index (Indexed) or one pod, all at once
        (parallelism = completions here), each with the controller-uid label and its index."""
        spec = job["spec"]
        uid = str(uuid.uuid4())
        indexed = spec.get("completionMode") == "Indexed"
        count = spec.get("completions", 1)
        template = json.loads(json.dumps(job["spec"]["template"]))
        if extra_args:
            template["spec"]["containers"][0]["args"] = template["spec"]["containers"][0]["args"] + extra_args
        labels = {**template["metadata"]["labels"], "batch.kubernetes.io/controller-uid": uid}
        pods = []
        for index in range(count):
            pod = kube.Pod(name=f"{name or job['metadata']['name']}-{index}", labels=labels,
                           spec=template["spec"], namespace=job["metadata"]["namespace"],
                           controller_env={"JOB_COMPLETION_INDEX": str(index)} if indexed else {},
                           hosts=self.service_hosts())
            self.create_pod(pod)
            pods.append(pod)
        for pod in pods:
            self.start_containers(pod, restart="no")
        run = JobRun(self, uid, pods)
        if wait:
            run.wait()
        return run


@dataclass
class JobRun:
    cluster: Cluster
    uid: str
    pods: list[kube.Pod]
    codes: list[int] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    def main_containers(self) -> list[str]:
        return [f"{p.name}-{p.containers()[0]['name']}" for p in self.pods]

    def running(self) -> bool:
        """Some shard's container is running or paused (not yet exited)."""
        return any(podman("inspect", c, "--format", "{{.State.Status}}", check=False).stdout.strip()
                   in ("running", "paused") for c in self.main_containers())

    @contextmanager
    def held(self):
        """The Job's shard containers frozen (podman pause: the cgroup freezer) for the block's time,
        their connections and requests in flight kept: a fault applied inside falls within the run
        however fast this machine classifies. Asserts that the run had not ended when frozen."""
        paused = [c for c in self.main_containers() if podman("pause", c, check=False).returncode == 0]
        try:
            assert paused, "the run ended before the fault: every shard's container had exited"
            yield
        finally:
            for container in paused:
                podman("unpause", container)

    def wait(self, timeout: float = 1800) -> "JobRun":
        for container in self.main_containers():
            done = podman("wait", container, timeout=timeout)
            self.codes.append(int(done.stdout.strip().splitlines()[-1]))
            self.logs.append(podman("logs", container, check=False).stdout + podman("logs", container,
                                                                                    check=False).stderr)
        for pod in self.pods:
            self.cluster.remove_pod(pod.name)
        return self


def rows(path: Path) -> dict[str, dict]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        assert row["path"] not in out, f"{row['path']} twice in {path}"
        out[row["path"]] = row
    return out


@pytest.fixture(scope="session")
def built() -> dict[str, str]:
    """Both images, built by scripts/images.sh (a second run reuses podman's layer cache)."""
    # Idempotent: installs only what is missing (scripts/images.sh setup lists what it checks).
    setup = subprocess.run(["bash", str(IMAGES_SH), "setup"], capture_output=True, text=True, timeout=900)
    assert setup.returncode == 0, setup.stderr
    env_line = subprocess.run(["bash", str(IMAGES_SH), "env"], capture_output=True, text=True, check=True).stdout
    env = dict(word.split("=", 1) for word in env_line.split()[1:])
    os.environ["CONTAINERS_CONF"] = env["CONTAINERS_CONF"]
    started = time.monotonic()
    done = subprocess.run(["bash", str(IMAGES_SH), "build"], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, f"scripts/images.sh build failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    storage = podman("info", "--format", "{{.Store.GraphRoot}}").stdout.strip()
    free = shutil.disk_usage(storage).free
    print(f"\n{done.stderr.strip()}\nimages: both ready in {time.monotonic() - started:.0f} s; "
          f"{free / 1e9:.0f} GB free under podman's storage {storage}")
    return {"ts-batch-classify-server": env["SERVER_IMAGE"], "ts-batch-classify-client": env["CLIENT_IMAGE"]}


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    return {name: kube.render(path) for name, path in
            (("deploy", "deploy"), ("classify", "deploy/kubernetes/classify"), ("rollout", "deploy/kubernetes/rollout"))}


@pytest.fixture(scope="session")
def cluster(built, rendered, tmp_path_factory) -> Cluster:
    """Two replica pods of the StatefulSet, ready, with digits 1.0 served and 1.1 waiting in incoming/."""
    remove_leftovers()
    root = Path(tempfile.mkdtemp(prefix="ts-images-"))  # under /tmp: the containers' users reach it
    root.chmod(0o755)
    network = f"tsbc-{os.getpid()}"
    podman("network", "create", network)
    gateway = json.loads(podman("network", "inspect", network).stdout)[0]["subnets"][0]["gateway"]
    deploy = rendered["deploy"]
    sts = kube.one(deploy, "StatefulSet")
    namespace = sts["metadata"]["namespace"]
    maps = kube.configmaps(deploy + rendered["rollout"])
    policies = [d for d in deploy if d["kind"] == "NetworkPolicy"]
    c = Cluster(root, network, gateway, built, maps, policies, namespace)
    try:
        # The two Secrets (created by hand on a cluster: docs/kubernetes.md), the claims' contents.
        c.write_token("ts-inference-token", "i" * 20 + uuid.uuid4().hex + "\n")
        c.write_token("ts-management-token", "m" * 20 + uuid.uuid4().hex + "\n")
        run = make_tiny_run(tmp_path_factory.mktemp("run"), num_classes=10, image_size=(16, 16), labels=DIGITS)
        store = group_writable(c.claim("ts-model-store"))
        data = c.claim("classify-data")
        models = maps[next(n for n in maps if n.startswith("ts-models"))]["models"]
        name, version = models.removesuffix(".mar").rsplit("-", 1)
        archive(run, store, name, version)
        archive(run, data / "incoming", name, "1.1")
        write_digits(data / "images", 359)
        write_digits(data / "smoke", 30, start=1000)
        (data / "results").mkdir()
        group_writable(data)
        group_writable(store)
        for i in range(REPLICAS):
            pod = kube.Pod(name=f"{sts['metadata']['name']}-{i}", labels=sts["spec"]["template"]["metadata"]["labels"],
                           spec=sts["spec"]["template"]["spec"], namespace=namespace)
            c.replicas[pod.name] = c.create_pod(pod)
            c.start_containers(pod, restart=sts["spec"]["template"]["spec"].get("restartPolicy", "always").lower())
        started = time.monotonic()
        # No deadline a busy machine could miss: the manifest's own startup budget (15 minutes).
        assert wait_for(lambda: all(c.replica_ready(n) for n in c.replicas), 900, interval=2), \
            "\n".join(podman("logs", "--tail", "30", f"{n}-torchserve", check=False).stderr for n in c.replicas)
        print(f"images: {REPLICAS} replica pods ready in {time.monotonic() - started:.0f} s")
        yield c
    finally:
        for name in list(c.pods):
            c.remove_pod(name)
        subprocess.run(["nft", "delete", "table", "bridge", c.table], capture_output=True)
        podman("network", "rm", "-f", network, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    return s
