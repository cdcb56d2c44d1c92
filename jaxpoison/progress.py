"""Progress bars for long work, mirrored as plain lines into the run's log.txt."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import jax
from tqdm.auto import tqdm

from jaxpoison import distributed

_LOG_FILE: Path | None = None
log = logging.getLogger("jaxpoison")


def set_log_file(path):
    """Lines given to `ProgressBar.log` (and `say`) are appended to `path` (None: stop); in the
    writing process only (`distributed.is_writer`)."""
    global _LOG_FILE
    _LOG_FILE = Path(path) if path and distributed.is_writer() else None


def say(message):
    """Prints a line above any progress bar and appends it to the log file (in the writing
    process only: a run of several processes says everything once)."""
    if not distributed.is_writer():
        return
    tqdm.write(message, file=sys.stderr)
    if _LOG_FILE is not None:
        with _LOG_FILE.open("a") as f:
            f.write(message + "\n")


class ProgressBar:
    def __init__(self, *, total, initial=0, desc="", disable=False):
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            disable=disable,
            leave=False,
            dynamic_ncols=True,
            mininterval=1.0,
            file=sys.stderr,
        )
        self._quiet = disable
        self._pending, self._pending_n = None, 0

    def update(self, n=1, *, pending=None):
        """Advances the bar by `n` steps.

        With `pending`, the outputs of the step just dispatched, steps are counted when they
        have been computed rather than queued (JAX dispatches asynchronously, so a loop can run
        far ahead of the device): the bar waits for the previous step's outputs, which still
        lets JAX dispatch one step ahead.
        """
        if pending is None:
            self._bar.update(n)
            return
        self._flush()
        self._pending, self._pending_n = pending, n

    def _flush(self):
        if self._pending is not None:
            jax.block_until_ready(self._pending)
            self._bar.update(self._pending_n)
            self._pending, self._pending_n = None, 0

    def set_postfix(self, **kwargs):
        self._flush()
        self._bar.set_postfix(**kwargs)

    def log(self, message):
        self._flush()
        if self._quiet:
            if _LOG_FILE is not None:
                with _LOG_FILE.open("a") as f:
                    f.write(message + "\n")
            log.info(message)
        else:
            say(message)

    def close(self):
        self._flush()
        with contextlib.suppress(Exception):
            self._bar.close()


def progress_bar(*, disable=False, **kwargs):
    """A `ProgressBar`, shown by the writing process only."""
    return ProgressBar(disable=disable or not distributed.is_writer(), **kwargs)
