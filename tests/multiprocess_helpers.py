"""Starting several jax processes on this machine as one run (tests of multi-process code).

`run_processes(script, ...)` starts `python script` num_processes times, each on
`devices_per_process` virtual CPU devices, with the run's place in the environment
(`ddpm_ot_jax.distributed.ENV_*`); the script joins with

    distributed.initialize(**distributed.args_from_env(os.environ), ...)

before it touches jax devices. The same script started with num_processes=1 is the
single-process reference.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from ddpm_ot_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
# What run_processes appends to the stderr of processes it had to kill.
TIMEOUT_MARKER = "[run_processes] killed: the run exceeded its timeout"
# A failure to serve the coordinator on the chosen port (taken meanwhile): run again.
_PORT_TAKEN = re.compile(r"coordinator port \d+ is already in use|Failed to add port to server")


class ProcessResult(subprocess.CompletedProcess):
  """A finished process: args, returncode (negative: killed by that signal), stdout, stderr
  (text), and elapsed (seconds from the start of the run to its exit) and end_time
  (time.time() at its exit, to 0.05 s)."""

  def __init__(self, args, returncode, stdout, stderr, elapsed: float, end_time: float):
    super().__init__(args, returncode, stdout, stderr)
    self.elapsed = elapsed
    self.end_time = end_time

  @property
  def timed_out(self) -> bool:
    return TIMEOUT_MARKER in self.stderr


def free_port() -> int:
  """A TCP port that nothing on 127.0.0.1 listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(num_processes: int, process_id: int, devices_per_process: int, port: int,
                base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of process `process_id`: CPU only, `devices_per_process` virtual devices
  (other XLA_FLAGS kept), unbuffered output (an abort would lose buffered lines), the repo
  and tests/ importable, and the run's coordinator, size and index."""
  env = dict(os.environ if base is None else base)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, TESTS, env.get("PYTHONPATH", "")) if p)
  env[distributed.ENV_NUM_PROCESSES] = str(num_processes)
  env[distributed.ENV_PROCESS_ID] = str(process_id)
  env[distributed.ENV_COORDINATOR] = f"localhost:{port}"
  return env


def run_processes(script: str, num_processes: int = 2, devices_per_process: int = 2,
                  timeout: float = 120.0, args: Sequence[str] = (),
                  env: dict[str, str] | None = None) -> list[ProcessResult]:
  """Runs `python script *args` as processes 0 … num_processes − 1 of one jax run on a free
  localhost port; returns their results in process order once all have exited.

  A run still going after `timeout` seconds is killed (SIGKILL, every process); the killed
  processes' stderr ends with TIMEOUT_MARKER (`ProcessResult.timed_out`). When the port was
  taken between choosing and serving it, the run starts again once on another port.
  env: extra variables for every process.
  """
  for attempt in range(2):
    results = _run_once(script, num_processes, devices_per_process, timeout, args, env)
    if attempt == 0 and results and _PORT_TAKEN.search(results[0].stderr):
      continue
    return results
  return results


def _run_once(script, num_processes, devices_per_process, timeout, args, extra_env):
  port = free_port()
  command = [sys.executable, script, *args]
  procs, files = [], []
  start = time.time()
  try:
    for i in range(num_processes):
      env = process_env(num_processes, i, devices_per_process, port)
      env.update(extra_env or {})
      out = tempfile.TemporaryFile("w+")
      err = tempfile.TemporaryFile("w+")
      files.append((out, err))
      procs.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=err,
                                    text=True))
    end_times: dict[int, float] = {}
    killed: set[int] = set()
    while len(end_times) < len(procs):
      now = time.time()
      for i, p in enumerate(procs):
        if i not in end_times and p.poll() is not None:
          end_times[i] = now
      if len(end_times) == len(procs):
        break
      if now - start > timeout:
        for i, p in enumerate(procs):
          if i not in end_times:
            p.kill()
            killed.add(i)
        for i, p in enumerate(procs):
          if i not in end_times:
            p.wait()
            end_times[i] = time.time()
        break
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  results = []
  for i, (p, (out, err)) in enumerate(zip(procs, files)):
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
    out.close()
    err.close()
    if i in killed:
      stderr += f"\n{TIMEOUT_MARKER} ({timeout:.0f} s)\n"
    results.append(ProcessResult(command, p.returncode, stdout, stderr,
                                 elapsed=end_times[i] - start, end_time=end_times[i]))
  return results


def describe(results: Sequence[ProcessResult], tail: int = 3000) -> str:
  """Every process's exit code, time and the tail of its output (for assertion messages)."""
  parts = []
  for i, r in enumerate(results):
    signame = ""
    if r.returncode is not None and r.returncode < 0:
      try:
        signame = f" ({signal.Signals(-r.returncode).name})"
      except ValueError:
        pass
    parts.append(f"--- process {i}: exit {r.returncode}{signame} after {r.elapsed:.1f} s\n"
                 f"stdout: {r.stdout[-tail:]}\nstderr: {r.stderr[-tail:]}")
  return "\n".join(parts)
