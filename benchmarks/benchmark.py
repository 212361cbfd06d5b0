"""Throughput of the served path beside the in-process limit and TorchServe's stock handler.

One run, one model.pt (resnet18 at 224x224, random fixed-seed weights), two image sets
(small digit PNGs, 12 MP camera-size JPEGs), three measurements per set, each a median
of --runs runs taken in interleaved rounds so that drift on a shared machine hits all three:
  limit   decode + preprocess + batched inference in this process (handler/preprocessing.py,
          handler/batch_inference.py), at the best of --batch-sizes;
  served  scripts/classify_dir.py --preprocess server against TorchServe with this project's .mar
          (scripts/archive.sh): the files are sent, the handler decodes them;
  client  the same with --preprocess client: classify_dir.py decodes and resizes, sends uint8 pixels;
  stock   TorchServe's stock image_classifier handler on the same model.pt, one request at a time.

    .venv/bin/python scripts/benchmark.py          # `make bench`: table, docs/benchmark.md and .png
    .venv/bin/python scripts/benchmark.py --tune "workers=2,threads=1" "batch=16"   # served variants

--tune measures the served path as it is now beside variants (model-config keys, client
concurrency, server settings or the handler at another git revision) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from benchmarks import assets
from benchmarks.assets import SUMMARY, WORK, CpuMeter
from benchmarks.report import (
    SET_TITLES,
    format_cpu_table,
    format_table,
    format_targets,
    load_average,
    machine_description,
    served_settings,
    write_chart,
    write_markdown,
)
from client import pixels
from client.local_server import LocalServer
from client.results import percentile
from core.errors import command
from core.http import new_session
from core.keys import Keys
from core.torchserve import TorchServe
from handler import batch_inference, preprocessing, request_decoding
from handler import device as devices

ROOT = Path(__file__).resolve().parents[1]

WARMUP_PASSES = 2  # untimed passes over a set before the served runs
DISTURBED_SPREAD = 1.3  # fastest / slowest run of one path above this: other work shared the cores
METRICS_OFF = "served-nometrics"  # fp32, handler.metrics false: what the handler's metrics cost
SPEC_KEYS = {"batch": "batchSize", "delay": "maxBatchDelay", "threads": "handler.cpu_threads"}


@dataclass
class Result:
    images_s: float
    p50_ms: float
    p95_ms: float
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU time per image, by process
    request_bytes: float | None = None  # request body bytes per image (served paths)


def median_result(results: list[Result]) -> Result:
    """Each figure the median of the runs' figures."""
    figures = (statistics.median(getattr(r, f) for r in results) for f in ("images_s", "p50_ms", "p95_ms"))
    cpu = {part: statistics.median(r.cpu_ms[part] for r in results) for part in results[0].cpu_ms}
    return Result(*figures, cpu, results[0].request_bytes)


def measure_limit(files: list[Path], model: torch.nn.Module, cfg: preprocessing.PreprocessConfig,
                  labels: list[str], batch_size: int, pool: Executor | None,
                  dtype: torch.dtype = torch.float32) -> Result:
    """The handler's own steps in this process, batch by batch: read, decode (in `pool`), forward, top-k.

    Pipelined as a real pipeline on this many cores runs: the next batch decodes while the model
    runs the current one. An image's latency is its batch's, from the start of its decoding.
    """
    latencies: list[float] = []
    device = torch.device("cpu")
    batches = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]

    def predict(tensors: list[torch.Tensor]) -> list[list[dict]]:
        return batch_inference.top_k(batch_inference.forward_batch(model, tensors, device, dtype), 5, labels)

    def decode(batch: list[Path]) -> tuple[float, list]:
        rows = [{"body": path.read_bytes()} for path in batch]
        return time.perf_counter(), request_decoding.decode_batch(rows, cfg, preprocessing.DEFAULT_MAX_PIXELS,
                                                                  pool)

    meter = CpuMeter()
    started = time.perf_counter()
    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetch:
        upcoming = prefetch.submit(decode, batches[0])
        for i, batch in enumerate(batches):
            batch_started = time.perf_counter() if i == 0 else decoding_started
            _, items = upcoming.result()
            decoding_started = time.perf_counter()
            if i + 1 < len(batches):
                upcoming = prefetch.submit(decode, batches[i + 1])
            answers = batch_inference.answer_batch(items, predict)
            if not all(isinstance(a, list) for a in answers):
                raise RuntimeError(f"limit: an image of {[p.name for p in batch]} failed")
            latencies += [(time.perf_counter() - batch_started) * 1000] * len(batch)
    elapsed = time.perf_counter() - started
    return Result(len(files) / elapsed, percentile(latencies, 50), percentile(latencies, 95),
                  meter.per_image(len(files), ("this process",)))


