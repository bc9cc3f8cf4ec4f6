"""The Colab notebooks: stored clean, their install cell, and executed top to bottom.

Each notebook has a cell tagged `parameters` (its small default settings); like papermill,
the test inserts a cell after it with smaller ones, so the suite runs each notebook in well
under a minute (nbclient, python3 kernel, cwd = repo root). Every notebook ends by printing
`NOTEBOOK_SUMMARY {json}` with the numbers it measured and asserting its own checks; the tests
read that line and check what the tiny settings can honestly guarantee.

Notebooks 02–03 import `configs`, which `pip install` of the package does not ship, so every
notebook's first cell (the same in all) clones the repository (REPO_URL), installs it editable
and runs from it; from a checkout it does nothing. colab/00_one_density.ipynb is executed by
tests/notebook_one_density_test.py, the others here.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
import nbformat

from colab import run_notebook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_URL = "https://github.com/ddpm-ot-jax/ddpm_ot_jax"
COLAB = run_notebook.COLAB
NOTEBOOKS = run_notebook.NOTEBOOKS
execute = run_notebook.execute


def code_cells(name: str) -> list[nbformat.NotebookNode]:
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  nbformat.validate(nb)
  return [c for c in nb.cells if c.cell_type == "code"]


def run_install_cell(cwd: str, prelude: str = "") -> subprocess.CompletedProcess:
  """Executes the first code cell of 01 in a fresh Python in `cwd`, with the working directory
  importable as in a Jupyter kernel, after `prelude` (which may replace subprocess.run); the
  script then prints {"cwd": ..., "path0": ..., "path_len_change": ...} as JSON."""
  cell = code_cells(NOTEBOOKS[0])[0].source
  script = "\n".join([
      "import json, os, subprocess, sys",
      "sys.path.insert(0, '')  # a kernel imports from its working directory",
      "before = len(sys.path)",
      textwrap.dedent(prelude),
      cell,
      "print(json.dumps(dict(cwd=os.getcwd(), path0=sys.path[0],"
      " path_len_change=len(sys.path) - before)))",
  ])
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True,
                        timeout=120, env=env)


class StoredNotebooksTest(absltest.TestCase):

  def test_outputs_stripped_install_cell_first_one_parameters_cell(self):
    """In git every notebook (00–03) is valid, every code cell has no outputs and no
    execution count, the first code cell installs the package from the repository (pip and
    REPO_URL) and is not the parameters cell, and exactly one code cell is tagged
    `parameters`."""
    for name in NOTEBOOKS:
      code = code_cells(name)
      for cell in code:
        self.assertEqual(cell.outputs, [], name)
        self.assertIsNone(cell.execution_count, name)
      self.assertIn("pip", code[0].source, name)
      self.assertIn("install", code[0].source, name)
      self.assertIn(REPO_URL, code[0].source, name)
      self.assertNotIn("parameters", code[0].metadata.get("tags", ()), name)
      self.assertEqual(sum("parameters" in c.metadata.get("tags", ()) for c in code), 1, name)

  def test_install_cell_is_shared_and_names_the_repository_once(self):
    """All notebooks open with the same install cell; it sets REPO_URL once, at its top (the only
    place the URL appears), clones with git, installs editable (pip install -e), and is plain
    Python (no IPython magics), so it also runs outside a kernel."""
    cells = [code_cells(name)[0].source for name in NOTEBOOKS]
    self.assertLen(set(cells), 1)
    lines = cells[0].splitlines()
    code_lines = [l for l in lines if l.strip() and not l.lstrip().startswith("#")]
    self.assertEqual(code_lines[0], f'REPO_URL = "{REPO_URL}"')
    self.assertEqual(cells[0].count(REPO_URL), 1)
    self.assertIn('"git", "clone"', cells[0])
    self.assertIn('"pip", "install", "-q", "-e"', cells[0])
    self.assertFalse([l for l in lines if l.lstrip().startswith(("%", "!"))])

  def test_install_cell_does_nothing_in_a_checkout(self):
    """Run from the repository root (as the tests and a local Jupyter do) the install cell
    runs no command and changes neither the working directory nor sys.path; opened from
    colab/ it only moves to the root and puts it on sys.path."""
    refuse = """
        def refuse(*args, **kwargs):
          raise AssertionError(f"the install cell ran {args}")
        subprocess.run = refuse
        """
    proc = run_install_cell(ROOT, refuse)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    state = json.loads(proc.stdout.splitlines()[-1])
    self.assertEqual((state["cwd"], state["path_len_change"]), (ROOT, 0))
    proc = run_install_cell(COLAB, refuse)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    state = json.loads(proc.stdout.splitlines()[-1])
    self.assertEqual((state["cwd"], state["path0"], state["path_len_change"]), (ROOT, ROOT, 1))

  def test_install_cell_clones_installs_and_enters_the_repository_elsewhere(self):
    """Where `configs` is not importable (a fresh Colab runtime) the cell clones REPO_URL into
    ./ddpm_ot_jax, installs it with `pip install -e`, changes into it and puts it first on
    sys.path (git and pip are recorded, not run)."""
    with tempfile.TemporaryDirectory() as tmp:
      record = """
          commands = []
          def fake_run(command, check=False):
            commands.append(list(command))
            if command[0] == "git":
              os.makedirs(command[-1])
          subprocess.run = fake_run
          import atexit
          atexit.register(lambda: print(json.dumps(commands)))
          """
      proc = run_install_cell(tmp, record)
      self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
      out = proc.stdout.splitlines()
      state, commands = json.loads(out[-2]), json.loads(out[-1])
      repo = os.path.join(os.path.realpath(tmp), "ddpm_ot_jax")
      self.assertEqual(commands, [["git", "clone", "--depth", "1", REPO_URL, repo],
                                  [sys.executable, "-m", "pip", "install", "-q", "-e", repo]])
      self.assertEqual((os.path.realpath(state["cwd"]), os.path.realpath(state["path0"])),
                       (repo, repo))


class ExecuteNotebooksTest(absltest.TestCase):

  def test_01_theory(self):
    """Theorem 3.1 holds to the solver tolerance; ε_rel ≥ 0 (an optimal assignment is never
    beaten); on the 2-D density the encoder pairing of 100 points is (nearly) the optimal one
    (identity fraction ≥ 0.9) while the shuffled codes are rejected (≤ 0.25); its codes look
    like N(0, I) samples."""
    _, summary = execute("01_encoder_is_ot_theory.ipynb", (
        "NUM_SAMPLES = 100\nGMM_DIMS = (2,)\nJACOBIAN_POINTS = 2\nFP_GRID = 128\n"
        "FP_TIME_STEPS = 16\nFP_TABLE = 32\nRTOL = 1e-7\n"))
    self.assertLess(summary["gaussian_max_abs_err_vs_closed_form"], 1e-5)
    self.assertGreaterEqual(summary["gmm_ot_relative_error_median"], 0.0)
    self.assertGreaterEqual(summary["density_ot_relative_error"], 0.0)
    self.assertGreaterEqual(summary["density_identity_fraction"], 0.9)
    self.assertLessEqual(summary["density_identity_fraction_shuffled"], 0.25)
    self.assertBetween(summary["density_code_std"], 0.5, 1.5)

  def test_02_dpmot(self):
    """A tiny DPM-OT run end to end with an untrained UNet (ε_θ ≡ 0): every method reports its
    NFE (10), FIDs (means over 2 draws) are finite and positive, and DPM-OT's samples are
    copies of its targets (copy fraction ≥ 0.9, the memorization the notebook warns about),
    hence a far lower FID than DDIM's noise."""
    with tempfile.TemporaryDirectory() as workdir:
      _, summary = execute("02_dpmot_digits.ipynb", (
          "REUSE_DEFAULT_RUN = False\nTRAIN_STEPS = 0\nTINY_UNET = True\nOT_ITERATIONS = 20\n"
          f"NUM_SAMPLES = 20\nNUM_DRAWS = 2\nMETHODS = ('ddim_10', 'dpm_ot_10')\n"
          f"WORKDIR = {workdir!r}\n"))
    self.assertEqual(summary["nfe_dpm_ot_10"], 10)
    self.assertEqual(summary["nfe_ddim_10"], 10)
    for method in ("dpm_ot_10", "ddim_10"):
      self.assertTrue(math.isfinite(summary[f"fid_{method}"]), method)
    self.assertGreater(summary["fid_dpm_ot_10"], 0.0)
    self.assertLess(summary["fid_dpm_ot_10"], summary["fid_ddim_10"])
    self.assertGreaterEqual(summary["copy_fraction_dpm_ot_10"], 0.9)

  def test_03_latent_codes(self):
    """Both image experiments on shared tiny models: the real pairing of the ODE codes is
    optimal far more often than the shuffled control (identity fractions at least 0.5 apart;
    an untrained ε_θ ≡ 0 makes the encoder a pixel-wise scaling, whose pairing is exactly
    optimal), and the distance ratios are computed for the DDPM pair and the VAE control."""
    with tempfile.TemporaryDirectory() as workdir:
      _, summary = execute("03_latent_codes.ipynb", (
          "TRAIN_STEPS = 0\nTINY_UNET = True\nNUM_IMAGES = (16,)\nDDIM_STEPS = 4\n"
          f"NUM_LATENTS = 8\nVAE_STEPS = 50\nWORKDIR = {workdir!r}\n"))
      # The two experiments shared their models: two DDPM folders, not four.
      self.assertLen(os.listdir(os.path.join(workdir, "models")), 2)
    self.assertLessEqual(summary["identity_fraction_shuffled_ode_k16"], 0.25)
    self.assertGreaterEqual(summary["identity_fraction_ode_k16"],
                            summary["identity_fraction_shuffled_ode_k16"] + 0.5)
    self.assertGreater(summary["distance_ratio_vae_control"], 0.0)
    self.assertIn("distance_ratio_different_data", summary)


if __name__ == "__main__":
  absltest.main()
