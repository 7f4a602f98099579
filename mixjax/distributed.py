"""Several processes (hosts) as one mesh, on JAX's own distributed runtime (`jax.distributed`).

One process per host; the mesh's `node` axis spans the processes and its `gpu` axis the devices of each
(`mixjax.sharding.mesh.make_mesh`). Every process loads the slices of the weights that its devices hold and runs the
same compiled steps; process 0 also runs the HTTP front end and the scheduler, and sends every other process the
plan of each step (which requests to prefill, the decode inputs) through the key-value store of JAX's coordination
service (`PlanChannel`).

Failure handling (`Watchdog`): every process writes a heartbeat into the key-value store and watches everyone
else's. When a process stops beating for `failure_timeout` seconds, or the coordination service cannot be reached
for that long, the others log a clear error, mark the engine unhealthy (the HTTP front end answers 503) and exit
with status EXIT_CLUSTER_FAILURE within `failure_bound(failure_timeout)` seconds, instead of hanging in a
collective that will never finish (a collective whose peer died may fail, or may wait forever). JAX's own
heartbeat check is set to a longer timeout, as a backstop: it aborts the process with its own message.

The key-value store is reached through `jax._src.distributed.global_state.client` (JAX 0.11.2 has no public
accessor for the coordination service's client; jax.experimental.multihost_utils uses the same object).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("mixjax.distributed")

ENV_COORDINATOR = "MIXJAX_COORDINATOR"
ENV_NUM_PROCESSES = "MIXJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MIXJAX_PROCESS_ID"
ENV_FAILURE_TIMEOUT = "MIXJAX_FAILURE_TIMEOUT"
ENV_INIT_TIMEOUT = "MIXJAX_INIT_TIMEOUT"

DEFAULT_FAILURE_TIMEOUT = 20.0  # seconds without a heartbeat before the cluster is declared broken
DEFAULT_INIT_TIMEOUT = 300.0  # seconds for all processes to join (JAX's default too)
FAILURE_GRACE = 1.5  # seconds process 0 (the HTTP front end) answers 503 before it exits
EXIT_CLUSTER_FAILURE = 3  # exit status of a process that stops because the cluster broke


def heartbeat_interval(failure_timeout: float) -> float:
    return min(1.0, failure_timeout / 5)


def failure_bound(failure_timeout: float, leader: bool = True) -> float:
    """Seconds from a process's death until the others have exited (docs/MULTIHOST.md): detection within
    timeout + 2 intervals; then the other processes exit at once, and process 0, which runs the coordination
    service and the HTTP front end, FAILURE_GRACE + 2 intervals later (it answers 503 meanwhile, and the others,
    which detect up to about an interval later, leave first: JAX would abort them were its service gone)."""
    i = heartbeat_interval(failure_timeout)
    return failure_timeout + 2 * i + ((FAILURE_GRACE + 2 * i) if leader else 0.0)


class DistributedError(RuntimeError):
    """A multi-process setting is wrong, or the cluster could not be formed or broke."""


@dataclass(frozen=True)
class ClusterSpec:
    """How to join the cluster. `coordinator`, `num_processes`, `process_id` are None where JAX's cluster detection
    (SLURM, Open MPI) fills them in; `detected` names the environment found then."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    failure_timeout: float = DEFAULT_FAILURE_TIMEOUT
    init_timeout: float = DEFAULT_INIT_TIMEOUT
    detected: str | None = None

    def describe(self) -> str:
        if self.detected and None in (self.coordinator, self.num_processes, self.process_id):
            return f"{self.detected} job (cluster detection by jax.distributed)"
        return f"process {self.process_id} of {self.num_processes}, coordinator {self.coordinator}"


def _int(value, what: str) -> int:
    if isinstance(value, bool):
        raise DistributedError(f"{what} must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{what} must be an integer, got {value!r}") from None


def _float(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{what} must be a number of seconds, got {value!r}") from None
    if not v > 0:
        raise DistributedError(f"{what} must be positive, got {value!r}")
    return v


def check_address(addr: str, what: str = "--coordinator") -> tuple[str, int]:
    host, sep, port = str(addr).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"{what} {addr!r} is not of the form HOST:PORT (e.g. 10.0.0.1:12345)")
    return host.strip("[]"), int(port)


