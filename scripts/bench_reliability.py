r"""Faults and bad input, measured: kill-and-resume runs and bad-input cases of scripts/main.py.

  python scripts/bench_reliability.py                      # the full harness (≈ 15 min, 2 CPUs)
  python scripts/bench_reliability.py --config.kills=3 --config.cases=quick   # the CI subset

Reads configs/bench/reliability.py (ml_collections, `--config.KEY=VALUE` overrides, as
scripts/main.py: scripts/cli.py).

1. Kill and resume. A tiny digits DDPM run (UNet ch 8, 60 steps, a checkpoint every 10) and a
   tiny DPM-OT run are each run once, uninterrupted, as the reference. Then every kill run
   starts in a fresh workdir, is SIGKILLed once, and is restarted with the same command until
   it finishes. The kill moment is either a wall-clock delay drawn from a seeded RNG
   (`config.seed`) or a named fault point (`DDPM_OT_FAULT=<point>[@k]`, `checkpoints.fault_point`):
   inside an asynchronous checkpoint write (`checkpoint_save`), between writing and renaming
   an atomic file (`atomic_write`), inside the DPM-OT stages (`dpmot_latents`,
   `dpmot_ot_solve`, `dpmot_sampling`, `dpmot_metrics`). Counted per run: finished, final
   state bit-identical to the reference (SHA-256 of the restored checkpoint pytree; for
   DPM-OT also the OT potential and every cached sample array), files half-written (a
   .json/.npz/.png/.msgpack that does not parse, metrics.jsonl lines that are not the
   reference's steps) or left behind (temporary files, files the reference does not have),
   crashes on restart (a restart with a non-zero exit code). Plus: the latest checkpoint
   truncated must never restart training silently from step 0.
2. Bad inputs. Each case runs scripts/main.py in a subprocess and passes when the exit code is
   non-zero, stderr has exactly one 'error:' line and no traceback, no file that existed
   before was changed, no results.json / config.json appeared and no temporary file is left.
   A few cases check more (the NaN guard names the step and keeps the last good checkpoint).

Writes JSON (config.out) and the markdown tables (config.markdown); prints the tables.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence
import warnings


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
_MAIN = os.path.join(_REPO, "scripts", "main.py")

DEFAULT_CONFIG = os.path.join(_REPO, "configs", "bench", "reliability.py")

TINY_DDPM = '''
from configs import digits_ddpm
def get_config():
  c = digits_ddpm.get_config()
  c.model.update(dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), norm_groups=4))
  c.diffusion.num_steps = 100
  c.training.update(dict(num_steps={steps}, batch_size=8, warmup_steps=5, log_every=10,
                         checkpoint_every={every}, sample_every=0, keep_checkpoints=2))
  c.sampling.update(dict(num_samples=16, batch_size=16, num_steps=5, grid_size=16))
  c.evaluate.classifier = False
  return c
'''
TINY_DPMOT = '''
from configs import digits_dpmot
def get_config():
  c = digits_dpmot.get_config()
  c.model.update(dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), norm_groups=4))
  c.diffusion.num_steps = 100
  c.training.update(dict(num_steps=20, batch_size=8, warmup_steps=5, log_every=10,
                         checkpoint_every=5, sample_every=0, keep_checkpoints=2))
  c.dpmot.target_split = "train[:48]"
  c.dpmot.ot.update(dict(num_iterations=100, batch_size=128, error_eval_every=50,
                         check_samples=2000, error_batch_size=512))
  c.evaluation.update(dict(methods=("ddim_5", "dpm_ot_5"), num_samples=24, num_draws=2,
                           batch_size=24, tuning_num_samples=24, classifier_steps=20))
  c.evaluation.spacings = dict(ddim_5="time_uniform")
  return c
'''
# Targeted kills: (config, fault point[@k]). The tiny DDPM saves 6 checkpoints and writes
# samples.png, samples.npz, config.json, results.json atomically, in this order.
TARGETED = (
    ("ddpm", "checkpoint_save@1"), ("dpmot", "dpmot_latents"), ("dpmot", "dpmot_ot_solve"),
    ("dpmot", "dpmot_sampling@2"), ("dpmot", "dpmot_metrics@3"), ("ddpm", "checkpoint_save@4"),
    ("ddpm", "atomic_write@2"), ("ddpm", "atomic_write@4"), ("ddpm", "checkpoint_save@6"),
)
MAX_RESTARTS = 4
TEMP_MARKERS = (".tmp-", "orbax-checkpoint-tmp")


# ------------------------------------------------------------------------------------------
# Running scripts/main.py.
# ------------------------------------------------------------------------------------------


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
  env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  env.pop("DDPM_OT_FAULT", None)
  env.update(extra or {})
  return env


def run_main(args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300,
             kill_after: float | None = None) -> tuple[int, str, float]:
  """(exit code, stderr, seconds) of `python scripts/main.py *args`; SIGKILLed after
  `kill_after` seconds when given (exit code -9)."""
  start = time.perf_counter()
  with tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen([sys.executable, _MAIN, *args], cwd=_REPO, env=_env(env),
                            stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
      proc.wait(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    err.seek(0)
    return proc.returncode, err.read(), time.perf_counter() - start


# ------------------------------------------------------------------------------------------
# What a workdir holds.
# ------------------------------------------------------------------------------------------


def state_hash(checkpoint_dir: str, skip: str = "") -> tuple[int | None, str | None]:
  """(latest step, SHA-256 over the restored pytree's leaves: path, dtype, shape, bytes; leaves
  whose path contains `skip`, when given, left out)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  steps = sorted(int(s) for s in os.listdir(checkpoint_dir) if s.isdigit()) if os.path.isdir(
      checkpoint_dir) else []
  if not steps:
    return None, None
  with warnings.catch_warnings(), ocp.PyTreeCheckpointer() as ckpt:
    warnings.simplefilter("ignore")  # "Sharding info not provided": host arrays are wanted
    tree = ckpt.restore(os.path.join(checkpoint_dir, str(steps[-1]), "state"))
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    if skip and skip in jax.tree_util.keystr(path):
      continue
    array = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
  return steps[-1], digest.hexdigest()


