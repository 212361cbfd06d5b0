"""Merge classify_dir.py --shard K/N outputs, checking every file is there once (code: client/shards.py).

    .venv/bin/python scripts/merge_shards.py merged.jsonl shard-*.jsonl --dir DIR
"""
from client.shards import cli

if __name__ == "__main__":
    cli()
