"""Copy the images of a list file into OUT/<label>/ class folders (code: training/list_to_folders.py).

    .venv/bin/python scripts/list_to_folders.py LIST --labels labels.json --out DIR
"""
from training.list_to_folders import cli

if __name__ == "__main__":
    cli()
