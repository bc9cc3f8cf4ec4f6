"""Two jax processes on this machine (2 virtual CPU devices each) as one 4-device run.

The test starts this file as the processes (`python distributed_test.py worker MODE`, through
`multiprocess_helpers.run_processes`) and checks what they print:
  compute: a mean and a psum over the 4 devices equal those of one process with 4 devices
    (to float32 round-off: gloo sums across processes in another order) and agree bitwise
    between the two processes; a global batch built from each process's own rows is the full
    batch, and each process's shards hold its own rows; `checkpoints.Checkpointer` (orbax,
    called by both processes on one shared folder) saves and restores replicated params with
    their Adam state and the sharded batch, identically in both processes.
  kill: one process SIGKILLs itself inside a loop of collectives; the other ends non-zero
    with jax's "another task died" abort within the heartbeat timeout (+ margin), not a hang.
"""
import json
import os
import shutil
import signal
import sys
import tempfile
import time

from absl.testing import absltest
import numpy as np

import multiprocess_helpers

HEARTBEAT_S = 5  # the kill run's heartbeat timeout: the survivor's abort comes ≈ this late
BATCH, DIM = 16, 5
FATAL = "JAX distributed service detected fatal errors"
# Process 0 killed: process 1 may first see its collective fail (a Python error) before the
# abort.
FATAL_OR_GLOO = f"{FATAL}|Gloo all-reduce failed"


def _hex(x: np.ndarray) -> str:
  return np.ascontiguousarray(x).tobytes().hex()


def _unhex(text: str, dtype, shape) -> np.ndarray:
  return np.frombuffer(bytes.fromhex(text), dtype).reshape(shape)


