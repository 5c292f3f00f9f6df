"""Ingest's helper processes: a forkserver pool whose workers die with the process that made it,
a map that keeps this process working too, and the threads that write slice files."""

import concurrent.futures
import functools
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Sequence

# Threads per process writing slice files (file creation waits on the file system).
_WRITER_THREADS = 2
# How often a worker looks whether the ingest that started it is still there (seconds).
_PARENT_POLL_S = 0.25


def process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor | None:
    """``workers - 1`` helper processes (None for one worker: this process does everything).

    Workers are forked from a server that has imported what ingest needs (numpy, pydicom,
    scikit-image...), so they start in milliseconds; not ingest itself: `python -m
    data_pipeline.ingest` would run it as the workers' __main__ too.

    If this process is killed (SIGKILL leaves it no time to shut the pool down), each worker
    notices within a fraction of a second and exits; then the forkserver and the resource tracker,
    whose pipes the workers held open, see them close and exit too (tests/malformed_test.py).
    """
    if workers <= 1:
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["data_pipeline"])
    return concurrent.futures.ProcessPoolExecutor(
        workers - 1,
        mp_context=context,
        initializer=_exit_with_parent,
        initargs=(os.getpid(),),
    )


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):  # no /proc (not Linux): kill(pid, 0) is all there is
        return True


def _exit_with_parent(parent_pid: int) -> None:
    """Runs in each worker: a thread that ends the worker once the ingest process is gone.

    Why a thread of our own: the worker, the forkserver and the resource tracker each hold the
    others' pipes open (Python passes the forkserver's "alive" pipe to every worker), so none of
    them ever sees the parent's death on its own and they would wait forever.
    """

    def watch() -> None:
        while _alive(parent_pid):
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def shared_map(executor, fn, items: Sequence) -> Iterator:
    """executor.map(fn, items), with this process working too; results in the order of items.

    The workers take items from the front while this process takes, from the back, those no worker
    has started yet, so that no core idles while worker processes start up (most of a second) and
    this process is not left waiting on them at the end.
    """
    if executor is None:
        yield from map(fn, items)
        return
    futures = [executor.submit(fn, item) for item in items]
    done_here = {}
    next_out, back = 0, len(items) - 1
    try:
        while next_out < len(items):
            if next_out in done_here:
                yield done_here.pop(next_out)
            elif futures[next_out].done():
                yield futures[next_out].result()
            elif back >= next_out and futures[back].cancel():
                done_here[back] = fn(items[back])
                back -= 1
                continue
            else:
                back = -1  # the workers hold everything left: wait for them in order
                yield futures[next_out].result()
            next_out += 1
    finally:
        for future in futures:
            future.cancel()


@functools.cache
def writer_pool() -> concurrent.futures.ThreadPoolExecutor:
    """This process's slice-writing threads (cheaper than starting threads per series)."""
    return concurrent.futures.ThreadPoolExecutor(_WRITER_THREADS, thread_name_prefix="npz-writer")
