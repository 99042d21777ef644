"""``main``: parse the command line, build the run configuration, run the participant or group level."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys

from bids_denoise.cli.errors import EXIT_INTERRUPTED, AppError

LOGGER = logging.getLogger("bids_denoise")


def main(argv=None) -> int:
    from bids_denoise.engine import INTERRUPTED, handle_signals

    os.environ.setdefault("NIPYPE_NO_ET", "1")
    os.environ.setdefault("LOGNAME", os.environ.get("USER", "bids-denoise"))
    _writable_home()
    previous = handle_signals()
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def console() -> None:
    """The ``bids-denoise`` command and ``python -m bids_denoise``: a fresh process, whose MultiProc workers
    may be forked (:func:`bids_denoise.engine.worker_start_method`)."""
    from bids_denoise.engine import mark_fresh_process

    mark_fresh_process()
    sys.exit(main())


def _writable_home() -> None:
    """Nipype, matplotlib and torch keep settings and caches under HOME; where it cannot be written (a
    container run as another user, a read-only or missing home), give this process a private one."""
    import tempfile
    from pathlib import Path

    home = Path(os.environ.get("HOME") or "/nonexistent")
    if home.is_dir() and os.access(home, os.W_OK | os.X_OK):
        return
    import atexit
    import shutil

    private = tempfile.mkdtemp(prefix="bids-denoise-home-")
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    os.environ["HOME"] = private
    os.environ.setdefault("MPLCONFIGDIR", str(Path(private) / "matplotlib"))
    print(f"bids-denoise: note: HOME ({home}) cannot be written; using {private} for this run's settings and caches",
          file=sys.stderr)


def _main(argv) -> int:
    from bids_denoise import registry
    from bids_denoise.cli.group import run_group
    from bids_denoise.cli.parser import build_config, parse_command_line
    from bids_denoise.cli.participant import run_participant

    methods = registry.load_all()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_command_line(argv, methods)
    setup_logging()
    try:
        config = build_config(args, methods, "bids-denoise " + " ".join(shlex.quote(a) for a in argv))
        if config.execution.analysis_level == "group":
            return run_group(config)
        return run_participant(config, methods)
    except AppError as err:
        print(f"bids-denoise: error: {err}", file=sys.stderr)
        return err.exit_code


def setup_logging():
    """The app's log to stderr; Nipype's own quieter unless BIDS_DENOISE_VERBOSE=1."""
    logging.raiseExceptions = False  # a log file on a full disk must not print tracebacks over the summary
    if not LOGGER.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [bids-denoise] %(levelname)s: %(message)s", "%H:%M:%S"))
        LOGGER.addHandler(handler)
        LOGGER.setLevel(logging.INFO)
        logging.getLogger("bids_denoise.methods").setLevel(logging.WARNING)
        logging.getLogger("bids_denoise.methods.progress").setLevel(logging.INFO)  # how far, how long still
    if os.environ.get("BIDS_DENOISE_VERBOSE") != "1":
        from nipype import logging as nipype_logging

        nipype_logging.getLogger("nipype.workflow").setLevel(logging.WARNING)
        nipype_logging.getLogger("nipype.interface").setLevel(logging.WARNING)
