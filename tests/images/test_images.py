"""The deployment run as a whole: both images, two replica pods, the classify and rollout Jobs from
their manifests under the NetworkPolicies, a token rotation and a killed TorchServe during runs.
Run by `make test-images` (tests/images/conftest.py builds and starts everything)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.images import kube
from tests.images.conftest import REPO, rows, write_digits

pytestmark = pytest.mark.images
SHARDS = 4
# The runs that must outlast a fault: one request in flight a shard (the Job's other flags as they are).
SLOW = ["--concurrency", "1"]


def test_what_podman_cannot_apply_is_said(rendered):
    sts = kube.one(rendered["deploy"], "StatefulSet")
    said = kube.not_applied(sts["spec"]["template"]["spec"])
    print("\nimages: not applied by podman, and how the tests stand in:\n  " + "\n  ".join(said))
    assert any("startupProbe" in line for line in said) and any("fsGroup" in line for line in said)


def test_client_image_imports_every_module_its_commands_reach(built, rendered, tmp_path):
    """Every command the Jobs run (and merge_shards.py, the documented merge), every import in every
    module they reach, function-level ones included, imported inside the client image."""
    commands = {w for name in ("classify", "rollout") for job in rendered[name] if job["kind"] == "Job"
                for c in job["spec"]["template"]["spec"].get("initContainers", []) + job["spec"]["template"]["spec"]["containers"]
                for w in c.get("command", []) + c.get("args", []) if w.startswith("/app/") and w.endswith(".py")}
    commands.add("/app/scripts/merge_shards.py")
    assert {"/app/scripts/classify_dir.py", "/app/scripts/manage.py", "/app/deploy/kubernetes/make_fleet.py",
            "/app/deploy/kubernetes/publish_mar.py"} <= commands
    done = subprocess.run(["podman", "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--user", "10001:10001",
                           "--network", "none", "-v", f"{REPO / 'tests/images/import_all.py'}:/check/import_all.py:ro",
                           built["ts-batch-classify-client"], "/check/import_all.py", *sorted(commands)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # The one import allowed to fail: torch, in handler/preprocessing.py's server-side tensor
    # functions (the client sends uint8 pixels and never calls them; the Job runs below prove it).
    server_only = {"torch": ["/app/handler/preprocessing.py"]}
    assert {n: report["importers"][n] for n in report["failed"]} == server_only, report["failed"]
    assert "matplotlib.pyplot" in report["imported"] or "matplotlib" in report["imported"]
    assert "/app/client/results.py" in report["files"]


def test_server_image_scales_a_worker_down_and_unregisters_a_version(cluster, session):
    """TorchServe stops a worker with `kill -9`: inside the server image that must work (procps)."""
    name, ip = sorted(cluster.replicas.items())[0]
    token = (cluster.secret("ts-management-token") / "token").read_text().split()[0]
    auth = {"Authorization": f"Bearer {token}"}
    url = f"http://{ip}:8091"
    up = session.put(f"{url}/models/digits/1.0", params={"min_worker": 2, "synchronous": "true"}, headers=auth,
                     timeout=300)
    assert up.status_code == 200, up.text
    down = session.put(f"{url}/models/digits/1.0", params={"min_worker": 1, "synchronous": "true"}, headers=auth,
                       timeout=300)
    assert down.status_code == 200, down.text
    workers = session.get(f"{url}/models/digits/1.0", headers=auth, timeout=30).json()[0]["workers"]
    assert len(workers) == 1
    # A second version registered from the store, then unregistered: the worker is killed the same way.
    registered = session.post(f"{url}/models", params={"url": "digits-1.0.mar", "model_name": "spare",
                                                       "initial_workers": 1, "synchronous": "true"},
                              headers=auth, timeout=300)
    assert registered.status_code == 200, registered.text
    gone = session.delete(f"{url}/models/spare", headers=auth, timeout=300)
    assert gone.status_code == 200, gone.text
    assert cluster.exec(f"{name}-torchserve", "test", "-x", "/usr/bin/kill").returncode == 0


def test_a_pt2_package_loads_in_the_server_image_without_a_compiler_from_a_read_only_store(built, tmp_path):
    """The worker's side of an AOTInductor package: no compiler on the image, root and store read-only,
    only the pod's /tmp writable; loaded with the handler's checks, batches of 1 and 3 answered."""
    from handler import aot
    from tests.tiny_model import TinyNet
    from training import aot as export_aot
    store = tmp_path / "store"
    package = export_aot.package_path(store, "fp32")
    export_aot.export_pt2(TinyNet(3), package, "fp32", (8, 8), 8, "0" * 64)
    store.chmod(0o755)
    code = ("import shutil, torch; from handler import aot; "
            "assert not any(shutil.which(c) for c in ('gcc', 'cc', 'g++', 'c++', 'clang')), 'a compiler'; "
            f"m, meta = aot.load_package('/store/{package.name}', torch.device('cpu')); "
            "print(meta['march'], [tuple(m(torch.zeros(n, 3, 8, 8)).shape) for n in (1, 3)])")
    done = subprocess.run(["podman", "run", "--rm", "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp",
                           "--user", "10001:10001", "--cap-drop", "ALL", "--network", "none", "--no-healthcheck",
                           "-v", f"{store}:/store:ro", "--entrypoint", '["python", "-c"]',
                           built["ts-batch-classify-server"], code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"{aot.read_meta(package)['march']} [(1, 3), (3, 3)]", done.stdout


def classify_job(cluster, rendered, **kw):
    return cluster.run_job(kube.one(rendered["classify"], "Job"), **kw)


def merge_in_client_image(cluster, built, run_uid: str, shards: int, output: str) -> subprocess.CompletedProcess:
    """merge_shards.py from the client image over the run's shard files, on the data volume."""
    data = cluster.claim("classify-data")
    inputs = [f"/data/results/{run_uid}/shard-{k}-of-{shards}.jsonl" for k in range(shards)]
    return subprocess.run(["podman", "run", "--rm", "--read-only", "--user", "10001:10001", "--network", "none",
                           "-v", f"{data}:/data:rw", built["ts-batch-classify-client"],
                           "/app/scripts/merge_shards.py", f"/data/results/{run_uid}/{output}", *inputs,
                           "--dir", "/data/images", "--shards", str(shards)],
                          capture_output=True, text=True, timeout=300)


