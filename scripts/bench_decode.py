"""Cost of decoding a 12 MP JPEG to the model's input, with and without draft decoding
(code: benchmarks/decode.py).

    .venv/bin/python scripts/bench_decode.py
"""
from benchmarks.decode import cli

if __name__ == "__main__":
    cli()
