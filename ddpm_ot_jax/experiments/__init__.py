"""Experiments: one module per experiment, each with `run(config, workdir) -> dict`.

Experiments are the only layer (with scripts/main.py) that logs progress and writes files.
"""
