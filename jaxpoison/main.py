"""Command line: ``jaxpoison --config=configs/<name>.py[:tiny] --workdir=DIR [--config.a.b=v]``,
or ``jaxpoison report WORKDIR [WORKDIR...] [--out DIR]`` (see `jaxpoison.report`).

Real logic lives in `jaxpoison.experiment`; this file only parses flags.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (get_config).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bars (log lines only).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    from jaxpoison import data, experiment
    from jaxpoison.poisons.storage import PoisonFileError

    try:
        experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value, progress=not _QUIET.value)
    except (data.DataError, PoisonFileError, ValueError, FloatingPointError) as e:
        print(f"jaxpoison: error: {e}", file=sys.stderr)
        sys.exit(1)


def run():
    """Console-script entry point."""
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from jaxpoison import report

        sys.exit(report.main(sys.argv[2:]))
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv):
    """absl's parsing, with one clear line for a bad flag or a config key that does not exist."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raw = str(e.args[0]) if e.args else str(e)
        message = " ".join(raw.replace("\\n", " ").replace("\\", "").replace("'", "").split())
        print(
            f"jaxpoison: error: bad flag ({message}). A --config.<key> override must name "
            "a key that exists in the config file (with a value of its type); --config and "
            "--workdir are required.",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    run()
