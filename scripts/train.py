"""Train an image classifier from a list file and a label map (code: training/train.py)."""
from training.train import cli

if __name__ == "__main__":
    cli()