def detect_launcher(environ=None) -> tuple[str, int] | None:
    """(name, process count) when this process was started by a multi-process launcher that jax.distributed's
    cluster detection understands (SLURM's srun, Open MPI's mpirun) with more than one process; else None."""
    env = os.environ if environ is None else environ
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                               "SLURM_LOCALID")):
        n = _int(env["SLURM_NTASKS"], "SLURM_NTASKS")
        return ("slurm", n) if n > 1 else None
    if "OMPI_COMM_WORLD_SIZE" in env and "OMPI_COMM_WORLD_RANK" in env:
        n = _int(env["OMPI_COMM_WORLD_SIZE"], "OMPI_COMM_WORLD_SIZE")
        return ("ompi", n) if n > 1 else None
    return None


def resolve_spec(coordinator=None, num_processes=None, process_id=None, failure_timeout=None, init_timeout=None,
                 environ=None) -> ClusterSpec | None:
    """The cluster to join, from the arguments, else the MIXJAX_* environment variables, else a SLURM / Open MPI
    launcher; None for a single process (nothing given, or one process)."""
    env = os.environ if environ is None else environ
    coordinator = coordinator if coordinator is not None else (env.get(ENV_COORDINATOR) or None)
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = env[ENV_NUM_PROCESSES]
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = env[ENV_PROCESS_ID]
    if failure_timeout is None and env.get(ENV_FAILURE_TIMEOUT):
        failure_timeout = env[ENV_FAILURE_TIMEOUT]
    if init_timeout is None and env.get(ENV_INIT_TIMEOUT):
        init_timeout = env[ENV_INIT_TIMEOUT]
    ft = _float(failure_timeout, "--failure-timeout / " + ENV_FAILURE_TIMEOUT) if failure_timeout is not None \
        else DEFAULT_FAILURE_TIMEOUT
    it = _float(init_timeout, "--init-timeout / " + ENV_INIT_TIMEOUT) if init_timeout is not None \
        else DEFAULT_INIT_TIMEOUT
    n = _int(num_processes, "--num-processes / " + ENV_NUM_PROCESSES) if num_processes is not None else None
    i = _int(process_id, "--process-id / " + ENV_PROCESS_ID) if process_id is not None else None
    if coordinator is not None:
        check_address(coordinator)
    if n is not None and n < 1:
        raise DistributedError(f"--num-processes must be at least 1, got {n}")
    if i is not None and n is not None and not 0 <= i < n:
        raise DistributedError(f"--process-id {i} is out of range: with --num-processes {n} the ids are 0..{n - 1}")
    if i is not None and i < 0:
        raise DistributedError(f"--process-id must be 0 or more, got {i}")
    launcher = detect_launcher(env)
    if coordinator is None and n is None and i is None:
        if launcher is None:
            return None
        return ClusterSpec(None, None, None, ft, it, detected=launcher[0])
    if n == 1 and launcher is None:
        return None  # one process: the single-process path
    missing = [f"{flag} (or {var})" for flag, var, v in (
        ("--coordinator", ENV_COORDINATOR, coordinator), ("--num-processes", ENV_NUM_PROCESSES, n),
        ("--process-id", ENV_PROCESS_ID, i)) if v is None]
    if missing and launcher is None:
        raise DistributedError("a multi-process run needs --coordinator, --num-processes and --process-id; "
                               "missing: " + ", ".join(missing))
    return ClusterSpec(coordinator, n, i, ft, it, detected=launcher[0] if launcher else None)


# --- joining the cluster ---------------------------------------------------------------------------------------
def _die(message: str, code: int = EXIT_CLUSTER_FAILURE):
    """Print a clear error and end the process at once (other threads may be stuck in a collective)."""
    try:
        log.critical(message)
        print(f"mixjax: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
    finally:
        os._exit(code)


def _wait_for_coordinator(addr: str, timeout: float):
    """Followers: wait until the coordinator's port accepts connections, or fail clearly."""
    host, port = check_address(addr)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(0.1, deadline - time.monotonic()))):
                return
        except OSError as e:
            last = e
            time.sleep(0.2)
    raise DistributedError(f"cannot reach the coordinator {addr} (process 0) within {timeout:g} s: {last}. Is "
                           f"process 0 running, and is the address reachable from this host?")