def limit_pool() -> Executor | None:
    """The decode threads a one-worker handler on this machine gets: one per core (cpu_threads auto)."""
    threads = devices.count_cpu_threads("auto", 1)
    return ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None


def measure_served(server: LocalServer, model: str, folder: Path, count: int, output: Path,
                   concurrency: int | None, preprocess: str = "server") -> Result:
    """scripts/classify_dir.py over the folder; its own summary line gives the figures."""
    command = [str(assets.PYTHON), str(ROOT / "scripts" / "classify_dir.py"), str(folder), "--model", model,
               "--url", server.inference_url, "--management-url", server.management_url,
               "--token-file", str(server.key_file), "--output", str(output), "--preprocess", preprocess]
    if concurrency:
        command += ["--concurrency", str(concurrency)]
    meter = CpuMeter(server)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    cpu = meter.per_image(count, ("client", "frontend (Java)", "workers"))
    match = SUMMARY.search(result.stdout)
    if result.returncode != 0 or not match or int(match[1]) != count or f"(preprocess {preprocess})" \
            not in result.stdout:
        raise RuntimeError(f"classify_dir.py --preprocess {preprocess} failed (exit {result.returncode}):\n"
                           f"{result.stdout}{result.stderr}")
    return Result(float(match[3]), float(match[5]), float(match[6]), cpu)


def request_bytes(files: list[Path], server: LocalServer, model: str, preprocess: str) -> float:
    """Mean request body per image: the file (server mode), or the pixels classify_dir.py makes of it."""
    if preprocess == "server":
        return statistics.mean(path.stat().st_size for path in files)
    settings = pixels.fetch_settings(TorchServe(server.inference_url, server.management_url,
                                                Keys(server.key_file, server.management_url)), model, None)
    if settings is None:
        raise RuntimeError(f"model {model} exposes no preprocessing settings")
    prepare = pixels.ClientPreprocessor(settings)
    return statistics.mean(len(prepare(path.read_bytes())[0]) for path in files)


def measure_stock(server: LocalServer, model: str, files: list[Path]) -> Result:
    """One request at a time, the body the file's bytes (TorchServe's `curl ... -T file`), keep-alive."""
    session = new_session(1)
    headers = Keys(server.key_file, server.management_url).headers("inference")
    url = f"{server.inference_url}/predictions/{model}"
    latencies: list[float] = []
    meter = CpuMeter(server)
    started = time.perf_counter()
    for path in files:
        data = path.read_bytes()
        sent = time.perf_counter()
        response = session.post(url, data=data, headers=headers, timeout=120)
        latencies.append((time.perf_counter() - sent) * 1000)
        if response.status_code != 200:
            raise RuntimeError(f"stock handler answered {response.status_code} for {path.name}: "
                               f"{response.text[:300]}")
    elapsed = time.perf_counter() - started
    cpu = meter.per_image(len(files), ("this process", "frontend (Java)", "workers"))
    cpu["client"] = cpu.pop("this process")
    return Result(len(files) / elapsed, percentile(latencies, 50), percentile(latencies, 95), cpu)


def parse_spec(spec: str) -> dict:
    """'name=x,batch=16,delay=5,workers=2,threads=1,concurrency=32,handler=REV,cfg.K=V,ts.K=V,env.K=V'."""
    variant: dict = {"name": spec or "as is", "model_config": {}, "ts": {}, "env": {}, "concurrency": None,
                     "handler": None, "preprocess": "server"}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --tune {spec!r}: '{item}' is not KEY=VALUE")
        value = yaml.safe_load(raw)
        if key in ("name", "handler", "preprocess"):
            variant[key] = raw
        elif key == "concurrency":
            variant["concurrency"] = int(value)
        elif key == "workers":
            variant["model_config"].update(minWorkers=int(value), maxWorkers=int(value))
        elif key in SPEC_KEYS or key.startswith("cfg."):
            variant["model_config"][SPEC_KEYS.get(key, key[4:])] = value
        elif key.startswith(("ts.", "env.")):
            variant[key.split(".", 1)[0]][key.split(".", 1)[1]] = raw
        else:
            raise SystemExit(f"error: --tune {spec!r}: unknown key '{key}'")
    return variant


