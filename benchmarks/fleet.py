"""The fleet client's overhead: classify_dir.py --fleet (a fleet file of one replica) against --url.

Same server, same images, runs interleaved round by round; prints images/s and CPU ms per image
of the client, the frontend and the workers for both, and their ratios (docs/fleet.md).

    .venv/bin/python scripts/benchmark.py --fleet-overhead [--pngs 128] [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks import assets
from benchmarks.assets import SUMMARY, WORK, CpuMeter
from benchmarks.report import load_average, machine_description
from client.fleet import write_fleet
from client.local_server import LocalServer

MODEL = "fleetbench"
PARTS = ("client", "frontend (Java)", "workers")


def run_client(server: LocalServer, folder: Path, count: int, target: list[str], output: Path) -> dict:
    """One classify_dir.py run -> images/s and CPU ms per image by process."""
    command = [str(assets.PYTHON), str(assets.ROOT / "scripts" / "classify_dir.py"), str(folder),
               "--model", MODEL, "--output", str(output), *target]
    meter = CpuMeter(server)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    cpu = meter.per_image(count, PARTS)
    match = SUMMARY.search(result.stdout)
    if result.returncode != 0 or not match or int(match[1]) != count:
        raise RuntimeError(f"classify_dir.py failed (exit {result.returncode}):\n"
                           f"{result.stdout}{result.stderr}")
    return {"images_s": float(match[3]), **cpu}


def measure_overhead(files: list[Path], store: Path, mar: str, runs: int) -> dict[str, dict[str, float]]:
    """Medians of `runs` interleaved runs of each client against one server."""
    server = LocalServer(WORK / "fleet" / "ts", store, [mar], start_timeout=180)
    with server.running():
        fleet_file = WORK / "fleet" / "fleet.yaml"
        write_fleet(fleet_file, [{"name": "ts-0", "inference_url": server.inference_url,
                                  "management_url": server.management_url, "key_file": server.key_file}])
        targets = {"--url": ["--url", server.inference_url, "--token-file", str(server.key_file)],
                   "--fleet (1 replica)": ["--fleet", str(fleet_file)]}
        out = WORK / "fleet" / "out.jsonl"
        for target in targets.values():  # warm-up: the JIT of the frontend, the model's first batches
            run_client(server, files[0].parent, len(files), target, out)
        results: dict[str, list[dict]] = {name: [] for name in targets}
        for r in range(runs):
            for name, target in targets.items():
                results[name].append(run_client(server, files[0].parent, len(files), target, out))
            done = ", ".join(f"{n} {x[-1]['images_s']:.1f}/s" for n, x in results.items())
            print(f"round {r + 1}: {done}", flush=True)
    return {name: {key: statistics.median(x[key] for x in rows) for key in rows[0]}
            for name, rows in results.items()}


def main(args: argparse.Namespace) -> None:
    """Build or reuse the benchmark's model and PNGs, measure, print the table."""
    started = time.perf_counter()
    print(f"fleet overhead: {machine_description()}; load average {load_average()}", flush=True)
    run_dir = assets.make_run(WORK / "run", args.arch, args.image_size, 10, args.seed)
    files = assets.make_png_set(WORK / "images" / "png", args.pngs)
    store = WORK / "store"
    store.mkdir(parents=True, exist_ok=True)
    (WORK / "fleet").mkdir(parents=True, exist_ok=True)
    mar = assets.archive_project(run_dir, store, MODEL)
    medians = measure_overhead(files, store, mar, args.runs)
    base = medians["--url"]
    lines = ["| client | images/s | CPU ms/image client | frontend (Java) | workers | images/s vs --url | "
             "client CPU vs --url |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in medians.items():
        lines.append(f"| {name} | {m['images_s']:.1f} | {m['client']:.2f} | {m['frontend (Java)']:.2f} | "
                     f"{m['workers']:.1f} | {m['images_s'] / base['images_s']:.3f}x | "
                     f"{m['client'] / base['client']:.3f}x |")
    print("\n".join(lines))
    print(f"fleet overhead: {len(files)} PNGs, {args.arch} {args.image_size}, median of {args.runs} "
          f"interleaved runs; load average {load_average()}; {time.perf_counter() - started:.0f}s")
