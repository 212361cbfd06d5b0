"""int8 against fp32 and bf16, speed and accuracy: a measured experiment (code: benchmarks/int8.py)."""
from benchmarks.int8 import cli

if __name__ == "__main__":
    cli()