class Cluster:
    """This process's place in a running cluster, with its heartbeat watchdog and the plan channel."""

    def __init__(self, spec: ClusterSpec, client, process_id: int, num_processes: int, coordinator: str):
        self.spec, self.client = spec, client
        self.process_id, self.num_processes, self.coordinator = process_id, num_processes, coordinator
        self.is_leader = process_id == 0
        self.watchdog = Watchdog(self, spec.failure_timeout)
        self.channel = PlanChannel(client)
        self._shut = False

    def fail(self, message: str):
        """Declare the cluster broken: see Watchdog.fail."""
        self.watchdog.fail(message)

    def agree(self, name: str, settings: dict, timeout: float | None = None):
        """Check that every process was started with the same settings (model, mesh, engine sizes); raises
        DistributedError naming the first difference. All processes must call it with the same name."""
        timeout = self.spec.init_timeout if timeout is None else timeout
        mine = json.dumps(settings, sort_keys=True, default=str)
        self.client.key_value_set(f"mixjax/agree/{name}/{self.process_id}", mine)
        others = range(1, self.num_processes) if self.is_leader else [0]
        for p in others:
            try:
                theirs = self.client.blocking_key_value_get(f"mixjax/agree/{name}/{p}", int(timeout * 1000))
            except Exception as e:
                raise DistributedError(f"process {p} did not report its {name} settings within {timeout:g} s: "
                                       f"{e}") from None
            if theirs != mine:
                a, b = json.loads(mine), json.loads(theirs)
                diff = [f"{k}: {a.get(k)!r} here, {b.get(k)!r} on process {p}" for k in sorted(set(a) | set(b))
                        if a.get(k) != b.get(k)]
                raise DistributedError(f"process {self.process_id} and process {p} were started with different "
                                       f"{name} settings (" + "; ".join(diff) + "): start every process with the "
                                       "same options")

    def shutdown(self):
        """Leave the cluster cleanly (all processes call it at the end: it waits for the others)."""
        if self._shut:
            return
        self._shut = True
        self.watchdog.stop()
        import jax

        try:
            jax.distributed.shutdown()
        except Exception as e:  # the others are gone already: nothing left to coordinate
            log.warning("jax.distributed.shutdown: %s", e)


def initialize(spec: ClusterSpec) -> Cluster:
    """Join the cluster (jax.distributed.initialize) and start the heartbeat watchdog. Must run before anything
    starts a JAX backend. A process that cannot join within spec.init_timeout prints why and exits with status
    EXIT_CLUSTER_FAILURE (JAX itself would abort with a less helpful message a little later)."""
    import jax
    from jax._src import distributed as jax_distributed  # the client of the coordination service lives here

    if jax.distributed.is_initialized():
        raise DistributedError("jax.distributed is already initialized in this process")
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices talk over gloo (TCP)
    except Exception:  # an older JAX without the option: nothing to do
        pass
    if spec.process_id not in (None, 0) and spec.coordinator is not None:
        _wait_for_coordinator(spec.coordinator, spec.init_timeout)
    where = spec.describe()
    timer = threading.Timer(spec.init_timeout, lambda: _die(
        f"the cluster did not form within {spec.init_timeout:g} s ({where}): every process must be started with "
        f"the same --coordinator and --num-processes, each with its own --process-id, and reach the coordinator"))
    timer.daemon = True
    timer.start()
    # One process per host with all of its devices: JAX's SLURM / Open MPI detection would otherwise give each
    # process a single GPU. An empty list means "all local devices"; JAX_LOCAL_DEVICE_IDS still overrides it.
    local_ids = None if os.environ.get("JAX_LOCAL_DEVICE_IDS") else []
    t = spec.failure_timeout
    try:
        jax.distributed.initialize(
            spec.coordinator, spec.num_processes, spec.process_id, local_device_ids=local_ids,
            initialization_timeout=int(spec.init_timeout) + 15,  # ours fires first, with a clearer message
            heartbeat_timeout_seconds=int(2 * t + 10),  # the backstop: our watchdog acts first
            shutdown_timeout_seconds=int(max(10, t)))
    except (ValueError, TypeError, RuntimeError) as e:
        timer.cancel()
        raise DistributedError(f"jax.distributed.initialize failed ({where}): {e}") from None
    timer.cancel()
    client = jax_distributed.global_state.client
    coordinator = jax_distributed.global_state.coordinator_address or spec.coordinator or "?"
    cluster = Cluster(spec, client, jax.process_index(), jax.process_count(), coordinator)
    cluster.watchdog.start()
    # a process that simply ends (a script using mixjax.LLM) leaves together with the others: were process 0 to
    # go first, JAX would abort the rest when its coordination service disappears
    atexit.register(cluster.shutdown)
    log.info("joined the cluster as process %d of %d (coordinator %s)", cluster.process_id, cluster.num_processes,
             coordinator)
    return cluster


