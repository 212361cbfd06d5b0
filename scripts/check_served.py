"""Check every served answer against model.pt, per image (code: training/check_served.py)."""
from training.check_served import cli

if __name__ == "__main__":
    cli()
