"""Test-wide setup: the repo root on sys.path (configs/ is imported by path), and no GPU
memory preallocation, so that the two pytest-xdist workers can share an accelerator."""
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