def _npz_hash(path: str) -> str:
  import numpy as np  # pylint: disable=g-import-not-at-top

  digest = hashlib.sha256()
  with np.load(path) as f:
    for key in sorted(f.files):
      if key != "seconds":  # wall time, not a result
        digest.update(key.encode() + np.asarray(f[key]).tobytes())
  return digest.hexdigest()


def fingerprint_run(workdir: str) -> dict[str, str]:
  """What must be bit-identical between a resumed run and the reference: every training
  checkpoint's final state, the OT potential and every cached array (samples, latents)."""
  out = {}
  for ckpt in sorted(glob.glob(os.path.join(workdir, "**", "checkpoints"), recursive=True)):
    out[os.path.relpath(ckpt, workdir)] = "%s:%s" % state_hash(ckpt)
  for ot in sorted(glob.glob(os.path.join(workdir, "ot-*"))):
    # The potential g; its diagnostics hold the solve's wall time, not a result.
    out[os.path.relpath(ot, workdir)] = "%s:%s" % state_hash(ot, skip="diagnostics")
  for npz in sorted(glob.glob(os.path.join(workdir, "*.npz"))):
    out[os.path.relpath(npz, workdir)] = _npz_hash(npz)
  return out


def listing(workdir: str) -> set[str]:
  """Relative paths of the files (checkpoint step folders as one entry each)."""
  out = set()
  for dirpath, dirnames, filenames in os.walk(workdir):
    rel = os.path.relpath(dirpath, workdir)
    parts = rel.split(os.sep)
    if len(parts) >= 2 and parts[-2] == "checkpoints" or (
        parts[-1].startswith("ot-") and rel != "."):
      out.add(rel + "/")
      dirnames[:] = []
      continue
    for name in dirnames:
      if any(m in name for m in TEMP_MARKERS):
        out.add(os.path.join(rel, name) + "/")
    out.update(os.path.normpath(os.path.join(rel, name)) for name in filenames)
  return out


def temporaries(workdir: str) -> list[str]:
  found = []
  for dirpath, dirnames, filenames in os.walk(workdir):
    for name in dirnames + filenames:
      if any(m in name for m in TEMP_MARKERS):
        found.append(os.path.relpath(os.path.join(dirpath, name), workdir))
  return sorted(found)


