"""The restore's kept threads: the pools that read and hash blocks (engine/blockload.py) and
fault in new buffers, started once per process and kept, and `run_shared`, which runs a list of
jobs on them in order."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait


def readers() -> int:
    """Threads that read and hash blocks: one per core, two at least (a read and a hash
    overlap even on one core: the read waits in the kernel), four at most (past that the
    memory bus, not the cores, is the limit)."""
    return min(4, max(2, os.cpu_count() or 1))


_pools: dict[tuple[str, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _forget_pools() -> None:
    """In a forked child: the parent's threads are not there, so neither are its pools."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The process's pool of `workers` threads for `name`, started on first use and kept:
    starting the threads anew for each restore cost 2-3 ms of it (the caller waits for each
    thread to start, on two busy cores)."""
    with _pools_lock:
        pool = _pools.get((name, workers))
        if pool is None:
            pool = _pools[(name, workers)] = ThreadPoolExecutor(workers, thread_name_prefix=name)
        return pool


def run_shared(jobs: list, workers: int) -> list:
    """Run `jobs` (callables) on `workers` threads of the kept pool, each taking the next job
    in order until none is left -> their results in order. On a failure the threads take no
    new job; the failure of the first job (in order) that failed is raised once every job
    taken has finished, so none is still at work when this returns. One task per thread, not
    one per job: 64 futures a restore cost ~1 ms of the submitting thread, holding the GIL the
    readers need between their calls."""
    results: list = [None] * len(jobs)
    failed: dict[int, BaseException] = {}
    taken = iter(range(len(jobs)))
    lock, stop = threading.Lock(), threading.Event()

    def work() -> None:
        while not stop.is_set():
            with lock:
                j = next(taken, None)
            if j is None:
                return
            try:
                results[j] = jobs[j]()
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller below
                failed[j] = exc
                stop.set()
                return

    n = max(1, min(workers, len(jobs)))
    tasks = [_pool("permeant-read", workers).submit(work) for _ in range(n)]
    try:
        wait(tasks)
    except BaseException:  # interrupted while waiting: the jobs taken still finish first
        stop.set()
        wait(tasks)
        raise
    for task in tasks:
        task.result()  # work() itself never raises; a pool shut down at exit would
    if failed:
        raise failed[min(failed)]
    return results
