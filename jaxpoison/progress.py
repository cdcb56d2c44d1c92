"""Progress bars for long work, mirrored as plain lines into the run's log.txt."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm

_LOG_FILE: Path | None = None
log = logging.getLogger("jaxpoison")


def set_log_file(path):
    """Lines given to `ProgressBar.log` (and `say`) are appended to `path` (None: stop)."""
    global _LOG_FILE
    _LOG_FILE = Path(path) if path else None


def say(message):
    """Prints a line above any progress bar and appends it to the log file."""
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

    def update(self, n=1):
        self._bar.update(n)

    def set_postfix(self, **kwargs):
        self._bar.set_postfix(**kwargs)

    def log(self, message):
        if self._quiet:
            if _LOG_FILE is not None:
                with _LOG_FILE.open("a") as f:
                    f.write(message + "\n")
            log.info(message)
        else:
            say(message)

    def close(self):
        with contextlib.suppress(Exception):
            self._bar.close()


def progress_bar(**kwargs):
    return ProgressBar(**kwargs)
