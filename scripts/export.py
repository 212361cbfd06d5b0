"""Export a checkpoint as TorchScript, or check a lower precision against fp32 (code: training/export.py)."""
from training.export import cli

if __name__ == "__main__":
    cli()
