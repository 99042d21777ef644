"""Helpers for the benchmarks: run a case in a fresh process, time it, measure its peak memory."""

from __future__ import annotations

import multiprocessing as mp
import resource
import time


def _child(queue, function, args, threads):
    from threadpoolctl import threadpool_limits
    import torch

    torch.set_num_threads(threads)
    with threadpool_limits(threads):
        data = args[0]()  # build the input inside the child
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        result = function(data)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((seconds, (peak - baseline) * 1024, result))


def measure(function, make_data, threads=1):
    """(seconds, extra peak bytes over the input, function's small result) in a fresh process."""
    context = mp.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, function, (make_data,), threads))
    process.start()
    outcome = queue.get()
    process.join()
    return outcome


def table(rows, headers):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = " | ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
