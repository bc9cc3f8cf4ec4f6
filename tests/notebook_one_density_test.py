"""The one-density notebook executes end to end (nbclient, python3 kernel, repo root as cwd)."""
import os

from absl.testing import absltest
import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colab", "00_one_density.ipynb")


class NotebookTest(absltest.TestCase):

  def test_notebook_executes(self):
    """Every cell runs without error and the outputs include the OT test and the asymmetry."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    self.assertTrue(all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"),
                    "commit the notebook with outputs stripped")
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    client.execute()
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    self.assertIn("eps_rel", text)
    self.assertIn("Jacobian asymmetry", text)


if __name__ == "__main__":
  absltest.main()
