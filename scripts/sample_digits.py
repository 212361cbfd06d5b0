"""Write scikit-learn's handwritten digits as class folders of PNGs (code: training/sample_data.py)."""
from training.sample_data import cli

if __name__ == "__main__":
    cli()
