"""The handler's metrics, end to end: a real TorchServe (its token authorization off, behind a real
nginx from scripts/front_proxy.sh with its metrics port) classifies the demo's 359 validation digits,
then the bad-image zoo, and a real Prometheus (Debian's package) scrapes it twice: directly and
through nginx. PromQL must then give the exact counts the runs produced."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from client.local_server import free_ports
from core.readiness import pid_alive
from tests.conftest import MODEL, PYTHON, REPO, VERSION, make_server, tiny_store, wait_for
from tests.image_zoo import png_bytes, write_zoo
from tests.test_front_proxy import new_proxy, proxy_base

CLIENT = REPO / "scripts" / "classify_dir.py"
JOBS = ("torchserve", "nginx")
# What the handler counts each refused zoo file as (handler.preprocessing.REFUSALS). The zoo run sends
# every file as it is (--preprocess server, every extension), so that each one reaches the server.
ZOO_REASONS = {"zero_bytes.jpg": "empty", "truncated.jpg": "undecodable", "text.txt": "not_an_image",
               "page.html": "not_an_image", "document.pdf": "not_an_image",
               "huge_40000x40000.png": "too_many_pixels"}


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:  # a core test: make install provides it
        pytest.fail("prometheus not found: run `make install` (it installs Debian's prometheus)")
    return path


class Prometheus:
    """A real Prometheus on a free loopback port, scraping `targets` (job -> host:port) every second."""

    def __init__(self, base: Path, targets: dict[str, str]):
        self.port = free_ports(1)[0]
        config = base / "prometheus.yml"
        jobs = [{"job_name": job, "scrape_interval": "1s", "static_configs": [{"targets": [target]}]}
                for job, target in targets.items()]
        config.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs}))
        self.log = open(base / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={base / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=base)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def query(self, promql: str) -> list[dict]:
        answer = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def by(self, label: str, promql: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(promql)}

    def scraped_since(self, when: float) -> bool:
        """Whether every job has a successful scrape that started after `when` (seconds since the epoch)."""
        # timestamp() of a plain selector is the sample's time (of an expression, the query's)
        last = {r["metric"]["job"]: float(r["value"][1]) for r in self.query("timestamp(up)")}
        up = {r["metric"]["job"]: float(r["value"][1]) for r in self.query("up")}
        return all(last.get(job, 0) > when and up.get(job) == 1 for job in JOBS)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def observed(tmp_path_factory, tiny_run):
    """(server, prometheus): tiny 1.0 on a TorchServe of its own (fresh counters), nginx in front with
    a metrics port, and Prometheus scraping both."""
    prometheus_binary()
    base = tmp_path_factory.mktemp("observed")
    store = tiny_store(base, tiny_run)
    server = make_server(base, store, tiny_run, [f"{MODEL}-{VERSION}.mar"])
    server.extra_env = {"TS_TOKEN_AUTH": "off"}
    with server.running() as srv:
        front_base = proxy_base()
        proxy = new_proxy(front_base, srv, REPO / "config.properties")
        metrics_port = free_ports(1)[0]
        proxy.env.update(PROXY_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
                         PROXY_METRICS_BACKEND=srv.metrics_url)
        prometheus = None
        try:
            started = proxy.run("start")
            assert started.returncode == 0, started.stdout + started.stderr
            prometheus = Prometheus(base, {"torchserve": srv.metrics_url.removeprefix("http://"),
                                           "nginx": f"127.0.0.1:{metrics_port}"})
            assert wait_for(prometheus.ready, 120, 0.5), (base / "prometheus.log").read_text()[-3000:]
            yield srv, prometheus
        finally:
            if prometheus is not None:
                prometheus.close()
            pid = proxy.pid()
            proxy.run("stop")
            if pid and pid_alive(pid):
                os.kill(pid, 9)
            shutil.rmtree(front_base, ignore_errors=True)


@pytest.fixture(scope="module")
def digits_val(tmp_path_factory) -> Path:
    """The demo's validation digits as class folders (scripts/demo.sh's own steps): 359 PNGs."""
    base = tmp_path_factory.mktemp("digits")
    for script, *args in (["sample_digits.py", str(base / "all")],
                          ["make_lists.py", str(base / "all"), "--out", str(base / "lists")],
                          ["list_to_folders.py", str(base / "lists" / "val.list"),
                           "--labels", str(base / "lists" / "labels.json"), "--out", str(base / "val")]):
        result = subprocess.run([str(PYTHON), str(REPO / "scripts" / script), *args], capture_output=True,
                                text=True, timeout=300, cwd=base)
        assert result.returncode == 0, result.stdout + result.stderr
    return base / "val"


def classify(server, directory: Path, output: Path, *extra: str) -> list[dict]:
    result = subprocess.run([str(PYTHON), str(CLIENT), str(directory), "--model", MODEL, "--url",
                             server.inference_url, "--management-url", server.management_url,
                             "--token-file", str(server.key_file), "--output", str(output), *extra],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: the zoo's failed share
    return [json.loads(line) for line in output.read_text().splitlines()]


def settle(server, prometheus: Prometheus) -> None:
    """Wait until TorchServe's counters stop moving (workers send their metric lines as they answer),
    then for a scrape of both jobs after that."""
    def images() -> str:
        text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
        return "\n".join(sorted(line for line in text.splitlines() if line.startswith("classifier_images_total")))

    previous = None
    for _ in range(240):
        current = images()
        if current == previous:
            break
        previous = current
        time.sleep(0.5)
    now = time.time()
    assert wait_for(lambda: prometheus.scraped_since(now), 120, 0.5), prometheus.query("up")


def sum_by_job(metric: str, matchers: str = "") -> str:
    return f'sum by (job) ({metric}{{ModelName="{MODEL}", ModelVersion="{VERSION}"{matchers}}})'


COUNTS = {  # name -> (PromQL, the label its answer is keyed by)
    "ok": (sum_by_job("classifier_images_total", ', Outcome="ok"'), "job"),
    "shortfalls": (sum_by_job("classifier_top1_shortfall_count"), "job"),
    "batch_images": (sum_by_job("classifier_batch_images_sum"), "job"),
    "passes": (sum_by_job("classifier_forward_seconds_count"), "job"),
    "decodes": (sum_by_job("classifier_decode_seconds_count"), "job"),
    "labels": ('sum by (Label) (classifier_answers_total{job="torchserve"})', "Label"),
    **{f"outcomes {job}": (f'sum by (Outcome) (classifier_images_total{{job="{job}"}})', "Outcome")
       for job in JOBS},
}


def counted(prometheus: Prometheus, before: dict | None = None) -> dict[str, dict[str, float]]:
    """COUNTS now, minus `before` (another test of the module may have classified first)."""
    now = {name: prometheus.by(label, promql) for name, (promql, label) in COUNTS.items()}
    if before is None:
        return now
    return {name: {key: value - before[name].get(key, 0) for key, value in values.items()
                   if value - before[name].get(key, 0)} for name, values in now.items()}


def test_prometheus_counts_the_digits_then_the_zoo_by_outcome(observed, digits_val, tmp_path):
    server, prometheus = observed
    settle(server, prometheus)
    before = counted(prometheus)
    rows = classify(server, digits_val, tmp_path / "digits.jsonl")
    assert len(rows) == 359 and all(row["status"] == "ok" for row in rows)
    settle(server, prometheus)

    counts = counted(prometheus, before)
    for name in ("ok", "shortfalls", "batch_images"):  # batch fill: each pass's images add up to 359
        assert counts[name] == {job: 359 for job in JOBS}, name
    assert set(counts["passes"]) == set(JOBS) and 45 <= counts["passes"]["torchserve"] <= 359  # batchSize 8
    assert counts["decodes"] == counts["passes"]
    assert counts["labels"] == dict(Counter(row["label"] for row in rows))
    assert prometheus.value(sum_by_job("classifier_forward_seconds_sum").replace("by (job) ", "")) > 0
    served = prometheus.query('classifier_precision{job="torchserve"} == 1')
    assert [(r["metric"]["Precision"], r["metric"]["Format"]) for r in served] == [("fp32", "torchscript")]
    median = prometheus.value('1 - histogram_quantile(0.5, sum by (le) '
                              '(classifier_top1_shortfall_bucket{job="torchserve"}))')
    assert median is not None and 0 < median <= 1

    zoo = write_zoo(tmp_path / "zoo")
    extensions = ",".join(sorted({Path(name).suffix for name in zoo}))
    zoo_rows = classify(server, tmp_path / "zoo", tmp_path / "zoo.jsonl", "--preprocess", "server",
                        "--extensions", extensions)
    assert len(zoo_rows) == len(zoo) and all(row["replica"] for row in zoo_rows)  # every file was sent
    refused = {Path(row["path"]).name for row in zoo_rows if row["status"] != "ok"}
    assert refused == set(ZOO_REASONS)
    expected = Counter(ZOO_REASONS.values())
    expected["ok"] = 359 + len(zoo) - len(refused)
    settle(server, prometheus)
    counts = counted(prometheus, before)
    for job in JOBS:
        assert counts[f"outcomes {job}"] == dict(expected), job


def test_metric_labels_carry_no_file_name_or_client_data(observed, tmp_path):
    server, prometheus = observed
    hostile = tmp_path / "in"
    hostile.mkdir()
    for name in ("Outcome=ok,Label=x.png", "secret-customer-4711.png", "ModelName:evil|#.png"):
        (hostile / name).write_bytes(png_bytes())
    (hostile / "customer-4711-notes.jpg").write_bytes(b"not an image, from customer 4711")
    rows = classify(server, hostile, tmp_path / "out.jsonl", "--preprocess", "server")
    assert len(rows) == 4
    settle(server, prometheus)
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    assert "classifier_images_total" in text  # the handler's series are there
    for forbidden in ("4711", "evil", ".png", ".jpg", str(tmp_path)):
        assert forbidden not in text
    names = {r["__name__"] for r in requests.get(f"{prometheus.url}/api/v1/series",
                                                   params={"match[]": '{__name__=~"classifier_.*"}'},
                                                   timeout=10).json()["data"]}
    labels = {key for r in prometheus.query('{__name__=~"classifier_.*"}') for key in r["metric"]}
    assert labels <= {"__name__", "ModelName", "Level", "ModelVersion", "Hostname", "Outcome", "Label",
                      "Precision", "Format", "le", "job", "instance"}, labels
    assert {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in names} <= {
        "classifier_images_total", "classifier_answers_total", "classifier_precision",
        "classifier_batch_seconds", "classifier_decode_seconds", "classifier_forward_seconds",
        "classifier_batch_images", "classifier_top1_shortfall"}