def host_rows(cluster, tmp_path: Path, images: Path) -> dict[str, dict]:
    """The host's classify_dir.py over the same replicas (their addresses) and the same token."""
    output = tmp_path / "host.jsonl"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "classify_dir.py"), str(images),
                           "--fleet", str(cluster.fleet_for_host(tmp_path / "fleet.yaml")), "--output", str(output)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return rows(output)


def assert_same_rows(ours: dict[str, dict], theirs: dict[str, dict]) -> None:
    assert ours.keys() == theirs.keys()
    for path, row in ours.items():
        other = theirs[path]
        for key in ("status", "label", "error", "http_status", "model_version"):
            assert row.get(key) == other.get(key), (path, key, row.get(key), other.get(key))
        for mine, its in zip(row.get("topk") or [], other.get("topk") or []):
            assert mine["label"] == its["label"] and abs(mine["probability"] - its["probability"]) <= 1e-6, path


def test_classify_job_four_shards_under_its_policy_give_the_hosts_rows(cluster, built, rendered, tmp_path):
    started = time.monotonic()
    run = classify_job(cluster, rendered)
    assert run.codes == [0] * SHARDS, "\n".join(run.logs)
    merged = merge_in_client_image(cluster, built, run.uid, SHARDS, "merged.jsonl")
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert "every file under /data/images exactly once" in merged.stdout
    ours = rows(cluster.claim("classify-data") / "results" / run.uid / "merged.jsonl")
    assert len(ours) == 359 and {r["status"] for r in ours.values()} == {"ok"}
    assert {r["model_version"] for r in ours.values()} == {"1.0"}
    assert {r["replica"].split(".")[0] for r in ours.values()} == set(cluster.replicas)  # both replicas used
    assert_same_rows(ours, host_rows(cluster, tmp_path, cluster.claim("classify-data") / "images"))
    print(f"\nimages: classify Job, {SHARDS} shards + merge: 359 rows in {time.monotonic() - started:.0f} s")


