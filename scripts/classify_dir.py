"""Classify every image under a directory with a model served by TorchServe (code: client/classify_dir.py).

    .venv/bin/python scripts/classify_dir.py DIR --model NAME [--class-folders]
"""
from client.classify_dir import cli

if __name__ == "__main__":
    cli()
