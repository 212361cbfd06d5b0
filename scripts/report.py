"""A batch run's self-contained HTML report from its results files (code: client/report.py).

    .venv/bin/python scripts/report.py RESULTS [RESULTS ...] --output report.html [--root DIR]
"""
from client.report import cli

if __name__ == "__main__":
    cli()
