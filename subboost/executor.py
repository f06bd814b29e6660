"""Where the experiments' independent units of work run: in this process or on a Ray cluster.

An *executor* maps a function over a list of units and returns the results in the units'
order, whatever order they finish in, so the same parameters give the same tables with any
executor and any number of workers:

- :class:`LocalExecutor` (``"local"``, the default): a plain loop in this process;
- :class:`RayExecutor` (``"ray"``): connects to a running Ray cluster with
  ``ray.init(address=...)`` and submits one Ray task per unit, with the resources it needs
  (``num_gpus=1`` on GPU suites). Ray is an optional extra (``pip install subboost[cluster]``).

Units carry *parameters*, never tensors: a worker rebuilds the suite from a
:class:`SuiteSpec` (the parameters :func:`subboost.experiments.load_suite_from_parameters`
takes) and reads checkpoints and data from the same paths as the driver (a shared filesystem
on a real cluster). Each worker process keeps the last suite and the last set of task
vectors it loaded (:func:`cached_suite`, :func:`cached_task_vectors`), so memory per worker
stays bounded by one suite plus one set of experts.

A worker that dies mid-unit (killed, out of memory, node lost) makes Ray retry the unit up to
``max_retries`` times; when the retries are spent the sweep stops with an
:class:`ExecutorError` naming the unit. Nothing is dropped silently.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

EXECUTORS = ("local", "ray")
#: Ray's default port of the Ray client server (``ray://host:port``).
RAY_CLIENT_PORT = 10001
#: Ray's default port of a head node's GCS (``ray start --head``).
RAY_GCS_PORT = 6379

U = TypeVar("U")
R = TypeVar("R")


class ExecutorError(RuntimeError):
    """A unit of work could not be completed (its worker died and the retries are spent)."""


def _parameter_error(name: str, message: str) -> ValueError:
    from subboost.book import ParameterError

    return ParameterError(name, message)


# =============================================================================== addresses


def parse_ray_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``ray://host[:port]`` → (host, port). ``ValueError`` naming
    ``ray_address`` for anything else (``auto`` is not accepted: name the head explicitly)."""
    if not isinstance(address, str) or not address.strip():
        raise _parameter_error("ray_address", f"expected host:port of a Ray head node, got {address!r}")
    text = address.strip()
    default_port = RAY_GCS_PORT
    if text.startswith("ray://"):
        text, default_port = text[len("ray://"):], RAY_CLIENT_PORT
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _parameter_error("ray_address", f"expected host:port of a Ray head node, got {address!r}")
    return host, int(port)


def check_ray_address(address: str, timeout_s: float = 3.0) -> str:
    """Return ``address`` if a TCP connection to it succeeds within ``timeout_s``; otherwise
    raise a :class:`~subboost.book.ParameterError` whose one line names the address. Cheap
    enough to run before anything else starts."""
    host, port = parse_ray_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        raise _parameter_error("ray_address", f"no Ray cluster reachable at {address!r} ({err.strerror or err})") from None
    return address