def half_written(workdir: str) -> list[str]:
  """Files that do not parse as what their name says."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  bad = []
  for dirpath, dirnames, filenames in os.walk(workdir):
    if "checkpoints" in dirpath.split(os.sep) or os.path.basename(dirpath).startswith("ot-"):
      dirnames[:] = []
      continue
    for name in filenames:
      path = os.path.join(dirpath, name)
      try:
        if name.endswith(".json"):
          with open(path) as f:
            json.load(f)
        elif name.endswith(".jsonl"):
          with open(path) as f:
            for line in f:
              json.loads(line)
        elif name.endswith(".npz"):
          with np.load(path) as f:
            for key in f.files:
              f[key]  # pylint: disable=pointless-statement
        elif name.endswith(".png"):
          with Image.open(path) as image:
            image.load()
        elif name.endswith(".msgpack"):
          import flax  # pylint: disable=g-import-not-at-top
          with open(path, "rb") as f:
            flax.serialization.msgpack_restore(f.read())
      except Exception:  # pylint: disable=broad-except
        bad.append(os.path.relpath(path, workdir))
  return sorted(bad)


def metrics_steps(workdir: str) -> list[list[int]]:
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, "**", "metrics.jsonl"), recursive=True)):
    with open(path) as f:
      out.append([json.loads(line)["step"] for line in f if line.strip()])
  return out


# ------------------------------------------------------------------------------------------
# 1. Kill and resume.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class KillRun:
  name: str
  config: str
  kill: str  # 'fault <point>' or 'after <s> s'
  killed: bool = False
  restarts: int = 0
  finished: bool = False
  identical: bool = False
  half_written: list = dataclasses.field(default_factory=list)
  left_behind: list = dataclasses.field(default_factory=list)
  crashes: int = 0
  crash_lines: list = dataclasses.field(default_factory=list)
  seconds: float = 0.0


def _error_lines(stderr: str) -> list[str]:
  lines = [line for line in stderr.splitlines() if line.startswith("error:")]
  if not lines and "Traceback" in stderr:
    lines = [stderr.strip().splitlines()[-1]]
  return lines


def kill_runs(root: str, configs: dict[str, str], count: int, seed: int,
              log: Callable[[str], None] = print, targeted: Sequence[tuple[str, str]] = TARGETED,
              jobs: int = 1) -> tuple[list[KillRun], dict]:
  """`count` kill-and-resume runs (targeted first) against uninterrupted references."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  references = {}
  plan = list(targeted[:count])
  kinds = sorted({kind for kind, _ in plan}) or ["ddpm"]
  for kind in kinds:
    workdir = os.path.join(root, f"reference-{kind}")
    rc, err, seconds = run_main([f"--config={configs[kind]}", f"--workdir={workdir}"])
    if rc != 0:
      raise RuntimeError(f"reference {kind} run failed ({rc}): {err[-2000:]}")
    references[kind] = dict(workdir=workdir, seconds=seconds, fingerprint=fingerprint_run(workdir),
                            listing=listing(workdir), metrics=metrics_steps(workdir))
    log(f"reference {kind}: {seconds:.1f} s")
  rng = np.random.default_rng(seed)
  while len(plan) < count:  # random moments over the whole DDPM run, startup included
    # Up to 0.8 × the reference's wall time: a slower reference (a busy CPU) must not draw
    # moments after a faster kill run has already finished.
    plan.append(("ddpm", float(np.round(rng.uniform(1.0, 0.8 * references["ddpm"]["seconds"]),
                                        2))
                 if "ddpm" in references else 5.0))
  if "ddpm" not in references and any(kind == "ddpm" for kind, _ in plan):
    raise ValueError("random kills need a DDPM reference: put a ddpm run first.")

  def one(i: int, kind: str, how) -> KillRun:
    ref = references[kind]
    workdir = os.path.join(root, f"kill-{i:02d}-{kind}")
    args = [f"--config={configs[kind]}", f"--workdir={workdir}"]
    run = KillRun(f"kill-{i:02d}", kind, f"fault {how}" if isinstance(how, str) else
                  f"after {how:.2f} s")
    start = time.perf_counter()
    if isinstance(how, str):
      rc, err, _ = run_main(args, env={"DDPM_OT_FAULT": how})
    else:
      rc, err, _ = run_main(args, kill_after=how)
    run.killed = rc == -signal.SIGKILL
    if rc not in (0, -signal.SIGKILL):
      run.crashes += 1
      run.crash_lines += _error_lines(err)
    while rc != 0 and run.restarts < MAX_RESTARTS:
      run.restarts += 1
      rc, err, _ = run_main(args)
      if rc != 0:
        run.crashes += 1
        run.crash_lines += _error_lines(err)
    run.finished = rc == 0
    run.seconds = time.perf_counter() - start
    if run.finished:
      run.identical = fingerprint_run(workdir) == ref["fingerprint"]
      if metrics_steps(workdir) != ref["metrics"]:
        run.half_written.append("metrics.jsonl steps differ from the reference")
    run.half_written += half_written(workdir)
    run.left_behind = sorted(temporaries(workdir) + sorted(listing(workdir) - ref["listing"]))
    log(f"{run.name} {kind:6s} {run.kill:28s} killed={run.killed} restarts={run.restarts} "
        f"finished={run.finished} identical={run.identical} half={run.half_written} "
        f"left={run.left_behind} crashes={run.crash_lines}")
    return run

  import concurrent.futures  # pylint: disable=g-import-not-at-top
  with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
    runs = list(pool.map(lambda item: one(item[0], *item[1]), enumerate(plan)))
  return runs, references


