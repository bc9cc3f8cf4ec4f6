"""Several jax processes (hosts) as one run: joining, feeding a sharded batch, gathering.

Measured with jax/jaxlib 0.10.2 on CPU (2 processes × 2 virtual devices on one machine):

- Cross-process CPU collectives are gloo (`jax_cpu_collectives_implementation`, default
  "gloo" in 0.10.2; None gives "Multiprocess computations aren't implemented on the CPU
  backend"). `initialize` sets it explicitly.
- Replicated results agree bitwise between the processes. Against one process with the same
  devices they agree to float32 round-off, not bitwise: gloo sums across processes in another
  order (a 4-term sum of ±1e8 and 1 gives 0 instead of 1). Per-row computations (sampling)
  and all-gather + argmax (`semidiscrete.assign_sharded`) are bitwise equal.
- Failures end every process by an abort (SIGABRT, exit code −6), printed on stderr as
  "Terminating process because the JAX distributed service detected fatal errors. This most
  likely indicates that another task died", never as a Python exception, after:
    * a process other than 0 is killed: ≤ heartbeat_timeout (measured 9.4–10.3 s for 10 s,
      3.2–5.3 s for 5 s, 99.5 s for jax's default 100 s), whatever the survivor is doing;
    * process 0 (the coordinator) is killed: at once (< 0.1 s), sometimes preceded by a
      Python `JaxRuntimeError: ... Gloo all-reduce failed: ... Connection reset by peer`;
    * a process raises (exits early) while the others wait in a collective: shutdown_timeout
      (its exit waits at jax's shutdown barrier, which fails and takes everyone down; the
      raising process also ends with −6);
    * a process never starts: initialization_timeout (+ ~1 s), "DEADLINE_EXCEEDED ...
      RegisterTask";
    * processes exit more than shutdown_timeout apart (one still working, e.g. the chief
      writing files): all abort with "Shutdown barrier has failed" — end with `barrier`.
  The coordinator's port already taken: jax segfaults ("Failed to add port to server");
  `initialize` checks the port first and raises instead.
- A collective on devices that have already run one together waits for a late process as
  long as needed (measured 75 s). The first collective on a new set of devices sets up a gloo
  context through the coordinator's key-value store, which waits only 30 s: a process more
  than 30 s late fails with "Gloo context initialization failed: DEADLINE_EXCEEDED:
  GetKeyValue() timed out". `initialize` therefore runs one collective over all devices and
  one over one device per process (what `barrier`/`allgather_to_host` of host data use) while
  the processes are still in step.
- gloo prints "[Gloo] Rank r is connected to k peer ranks ..." on stdout (from C++) whenever it
  sets up a context.
- `jax_enable_recoverability` makes the survivor of a kill hang in its
  collective instead: do not use it.

Every process runs the same program and must make the same jax calls (jit of sharded arrays,
`barrier`, `allgather_to_host`, orbax `CheckpointManager.save/restore`, which synchronise
internally and each write their own shards); only side effects outside jax (files, logs)
are for the chief (`is_chief`). Where a branch depends on what a process finds on disk
(a cached stage), `all_processes` makes every process take the same one. In this project
scripts/main.py calls `initialize` (from `args_from_env`, or jax's auto-detection); the
experiments layer decides who writes (experiments/common.py).
"""
from __future__ import annotations

import socket
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Array = jax.Array

# Environment variables through which a launcher (tests/multiprocess_helpers.run_processes)
# tells each process its place in the run; see `args_from_env`.
ENV_COORDINATOR = "DDPM_OT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "DDPM_OT_NUM_PROCESSES"
ENV_PROCESS_ID = "DDPM_OT_PROCESS_ID"

_LOCAL_HOSTS = ("localhost", "127.0.0.1")