def validate_executor(executor: Any, ray_address: Any) -> tuple[str, str | None]:
    """Check the ``executor`` / ``ray_address`` pair of parameters: ``executor`` ∈ {local,
    ray}; with ``ray`` the address must be given and reachable, and Ray importable."""
    if executor not in EXECUTORS:
        raise _parameter_error("executor", f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if executor == "local":
        return "local", None
    if ray_address is None:
        raise _parameter_error("ray_address", "the ray executor needs the address (host:port) of a running Ray head")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise _parameter_error("executor", "'ray' needs the cluster extra: pip install 'subboost[cluster]'") from None
    return "ray", check_ray_address(str(ray_address))


# =============================================================================== executors


class LocalExecutor:
    """Today's in-process loop: ``map`` calls ``fn`` on each unit in order."""

    name = "local"

    def map(self, fn: Callable[[U], R], units: Sequence[U], progress: Callable[[int], None] | None = None,
            describe: Callable[[U], str] = repr) -> list[R]:
        out = []
        for unit in units:
            out.append(fn(unit))
            if progress:
                progress(1)
        return out

    def close(self) -> None:
        return None

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RayExecutor:
    """Units as Ray tasks on the cluster at ``address``.

    ``num_cpus`` / ``num_gpus``: resources each unit asks for (``num_gpus=1`` on GPU suites).
    ``max_retries``: how often Ray resubmits a unit whose worker died (system failures only;
    an exception raised by the unit itself is not retried and propagates as it is).
    ``runtime_env``: passed to ``ray.init`` (e.g. ``{"env_vars": {...}}``); ``None`` uses the
    workers' own environment. Results come back in the order of the units.
    """

    name = "ray"

    def __init__(self, address: str, *, num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 2,
                 runtime_env: Mapping[str, Any] | None = None, check: bool = True) -> None:
        import ray

        if check:
            check_ray_address(address)
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.max_retries = int(max_retries)
        self._owns = not ray.is_initialized()
        if self._owns:
            kwargs: dict[str, Any] = dict(address=address, log_to_driver=False)
            host, _ = parse_ray_address(address)
            if host == "localhost" or host.startswith("127."):
                # a loopback head: this driver is on the loopback too (saves Ray's guess of
                # the node's address, which opens a socket towards a public resolver)
                kwargs["_node_ip_address"] = "127.0.0.1"
            if runtime_env:
                kwargs["runtime_env"] = dict(runtime_env)
            ray.init(**kwargs)

    def map(self, fn: Callable[[U], R], units: Sequence[U], progress: Callable[[int], None] | None = None,
            describe: Callable[[U], str] = repr) -> list[R]:
        import ray
        from ray.exceptions import RayError, RayTaskError

        remote = ray.remote(fn).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                        max_retries=self.max_retries, retry_exceptions=False)
        refs = [remote.remote(u) for u in units]
        out: list[R] = []
        try:
            for i, (unit, ref) in enumerate(zip(units, refs)):
                try:
                    out.append(ray.get(ref))
                except RayTaskError as err:  # the unit raised: its own exception, unchanged
                    raise err.as_instanceof_cause() from None
                except RayError as err:
                    raise ExecutorError(
                        f"unit {i + 1} of {len(units)} ({describe(unit)}) failed on the Ray cluster at "
                        f"{self.address} after {self.max_retries} retries: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from err
                if progress:
                    progress(1)
        finally:
            for ref in refs[len(out):]:  # a failure or an interrupt: drop the rest of the sweep
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 -- already finished or already failed
                    pass
        return out

    def close(self) -> None:
        import ray

        if self._owns and ray.is_initialized():
            ray.shutdown()
        self._owns = False

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


Executor = LocalExecutor | RayExecutor


def make_executor(executor: str | LocalExecutor | RayExecutor | None = "local", ray_address: str | None = None,
                  *, device: str = "cpu", **options: Any) -> LocalExecutor | RayExecutor:
    """An executor from the chapters' parameters: ``"local"`` (or ``None``) or ``"ray"`` with
    ``ray_address``. Units ask for one GPU each when ``device`` is ``cuda`` (override with
    ``num_gpus=``). An executor object is returned as it is."""
    if isinstance(executor, (LocalExecutor, RayExecutor)):
        return executor
    kind, address = validate_executor(executor or "local", ray_address)
    if kind == "local":
        return LocalExecutor()
    options.setdefault("num_gpus", 1 if str(device) == "cuda" else 0)
    return RayExecutor(address, check=False, **options)


# =============================================================================== suites on workers


@dataclass(frozen=True)
class SuiteSpec:
    """The parameters a worker needs to load a suite itself (paths, never tensors): those of
    :func:`subboost.experiments.load_suite_from_parameters`, with paths made absolute and
    ``threads`` the driver's torch CPU threads (same thread count, same floating-point sums)."""

    profile: str = "ci"
    zoo_root: str | None = None
    checkpoint_root: str | None = None
    model: str | None = None
    tasks: tuple[str, ...] | None = None
    data_root: str | None = None
    allow_pickle: bool = False
    device: str = "auto"
    threads: int | None = None

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any]) -> "SuiteSpec":
        def path(v: Any) -> str | None:
            return None if v in (None, "") else str(Path(v).resolve())

        zoo_root = params.get("zoo_root")
        if not params.get("checkpoint_root") and not zoo_root:
            from subboost.zoo.build import default_root

            zoo_root = default_root()  # resolved here: the worker's environment may differ
        tasks = params.get("tasks")
        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        return cls(profile=str(params.get("profile", "ci")), zoo_root=path(zoo_root),
                   checkpoint_root=path(params.get("checkpoint_root")), model=params.get("model"),
                   tasks=tuple(tasks) if tasks else None, data_root=path(params.get("data_root")),
                   allow_pickle=bool(params.get("allow_pickle", False)), device=str(params.get("device", "auto")))

    def parameters(self) -> dict[str, Any]:
        return dict(profile=self.profile, zoo_root=self.zoo_root, checkpoint_root=self.checkpoint_root,
                    model=self.model, tasks=list(self.tasks) if self.tasks else None, data_root=self.data_root,
                    allow_pickle=self.allow_pickle, device=self.device)