def start_variant(index: int, variant: dict, run_dir: Path, store: Path) -> LocalServer:
    """A server for one --tune variant: its own .mar (model 'bench'), config and environment."""
    base = WORK / "servers" / f"tune{index}"
    name = f"tune{index}"
    if variant["handler"] or variant["model_config"]:
        handler_dir = Path(variant["handler"] or ROOT / "handler")
        if variant["handler"] and not handler_dir.is_dir():  # a git revision
            handler_dir = assets.handler_files_at(variant["handler"], base / "handler")
        mar = assets.archive_variant(run_dir, store, name, handler_dir, variant["model_config"])
    else:
        mar = assets.archive_project(run_dir, store, name)
    config = None
    if variant["ts"]:
        base.mkdir(parents=True, exist_ok=True)
        config = base / "config.properties"
        config.write_text((ROOT / "config.properties").read_text()
                          + "".join(f"{k}={v}\n" for k, v in variant["ts"].items()))
    server = LocalServer(base, store, [mar], config=config, extra_env=variant["env"] or {}, start_timeout=180)
    server.start()
    return server


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", help="torchvision model (random fixed-seed weights)")
    parser.add_argument("--image-size", type=int, default=224, help="model input size, square")
    parser.add_argument("--pngs", type=int, default=128, help="images in the PNG set (digits)")
    parser.add_argument("--photos", type=int, default=48, help="images in the photo set")
    parser.add_argument("--photo-size", default="4032x3024", help="WxH of the photos (12.2 MP)")
    parser.add_argument("--sets", default="png,photo", help="comma-separated sets to measure")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure; the median is reported")
    parser.add_argument("--batch-sizes", default="1,4,8,16,32", help="batch sizes tried for the limit")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="classify_dir.py --concurrency (default: classify_dir.py's own default)")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock handler")
    parser.add_argument("--precisions", default="fp32,bf16,pt2-fp32,pt2-bf16,pt2-int8",
                        help="what to measure (limit, served, client each): handler.precision values of "
                             "model.pt (fp32, bf16) and AOTInductor packages (pt2-fp32, pt2-bf16, pt2-int8, "
                             "compiled once and kept under bench/run); bf16 is left out on a CPU without "
                             "native bf16")
    parser.add_argument("--tune", nargs="+", metavar="SPEC", default=None,
                        help="measure served variants beside the current one, e.g. 'workers=2,threads=1' "
                             "(keys: name batch delay workers threads concurrency preprocess handler=REV|DIR "
                             "cfg.KEY ts.KEY env.NAME); prints a table, writes no docs")
    parser.add_argument("--limit-batch-size", type=int, default=16, help="--tune: the limit's batch size")
    parser.add_argument("--markdown", default=str(ROOT / "docs" / "benchmark.md"), help="Markdown to update")
    parser.add_argument("--chart", default=str(ROOT / "docs" / "benchmark.png"), help="bar chart to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the photo crops")
    parser.add_argument("--fleet-overhead", action="store_true",
                        help="only classify_dir.py --fleet (one replica) against --url on the PNGs "
                             "(benchmarks/fleet.py; --pngs, --runs); prints a table, writes no docs")
    return parser


@dataclass
class Bench:
    """What every measurement of one run shares: the model, its preprocessing, the limit's threads."""

    models: dict[str, torch.nn.Module]  # by precision, each loaded as the handler loads it
    cfg: preprocessing.PreprocessConfig
    labels: list[str]
    pool: Executor | None
    out: Path  # classify_dir.py's result files

    def limit(self, files: list[Path], batch_size: int, precision: str = "fp32") -> Result:
        # a package takes float32 and converts inside its graph
        return measure_limit(files, self.models[precision], self.cfg, self.labels, batch_size, self.pool,
                             devices.DTYPES.get(precision, torch.float32))