def corrupt_latest_checkpoint(root: str, configs: dict[str, str], reference: str) -> dict:
  """The latest checkpoint of a finished run with its largest data file truncated, then the
  run continued (more steps): it must resume from the previous good checkpoint or stop with a
  message naming the bad one, never start again from step 0."""
  workdir = os.path.join(root, "corrupt-checkpoint")
  shutil.copytree(reference, workdir)
  ckpt = os.path.join(workdir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
  latest = os.path.join(ckpt, str(steps[-1]))
  files = [p for p in glob.glob(os.path.join(latest, "**", "*"), recursive=True)
           if os.path.isfile(p)]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  results_before = _digest(os.path.join(workdir, "results.json"))
  rc, err, seconds = run_main([f"--config={configs['ddpm']}", f"--workdir={workdir}",
                               f"--config.training.num_steps={steps[-1] + 10}"])
  text = " ".join(_error_lines(err))
  resumed_from = None
  for line in err.splitlines():
    if "Resuming from the checkpoint at step" in line:
      resumed_from = int(line.split("at step")[1].split()[0].rstrip("."))
  restarted_from_zero = "Training" in err and "steps 0 →" in err
  ok = (not restarted_from_zero) and (
      (rc != 0 and str(steps[-1]) in text and "Traceback" not in err
       and _digest(os.path.join(workdir, "results.json")) == results_before)
      or (rc == 0 and resumed_from == steps[-2]))
  return dict(truncated=os.path.relpath(victim, workdir), exit_code=rc, message=text,
              resumed_from=resumed_from, restarted_from_zero=restarted_from_zero, ok=ok,
              seconds=seconds)


# ------------------------------------------------------------------------------------------
# 2. Bad inputs.
# ------------------------------------------------------------------------------------------


def _digest(path: str) -> str | None:
  if not os.path.isfile(path):
    return None
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _snapshot(workdir: str) -> dict[str, str]:
  if not os.path.isdir(workdir):
    return {}
  out = {}
  for dirpath, _, filenames in os.walk(workdir):
    for name in filenames:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, workdir)] = _digest(path)
  return out


@dataclasses.dataclass
class Case:
  name: str
  args: list[str]
  setup: Callable[[str], None] | None = None  # (case folder) → prepares files
  env: dict[str, str] | None = None
  expect: str = ""  # a substring the error line must contain
  check: Callable[[str, str], str] | None = None  # (case folder, stderr) → '' or a problem
  quick: bool = False
  recovers: bool = False  # a cache: recomputed with a warning naming it, exit code 0