# --- failure detection -----------------------------------------------------------------------------------------
class Watchdog:
    """Heartbeats through the coordination service's key-value store, and a check of everyone else's.

    A heartbeat thread writes `mixjax/hb/<process id>` = a counter every `interval` seconds and reads all of them;
    a separate check thread (which makes no network calls, so that it cannot hang) declares the cluster broken when
    another process's counter has not changed for `timeout` seconds, or when this process has not completed a
    heartbeat round trip for `timeout` seconds (coordinator gone or unreachable). Then `fail` runs.

    Bound: a failure is detected within timeout + 2 * interval seconds (interval = min(1, timeout / 5)); see
    failure_bound for when each process exits."""

    PREFIX = "mixjax/hb/"

    def __init__(self, cluster: Cluster, timeout: float):
        self.cluster, self.timeout = cluster, float(timeout)
        self.interval = heartbeat_interval(self.timeout)
        self.on_failure: list = []  # callables(message), e.g. the engine's mark_failed
        self._stop = threading.Event()
        self._failed = threading.Lock()
        self._t0 = time.monotonic()
        self.last_ok = self._t0
        self.last_error: str | None = None
        self._seen: dict[int, str] = {}
        self._changed: dict[int, float] = {}
        self.failure: str | None = None

    def start(self):
        self._t0 = self.last_ok = time.monotonic()
        self._changed = {p: self._t0 for p in range(self.cluster.num_processes)}
        for target, name in ((self._beat, "mixjax-heartbeat"), (self._check, "mixjax-watchdog")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def stop(self):
        self._stop.set()

    def _beat(self):
        c, me, n = self.cluster.client, self.cluster.process_id, 0
        while not self._stop.is_set():
            try:
                c.key_value_set(f"{self.PREFIX}{me}", str(n), allow_overwrite=True)
                n += 1
                beats = c.key_value_dir_get(self.PREFIX)
                now = time.monotonic()
                for key, value in beats:
                    p = int(key.rstrip("/").rsplit("/", 1)[-1])
                    if self._seen.get(p) != value:
                        self._seen[p], self._changed[p] = value, now
                self.last_ok = now
            except Exception as e:  # keep trying: the check thread decides when it is too long
                self.last_error = str(e).splitlines()[0] if str(e) else type(e).__name__
            self._stop.wait(self.interval)

    def _check(self):
        me, n = self.cluster.process_id, self.cluster.num_processes
        while not self._stop.wait(self.interval / 2):
            now = time.monotonic()
            if now - self.last_ok > self.timeout:
                self.fail(f"process {me} lost contact with the coordination service at {self.cluster.coordinator} "
                          f"for {now - self.last_ok:.1f} s (failure timeout {self.timeout:g} s; last error: "
                          f"{self.last_error}): process 0 died or the network failed")
                return
            for p in range(n):
                if p != me and now - self._changed.get(p, self._t0) > self.timeout:
                    self.fail(f"process {p} of {n} sent no heartbeat for {now - self._changed.get(p, self._t0):.1f} "
                              f"s (failure timeout {self.timeout:g} s): it died, hung or lost its network")
                    return

    def fail_after_check(self, message: str):
        """A step failed (e.g. a collective lost its peer): give the heartbeat check one failure timeout to name the
        process that is gone (it then exits with that message), else fail with `message`."""
        log.error("%s; waiting up to %.1f s for the heartbeat check to find the cause", message,
                  self.timeout + 2 * self.interval)
        for cb in list(self.on_failure):  # the HTTP front end answers 503 from now on
            try:
                cb(message)
            except Exception:
                log.exception("failure callback")
        self._stop.wait(self.timeout + 2 * self.interval)
        self.fail(message)

    def fail(self, message: str):
        """Log the error, tell the listeners (the HTTP front end starts answering 503), exit with
        EXIT_CLUSTER_FAILURE: at once, or on process 0 after FAILURE_GRACE + 2 intervals (see failure_bound). Only
        the first call acts; later ones wait for the exit."""
        if not self._failed.acquire(blocking=False):
            time.sleep(FAILURE_GRACE + 2 * self.interval + 5)
            return
        if self._stop.is_set():  # a clean shutdown is under way
            self._failed.release()
            return
        self.failure = message
        log.critical("multi-host failure: %s", message)
        print(f"mixjax: error: multi-host failure on process {self.cluster.process_id}: {message}; stopping this "
              f"process (exit status {EXIT_CLUSTER_FAILURE})", file=sys.stderr, flush=True)
        for cb in list(self.on_failure):
            try:
                cb(message)
            except Exception:
                log.exception("failure callback")
        if self.cluster.is_leader:
            time.sleep(FAILURE_GRACE + 2 * self.interval)
        sys.stdout.flush()
        os._exit(EXIT_CLUSTER_FAILURE)


# --- the per-step plan, sent from process 0 to every other process ---------------------------------------------
_MAGIC = b"MJP1"
_PLAN_DTYPES = {"int32", "uint32", "float32"}


def encode_plan(kind: str, arrays: dict[str, np.ndarray] | None = None) -> bytes:
    """A plan as bytes: magic, header length, a JSON header (kind, array names, dtypes, shapes), the raw arrays.
    (Not pickle: the receiver must not run code that arrives over the network.)"""
    arrays = arrays or {}
    meta, parts = [], []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.name not in _PLAN_DTYPES:
            raise TypeError(f"plan array {name} has dtype {a.dtype}; allowed: {sorted(_PLAN_DTYPES)}")
        meta.append([name, a.dtype.name, list(a.shape)])
        parts.append(a.tobytes())
    head = json.dumps({"kind": kind, "arrays": meta}).encode()
    return b"".join([_MAGIC, len(head).to_bytes(4, "little"), head] + parts)


def decode_plan(blob: bytes) -> tuple[str, dict[str, np.ndarray]]:
    if blob[:4] != _MAGIC:
        raise DistributedError("received a malformed step plan")
    n = int.from_bytes(blob[4:8], "little")
    head = json.loads(blob[8: 8 + n])
    off, out = 8 + n, {}
    for name, dtype, shape in head["arrays"]:
        if dtype not in _PLAN_DTYPES:
            raise DistributedError(f"received a step plan with dtype {dtype}")
        dt = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        out[name] = np.frombuffer(blob, dt, count=size // dt.itemsize, offset=off).reshape(shape)
        off += size
    return head["kind"], out


class PlanChannel:
    """An ordered stream of step plans from process 0 to the others, through the coordination service's key-value
    store: plan n is the key `mixjax/plan/<n>`. Process 0 writes each plan once (one RPC); the others wait for the
    next key (a blocking get, which returns as soon as it is written). Old keys are deleted KEEP plans later: every
    plan ends with a collective over all processes, so by then every process has read them.

    (Measured on 2 CPU processes of one machine: about 0.5 ms per plan, against about 2 ms for
    jax.experimental.multihost_utils.broadcast_one_to_all of 4 KB, which also compiles per shape.)"""

    PREFIX = "mixjax/plan/"
    KEEP = 8

    def __init__(self, client):
        self.client = client
        self.n = 0
        self.send_seconds = 0.0  # process 0: total time spent sending plans
        self.bytes_sent = 0

    def send(self, kind: str, arrays: dict[str, np.ndarray] | None = None):
        t0 = time.perf_counter()
        blob = encode_plan(kind, arrays)
        self.client.key_value_set_bytes(f"{self.PREFIX}{self.n}", blob)
        if self.n >= self.KEEP:
            self.client.key_value_delete(f"{self.PREFIX}{self.n - self.KEEP}")
        self.n += 1
        self.bytes_sent += len(blob)
        self.send_seconds += time.perf_counter() - t0

    def receive(self, poll_seconds: float = 1.0) -> tuple[str, dict[str, np.ndarray]]:
        key = f"{self.PREFIX}{self.n}"
        while True:
            try:
                blob = self.client.blocking_key_value_get_bytes(key, int(poll_seconds * 1000))
                break
            except Exception as e:
                if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e):
                    continue  # process 0 is idle: keep waiting (the watchdog watches it)
                raise DistributedError(f"lost the step plans from process 0: {e}") from None
        self.n += 1
        return decode_plan(blob)


def to_host(x) -> np.ndarray:
    """A jax.Array's global value as numpy, also when it spans devices of other processes."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
