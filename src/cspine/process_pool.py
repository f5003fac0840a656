"""Batch work in child processes that survives a child's death.

A batch (prepare, pseudo-label) must not die for one study: a native decoder's panic or the kernel's OOM killer
takes the whole process with it, and with it a plain ``ProcessPoolExecutor`` (``BrokenProcessPool``). Here the jobs
that had not answered when a process died are run again one per fresh process, so the job that kills its process
is reported through ``crashed`` and every other job still runs.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

log = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")


def run_in_processes(
    fn: Callable[[J], R],
    jobs: Sequence[J],
    workers: int,
    record: Callable[[R], None],
    crashed: Callable[[J], None],
    *,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    start_method: str | None = None,
) -> None:
    """Run ``fn`` (a module-level function that reports its own errors in its result) over ``jobs`` in ``workers``
    processes; ``record`` gets each result as it comes, in completion order, ``crashed`` each job whose process
    died. ``start_method``: "spawn" where the parent's threads (torch's OpenMP pool) make forking unsafe."""
    context = mp.get_context(start_method) if start_method else None

    def pool(n: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=n, mp_context=context, initializer=initializer, initargs=initargs)

    pending = dict(enumerate(jobs))
    try:
        with pool(workers) as ex:
            futures = {ex.submit(fn, job): k for k, job in pending.items()}
            for fut in as_completed(futures):
                record(fut.result())
                pending.pop(futures[fut])
    except BrokenProcessPool:
        log.warning("a worker process died; running %d unfinished job(s) one per process", len(pending))
        for job in pending.values():
            try:
                with pool(1) as ex:
                    record(ex.submit(fn, job).result())
            except BrokenProcessPool:
                crashed(job)
