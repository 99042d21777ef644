"""How the graph runs, and how the app and its workers live and die.

* :func:`configure` sets Nipype's settings before a participant's graph is built (content hashing, crash
  files in the participant's log folder, the scheduler's poll interval); :func:`run_workflow` runs the
  graph with the configured plugin and returns Nipype's one-line reason where it did not complete.
* MultiProc workers die with the app (:func:`tie_workers_to_the_app`): an app killed by its scheduler
  leaves no orphan holding memory.
* Ctrl-C (SIGINT) ends the app at once with one line and exit 130 (:func:`handle_interrupts`). Every
  output is written atomically and the work directory caches, so a rerun resumes.
"""

from __future__ import annotations

import gc
import os
import signal
import sys

INTERRUPTED = "bids-denoise: interrupted; rerun the same command to resume"


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
    try:
        # MultiProc collects garbage at every poll: keep the long-lived heap (torch, pybids) out of those
        # collections, which otherwise cost 0.2 s each
        gc.freeze()
        try:
            workflow.run(plugin=nipype.plugin, plugin_args=plugin_args)
        finally:
            gc.unfreeze()
    except (RuntimeError, OSError) as err:  # OSError: Nipype could not write its own files (a full disk)
        return str(err).splitlines()[0] if str(err) else "the workflow did not complete"
    return ""


def handle_interrupts():
    """Make Ctrl-C end the app at once with one line and exit 130, wherever it arrives (a KeyboardInterrupt
    raised inside Nipype's or logging's handlers can be swallowed). Returns the previous handler (None
    outside the main thread, where signals cannot be handled)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupted(signum, frame):
        print(INTERRUPTED, file=sys.stderr, flush=True)
        os._exit(130)

    return signal.signal(signal.SIGINT, interrupted)


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
