"""A DPM-OT run as two jax processes on this machine (2 virtual CPU devices each) against one
process with 4 devices: the same global batch, the same 4-device mesh, the same numbers.

The run is scripts/main.py with tests/multiprocess_dpmot_config.py (tiny DPM-OT: 2 training
steps, latents, the OT potential, 2 draws of DDPM-1000 samples and of DPM-OT samples through
the target-sharded map, classifier evaluation), started through `multiprocess_helpers.run_processes`, which names the
run in the DDPM_OT_* environment variables. The kill of one process (a clear abort within the
heartbeat timeout, not a hang) is tests/distributed_test.py's test_killed_process_ends_the_run.
"""
import glob
import json
import os
import shutil
import sys
import tempfile

from absl.testing import absltest
import numpy as np

import helpers
import multiprocess_helpers

ROOT = multiprocess_helpers.ROOT
MAIN = os.path.join(ROOT, "scripts", "main.py")
TINY_DPMOT = os.path.join(ROOT, "tests", "multiprocess_dpmot_config.py")
TIMEOUT_S = 600  # a bound against hangs, far above the ≈ 20–60 s CPU time a run takes, as
# other jobs on a 2-core machine can stretch its wall time 3-fold


def _train_reference(checkpoint_dir: str, out: str) -> None:
  """The run's training alone in this one process (4 devices), and the 2-process run's
  checkpoint of the same step restored beside it: both states to `out` (.npz)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_ot_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from ddpm_ot_jax import data  # pylint: disable=g-import-not-at-top
  from ddpm_ot_jax import trainer  # pylint: disable=g-import-not-at-top
  import multiprocess_dpmot_config  # pylint: disable=g-import-not-at-top
  config = multiprocess_dpmot_config.get_config()
  result = trainer.train_ddpm(config, os.path.join(os.path.dirname(out), "reference"),
                              data.load_dataset(config.data.name, "train"))
  with checkpoints.Checkpointer(checkpoint_dir) as ckpt:
    two = ckpt.restore(result.state, config.training.num_steps)
  arrays = {"devices": np.int32(jax.device_count()), "final_loss": np.float32(result.final_loss)}
  for name, state in (("one", result.state), ("two", two)):
    for field, leaves in helpers.state_leaves(state).items():
      arrays.update({f"{name}/{field}/{i}": leaf for i, leaf in enumerate(leaves)})
  np.savez(out, **arrays)


def _load(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _state(arrays: dict[str, np.ndarray], name: str) -> dict[str, list[np.ndarray]]:
  """`helpers.state_leaves` of the state saved as `name` by _train_reference."""
  return {field: [arrays[f"{name}/{field}/{i}"]
                  for i in range(sum(k.startswith(f"{name}/{field}/") for k in arrays))]
          for field in helpers.STATE_FIELDS}


class TwoProcessDpmotTest(absltest.TestCase):

  def test_two_processes_equal_one(self):
    """scripts/main.py as 2 processes × 2 devices (training included), then as 1 process × 4
    devices on a copy of the 2-process run's trained model (restored from its orbax checkpoint,
    so that both sample the same network):

    (a) training: the 2-process parameters, EMA and Adam state equal those of the same
        training in one process with 4 devices to float32 round-off
        (`helpers.assert_states_close`: gloo sums across processes in another
        order); metrics.jsonl holds each step once (process 0 writes it);
    (b) the sharded assignment: every DPM-OT sample's target j(z) (46 targets split over the
        4 devices of 2 processes, the last shard padded) is the 1-process one exactly;
    (c) the OT potential g (solved in each process) is the 1-process one bitwise, and the
        two processes' agreed (no "different OT potentials" warning);
    (d) every cached array (latents, DDPM-1000 and DPM-OT samples of both draws) is bitwise
        the same, and so is every number of results.json except timings;
    (e) process 0 alone logs, prints and writes (no stray temporary files); all exit 0.
    """
    import multiprocess_dpmot_config  # pylint: disable=g-import-not-at-top
    from ddpm_ot_jax import checkpoints  # pylint: disable=g-import-not-at-top
    from ddpm_ot_jax.experiments import dpmot  # pylint: disable=g-import-not-at-top

    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    two, one = os.path.join(root, "two"), os.path.join(root, "one")
    args = (f"--config={TINY_DPMOT}",)
    runs = multiprocess_helpers.run_processes(MAIN, 2, 2, timeout=TIMEOUT_S,
                                              args=args + (f"--workdir={two}",))
    for proc in runs:
      self.assertEqual(proc.returncode, 0, multiprocess_helpers.describe(runs))
    (model,) = glob.glob(os.path.join(two, "model-*"))
    shutil.copytree(model, os.path.join(one, os.path.basename(model)))
    (single,) = multiprocess_helpers.run_processes(MAIN, 1, 4, timeout=TIMEOUT_S,
                                                   args=args + (f"--workdir={one}",))
    self.assertEqual(single.returncode, 0, multiprocess_helpers.describe([single]))
    (reference,) = multiprocess_helpers.run_processes(
        os.path.abspath(__file__), 1, 4, timeout=TIMEOUT_S,
        args=("train_reference", os.path.join(model, "checkpoints"),
              os.path.join(root, "train.npz")))
    self.assertEqual(reference.returncode, 0, multiprocess_helpers.describe([reference]))

    chief, other = runs
    with self.subTest("training"):
      trained = _load(os.path.join(root, "train.npz"))
      self.assertEqual(int(trained["devices"]), 4)
      helpers.assert_states_close(
          _state(trained, "two"), _state(trained, "one"),
          multiprocess_dpmot_config.get_config().training.lr)
      self.assertIn("Training UNet steps 0 → 2, batch 8 on 4 device(s)", chief.stderr)
      self.assertIn("Resuming from the checkpoint at step 2", single.stderr)
      with open(os.path.join(model, "metrics.jsonl")) as f:
        self.assertEqual([json.loads(line)["step"] for line in f], [1, 2])

    with self.subTest("assignment and samples"):
      names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(two, "*.npz")))
      self.assertEqual(names, sorted(os.path.basename(p)
                                     for p in glob.glob(os.path.join(one, "*.npz"))))
      self.assertEqual([n.rsplit("-", 1)[0] for n in names],
                       ["latents", "samples-ddpm-0", "samples-ddpm-1", "samples-dpm_ot_10-0",
                        "samples-dpm_ot_10-1"])
      for name in names:
        a, b = _load(os.path.join(two, name)), _load(os.path.join(one, name))
        for key in a:
          if key != "seconds":
            self.assertEqual(a[key].tobytes(), b[key].tobytes(), f"{name}: {key}")
        if name.startswith("samples-dpm_ot"):
          self.assertGreater(len(np.unique(a["target_index"])), 5)  # not a trivial map

    with self.subTest("potential"):
      potentials = []
      for workdir in (two, one):
        (ot_dir,) = glob.glob(os.path.join(workdir, "ot-*"))
        with checkpoints.Checkpointer(ot_dir) as ckpt:
          potentials.append(ckpt.restore({
              "g": np.zeros(multiprocess_dpmot_config.NUM_TARGETS, np.float32),
              "diagnostics": np.zeros(len(dpmot._DIAG_KEYS), np.float32)})["g"])  # pylint: disable=protected-access
      self.assertEqual(np.asarray(potentials[0]).tobytes(), np.asarray(potentials[1]).tobytes())
      self.assertGreater(np.abs(potentials[0]).max(), 0)
      for proc in runs:
        self.assertNotIn("different OT potentials", proc.stderr)

    with self.subTest("results"):
      results = []
      for workdir in (two, one):
        with open(os.path.join(workdir, "results.json")) as f:
          results.append({k: v for k, v in json.load(f).items() if "seconds" not in k})
      self.assertEqual(results[0], results[1])
      self.assertEqual((results[0]["train_steps"], results[0]["num_targets"]), (2, 46))

    with self.subTest("process 0 writes"):
      self.assertIn("Wrote", chief.stdout)
      self.assertNotIn("Wrote", other.stdout)
      self.assertNotIn("Training UNet", other.stderr)
      self.assertEqual([p for p in glob.glob(os.path.join(two, "**"), recursive=True)
                        if ".tmp-" in p], [])


if __name__ == "__main__":
  if len(sys.argv) > 3 and sys.argv[1] == "train_reference":
    _train_reference(sys.argv[2], sys.argv[3])
  else:
    absltest.main()
