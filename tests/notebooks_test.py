"""Executes the Colab notebooks top to bottom (nbclient, python3 kernel, cwd = repo root).

Each notebook has a cell tagged `parameters` (its small default settings); like papermill,
the test inserts a cell after it with smaller ones, so the suite runs each notebook in well
under a minute. Every notebook ends by printing `NOTEBOOK_SUMMARY {json}` with the numbers it
measured and asserting its own checks; the tests read that line and check it again.
"""
import json
import os
import tempfile

from absl.testing import absltest
import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
TIMEOUT_S = 600
NOTEBOOKS = ("01_encoder_is_ot_theory.ipynb", "02_dpmot_digits.ipynb", "03_latent_codes.ipynb")


def execute(name: str, overrides: str) -> tuple[nbformat.NotebookNode, dict]:
  """Runs colab/<name> with `overrides` injected after its parameters cell; returns the
  executed notebook and the parsed NOTEBOOK_SUMMARY of its last cell."""
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", ()))
  injected = nbformat.v4.new_code_cell(overrides)
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, injected)
  client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": ROOT}})
  client.execute()
  text = "".join(out.get("text", "") for out in nb.cells[-1].outputs if out.get("name") == "stdout")
  line = next(l for l in text.splitlines() if l.startswith("NOTEBOOK_SUMMARY "))
  return nb, json.loads(line[len("NOTEBOOK_SUMMARY "):])


class StoredNotebooksTest(absltest.TestCase):

  def test_outputs_stripped_and_install_cell_first(self):
    """In git every code cell has no outputs and no execution count, and the first code cell
    is the guarded Colab install."""
    for name in NOTEBOOKS:
      nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
      nbformat.validate(nb)
      code = [c for c in nb.cells if c.cell_type == "code"]
      for cell in code:
        self.assertEqual(cell.outputs, [], name)
        self.assertIsNone(cell.execution_count, name)
      self.assertIn("import ddpm_ot_jax", code[0].source, name)
      self.assertIn("pip install", code[0].source, name)
      self.assertEqual(sum("parameters" in c.metadata.get("tags", ()) for c in code), 1, name)


class ExecuteNotebooksTest(absltest.TestCase):

  def test_01_theory(self):
    """Theorem 3.1 holds to the solver tolerance, ε_rel ≥ 0 everywhere, and the 2-D density's
    codes look like N(0, I) samples."""
    _, summary = execute("01_encoder_is_ot_theory.ipynb", (
        "NUM_SAMPLES = 100\nGMM_DIMS = (2,)\nJACOBIAN_POINTS = 2\nFP_GRID = 128\n"
        "FP_TIME_STEPS = 16\nFP_TABLE = 32\nRTOL = 1e-7\n"))
    self.assertLess(summary["gaussian_max_abs_err_vs_closed_form"], 1e-5)
    self.assertGreaterEqual(summary["gmm_ot_relative_error_median"], 0.0)
    self.assertBetween(summary["density_identity_fraction"], 0.0, 1.0)
    self.assertBetween(summary["density_code_std"], 0.5, 1.5)

  def test_02_dpmot(self):
    """A tiny DPM-OT run end to end: every method reports its NFE (DPM-OT-10: 10) and FID."""
    with tempfile.TemporaryDirectory() as workdir:
      _, summary = execute("02_dpmot_digits.ipynb", (
          "REUSE_DEFAULT_RUN = False\nTRAIN_STEPS = 0\nTINY_UNET = True\nOT_ITERATIONS = 20\n"
          f"NUM_SAMPLES = 20\nMETHODS = ('ddim_10', 'dpmot_10')\nWORKDIR = {workdir!r}\n"))
    self.assertEqual(summary["nfe_dpm_ot_10"], 10)
    self.assertEqual(summary["nfe_ddim_10"], 10)
    self.assertGreaterEqual(summary["fid_dpm_ot_10"], 0.0)

  def test_03_latent_codes(self):
    """Both image experiments on shared tiny models: the shuffled control is rejected and
    the distance ratios are computed for the DDPM pair and the VAE control."""
    with tempfile.TemporaryDirectory() as workdir:
      _, summary = execute("03_latent_codes.ipynb", (
          "TRAIN_STEPS = 0\nTINY_UNET = True\nNUM_IMAGES = (16,)\nDDIM_STEPS = 4\n"
          f"NUM_LATENTS = 8\nVAE_STEPS = 50\nWORKDIR = {workdir!r}\n"))
      # The two experiments shared their models: two DDPM folders, not four.
      self.assertLen(os.listdir(os.path.join(workdir, "models")), 2)
    self.assertLessEqual(summary["identity_fraction_shuffled_ode_k16"], 0.25)
    self.assertBetween(summary["identity_fraction_ode_k16"], 0.0, 1.0)
    self.assertGreater(summary["distance_ratio_vae_control"], 0.0)
    self.assertIn("distance_ratio_different_data", summary)


if __name__ == "__main__":
  absltest.main()
