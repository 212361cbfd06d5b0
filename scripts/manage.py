"""Manage the models TorchServe serves: list, register, scale, switch versions, roll out safely
(code: client/manage.py and client/rollout.py).

    .venv/bin/python scripts/manage.py rollout model_store/digits-2.0.mar --smoke-dir demo/val
"""
from client.manage import cli

if __name__ == "__main__":
    cli()