@functools.lru_cache(maxsize=1)
def cached_suite(spec: SuiteSpec) -> Any:
    """The suite of ``spec``, loaded once per worker process (the last one only)."""
    import torch

    from subboost.experiments import load_suite_from_parameters

    if spec.threads:
        torch.set_num_threads(int(spec.threads))
    return load_suite_from_parameters(spec.parameters())


@functools.lru_cache(maxsize=1)
def cached_task_vectors(spec: SuiteSpec, tasks: tuple[str, ...]) -> Any:
    """The task vectors of ``tasks`` in the suite of ``spec``; one set kept per worker."""
    return cached_suite(spec).task_vectors(list(tasks))


# =============================================================================== a cluster on one machine


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def loopback_namespace_command(argv: Sequence[str]) -> list[str] | None:
    """``argv`` wrapped to run in a fresh network namespace whose only interface is the
    loopback (``unshare -n``, then ``ip link set lo up``), or ``None`` where that is not
    possible (no ``unshare``/``ip``, no permission). Ray's servers listen on every interface
    of their namespace; in this one that is the loopback alone, so a test cluster is never
    reachable from outside the machine."""
    import shutil
    import subprocess

    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if not unshare or not ip:
        return None
    probe = subprocess.run([unshare, "-n", ip, "link", "set", "lo", "up"], capture_output=True)
    if probe.returncode != 0:
        return None
    return [unshare, "-n", "sh", "-c", f'"{ip}" link set lo up && exec "$@"', "sh", *argv]