def prepare(args: argparse.Namespace) -> tuple[Path, dict[str, list[Path]], Path, Bench]:
    """The run folder, the image sets, the model store and the in-process model."""
    run_dir = assets.make_run(WORK / "run", args.arch, args.image_size, 10, args.seed)
    width, height = (int(v) for v in args.photo_size.lower().split("x"))
    sets = {}
    for name in args.sets.split(","):
        if name == "png":
            sets[name] = assets.make_png_set(WORK / "images" / "png", args.pngs)
        elif name == "photo":
            sets[name] = assets.make_photo_set(WORK / "images" / "photo", args.photos, (width, height),
                                               args.seed)
        else:
            raise SystemExit(f"error: --sets: unknown set '{name}' (png, photo)")
    store = WORK / "store"
    store.mkdir(parents=True, exist_ok=True)
    (WORK / "out").mkdir(parents=True, exist_ok=True)
    packages = [p.removeprefix("pt2-") for p in precisions(args) if p.startswith("pt2-")]
    served_batch = int(yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["batchSize"])
    calibration = sets.get("png") or next(iter(sets.values()))
    assets.make_packages(run_dir, args.arch, args.image_size, 10, args.seed, packages, calibration[:64],
                         max(served_batch, *(int(b) for b in args.batch_sizes.split(","))))
    bench = Bench({p: load_for_limit(run_dir, p) for p in precisions(args)},
                  preprocessing.PreprocessConfig.load(run_dir / "preprocess.json"),
                  batch_inference.load_labels(run_dir / "index_to_name.json"), limit_pool(), WORK / "out")
    return run_dir, sets, store, bench


def load_for_limit(run_dir: Path, precision: str):
    """The model as a worker loads it: model.pt at a precision, or a .pt2 package."""
    if precision.startswith("pt2-"):
        from handler import aot
        from training.aot import package_path
        return aot.load_package(package_path(run_dir, precision.removeprefix("pt2-")), torch.device("cpu"))[0]
    return batch_inference.load_model(run_dir / "model.pt", torch.device("cpu"), precision)


def precisions(args: argparse.Namespace) -> list[str]:
    """--precisions, less bf16 (model.pt's and the package's) on a CPU without native bf16 (said once)."""
    wanted = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if {"bf16", "pt2-bf16"} & set(wanted) and not devices.cpu_has_native_bf16():
        print("benchmark: this CPU has no native bf16: no bf16 rows", flush=True)
        wanted = [p for p in wanted if p not in ("bf16", "pt2-bf16")]
    return wanted


def server_key(precision: str) -> str:
    return "served" if precision == "fp32" else f"served-{precision}"


def start_servers(run_dir: Path, store: Path, stock: bool, served_precisions: list[str]) -> dict[str, LocalServer]:
    """One server per precision (each worker alone on the cores, as the limit is) and, unless
    `stock` is false, the stock server; stopped by the caller. The model is random weights:
    no agreement report to gate on (--no-precision-check)."""
    servers = {}
    for precision in served_precisions:
        how = ["--pt2", precision.removeprefix("pt2-")] if precision.startswith("pt2-") else ["--precision", precision]
        archive = assets.archive_project(run_dir, store, "bench", precision, *how, "--no-precision-check")
        servers[server_key(precision)] = LocalServer(WORK / "servers" / server_key(precision), store, [archive],
                                                     start_timeout=180)
    if "fp32" in served_precisions:  # issue 24: the handler's metrics off, to price them on the PNGs
        archive = assets.archive_variant(run_dir, store, "bench-nometrics", ROOT / "handler",
                                         {"handler.metrics": False})
        servers[METRICS_OFF] = LocalServer(WORK / "servers" / METRICS_OFF, store, [archive], start_timeout=180)
    if stock:
        # captum, which the stock handler imports, is in .venv (requirements-test.txt)
        servers["stock"] = LocalServer(WORK / "servers" / "stock", store,
                                       [assets.archive_stock(run_dir, store, "stock")], start_timeout=180)
    return servers