def test_class_folders_work_in_the_client_image(cluster, rendered):
    """The Job's pod with --class-folders added (the digits lie in class folders): rows, accuracy and
    the confusion matrix drawn by matplotlib, exit 0."""
    job = json.loads(json.dumps(kube.one(rendered["classify"], "Job")))
    job["spec"]["completions"] = job["spec"]["parallelism"] = 1
    job["spec"]["template"]["spec"]["containers"][0]["args"] = [
        a.replace("/4", "/1") for a in job["spec"]["template"]["spec"]["containers"][0]["args"]]
    run = cluster.run_job(job, extra_args=["--class-folders"], name="classify-folders")
    assert run.codes == [0], run.logs[0]
    assert "accuracy" in run.logs[0].lower()
    results = cluster.claim("classify-data") / "results" / run.uid
    assert any(p.suffix == ".png" and p.stat().st_size > 1000 for p in results.iterdir()), sorted(results.iterdir())


def connects(cluster, pod_name: str, ip: str, port: int) -> bool:
    """From inside `pod_name` (its network namespace): does a TCP connection to ip:port open?"""
    code = f"import socket; socket.create_connection(('{ip}', {port}), timeout=3).close()"
    done = subprocess.run(["podman", "run", "--rm", "--pod", pod_name, "--pull", "never", "--user", "10001:10001",
                           cluster.images["ts-batch-classify-client"], "-c", code],
                          capture_output=True, text=True, timeout=60)
    return done.returncode == 0


def test_the_job_network_is_what_the_policies_allow_and_nothing_more(cluster):
    """Pods labelled as the classify Job, the rollout Job and an unlisted workload, on the same
    bridge: each reaches exactly the replica ports its policy names, and not the host; with the
    rules taken away every one of those connections opens (so the rules are what refuses them)."""
    replica_ip = sorted(cluster.replicas.values())[0]
    host = socket.socket()
    host.bind((cluster.gateway, 0))  # a service on the host, beyond the pods
    host.listen(16)
    host_port = host.getsockname()[1]
    expect = {"classify": {8090: True, 8091: True, 8092: False},
              "rollout": {8090: True, 8091: True, 8092: False},
              "someone-else": {8090: False, 8091: False, 8092: False}}
    try:
        for app, ports in expect.items():
            pod = kube.Pod(name=f"probe-{app}", labels={"app.kubernetes.io/name": app}, spec={"volumes": []},
                           namespace=cluster.namespace)
            cluster.create_pod(pod)
            try:
                got = {port: connects(cluster, pod.name, replica_ip, port) for port in ports}
                assert got == ports, app
                assert not connects(cluster, pod.name, cluster.gateway, host_port), app
                subprocess.run(["nft", "delete", "table", "bridge", cluster.table], check=True)
                assert all(connects(cluster, pod.name, replica_ip, port) for port in ports), app
                assert connects(cluster, pod.name, cluster.gateway, host_port), app
            finally:
                cluster.remove_pod(pod.name)
                cluster.apply_policies()
    finally:
        host.close()


def big_image_set(cluster, count: int) -> None:
    """More images in the data volume's images/ for the runs that must outlast a fault."""
    images = cluster.claim("classify-data") / "images"
    write_digits(images, count, start=10000)
    from tests.images.conftest import group_writable
    group_writable(images)


def nginx_statuses(cluster, since: str) -> list[int]:
    """Every status nginx logged since `since` in both replicas (its access log is the container's stdout)."""
    out = []
    for name in cluster.replicas:
        log = subprocess.run(["podman", "logs", "--since", since, f"{name}-nginx"], capture_output=True, text=True,
                             timeout=60).stdout
        out += [int(line.split('" ')[1].split()[0]) for line in log.splitlines() if '" ' in line and "[" in line]
    return out