class LocalCluster:
    """A Ray cluster of real processes on this machine's loopback interface, for tests and
    benchmarks: a head without CPUs (it schedules, it does not compute) and ``workers``
    worker nodes with ``cpus_per_worker`` CPUs each, every node a ``ray start --block``
    process whose id is kept, so :meth:`shutdown` ends exactly these (and their children).

    ``env``: extra environment of the nodes (e.g. ``PYTHONPATH``, ``SUBBOOST_ZOO_ROOT``).
    ``object_store_bytes``: object store per node (small: units carry parameters only).
    Use as a context manager; :meth:`add_worker` grows the cluster.
    """

    def __init__(self, workers: int = 1, cpus_per_worker: int = 1, *, env: Mapping[str, str] | None = None,
                 temp_dir: str | Path | None = None, object_store_bytes: int = 100 * 1024 ** 2,
                 timeout_s: float = 180.0) -> None:
        import sys
        import tempfile

        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.address = f"{self.host}:{self.port}"
        self.cpus_per_worker = int(cpus_per_worker)
        self.object_store_bytes = int(object_store_bytes)
        self.timeout_s = float(timeout_s)
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **dict(env or {})}
        self._tmp = tempfile.mkdtemp(prefix="ray-", dir=temp_dir)  # Ray's session folder (short path)
        self._ray = str(Path(sys.executable).with_name("ray"))
        self.nodes: list[Any] = []
        self._workers = 0
        try:
            self._start(["--head", "--port", str(self.port), "--num-cpus", "0", "--include-dashboard", "false",
                         "--temp-dir", self._tmp], expect_cpus=None)
            self.add_worker(int(workers))
        except BaseException:
            self.shutdown()
            raise

    def _start(self, args: list[str], expect_cpus: int | None) -> None:
        """Start one node; wait for the head's port (``expect_cpus=None``) or for the cluster
        to offer ``expect_cpus`` CPUs (``0``: do not wait)."""
        import subprocess

        cmd = [self._ray, "start", "--block", "--node-ip-address", self.host, "--disable-usage-stats",
               "--object-store-memory", str(self.object_store_bytes), *args]
        log = open(Path(self._tmp) / f"node{len(self.nodes)}.log", "wb")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        self.nodes.append(proc)
        if expect_cpus is None:
            self._wait_for_port(proc)
        elif expect_cpus:
            self._wait_for_cpus(expect_cpus, proc)

    def add_worker(self, count: int = 1) -> None:
        """Start ``count`` more worker nodes, one after the other (concurrent starts time out on a
        busy machine), each waited for until its CPUs are in the cluster; a node whose start
        fails is tried once more."""
        for _ in range(count):
            self._workers += 1
            args = ["--address", self.address, "--num-cpus", str(self.cpus_per_worker)]
            try:
                self._start(args, expect_cpus=self._workers * self.cpus_per_worker)
            except ExecutorError:
                self._end(self.nodes.pop())
                self._start(args, expect_cpus=self._workers * self.cpus_per_worker)

    def _wait_for_port(self, proc: Any) -> None:
        import time

        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log = (Path(self._tmp) / f"node{len(self.nodes) - 1}.log").read_text(errors="replace")
                raise ExecutorError(f"ray start exited with {proc.returncode}:\n{log[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise ExecutorError(f"the Ray head at {self.address} did not open its port in {self.timeout_s:.0f} s")

    def _wait_for_cpus(self, cpus: int, proc: Any) -> None:
        import subprocess
        import time

        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            for i, node in enumerate(self.nodes):
                if node.poll() is not None:
                    log = (Path(self._tmp) / f"node{i}.log").read_text(errors="replace")
                    raise ExecutorError(f"ray start exited with {node.returncode}:\n{log[-2000:]}")
            out = subprocess.run([self._ray, "status", "--address", self.address], capture_output=True,
                                 text=True, env=self.env)
            if out.returncode == 0 and _total_cpus(out.stdout) >= cpus:
                return
            time.sleep(1.0)
        raise ExecutorError(f"the Ray cluster at {self.address} did not reach {cpus} CPUs in {self.timeout_s:.0f} s")

    def shutdown(self) -> None:
        """End the nodes started here (SIGTERM, then SIGKILL to their process groups)."""
        import shutil

        for proc in reversed(self.nodes):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.nodes):
            self._end(proc)
        self.nodes = []
        shutil.rmtree(self._tmp, ignore_errors=True)

    @staticmethod
    def _end(proc: Any) -> None:
        """End one node started here: SIGTERM, a grace period, then SIGKILL to its process
        group (its raylet, GCS and worker processes)."""
        import signal
        import subprocess

        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _total_cpus(status: str) -> float:
    """The total CPUs in the text of ``ray status`` (``0.0/2.0 CPU``)."""
    import re

    m = re.search(r"[\d.]+/([\d.]+) CPU", status)
    return float(m.group(1)) if m else -1.0