def measure_set(name: str, files: list[Path], servers: dict[str, LocalServer], bench: Bench,
                args: argparse.Namespace) -> tuple[list[dict], dict[str, dict[int, float]], str | None]:
    """Per precision: limit sweep, warm-up, then interleaved rounds of limit, served, client (and
    stock, with fp32): rows, sweeps by precision, warning."""
    folder, count = files[0].parent, len(files)
    sizes = [b for b in (int(v) for v in args.batch_sizes.split(",")) if b <= count]
    sweeps, best = {}, {}
    for precision in bench.models:
        bench.limit(files[:sizes[-1]], sizes[-1], precision)  # warm-up
        sweeps[precision] = {b: median_result([bench.limit(files, b, precision) for _ in range(args.runs)]).images_s
                             for b in sizes}
        best[precision] = max(sweeps[precision], key=sweeps[precision].get)
        print(f"{name} {precision}: limit by batch size (images/s): "
              + ", ".join(f"{b}: {v:.1f}" for b, v in sweeps[precision].items()) + f"; best {best[precision]}",
              flush=True)
    # Untimed warm-up: the frontend's JIT needs a few hundred requests of a size to settle
    # (docs/benchmark.md: its CPU per 12 MP request falls by about 3x), and the first batches are slow.
    for precision in bench.models:
        for mode in ("server", "client"):
            for _ in range(WARMUP_PASSES):
                measure_served(servers[server_key(precision)], "bench", folder, count, bench.out / "warmup.jsonl",
                               args.concurrency, mode)
    if "stock" in servers:
        measure_stock(servers["stock"], "stock", files)
    keys = [(precision, path) for precision in bench.models for path in ("limit", "served", "client")]
    runs: dict[tuple[str, str], list[Result]] = {key: [] for key in keys + [("fp32", "stock"), ("fp32", METRICS_OFF)]}
    metrics_off = servers.get(METRICS_OFF) if name == "png" else None
    if metrics_off is not None:
        for _ in range(WARMUP_PASSES):
            measure_served(metrics_off, "bench-nometrics", folder, count, bench.out / "warmup.jsonl",
                           args.concurrency, "server")
    sent = {mode: request_bytes(files, servers["served"], "bench", mode) for mode in ("server", "client")}
    for i in range(args.runs):
        for precision in bench.models:
            server = servers[server_key(precision)]
            runs[precision, "limit"].append(bench.limit(files, best[precision], precision))
            for path, mode in (("served", "server"), ("client", "client")):
                result = measure_served(server, "bench", folder, count,
                                        bench.out / f"{path}-{precision}-{name}-{i}.jsonl", args.concurrency, mode)
                result.request_bytes = sent[mode]
                runs[precision, path].append(result)
            if precision == "fp32" and metrics_off is not None:  # right after the same path with them on
                runs["fp32", METRICS_OFF].append(measure_served(
                    metrics_off, "bench-nometrics", folder, count, bench.out / f"{METRICS_OFF}-{name}-{i}.jsonl",
                    args.concurrency, "server"))
        if "stock" in servers:
            runs["fp32", "stock"].append(measure_stock(servers["stock"], "stock", files))
        done = ", ".join(f"{p} {k} {r[-1].images_s:.1f}/s" for (p, k), r in runs.items() if r)
        print(f"{name} round {i + 1}: {done}; load {load_average()}", flush=True)
    runs = {key: r for key, r in runs.items() if r}
    medians = {key: median_result(r) for key, r in runs.items()}
    spread = max(max(x.images_s for x in r) / min(x.images_s for x in r) for r in runs.values())
    warning = None
    if spread > DISTURBED_SPREAD:
        warning = (f"{SET_TITLES[name]}: runs of one path differ up to {spread:.2f}x (load average "
                   f"{load_average()}): the machine was busy; rerun for clean figures")
        print(f"warning: {warning}", flush=True)
    rows = []
    for (precision, path), result in medians.items():
        labels = {"limit": f"limit (in-process, pipelined, batch {best[precision]})",
                  "served": "served, --preprocess server", "client": "served, --preprocess client",
                  "stock": "stock image_classifier", METRICS_OFF: "served, --preprocess server, handler metrics off"}
        row = {"set": name, "images": count, "path": path, "precision": precision,
               "label": f"{labels[path]}, {precision}", **asdict(result)}
        if path in ("served", "client"):
            row["served_limit"] = result.images_s / medians[precision, "limit"].images_s
            stock = medians.get(("fp32", "stock"))
            row["served_stock"] = result.images_s / stock.images_s if stock else None
        if path == "served" and precision == "fp32" and ("fp32", METRICS_OFF) in runs:  # issue 24
            # Paired by round: on and off ran back to back, so a round's ratio cancels the machine's
            # drift, which the two medians (taken apart) do not; the workers' CPU per image besides.
            ratios = [on.images_s / off.images_s for on, off in zip(runs["fp32", "served"], runs["fp32", METRICS_OFF])]
            off = medians["fp32", METRICS_OFF]
            row["metrics_cost"] = 1 - statistics.median(ratios)
            row["metrics_cost_medians"] = 1 - result.images_s / off.images_s
            if "workers" in result.cpu_ms:
                row["metrics_workers_cpu"] = result.cpu_ms["workers"] / off.cpu_ms["workers"] - 1
        if path == "client":  # issue 12's targets: against server mode on the same server
            server_mode = medians[precision, "served"]
            row["fewer_bytes"] = server_mode.request_bytes / result.request_bytes
            row["server_cpu_share"] = server_cpu(result) / server_cpu(server_mode)
        if precision != "fp32" and path != "stock":  # issue 18: the lower precision against fp32
            reference = medians["fp32", path]
            row["vs_fp32"] = result.images_s / reference.images_s
            if "workers" in result.cpu_ms:
                row["workers_cpu_vs_fp32"] = result.cpu_ms["workers"] / reference.cpu_ms["workers"]
            if precision == "pt2-int8" and ("bf16", path) in medians:  # issue 23: int8 against bf16 TorchScript
                row["vs_bf16"] = result.images_s / medians["bf16", path].images_s
                if "workers" in result.cpu_ms:
                    row["workers_cpu_vs_bf16"] = result.cpu_ms["workers"] / medians["bf16", path].cpu_ms["workers"]
        rows.append(row)
    return rows, sweeps, warning


