"""How the graph runs, and how the app and its workers live and die.

* :func:`configure` sets Nipype's settings before a participant's graph is built (content hashing, crash
  files in the participant's log folder, the scheduler's poll interval); :func:`run_workflow` runs the
  graph with the configured plugin and returns Nipype's one-line reason where it did not complete.
* MultiProc workers die with the app (:func:`tie_workers_to_the_app`): an app killed by its scheduler
  leaves no orphan holding memory.
* A worker that dies (the kernel's out-of-memory killer, a segfault in a library) ends the run instead of
  hanging it (:class:`GuardedMultiProcPlugin`): its node fails, Nipype writes its crash file, the run
  stops with one line naming the node, and what finished is kept, so a rerun resumes.
* Ctrl-C (SIGINT) and a scheduler's SIGTERM end the app at once with one line and exit 130 or 143
  (:func:`handle_signals`). Every output is written atomically and the work directory caches, so a rerun
  resumes.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from contextlib import contextmanager

from bids_denoise.machine import available_cpus, total_memory_gb  # noqa: F401  (the engine's resources)

INTERRUPTED = "bids-denoise: interrupted; rerun the same command to resume"
TERMINATED = "bids-denoise: terminated (SIGTERM); rerun the same command to resume"


class WorkerDied(RuntimeError):
    """A worker process of the pool died while it ran a node."""


class WorkDirInUse(RuntimeError):
    """Another run holds the work directory (``holder``: its process id, or -1 where unknown)."""

    def __init__(self, holder: int):
        super().__init__(holder)
        self.holder = holder


@contextmanager
def holding(work_dir):
    """Hold ``work_dir`` for the duration of a run: an advisory lock that its file system keeps while this
    process lives (a killed run leaves nothing to clean up). Two runs in one work directory would overwrite
    each other's nodes: the second raises :class:`WorkDirInUse`."""
    import fcntl
    from pathlib import Path

    with open(Path(work_dir) / ".bids-denoise.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            raise WorkDirInUse(int(holder) if holder.isdigit() else -1) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def plugin_names() -> list[str]:
    """The Nipype plugins ``--plugin`` may name."""
    from nipype.pipeline import plugins

    return sorted(name[: -len("Plugin")] for name in dir(plugins) if name.endswith("Plugin") and name != "Plugin")


def configure(nipype, log_dir) -> None:
    """Nipype's settings for a participant's graph (before it is built: nodes copy them when made): content
    hashing, crash files in ``log_dir``, the scheduler's poll interval; workers tied to the app."""
    from nipype import config as nipype_config

    tie_workers_to_the_app()
    nipype_config.update_config({
        "execution": {
            "crashdump_dir": str(log_dir),
            "crashfile_format": "txt",
            "hash_method": "content",
            "check_version": "false",
            "stop_on_first_crash": str(bool(nipype.stop_on_first_crash)).lower(),
            "remove_unnecessary_outputs": "false",
            "use_relative_paths": "false",
            # Nipype reads its scheduler's poll interval here, not from the plugin arguments
            "poll_sleep_duration": str(nipype.plugin_args.get("poll_sleep_duration", 2)),
        },
        "monitoring": {"enabled": "false"},
    })


def run_workflow(workflow, nipype) -> str:
    """Run ``workflow`` (built after :func:`configure`) with the engine settings ``nipype`` (a
    :class:`~bids_denoise.config.Nipype`). Returns Nipype's error line if the graph failed, else ''."""
    plugin_args = {key: value for key, value in nipype.plugin_args.items() if key != "poll_sleep_duration"}
    if nipype.plugin == "MultiProc":
        plugin_args.setdefault("mp_context", worker_start_method())
    plugin = GuardedMultiProcPlugin(plugin_args=plugin_args) if nipype.plugin == "MultiProc" else nipype.plugin
    try:
        # MultiProc collects garbage at every poll: keep the long-lived heap (torch, pybids) out of those
        # collections, which otherwise cost 0.2 s each
        gc.freeze()
        try:
            workflow.run(plugin=plugin, plugin_args=plugin_args)
        finally:
            gc.unfreeze()
    except (RuntimeError, OSError) as err:  # OSError: Nipype could not write its own files (a full disk)
        return str(err).splitlines()[0] if str(err) else "the workflow did not complete"
    return ""


_FRESH_PROCESS = False


def mark_fresh_process() -> None:
    """Called by the command line's entry point: this process has run no parallel native code yet."""
    global _FRESH_PROCESS
    _FRESH_PROCESS = True


def worker_start_method() -> str:
    """How MultiProc starts its workers: ``fork`` from the command line (fast: the workers share the app's
    imports); a fork server when the app runs inside a Python session (a notebook, a test session). A
    process that has already run multithreaded OpenMP code (any torch computation) cannot safely fork:
    GNU libgomp's thread pool does not survive a fork and the worker's first parallel region waits
    forever for threads that are not there."""
    return "fork" if _FRESH_PROCESS else "forkserver"


def handle_signals() -> dict:
    """Make Ctrl-C (SIGINT) and SIGTERM end the app at once with one line and exit 130 or 143, wherever they
    arrive (a KeyboardInterrupt raised inside Nipype's or logging's handlers can be swallowed); the workers
    die with the app. Returns the previous handlers, by signal (none outside the main thread, where
    signals cannot be handled)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def ended(signum, frame):
        print(INTERRUPTED if signum == signal.SIGINT else TERMINATED, file=sys.stderr, flush=True)
        os._exit(128 + signum)

    return {signum: signal.signal(signum, ended) for signum in (signal.SIGINT, signal.SIGTERM)}


def _plugin_base():
    from nipype.pipeline.plugins.multiproc import MultiProcPlugin

    return MultiProcPlugin


class GuardedMultiProcPlugin(_plugin_base()):
    """Nipype's MultiProc, which ends the run when a worker dies instead of waiting for it forever.

    When a worker process dies (killed for memory, a crash in native code), Python's process pool breaks:
    every future of the pool fails with ``BrokenProcessPool``. Nipype's MultiProc reads a future's result
    in its done-callback, where that exception is lost, so the node's result never arrives and the
    scheduler polls on. Here the callback turns it into the node's failure (Nipype then writes the node's
    crash file and skips what depends on it) and the next scheduling step stops the run with
    :class:`WorkerDied`, naming the node(s) the dead pool was running.
    """

    def __init__(self, plugin_args=None):
        super().__init__(plugin_args=plugin_args)
        self._task_of_future = {}
        self._lost = []

    def _submit_job(self, node, updatehash=False):
        from concurrent.futures.process import BrokenProcessPool

        if self._lost:
            raise self._worker_died()
        try:
            taskid = super()._submit_job(node, updatehash=updatehash)
        except BrokenProcessPool:  # it broke before any running node reported: name those still running
            self._lost += [name for future, (_, name) in self._task_of_future.items() if not future.done()
                           or future.exception() is not None] or ["no node (an idle worker)"]
            raise self._worker_died() from None
        self._task_of_future[self._task_obj[taskid]] = (taskid, node.fullname)
        return taskid

    def _async_callback(self, args):
        try:
            result = args.result()
        except BaseException as err:  # noqa: BLE001 - the pool broke: this node's worker (or another) died
            taskid, name = self._task_of_future.get(args, (None, "a node"))
            self._lost.append(name)
            if taskid is not None:
                message = (f"the worker process running {name} died ({type(err).__name__}: {err}); the system may "
                           "have killed it for memory (see --mem-gb, --nprocs)")
                self._taskresult[taskid] = {"taskid": taskid, "result": None, "traceback": [message]}
            return
        self._taskresult[result["taskid"]] = result

    def _send_procs_to_workers(self, updatehash=False, graph=None):
        if self._lost:
            raise self._worker_died()
        return super()._send_procs_to_workers(updatehash=updatehash, graph=graph)

    def _worker_died(self) -> WorkerDied:
        names = ", ".join(sorted(set(self._lost)))
        return WorkerDied(f"a worker process died while running {names} (killed by the system, for memory?); the "
                          "run stopped: what finished is kept, rerun the same command to resume")


def tie_workers_to_the_app() -> None:
    """Make every MultiProc worker die with the app, from the moment it starts (not only once it
    runs a node: an idle worker of a killed app would otherwise live on)."""
    from nipype.pipeline.plugins import multiproc

    if multiproc.process_initializer is not _worker_initializer:
        _worker_initializer.__wrapped__ = multiproc.process_initializer
        multiproc.process_initializer = _worker_initializer


def _worker_initializer(cwd):
    """Nipype's worker initializer, after tying the worker to the app (module level: picklable)."""
    from nipype.pipeline.plugins import multiproc

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the app's to handle; workers die with it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a broken pool ends its workers quietly
    original = getattr(multiproc.process_initializer, "__wrapped__", multiproc.process_initializer)
    original(cwd)


def die_with_parent():
    """In a MultiProc worker: die with the app instead of running on as an orphan (Linux)."""
    import ctypes
    import multiprocessing

    if not sys.platform.startswith("linux") or multiprocessing.parent_process() is None:
        return  # the app's own process (Linear plugin, sinks) or a batch job: nothing to tie
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
