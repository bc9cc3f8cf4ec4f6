"""Executes a notebook of this folder with its parameters overridden (papermill's convention).

Each notebook has one code cell tagged `parameters`; `execute` inserts a cell after it with
`overrides`, runs the notebook top to bottom with nbclient (python3 kernel, cwd = repo root)
and returns the executed notebook with the `NOTEBOOK_SUMMARY {json}` line its last cell
prints. Used by the tests (tiny overrides) and scripts/bench_notebooks.py (the defaults).
nbclient ships with the [test] and [notebooks] extras.
"""
from __future__ import annotations

import json
import os

import nbclient
import nbformat

COLAB = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(COLAB)
NOTEBOOKS = tuple(sorted(name for name in os.listdir(COLAB) if name.endswith(".ipynb")))
_SUMMARY = "NOTEBOOK_SUMMARY "


def execute(name: str, overrides: str = "",
            timeout_s: int = 600) -> tuple[nbformat.NotebookNode, dict]:
  """Runs colab/<name> with `overrides` (Python source) injected after its parameters cell;
  returns the executed notebook and the parsed NOTEBOOK_SUMMARY of its last cell. A cell
  that raises stops the run with nbclient's CellExecutionError (it names the cell)."""
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", ()))
  if overrides:
    injected = nbformat.v4.new_code_cell(overrides)
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, injected)
  client = nbclient.NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                                   resources={"metadata": {"path": ROOT}})
  client.execute()
  text = "".join(out.get("text", "") for out in nb.cells[-1].outputs if out.get("name") == "stdout")
  line = next(l for l in text.splitlines() if l.startswith(_SUMMARY))
  return nb, json.loads(line[len(_SUMMARY):])