def args_from_env(environ: dict[str, str]) -> dict[str, Any]:
  """`initialize`'s coordinator_address, num_processes and process_id from `environ` (e.g.
  os.environ): the ENV_* variables, or a single process when ENV_NUM_PROCESSES is unset."""
  num_processes = int(environ.get(ENV_NUM_PROCESSES, "1"))
  if num_processes == 1:
    return dict(coordinator_address=None, num_processes=1, process_id=0)
  missing = [k for k in (ENV_COORDINATOR, ENV_PROCESS_ID) if k not in environ]
  if missing:
    raise ValueError(f"{ENV_NUM_PROCESSES}={num_processes} but {', '.join(missing)} unset.")
  return dict(coordinator_address=environ[ENV_COORDINATOR], num_processes=num_processes,
              process_id=int(environ[ENV_PROCESS_ID]))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout_s: int = 30,
               initialization_timeout_s: int = 120, shutdown_timeout_s: int = 60,
               warm_up: bool = True) -> None:
  """Joins a run of `num_processes` processes; call before anything else touches jax devices.

  With num_processes == 1 nothing happens (a plain single-process run). Otherwise: CPU
  collectives set to gloo, then `jax.distributed.initialize` with bounded timeouts (see the
  module docstring for what each bounds), then (warm_up) the collectives' setup. With all
  three of coordinator_address, num_processes, process_id None, jax finds the run itself
  (TPU pods, SLURM, Open MPI: its cluster auto-detection).

  Args:
    coordinator_address: "host:port" of process 0, which serves the coordinator on that
      port. A localhost address binds 127.0.0.1 only; others bind all interfaces.
    num_processes, process_id: the run's size and this process's index (0 … P − 1).
    heartbeat_timeout_s: a process silent this long is dead: all others abort.
    initialization_timeout_s: how long to wait for every process to join.
    shutdown_timeout_s: how long a process exiting waits for all others to exit too.
    warm_up: run one collective over all devices and one over one device per process, so
      that later collectives never set up gloo contexts (which time out after 30 s) while
      processes are out of step.

  Raises:
    RuntimeError: jax's backend is already initialized, or (process 0) the coordinator's port
      is in use.
    ValueError: inconsistent arguments.
  """
  detect = coordinator_address is None and num_processes is None and process_id is None
  bind_address = None
  if not detect:
    if (num_processes is None or process_id is None or num_processes < 1
        or not 0 <= process_id < num_processes):
      raise ValueError(f"need 0 ≤ process_id < num_processes, got process_id={process_id}, "
                       f"num_processes={num_processes}.")
    if num_processes == 1:
      return
  if jax.distributed.is_initialized():
    raise RuntimeError("jax.distributed is already initialized in this process.")
  if not detect:
    if not coordinator_address or ":" not in coordinator_address:
      raise ValueError(f"coordinator_address must be 'host:port', got {coordinator_address!r}.")
    host, port = coordinator_address.rsplit(":", 1)
    bind_address = f"127.0.0.1:{port}" if host in _LOCAL_HOSTS else None
    if process_id == 0:
      _check_port_free(int(port), local_only=bind_address is not None)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, initialization_timeout=int(initialization_timeout_s),
      heartbeat_timeout_seconds=int(heartbeat_timeout_s),
      shutdown_timeout_seconds=int(shutdown_timeout_s),
      coordinator_bind_address=bind_address)
  if warm_up and jax.process_count() > 1:
    _warm_up()


def _check_port_free(port: int, local_only: bool) -> None:
  """Raises RuntimeError when `port` cannot be bound (jax would segfault on it)."""
  family, address = ((socket.AF_INET, ("127.0.0.1", port)) if local_only
                     else (socket.AF_INET6, ("::", port)))
  try:
    probe = socket.socket(family, socket.SOCK_STREAM)
  except OSError:  # no IPv6 on this host: jax binds IPv4 then
    family, address = socket.AF_INET, ("0.0.0.0", port)
    probe = socket.socket(family, socket.SOCK_STREAM)
  try:
    with probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      probe.bind(address)
  except OSError as e:
    raise RuntimeError(
        f"the coordinator port {port} is already in use on this machine ({e.strerror}); "
        f"start the run with another port.") from e


def _warm_up() -> None:
  mesh = all_devices_mesh("all")
  ones = np.ones((jax.local_device_count(),), np.float32)
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("all")), ones,
                                             (jax.device_count(),))
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
  total.block_until_ready()
  barrier("ddpm_ot_jax.distributed.initialize")


def is_chief() -> bool:
  """True in process 0, the one that writes files and logs."""
  return jax.process_index() == 0


def all_devices_mesh(axis_name: str = "data") -> Mesh:
  """A 1-D mesh over every device of every process (jax.devices() order: process 0's
  devices first), with Auto axis type (explicit shardings are passed to jit)."""
  return Mesh(np.asarray(jax.devices()), (axis_name,),
              axis_types=(jax.sharding.AxisType.Auto,))


def process_rows(num_rows: int) -> slice:
  """The rows [p B/P, (p + 1) B/P) of a global batch of B rows that this process p of P
  feeds. Raises ValueError when B is not a multiple of P."""
  count = jax.process_count()
  if num_rows % count:
    raise ValueError(f"a batch of {num_rows} rows does not split over {count} processes.")
  rows = num_rows // count
  return slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)


def global_batch_from_local(mesh: Mesh, local_rows: np.ndarray | Array,
                            axis_name: str = "data") -> Array:
  """One array of P × len(local_rows) rows split along `axis_name` of `mesh`, from the rows
  each process loaded itself (`process_rows`: process p's rows come p-th).

  Every process passes the same number of rows; their count must split over this process's
  devices of `mesh`.
  """
  local_rows = np.asarray(local_rows)
  global_shape = (local_rows.shape[0] * jax.process_count(),) + local_rows.shape[1:]
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P(axis_name)), local_rows,
                                                global_shape)


def allgather_to_host(x: Array | np.ndarray) -> np.ndarray:
  """The whole of a (possibly multi-process, sharded) array as numpy, in every process.

  Call it in all processes (it is a collective when x spans processes); the chief then writes
  it. A host array is gathered along a new leading axis (one entry per process).
  """
  if isinstance(x, jax.Array):
    if x.is_fully_addressable:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def barrier(name: str) -> None:
  """Waits until every process reaches `barrier(name)` (same name everywhere). Use it before
  exiting after chief-only work, so that processes exit within `shutdown_timeout_s`."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def all_processes(flag: bool) -> bool:
  """Whether `flag` holds in every process (a collective: call it in all processes). Lets
  every process take the same branch, e.g. reuse a cached file only when all of them see it."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.all(allgather_to_host(np.asarray(bool(flag), np.int32))))


def chief_value(x: Array | np.ndarray) -> np.ndarray:
  """Process 0's value of a host or single-process array, in every process (a collective):
  what every process uses where the processes computed it separately."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return allgather_to_host(np.asarray(x))[0]
