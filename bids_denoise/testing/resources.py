"""Measuring a method as a user's machine sees it: its time and the peak memory it adds, in a fresh process.

Shared by the benchmarks (``benchmarks/``) and the tests that hold the methods to their declared memory.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import time


def _child(queue, function, args, threads, warmup):
    try:
        _measure_here(queue, function, args, threads, warmup)
    except BaseException as err:  # report, never leave the parent waiting
        queue.put(err)


def _measure_here(queue, function, args, threads, warmup=None):
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    with threadpool_limits(threads):
        data = args[0]()  # build the input inside the child
        if warmup is not None:  # library code loaded on first use is not the algorithm's memory
            function(warmup())
        gc.collect()
        _release_free_heap()
        _reset_peak()
        baseline = _status_kib("VmRSS")
        start = time.perf_counter()
        result = function(data)
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM")
    queue.put((seconds, (peak - baseline) * 1024, result))


def _release_free_heap():
    """Give the memory freed so far (building the input, the warm-up) back to the system (glibc's
    ``malloc_trim``), so that later allocations show in the peak instead of reusing it unseen: glibc
    raises its mmap threshold after large frees (up to 32 MiB), so arrays of that size come from, and
    go back to, a heap that keeps its pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak():
    """Reset the process's peak resident size (Linux: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _status_kib(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(function, make_data, threads=1, warmup=None):
    """(seconds, extra peak bytes over the input, function's small result) in a fresh process.

    ``warmup``, if given, makes a small input that the function runs on first, untimed, so that
    neither the time nor the peak memory counts what a first call loads (library code, caches)."""
    context = mp.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, function, (make_data,), threads, warmup))
    process.start()
    outcome = queue.get()
    process.join()
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def measure_best(function, make_data, threads=1, repeat=1, warmup=None):
    """:func:`measure` ``repeat`` times: the shortest time, the largest peak memory, the last result.

    The shortest of a few runs is the usual estimate of a program's own cost on a shared machine."""
    runs = [measure(function, make_data, threads, warmup) for _ in range(max(1, repeat))]
    return min(r[0] for r in runs), max(r[1] for r in runs), runs[-1][2]
