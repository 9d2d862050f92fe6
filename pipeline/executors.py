"""Where work units run: in-process, a local process pool, or Ray tasks across nodes.

Every executor runs the same `process_unit` on the same units and hands the summaries back
in unit order; the driver assembles the built dirs, so the output is byte-identical
whichever executor ran.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque

from stages.errors import BuildError

from .worker import process_unit

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCHDOG_S = 0.5  # how often a worker checks that its driver is still alive


_TERMINATED = threading.Event()  # set by SIGTERM: seen even where a KeyboardInterrupt was swallowed


def _interrupt(signum, frame):
    _TERMINATED.set()
    raise KeyboardInterrupt


def _get_local(res):
    """A pool result, waited for in short slices: a SIGTERM whose KeyboardInterrupt landed in a
    destructor or callback (and was swallowed there) still stops the build here."""
    while True:
        if _TERMINATED.is_set():
            raise KeyboardInterrupt
        try:
            return res.get(timeout=0.25)
        except mp.TimeoutError:
            continue


def handle_sigterm_as_interrupt() -> None:
    """SIGTERM (a scheduler's kill, `timeout`) stops a build like Ctrl-C: the pool is
    terminated, finished units stay on disk and the CLI prints its `interrupted:` line."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


@contextlib.contextmanager
def _sigterm_interrupts():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker_init(driver_pid: int):
    # Ctrl-C reaches the whole process group: the driver alone handles it (and terminates the
    # pool), so workers stop without a traceback each. Finished units are already on disk.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # pool.terminate() must end us, not interrupt
    die_with_parent(driver_pid)


def die_with_parent(parent_pid: int) -> None:
    """A worker must not outlive its driver (SIGKILL, OOM kill): a worker stuck in a
    transform would spin forever, reparented to init. Linux: the kernel sends SIGKILL when the
    parent dies (PR_SET_PDEATHSIG); everywhere: a watchdog thread checks the parent pid."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still covers it
    if os.getppid() != parent_pid:  # the driver died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="tokenmill-watchdog",
                     daemon=True).start()


def _watch_parent(parent_pid: int):
    while True:
        time.sleep(WATCHDOG_S)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)


def _deliver(on_result, progress, plan, unit, summary) -> None:
    progress.advance(plan.spec.dataset_name, summary)
    if on_result is not None:
        on_result(plan, unit, summary)


def _windowed(tasks, window: int, submit, wait, deliver) -> None:
    """Submit lazily with at most `window` units in flight; deliver results in task order.
    A huge dataset's 10^5 units are never all pending (nor all in memory) at once."""
    pending: deque = deque()
    for plan, unit in tasks:
        pending.append((plan, unit, submit(plan, unit)))
        if len(pending) >= window:
            plan0, unit0, handle = pending.popleft()
            deliver(plan0, unit0, wait(handle))  # re-raises a worker's RecordError, in unit order
    while pending:
        plan0, unit0, handle = pending.popleft()
        deliver(plan0, unit0, wait(handle))


def run_local(tasks, workers: int, progress, on_result=None) -> None:
    """Run (plan, unit) tasks (any iterable, consumed lazily). Each summary goes to the
    progress and to `on_result(plan, unit, summary)` in task order; it is also on disk beside
    its unit (the build reads it back from there)."""
    it = iter(tasks)
    head = list(itertools.islice(it, 2))
    tasks = itertools.chain(head, it)
    deliver = functools.partial(_deliver, on_result, progress)
    _TERMINATED.clear()
    with _sigterm_interrupts():
        if workers <= 1 or len(head) <= 1:
            for plan, unit in tasks:
                deliver(plan, unit, process_unit(plan.job, unit))
            return
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(workers, maxtasksperchild=64, initializer=_worker_init,
                      initargs=(os.getpid(),)) as pool:
            _windowed(tasks, 2 * workers, lambda plan, unit: pool.apply_async(process_unit, (plan.job, unit)),
                      _get_local, deliver)


def map_calls(fn, calls: list[tuple], executor: str = "local", workers: int = 1) -> list:
    """[fn(*args) for args in calls], run in parallel (a local process pool, or Ray tasks on the
    cluster the build already joined), results in call order. For the driver's per-shard and
    per-file work after the units ran: joining, hashing — its own work stays O(shards)."""
    calls = list(calls)
    if executor == "ray" and calls:
        import ray
        remote = ray.remote(num_cpus=1)(fn)
        return ray.get([remote.remote(*args) for args in calls])
    if workers <= 1 or len(calls) <= 1:
        return [fn(*args) for args in calls]
    _TERMINATED.clear()
    with _sigterm_interrupts():
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(min(workers, len(calls)), initializer=_worker_init, initargs=(os.getpid(),)) as pool:
            handles = [pool.apply_async(fn, args) for args in calls]
            return [_get_local(h) for h in handles]


def _paths_visible(paths: list[str]) -> tuple[str, list[str]]:
    import socket
    return socket.gethostname(), [p for p in paths if not os.path.exists(p)]


def run_ray(tasks, address: str | None, progress, shared_paths: list[str], on_result=None,
            units_per_node=None) -> None:
    """run_local's contract on a Ray cluster; `units_per_node` (a dict), when given, gets the number of
    units each Ray node ran."""
    try:
        import ray
    except ImportError:
        raise BuildError("--executor ray needs Ray: pip install -c constraints.txt '.[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    # Workers read the sources and write into the cache by path: check every node sees them.
    check = ray.remote(num_cpus=0)(_paths_visible)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probes = [check.options(scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(shared_paths) for n in nodes]
    for host, missing in ray.get(probes):
        if missing:
            raise BuildError(f"Ray node {host} cannot see {', '.join(missing[:3])}: with --executor ray the "
                             "sources and the cache must be on a path every node shares (NFS, Lustre, …)")
    remote = ray.remote(num_cpus=1)(_unit_on_node)

    def wait(handle):
        summary, node = ray.get(handle)
        if units_per_node is not None:
            units_per_node[node] = units_per_node.get(node, 0) + 1
        return summary
    window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    _windowed(tasks, window, lambda plan, unit: remote.remote(plan.job, unit), wait,
              functools.partial(_deliver, on_result, progress))


def _unit_on_node(job, unit) -> tuple[dict, str]:
    """process_unit in a Ray task, and the node it ran on (the build reports the spread)."""
    import ray
    return process_unit(job, unit), ray.get_runtime_context().get_node_id()