def server_cpu(result: Result) -> float:
    """CPU ms per image of the server's processes: the Java frontend and the workers."""
    return result.cpu_ms["frontend (Java)"] + result.cpu_ms["workers"]


def report(args: argparse.Namespace, rows: list[dict], sweeps: dict[str, dict[int, float]],
           warnings: list[str], elapsed: float) -> None:
    """Print the tables, update the Markdown's generated block, draw the chart, keep the JSON."""
    table, cpu_table, machine = format_table(rows), format_cpu_table(rows), machine_description()
    print(f"\n{table}\n\n{cpu_table}\n")
    (WORK / "results").mkdir(exist_ok=True)
    (WORK / "results" / "latest.json").write_text(
        json.dumps({"machine": machine, "rows": rows, "sweeps": sweeps}, indent=2))
    sweep_text = "; ".join(f"{SET_TITLES[s]} {p}: " + ", ".join(f"{b}: {v:.1f}" for b, v in sw.items())
                           for s, by_precision in sweeps.items() for p, sw in by_precision.items())
    warning_lines = [f"**Warning**: {w}.  " for w in warnings] + [""] if warnings else []
    block = [f"## Results (`make bench`, {time.strftime('%Y-%m-%d %H:%M')}, {elapsed / 60:.1f} min)", "",
             f"Machine: {machine}; load average at the end {load_average()}.  ",
             f"Model: {args.arch} at {args.image_size}x{args.image_size}, 10 classes, random fixed-seed "
             f"weights, one model.pt for every path.  ",
             f"Served: {served_settings()}; classify_dir.py --concurrency "
             f"{args.concurrency or 'default (16)'}.  ",
             "Stock: image_classifier handler, batch size 1, config.properties' default workers, "
             "one request at a time (keep-alive).  ",
             "From start to READY (TorchServe and its worker, one server at a time): "
             + ", ".join(f"{k} {v:.1f} s" for k, v in getattr(args, "start_times", {}).items()) + ".  ",
             f"Each figure is the median of {args.runs} runs taken in interleaved rounds.", "", table, "",
             format_targets(rows), "", *warning_lines,
             "CPU time per image (median of the same runs; the limit's is all in the client column, "
             "this process; the served client's includes classify_dir.py's start, about 0.3 s a run):", "",
             cpu_table, "", f"Limit by batch size (images/s): {sweep_text}", "",
             f"![images/s per path]({Path(args.chart).name})"]
    write_markdown(Path(args.markdown), "\n".join(block))
    write_chart(rows, Path(args.chart), f"{args.arch} {args.image_size}px, {machine.split(' (')[0]}")
    served = [r for r in rows if r["path"] in ("served", "client")]
    print("benchmark: " + "; ".join(
        f"{r['set']} {r['label']} {r['images_s']:.1f}/s = {r['served_limit']:.2f}x limit"
        + (f", {r['served_stock']:.2f}x stock" if r.get("served_stock") else "") for r in served)
        + f"; {args.markdown}, {args.chart}; {elapsed / 60:.1f} min")


