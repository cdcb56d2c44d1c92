"""Command line: ``jaxpoison --config=configs/<name>.py[:tiny] --workdir=DIR [--config.a.b=v]``,
``jaxpoison report WORKDIR [WORKDIR...] [--out DIR]`` (see `jaxpoison.report`), or
``jaxpoison export WORKDIR RUN OUT.npz`` (see `jaxpoison.export`).

Real logic lives in `jaxpoison.trainers` (``TRAINERS[config.trainer]``); this file only parses
flags.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (get_config).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bars (log lines only).")
_DEBUG = flags.DEFINE_bool("debug", False, "On an error, show the full traceback.")
# jax.distributed.initialize's arguments, for a run over several processes (hosts).
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for a run of several processes."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's number, 0..N-1.")


def _fail(message, code=1):
    """Ends the command with one ``jaxpoison: error:`` line (the log's path when there is one)."""
    log = Path(_WORKDIR.value or "") / "log.txt"
    where = f" (log: {log})" if _WORKDIR.value and log.is_file() else ""
    print(f"jaxpoison: error: {message}{where}", file=sys.stderr)
    sys.exit(code)


def _last_line(error):
    """The last non-empty line of an exception's message (ml_collections nests tracebacks)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _quiet_closed_loops(hook):
    """`hook` without the "Event loop is closed" tracebacks that TensorStore's writer threads
    print (through ``sys.excepthook``) when a checkpoint write failed (disk full) and orbax has
    closed the loop that waited for them: the error line says what went wrong."""

    def quiet(kind, value, tb):
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            hook(kind, value, tb)

    return quiet


def main(argv):
    if len(argv) > 1:
        _fail(
            f"unexpected arguments {argv[1:]}; give flags only: --config=FILE[:tiny] "
            "--workdir=DIR [--config.<key>=<value> ...] (a value with spaces in quotes).",
            2,
        )
    if not (_WORKDIR.value or "").strip():
        _fail("--workdir is empty; name a directory, e.g. --workdir=/tmp/run.", 2)
    # orbax logs every checkpoint step at INFO, and a failed write (disk full) as dozens of
    # tracebacks at ERROR: the one error line says it, --debug shows them.
    logging.set_verbosity(logging.WARNING if _DEBUG.value else logging.FATAL)
    if not _DEBUG.value:
        sys.excepthook = _quiet_closed_loops(sys.excepthook)
    try:
        config = _CONFIG.value
        config.get("trainer")  # ml_collections defers a failure to load the file to a first use
    except OSError as e:  # ml_collections defers a config file it could not load to here
        _fail(f"cannot load the config ({_last_line(e)}); check the path after --config=.", 2)
    from jaxpoison import distributed, trainers

    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:
        _fail(str(e), 2)
    try:
        trainers.train_and_evaluate(config, _WORKDIR.value, progress=not _QUIET.value)
    except KeyboardInterrupt:
        _fail("interrupted; rerun the same command to resume from the last checkpoint.", 130)
    except Exception as e:  # one line for a person; --debug for the traceback
        if _DEBUG.value:
            raise
        if isinstance(e, (ValueError, FloatingPointError)):  # DataError, PoisonFileError, ...
            _fail(str(e))
        if isinstance(e, OSError):
            what = f"{e.strerror}: {e.filename}" if e.filename else str(e)
            _fail(f"cannot read or write a file ({what}); check the workdir and the free space.")
        _fail(
            f"internal error ({type(e).__name__}: {_last_line(e)}); rerun with --debug for the "
            "traceback and report it."
        )


_HUGE_PAGES = "glibc.malloc.hugetlb=1"


def _reexec_with_huge_pages():
    """Restarts this command once with glibc's malloc asking for transparent huge pages.

    XLA:CPU allocates a compiled step's temporary buffers afresh on every call, and the kernel
    faults them in 4 KB at a time: 39k page faults per CIFAR CNN train step at batch 128. glibc's
    ``hugetlb`` tunable (2.35 and later; ignored elsewhere) madvises large allocations for
    transparent huge pages: 650 faults, and the step takes 0.117 s instead of 0.161 s
    (docs/performance.md). Tunables are read when a process starts, hence the restart.
    ``JAXPOISON_HUGE_PAGES=0`` turns it off.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (
        sys.platform != "linux"
        or os.environ.get("JAXPOISON_HUGE_PAGES", "1") == "0"
        or "glibc.malloc.hugetlb" in tunables
    ):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, _HUGE_PAGES])))
    os.execve(sys.executable, [sys.executable, "-m", "jaxpoison.main", *sys.argv[1:]], env)


def cli():
    """The ``jaxpoison`` command (and ``python -m jaxpoison.main``): `run` in a process whose
    malloc asks for huge pages. Callers inside their own process use `run`."""
    _reexec_with_huge_pages()
    run()


def run():
    """Runs the command line in ``sys.argv`` in this process."""
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from jaxpoison import report

        sys.exit(report.main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from jaxpoison import export

        sys.exit(export.main(sys.argv[2:]))
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv):
    """absl's parsing, with one clear line for a bad flag or a config key that does not exist."""
    try:
        return FLAGS(argv)
    except SyntaxError as e:  # --config names a file that is not Python (e.g. README.md)
        print(
            f"jaxpoison: error: cannot load the config: {e.filename} is not a Python config file "
            f"(SyntaxError at line {e.lineno}); --config takes a configs/*.py file.",
            file=sys.stderr,
        )
        sys.exit(2)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raw = str(e.args[0]) if e.args else str(e)
        if "Error whilst parsing config file" in raw:  # get_config raised: its own message
            message = _last_line(raw).removeprefix("ValueError: ")
            print(f"jaxpoison: error: {message}", file=sys.stderr)
            sys.exit(2)
        message = " ".join(raw.replace("\\n", " ").replace("\\", "").replace("'", "").split())
        print(
            f"jaxpoison: error: bad flag ({message}). A --config.<key> override must name "
            "a key that exists in the config file (with a value of its type); --config and "
            "--workdir are required.",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    cli()