def test_token_rotation_as_documented_refuses_nothing_during_a_classify_run(cluster, rendered):
    """docs/security.md's steps, in the pods: the Secret's file rewritten (as the kubelet does) and
    `render.sh --reload` run in each replica's nginx, while the 4-shard Job runs. Each step is taken
    with the Job held still (its requests in flight kept), so that it falls within the run on any
    machine, and the next step waits until the run has gone on under this one."""
    big_image_set(cluster, 2400)
    old = (cluster.secret("ts-inference-token") / "token").read_text().split()[0]
    new = "r" * 20 + uuid.uuid4().hex
    since = str(int(time.time()) - 1)
    run = classify_job(cluster, rendered, wait=False, extra_args=SLOW)
    try:
        assert wait_for(lambda: rows_written(cluster, run.uid) > 0, 300)
        for text in (f"{old}\n{new}\n", f"{new}\n{old}\n", f"{new}\n"):
            with run.held():
                cluster.write_token("ts-inference-token", text)
                for name in cluster.replicas:
                    done = cluster.exec(f"{name}-nginx", "sh", "/etc/ts-nginx/render.sh", "--reload")
                    assert done.returncode == 0, done.stderr
                before = rows_written(cluster, run.uid)
            wait_for(lambda: rows_written(cluster, run.uid) >= before + 2 * SHARDS or not run.running(), 300)
            assert rows_written(cluster, run.uid) >= before + 2 * SHARDS, "the run did not go on under this step"
    finally:
        run.wait()
    assert run.codes == [0] * SHARDS, "\n".join(run.logs)
    statuses = nginx_statuses(cluster, since)
    assert statuses and 401 not in statuses and 403 not in statuses, sorted(set(statuses))
    done = rows_of_run(cluster, run.uid)
    assert len(done) == 359 + 2400 and {r["status"] for r in done.values()} == {"ok"}


def rows_written(cluster, uid: str) -> int:
    return sum(len(s.read_text().splitlines())
               for s in (cluster.claim("classify-data") / "results" / uid).glob("shard-*"))


def rows_of_run(cluster, uid: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for shard in sorted((cluster.claim("classify-data") / "results" / uid).glob("shard-*.jsonl")):
        part = rows(shard)
        assert not part.keys() & out.keys(), "a file in two shards"
        out.update(part)
    return out


def test_a_torchserve_container_killed_mid_run_loses_no_file(cluster, rendered):
    """kill -9 of one replica's TorchServe while the Job runs: nginx answers 502, the client moves
    the files, the container restarts (restartPolicy Always); every file once, all ok, exit 0."""
    images = cluster.claim("classify-data") / "images"
    total = sum(1 for p in images.rglob("*.png"))
    run = classify_job(cluster, rendered, wait=False, extra_args=SLOW)
    victim = sorted(cluster.replicas)[1]
    try:
        assert wait_for(lambda: rows_written(cluster, run.uid) > 200, 300)
        # From outside, as the kernel's OOM killer or a crash would: `podman kill` is a user's stop,
        # which podman's restart policy (like the kubelet's for a deleted pod) does not undo. The Job
        # is held still meanwhile, so that the kill falls within the run on any machine.
        with run.held():
            pid = int(subprocess.run(["podman", "inspect", "--format", "{{.State.Pid}}", f"{victim}-torchserve"],
                                     check=True, capture_output=True, text=True).stdout)
            os.kill(pid, signal.SIGKILL)
    finally:
        run.wait()
    assert run.codes == [0] * SHARDS, "\n".join(run.logs)
    done = rows_of_run(cluster, run.uid)
    assert len(done) == total and {r["status"] for r in done.values()} == {"ok"}
    assert wait_for(lambda: cluster.replica_ready(victim), 900, interval=2)  # restarted, ready again


def test_rollout_job_rolls_both_replicas_from_1_0_to_1_1(cluster, rendered, session):
    """The rollout Job after models.env names digits-1.1.mar (the documented step, here in the
    rendered ConfigMap): publish from incoming/, register, smoke test, switch, retire 1.0 on both."""
    job = kube.one(rendered["rollout"], "Job")
    models = next(n for n in cluster.maps if n.startswith("ts-models"))
    cluster.maps[models] = {"models": "digits-1.1.mar"}
    run = cluster.run_job(job)
    assert run.codes == [0], run.logs[0]
    assert (cluster.claim("ts-model-store") / "digits-1.1.mar").is_file()
    token = (cluster.secret("ts-management-token") / "token").read_text().split()[0]
    for name, ip in cluster.replicas.items():
        versions = session.get(f"http://{ip}:8091/models/digits/all", headers={"Authorization": f"Bearer {token}"},
                               timeout=30).json()
        assert [v["modelVersion"] for v in versions] == ["1.1"], (name, versions)