def main(args: argparse.Namespace) -> None:
    if args.fleet_overhead:
        from benchmarks import fleet  # its own measurement: loaded only when asked for
        return fleet.main(args)
    started = time.perf_counter()
    print(f"benchmark: {machine_description()}; load average {load_average()}", flush=True)
    run_dir, sets, store, bench = prepare(args)
    if args.tune:
        return tune(args, run_dir, sets, store, bench, started)
    rows, sweeps, warnings = [], {}, []
    servers: dict[str, LocalServer] = {}
    try:
        servers = start_servers(run_dir, store, stock=not args.no_stock, served_precisions=precisions(args))
        start_times = {}
        for key, server in servers.items():  # one at a time: each start has the cores to itself
            began = time.perf_counter()
            server.start()
            start_times[key] = time.perf_counter() - began
        print(f"benchmark: servers ready after {time.perf_counter() - started:.0f}s; from start to READY: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in start_times.items()), flush=True)
        args.start_times = start_times
        for name, files in sets.items():
            set_rows, sweeps[name], warning = measure_set(name, files, servers, bench, args)
            rows += set_rows
            warnings += [warning] if warning else []
    finally:
        for server in servers.values():
            server.close()
    report(args, rows, sweeps, warnings, time.perf_counter() - started)


def tune(args: argparse.Namespace, run_dir: Path, sets: dict[str, list[Path]], store: Path, bench: Bench,
         started: float) -> None:
    """Served as it is now and each variant, interleaved round by round; prints the table."""
    variants = [parse_spec("")] + [parse_spec(spec) for spec in args.tune]
    servers: list[LocalServer] = []
    lines = ["| set | variant | images/s | p50 ms | p95 ms | vs as is | vs limit | CPU ms/image client, "
             "Java, workers |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    try:
        for i, variant in enumerate(variants):
            servers.append(start_variant(i, variant, run_dir, store))
        print(f"tune: {len(servers)} servers ready after {time.perf_counter() - started:.0f}s", flush=True)
        for name, files in sets.items():
            folder = files[0].parent
            for i, (server, variant) in enumerate(zip(servers, variants, strict=True)):  # warm-up
                for _ in range(WARMUP_PASSES):
                    measure_served(server, f"tune{i}", folder, len(files), bench.out / "warmup.jsonl",
                                   variant["concurrency"], variant["preprocess"])
            runs: list[list[Result]] = [[] for _ in variants]
            limit: list[Result] = []
            for r in range(args.runs):
                limit.append(bench.limit(files, args.limit_batch_size))
                for i, (server, variant) in enumerate(zip(servers, variants, strict=True)):
                    output = bench.out / f"tune-{name}-{i}.jsonl"
                    runs[i].append(measure_served(server, f"tune{i}", folder, len(files), output,
                                                  variant["concurrency"], variant["preprocess"]))
                done = ", ".join(f"{v['name']} {x[-1].images_s:.1f}/s"
                                 for v, x in zip(variants, runs, strict=True))
                print(f"{name} round {r + 1}: limit {limit[-1].images_s:.1f}/s, {done}; "
                      f"load {load_average()}", flush=True)
            base, lim = median_result(runs[0]), median_result(limit)
            lines.append(f"| {name} | limit (batch {args.limit_batch_size}) | {lim.images_s:.1f} | "
                         f"{lim.p50_ms:.0f} | {lim.p95_ms:.0f} | | | "
                         f"{lim.cpu_ms['this process']:.1f} (in-process) |")
            for variant, results in zip(variants, runs, strict=True):
                m = median_result(results)
                cpu = ", ".join(f"{v:.1f}" for v in m.cpu_ms.values())
                lines.append(f"| {name} | {variant['name']} | {m.images_s:.1f} | {m.p50_ms:.0f} | "
                             f"{m.p95_ms:.0f} | {m.images_s / base.images_s:.2f}x | "
                             f"{m.images_s / lim.images_s:.2f}x | {cpu} |")
    finally:
        for server in servers:
            server.close()
    print("\n" + "\n".join(lines))
    print(f"tune: {len(variants)} variants x {args.runs} runs; {machine_description()}; "
          f"{(time.perf_counter() - started) / 60:.1f} min")


cli = command(main, get_args_parser)