def _write(path: str, blob: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(blob)


def _fake_cifar(root: str, truncate: bool) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top

  folder = os.path.join(root, "cifar-10-batches-py")
  rng = np.random.default_rng(0)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    batch = {b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
             b"labels": list(rng.integers(0, 10, 8))}
    blob = pickle.dumps(batch)
    _write(os.path.join(folder, name), blob[:len(blob) // 3] if truncate else blob)


def _image_folder(root: str, corrupt: bool) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  os.makedirs(os.path.join(root, "train"), exist_ok=True)
  for i in range(4):
    path = os.path.join(root, "train", f"{i}.png")
    Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(path)
  if corrupt:
    _write(os.path.join(root, "train", "9.png"), b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)


def _copy_reference(source: str) -> Callable[[str], None]:
  def setup(folder: str) -> None:
    shutil.copytree(source, os.path.join(folder, "run"))
  return setup


def _nan_guard_check(folder: str, stderr: str) -> str:
  lines = _error_lines(stderr)
  if not lines or "non-finite at step" not in lines[0]:
    return "no NaN-guard message naming the step"
  ckpt = os.path.join(folder, "run", "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
  if f"step {steps[-1]})" not in lines[0]:
    return f"message does not name the last good checkpoint (step {steps[-1]})"
  return ""


def bad_input_cases(configs: dict[str, str], reference: str | None,
                    dpmot_reference: str | None) -> list[Case]:
  ddpm, dpmot = configs["ddpm"], configs["dpmot"]
  fake_weights_dir = os.path.join(_REPO, "tests")

  def fid_weights(wrong_shape: bool) -> Callable[[str], None]:
    def setup(folder: str) -> None:
      sys.path.insert(0, fake_weights_dir)
      import fake_weights  # pylint: disable=g-import-not-at-top
      state = fake_weights.random_state_dict(0)
      if wrong_shape:
        key = next(k for k in state if k.endswith("conv.weight"))
        state[key] = state[key][:, :1]
      fake_weights.write_zip_without_torch(os.path.join(folder, "fid.pth"), state)
      _fake_cifar(os.path.join(folder, "data"), truncate=False)
    return setup

  def diffusers_folder(kind: str) -> Callable[[str], None]:
    def setup(folder: str) -> None:
      path = os.path.join(folder, "ddpm")
      os.makedirs(path)
      if kind == "wrong_shape":
        _write(os.path.join(path, "config.json"), json.dumps(dict(
            _class_name="UNet2DModel", sample_size=32, in_channels=3, out_channels=3,
            block_out_channels=[8], layers_per_block=1, down_block_types=["DownBlock2D"],
            up_block_types=["UpBlock2D"], norm_num_groups=4)).encode())
        header = json.dumps({"conv_in.weight": dict(dtype="F32", shape=[8, 3, 1, 1],
                                                     data_offsets=[0, 96])}).encode()
        _write(os.path.join(path, "diffusion_pytorch_model.safetensors"),
               len(header).to_bytes(8, "little") + header + bytes(96))
    return setup

  diffusers_args = ["--config.training.init_from_diffusers={folder}/ddpm"]
  cifar_dpmot = os.path.join(_REPO, "configs", "cifar10_dpmot.py")
  cifar_splits = ["--config.dpmot.target_split=test[:4]", "--config.evaluation.reference_split="
                  "test[4:]", "--config.evaluation.floor_split=train[:8]"]
  cases = [
      Case("unknown key", [f"--config={ddpm}", "--config.training.num_stepz=5"],
           expect="Valid keys", quick=True),
      Case("wrong type", [f"--config={ddpm}", "--config.training.num_steps=abc"], quick=True),
      Case("negative steps", [f"--config={ddpm}", "--config.training.num_steps=-5"],
           expect="num_steps", quick=True),
      Case("zero batch", [f"--config={ddpm}", "--config.training.batch_size=0"],
           expect="batch_size", quick=True),
      Case("batch not divisible by devices", [f"--config={ddpm}",
                                              "--config.training.batch_size=7"],
           env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, expect="batch_size"),
      Case("NaN learning rate", [f"--config={ddpm}", "--config.training.lr=nan"],
           expect="training.lr", quick=True),
      Case("negative learning rate", [f"--config={ddpm}", "--config.training.lr=-0.1"],
           expect="training.lr"),
      Case("zero checkpoint_every", [f"--config={ddpm}",
                                     "--config.training.checkpoint_every=0"],
           expect="checkpoint_every", quick=True),
      Case("zero log_every", [f"--config={ddpm}", "--config.training.log_every=0"],
           expect="log_every"),
      Case("keep_checkpoints 0", [f"--config={ddpm}", "--config.training.keep_checkpoints=0"],
           expect="keep"),
      Case("num_devices too many", [f"--config={ddpm}", "--config.training.num_devices=64"],
           expect="num_devices"),
      Case("unknown sampler", [f"--config={ddpm}", "--config.sampling.sampler=euler"],
           expect="sampling.sampler"),
      Case("unknown dataset", [f"--config={ddpm}", "--config.data.name=mnist"],
           expect="mnist"),
      Case("stray argument", [f"--config={ddpm}", "extra"], expect="unexpected", quick=True),
      Case("missing config file", ["--config={folder}/nope.py"], expect="not found",
           quick=True),
      Case("garbled config file", ["--config={folder}/garbled.py"],
           setup=lambda f: _write(os.path.join(f, "garbled.py"), b"def get_config(:\n  ("),
           expect="garbled.py", quick=True),
      Case("config without get_config", ["--config={folder}/empty.py"],
           setup=lambda f: _write(os.path.join(f, "empty.py"), b"x = 1\n"),
           expect="get_config"),
      Case("workdir is a file", [f"--config={ddpm}", "--workdir={folder}/file"],
           setup=lambda f: _write(os.path.join(f, "file"), b"mine\n"), expect="workdir",
           quick=True),
      Case("workdir read-only", [f"--config={ddpm}", "--workdir=/proc/ddpm-ot-run"],
           expect="workdir"),
      Case("digits root given", [f"--config={ddpm}", "--config.data.root={folder}/nodata"],
           expect="data.root"),
      Case("digits bad resolution", [f"--config={ddpm}", "--config.data.resolution=16"],
           expect="resolution"),
      Case("CIFAR-10 root missing", [f"--config={ddpm}", "--config.data.name=cifar10",
                                     "--config.data.root={folder}/nodata"], expect="nodata"),
      Case("CIFAR-10 root empty", [f"--config={ddpm}", "--config.data.name=cifar10",
                                   "--config.data.root={folder}/data"],
           setup=lambda f: os.makedirs(os.path.join(f, "data")), expect="data"),
      Case("CIFAR-10 pickles truncated", [f"--config={ddpm}", "--config.data.name=cifar10",
                                          "--config.data.root={folder}/data"],
           setup=lambda f: _fake_cifar(os.path.join(f, "data"), truncate=True),
           expect="data_batch"),
      Case("image folder missing", [f"--config={ddpm}", "--config.data.name=image_folder",
                                    "--config.data.root={folder}/nodata",
                                    "--config.data.resolution=16"], expect="nodata"),
      Case("image folder empty", [f"--config={ddpm}", "--config.data.name=image_folder",
                                  "--config.data.root={folder}/data",
                                  "--config.data.resolution=16"],
           setup=lambda f: os.makedirs(os.path.join(f, "data", "train")), expect="data"),
      Case("image folder corrupt PNG", [f"--config={ddpm}", "--config.data.name=image_folder",
                                        "--config.data.root={folder}/data",
                                        "--config.data.resolution=16"],
           setup=lambda f: _image_folder(os.path.join(f, "data"), corrupt=True),
           expect="9.png"),
      Case("Inception weights missing", [f"--config={cifar_dpmot}", *cifar_splits,
                                         "--config.data.root={folder}/data",
                                         "--config.evaluation.inception_weights={folder}/no.pth"],
           setup=lambda f: _fake_cifar(os.path.join(f, "data"), truncate=False),
           expect="no.pth"),
      Case("Inception weights wrong shape", [
          f"--config={cifar_dpmot}", *cifar_splits, "--config.data.root={folder}/data",
          "--config.evaluation.inception_weights={folder}/fid.pth",
          "--config.evaluation.inception_width=0.0625", "--config.evaluation.inception_resize=75"],
           setup=fid_weights(wrong_shape=True), expect="Inception"),
      Case("diffusers weights missing", [f"--config={ddpm}", "--config.data.name=cifar10",
                                         "--config.data.root={folder}/data", *diffusers_args],
           setup=lambda f: (_fake_cifar(os.path.join(f, "data"), truncate=False),
                            diffusers_folder("missing")(f)), expect="ddpm"),
      Case("diffusers weights wrong shape", [f"--config={ddpm}", "--config.data.name=cifar10",
                                             "--config.data.root={folder}/data",
                                             *diffusers_args],
           setup=lambda f: (_fake_cifar(os.path.join(f, "data"), truncate=False),
                            diffusers_folder("wrong_shape")(f)), expect="do not fit"),
  ]
  if reference:
    cases += [
        Case("resume with a different model size", [
            f"--config={ddpm}", "--workdir={folder}/run", "--config.model.ch=16",
            "--config.training.num_steps=1000"],
             setup=_copy_reference(reference), expect="checkpoint"),
        Case("checkpoint past num_steps", [f"--config={ddpm}", "--workdir={folder}/run",
                                           "--config.training.num_steps=1"],
             setup=_copy_reference(reference), expect="num_steps"),
        Case("NaN-producing learning rate", [
            f"--config={ddpm}", "--workdir={folder}/run", "--config.training.lr=1e30",
            "--config.training.num_steps=1000"],
             setup=_copy_reference(reference), expect="non-finite", check=_nan_guard_check),
    ]
  if dpmot_reference:
    def corrupt_classifier(folder: str) -> None:
      _copy_reference(dpmot_reference)(folder)
      for path in glob.glob(os.path.join(folder, "run", "classifier-*.msgpack")):
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)

    def corrupt_ot(folder: str) -> None:
      _copy_reference(dpmot_reference)(folder)
      for path in glob.glob(os.path.join(folder, "run", "ot-*", "**", "d", "*"), recursive=True):
        if os.path.isfile(path):
          with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    cases += [
        Case("DPM-OT classifier cache corrupt", [f"--config={dpmot}", "--workdir={folder}/run"],
             setup=corrupt_classifier, expect="cannot be read", recovers=True),
        Case("DPM-OT OT cache corrupt", [f"--config={dpmot}", "--workdir={folder}/run"],
             setup=corrupt_ot, expect="ot-"),
    ]
  return cases


QUICK = ("unknown key", "wrong type", "negative steps", "zero batch", "NaN learning rate",
         "zero checkpoint_every", "stray argument", "missing config file", "garbled config file",
         "workdir is a file")


def run_case(case: Case, root: str) -> dict:
  folder = os.path.join(root, "case-" + "".join(c if c.isalnum() else "_" for c in case.name))
  os.makedirs(folder)
  if case.setup:
    case.setup(folder)
  before = _snapshot(folder)
  args = [a.replace("{folder}", folder) for a in case.args]
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={folder}/run")
  workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))
  workdir_existed = os.path.exists(workdir)
  rc, err, seconds = run_main(args, env=case.env, timeout=240)
  after = _snapshot(folder)
  errors = _error_lines(err)
  problems = []
  if case.recovers:
    if rc != 0:
      problems.append(f"exit code {rc}")
    if "Traceback" in err:
      problems.append("traceback")
    if case.expect not in err:
      problems.append(f"no warning naming {case.expect!r}")
    warning = next((line for line in err.splitlines() if case.expect in line), "")
    return dict(case=case.name, exit_code=rc, ok=not problems, problems=problems,
                message=("recovered: " + warning.split("] ", 1)[-1])[:400], seconds=seconds)
  if rc == 0:
    problems.append("exit code 0")
  if rc < 0:
    problems.append(f"killed by signal {-rc}")
  if "Traceback" in err:
    problems.append("traceback")
  if len([line for line in err.splitlines() if line.startswith("error:")]) != 1:
    problems.append("not exactly one 'error:' line")
  tail = err[err.find("error:"):] if "error:" in err else ""
  if case.expect and case.expect not in tail:
    problems.append(f"error message lacks {case.expect!r}")
  changed = sorted(p for p in before if after.get(p) != before[p]
                   and os.path.basename(p) != "metrics.jsonl")
  if changed:
    problems.append(f"changed: {changed[:3]}")
  new = sorted(set(after) - set(before))
  bad_new = [p for p in new if os.path.basename(p) in ("results.json", "config.json")
             or any(m in p for m in TEMP_MARKERS)]
  if bad_new:
    problems.append(f"left: {bad_new[:3]}")
  if not workdir_existed and os.path.isdir(workdir):
    problems.append("workdir created and left")
  if case.check and not problems:
    problem = case.check(folder, err)
    if problem:
      problems.append(problem)
  last = err.strip().splitlines()[-1] if err.strip() else ""
  return dict(case=case.name, exit_code=rc, ok=not problems, problems=problems,
              message=(errors[0] if errors else last)[:400], seconds=seconds)


# ------------------------------------------------------------------------------------------
# Report.
# ------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
  lines = []
  k = report.get("kill_summary")
  if k:
    lines += ["| kill and resume | count |", "|---|---:|"]
    for key in ("runs", "killed", "resumes_completed", "bit_identical", "half_written",
                "left_behind", "crashes_on_restart"):
      lines.append(f"| {key.replace('_', ' ')} | {k[key]} |")
    c = report.get("corrupt_checkpoint")
    if c:
      lines.append(f"| truncated latest checkpoint handled | {int(c['ok'])}/1 |")
    lines += ["", "| run | config | kill | restarts | finished | bit-identical | half-written / "
              "left behind | s |", "|---|---|---|---:|---|---|---|---:|"]
    for r in report["kill_runs"]:
      issues = "; ".join(r["half_written"] + r["left_behind"] + r["crash_lines"]) or "–"
      lines.append(f"| {r['name']} | {r['config']} | {r['kill']} | {r['restarts']} | "
                   f"{'yes' if r['finished'] else 'NO'} | {'yes' if r['identical'] else 'NO'} | "
                   f"{issues} | {r['seconds']:.0f} |")
    lines.append("")
  cases = report.get("bad_inputs")
  if cases:
    ok = sum(c["ok"] for c in cases)
    lines += [f"Bad inputs: {ok}/{len(cases)} fail cleanly (non-zero exit, one 'error:' line, "
              "no traceback, nothing overwritten or left).", "",
              "| case | exit | ok | error line |", "|---|---:|---|---|"]
    for c in cases:
      message = c["message"].replace("|", "\\|")
      if len(message) > 160:
        message = message[:157] + "..."
      extra = f" **{'; '.join(c['problems'])}**" if c["problems"] else ""
      lines.append(f"| {c['case']} | {c['exit_code']} | {'yes' if c['ok'] else 'NO'} | "
                   f"{message}{extra} |")
  return "\n".join(lines) + "\n"


def run_harness(root: str, kills: int, cases: str, seed: int,
                log: Callable[[str], None] = print,
                targeted: Sequence[tuple[str, str]] = TARGETED, jobs: int = 1,
                ddpm_steps: int = 60) -> dict:
  """Both parts in `root`; returns the report dict (see the module docstring)."""
  configs = {}
  ddpm = TINY_DDPM.replace("{steps}", str(ddpm_steps)).replace(
      "{every}", str(max(1, ddpm_steps // 6)))
  for kind, text in (("ddpm", ddpm), ("dpmot", TINY_DPMOT)):
    configs[kind] = os.path.join(root, f"tiny_{kind}.py")
    _write(configs[kind], text.encode())
  report: dict = {"kills": kills, "cases": cases, "seed": seed}
  references: dict = {}
  if kills:
    runs, references = kill_runs(root, configs, kills, seed, log, targeted, jobs)
    report["kill_runs"] = [dataclasses.asdict(r) for r in runs]
    report["kill_summary"] = dict(
        runs=len(runs), killed=sum(r.killed for r in runs),
        resumes_completed=sum(r.finished for r in runs),
        bit_identical=sum(r.identical for r in runs),
        half_written=sum(bool(r.half_written) for r in runs),
        left_behind=sum(bool(r.left_behind) for r in runs),
        crashes_on_restart=sum(r.crashes for r in runs))
    report["reference_seconds"] = {k: v["seconds"] for k, v in references.items()}
    if "ddpm" in references and cases != "quick":
      report["corrupt_checkpoint"] = corrupt_latest_checkpoint(
          root, configs, references["ddpm"]["workdir"])
      log(f"corrupt checkpoint: {report['corrupt_checkpoint']}")
  if cases:
    ref = references.get("ddpm", {}).get("workdir")
    dref = references.get("dpmot", {}).get("workdir")
    selected = bad_input_cases(configs, ref, dref)
    if cases == "quick":
      selected = [c for c in selected if c.name in QUICK]
    elif cases != "all":
      names = set(cases.split(","))
      selected = [c for c in selected if c.name in names]
    def one(case: Case) -> dict:
      result = run_case(case, root)
      log(f"case {case.name!r}: ok={result['ok']} {result['problems']} {result['message'][:200]}")
      return result

    import concurrent.futures  # pylint: disable=g-import-not-at-top
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
      report["bad_inputs"] = list(pool.map(one, selected))
  return report


def main(argv: Sequence[str]) -> None:
  del argv  # only the program name: `cli.flags_parser` refuses any other argument
  from ddpm_ot_jax.experiments import common  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value

  if config.rescore:
    with open(config.out) as f:
      report = json.load(f)
    refs = {kind: fingerprint_run(os.path.join(config.keep, f"reference-{kind}"))
            for kind in ("ddpm", "dpmot")
            if os.path.isdir(os.path.join(config.keep, f"reference-{kind}"))}
    for run in report["kill_runs"]:
      workdir = os.path.join(config.keep, f"{run['name']}-{run['config']}")
      run["identical"] = run["finished"] and fingerprint_run(workdir) == refs[run["config"]]
    report["kill_summary"]["bit_identical"] = sum(r["identical"] for r in report["kill_runs"])
    report["rescored"] = True
    common.write_json(config.out, report)
    table = markdown(report)
    if config.markdown:
      common.write_text(config.markdown, table)
    print(table)
    return
  start = time.perf_counter()
  root = config.keep or tempfile.mkdtemp(prefix="bench-reliability-")
  os.makedirs(root, exist_ok=True)
  try:
    targeted = [tuple(t.split(":", 1)) for t in config.targeted.split(",") if t] or TARGETED
    report = run_harness(root, config.kills, config.cases, config.seed,
                         log=lambda s: print(s, flush=True), targeted=targeted,
                         jobs=config.jobs)
  finally:
    if not config.keep:
      shutil.rmtree(root, ignore_errors=True)
  report["wall_seconds"] = time.perf_counter() - start
  report["command"] = " ".join(["python3", "scripts/bench_reliability.py"] + sys.argv[1:])
  report["cpu_count"] = os.cpu_count()
  report["load_average_1min_after"] = os.getloadavg()[0]
  common.write_json(config.out, report)
  table = markdown(report)
  if config.markdown:
    common.write_text(config.markdown, table)
  print(table)
  print(f"wall time {report['wall_seconds']:.0f} s; wrote {config.out}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  import cli  # pylint: disable=g-import-not-at-top
  _CONFIG = cli.define_config_flag(DEFAULT_CONFIG, "Path to a config file in configs/bench/.")
  app.run(main, flags_parser=cli.flags_parser(DEFAULT_CONFIG))
