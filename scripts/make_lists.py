"""Class folders -> train.list, val.list and labels.json (code: training/lists.py)."""
from training.lists import cli

if __name__ == "__main__":
    cli()
