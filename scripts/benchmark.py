"""`make bench`: limit, served and stock throughput on PNGs and camera JPEGs (code: benchmarks/).

    .venv/bin/python scripts/benchmark.py
"""
from benchmarks.benchmark import cli

if __name__ == "__main__":
    cli()