def _worker(mode: str) -> None:
  from ddpm_ot_jax import distributed  # pylint: disable=g-import-not-at-top

  distributed.initialize(**distributed.args_from_env(os.environ),
                         heartbeat_timeout_s=HEARTBEAT_S if mode == "kill" else 30,
                         initialization_timeout_s=60, shutdown_timeout_s=20)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  mesh = distributed.all_devices_mesh("data")
  replicated = jax.sharding.NamedSharding(mesh, P())
  rng = np.random.default_rng(0)
  full = rng.standard_normal((BATCH, DIM)).astype(np.float32)
  x = distributed.global_batch_from_local(mesh, full[distributed.process_rows(BATCH)])

  if mode == "kill":
    step = jax.jit(lambda v: v * 0.5 + jnp.mean(v), out_shardings=x.sharding)
    for i in range(100_000):
      if i == 20 and jax.process_index() == int(os.environ["VICTIM"]):
        print(f"KILLED_AT {time.time():.3f}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
      x = step(x)
      x.block_until_ready()
    print("SURVIVED", flush=True)
    return

  mean = jax.jit(lambda v: jnp.mean(v, axis=0), out_shardings=replicated)(x)
  psum = jax.jit(jax.shard_map(lambda v: jax.lax.psum(jnp.sum(v, axis=0), "data"), mesh=mesh,
                               in_specs=P("data"), out_specs=P(), check_vma=False))(x)
  gathered = distributed.allgather_to_host(x)
  local_ok = all(np.array_equal(np.asarray(s.data), full[s.index]) for s in x.addressable_shards)
  result = dict(
      process_index=jax.process_index(), process_count=jax.process_count(),
      device_count=jax.device_count(), local_device_count=jax.local_device_count(),
      rows=[distributed.process_rows(BATCH).start, distributed.process_rows(BATCH).stop],
      mean=_hex(distributed.allgather_to_host(mean)),
      psum=_hex(distributed.allgather_to_host(psum)),
      gathered=_hex(gathered), local_shards_ok=bool(local_ok),
      processes=distributed.allgather_to_host(np.int32(jax.process_index())).tolist())
  result["checkpoint"] = _checkpoint_round_trip(os.environ["CKPT_DIR"], mesh, x)
  distributed.barrier("distributed_test.end")
  print("RESULT " + json.dumps(result), flush=True)


def _checkpoint_round_trip(directory: str, mesh, batch) -> dict:
  """Saves {params, Adam state, step, sharded batch} at steps 1 and 2 (keep 1), restores the
  latest into an abstract target; what came back, gathered, as hex."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ddpm_ot_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from ddpm_ot_jax import distributed  # pylint: disable=g-import-not-at-top

  tx = optax.adam(1e-2)

  def init(key):
    params = {"w": jax.random.normal(key, (7, 3)), "b": jax.numpy.full((3,), 0.5)}
    grads = jax.tree.map(lambda p: p * 0.1, params)
    _, opt_state = tx.update(grads, tx.init(params), params)
    return {"params": params, "opt_state": opt_state, "step": jax.numpy.int32(2)}

  state = jax.jit(init, out_shardings=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))(jax.random.key(0))
  state["batch"] = batch
  with checkpoints.Checkpointer(directory, keep=1) as ckpt:
    ckpt.save(1, state)
    ckpt.save(2, state)
    ckpt.wait()
    steps = ckpt.all_steps()
    restored = ckpt.restore(checkpoints.abstract_like(state))
  leaves = [distributed.allgather_to_host(v) for v in jax.tree.leaves(restored)]
  originals = [distributed.allgather_to_host(v) for v in jax.tree.leaves(state)]
  return dict(steps=steps, equal=all(np.array_equal(a, b) for a, b in zip(leaves, originals)),
              shardings_kept=all(r.sharding == s.sharding for r, s in
                                 zip(jax.tree.leaves(restored), jax.tree.leaves(state))),
              values=[_hex(v) for v in leaves])


def _result(proc) -> dict:
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  return json.loads(lines[-1][len("RESULT "):]) if lines else {}


class TwoProcessTest(absltest.TestCase):
  """One test per multi-process run (pytest-xdist spreads tests, not classes)."""

  def test_two_processes_equal_one(self):
    """2 processes × 2 devices against 1 process × 4 devices, both running `_worker('compute')`.

    (a) mean and psum over the 4 devices: float32 round-off from the 1-process values,
        bitwise the same in both processes.
    (b) the global batch from each process's own rows is the full batch, bitwise; process p
        fed rows [8p, 8p + 8) and its devices hold exactly those.
    (c) orbax from both processes into one folder: the latest step restores bitwise with its
        shardings, the same in both processes and as in one process; keep=1 dropped step 1.
    """
    script = os.path.abspath(__file__)
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    runs = multiprocess_helpers.run_processes(
        script, 2, 2, timeout=120, args=("worker", "compute"),
        env={"CKPT_DIR": os.path.join(tmp, "two")})
    reference = multiprocess_helpers.run_processes(
        script, 1, 4, timeout=120, args=("worker", "compute"),
        env={"CKPT_DIR": os.path.join(tmp, "one")})
    for run in (runs, reference):
      for proc in run:
        self.assertEqual(proc.returncode, 0, multiprocess_helpers.describe(run))
    (first, second), ref = [_result(p) for p in runs], _result(reference[0])
    full = np.random.default_rng(0).standard_normal((BATCH, DIM)).astype(np.float32)

    with self.subTest("reduction"):
      self.assertEqual([first["process_count"], first["device_count"],
                        first["local_device_count"]], [2, 4, 2])
      self.assertEqual([ref["process_count"], ref["device_count"]], [1, 4])
      for key, exact in (("mean", full.astype(np.float64).mean(0)),
                         ("psum", full.astype(np.float64).sum(0))):
        self.assertEqual(first[key], second[key], key)  # replicated: same bits everywhere
        two = _unhex(first[key], np.float32, (DIM,))
        one = _unhex(ref[key], np.float32, (DIM,))
        scale = 1 + np.abs(exact).max()
        np.testing.assert_allclose(two, one, rtol=0, atol=1e-6 * scale, err_msg=key)
        np.testing.assert_allclose(two, exact, rtol=0, atol=1e-5 * scale, err_msg=key)

    with self.subTest("batch"):
      self.assertEqual([first["rows"], second["rows"]], [[0, 8], [8, 16]])
      for result in (first, second, ref):
        self.assertTrue(result["local_shards_ok"])
        np.testing.assert_array_equal(_unhex(result["gathered"], np.float32, full.shape), full)
      self.assertEqual(first["processes"], [0, 1])

    with self.subTest("checkpoint"):
      for result in (first, second, ref):
        self.assertEqual(result["checkpoint"]["steps"], [2])
        self.assertTrue(result["checkpoint"]["equal"])
        self.assertTrue(result["checkpoint"]["shardings_kept"])
      self.assertEqual(first["checkpoint"]["values"], second["checkpoint"]["values"])
      self.assertEqual(first["checkpoint"]["values"], ref["checkpoint"]["values"])
      self.assertEqual(sorted(os.listdir(os.path.join(tmp, "two"))), ["2"])

  def test_killed_process_ends_the_run(self):
    """SIGKILL of process 1 (0: the coordinator) in a loop of collectives: the other
    process exits non-zero with jax's fatal-error message within the heartbeat timeout + 15 s
    (at once when the coordinator dies)."""
    script = os.path.abspath(__file__)
    for victim, pattern in ((1, FATAL), (0, FATAL_OR_GLOO)):
      with self.subTest(victim=victim):
        runs = multiprocess_helpers.run_processes(script, 2, 2, timeout=90,
                                                  args=("worker", "kill"),
                                                  env={"VICTIM": str(victim)})
        info = multiprocess_helpers.describe(runs)
        dead, survivor = runs[victim], runs[1 - victim]
        self.assertFalse(survivor.timed_out, info)
        self.assertEqual(dead.returncode, -signal.SIGKILL, info)
        self.assertNotEqual(survivor.returncode, 0, info)
        self.assertNotIn("SURVIVED", survivor.stdout, info)
        self.assertRegex(survivor.stderr, pattern, info)
        killed_at = float(dead.stdout.split("KILLED_AT ")[1].split()[0])
        self.assertLess(survivor.end_time - killed_at, HEARTBEAT_S + 15, info)


if __name__ == "__main__":
  if len(sys.argv) > 2 and sys.argv[1] == "worker":
    _worker(sys.argv[2])
  else:
    absltest.main()
