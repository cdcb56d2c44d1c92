"""Shared fixtures. Tests run on CPU with tiny shapes; real data comes from ../shared/data."""

import os
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir():
    if not (SHARED_DATA / "cifar10.npz").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def fast_compiles():
    """XLA's cheaper compiles for a module of logic tests whose run time is mostly compilation.

    ``jax_disable_most_optimizations`` makes them 2-3x faster (every model built once: 3m50s ->
    1m10s). Use it with ``pytestmark = pytest.mark.usefixtures("fast_compiles")``; not for
    sharded programs (8 fake devices gave NaN losses with it) nor for numerical comparisons
    against optimized code.
    """
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="session")
def tiny_images():
    """16 random 8x8x3 images in [0, 1] and labels in 0..3 (for invariants, not accuracy)."""
    rng = np.random.default_rng(0)
    return rng.random((16, 8, 8, 3), dtype=np.float32), rng.integers(0, 4, 16).astype(np.int32)


def pytest_addoption(parser):
    parser.addoption(
        "--runslow",
        action="store_true",
        default=False,
        help="also run the tests marked slow (minutes each; the nightly-style run)",
    )


def pytest_configure(config):
    os.environ.setdefault("TQDM_DISABLE", "1")
    # One on-disk compilation cache for the whole test session: its xdist workers and the
    # command-line runs they start compile many identical tiny programs. The controller makes
    # the folder; workers and subprocesses inherit it. A cache set by the caller is kept.
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="jaxpoison-tests-jit-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")),
    )
    # xdist's --dist loadscope hands out modules with the most tests first, which left the
    # one-test 8-device module running alone at the end; the collection order (LONGEST_FIRST)
    # is used instead.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    config.addinivalue_line(
        "markers",
        "slow: minutes of work (e.g. repeated SIGKILLs of a real run); skipped unless "
        "--runslow is given (pytest -q --runslow -m slow runs only those).",
    )


# The test modules that take longest, longest first (durations of whole suites on 2 cores). With
# --dist loadscope a module is one unit of work for one worker: handed out first, the long ones
# run beside each other and the short ones fill the end, instead of one long module finishing
# alone while the other worker idles.
LONGEST_FIRST = (
    "test_sharding_victims.py",
    "test_sharding.py",
    "test_ops.py",
    "test_sharding_processes.py",
    "test_sharding_onednn.py",
    "test_experiment.py",
    "test_l2c.py",
    "test_synthetic_poisons.py",
    "test_study_configs.py",
    "test_models_attacks.py",
    "test_transforms.py",
    "test_ueraser.py",
    "test_robust_error_minimizing.py",
    "test_ntga.py",
    "test_training.py",
    "test_evaluation.py",
    "test_apbench.py",
    "test_autoattack.py",
    "test_notebook.py",
    "test_badnets.py",
    "test_docs.py",
    "test_ssl.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep theirs
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cli():
    """``cli(*args)``: runs the ``jaxpoison`` command line in a subprocess from the repository
    root and returns the completed process (exit code, stdout, stderr)."""
    import subprocess
    import sys

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "jaxpoison.main", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )

    return run


@pytest.fixture
def cli_inprocess(capsys):
    """``cli_inprocess(*args)``: runs the ``jaxpoison`` command line in this process (no new
    interpreter, JAX already imported: a failing case takes milliseconds) and returns
    ``(exit code, stderr)``.

    absl keeps parsed flags between calls, and ml_collections registers one flag per config
    override: both are reset first, so each call sees only its own arguments.
    """
    import sys

    from absl import flags, logging

    from jaxpoison import main
    from jaxpoison.progress import set_log_file

    def run(*args):
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)
        flags.FLAGS.unparse_flags()
        argv, sys.argv = sys.argv, ["jaxpoison", *map(str, args)]
        hook, verbosity = sys.excepthook, logging.get_verbosity()
        capsys.readouterr()
        try:
            main.run()
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code
        finally:  # what the command sets for its process
            sys.argv, sys.excepthook = argv, hook
            logging.set_verbosity(verbosity)
            set_log_file(None)  # a failed run leaves its log open
        return code, capsys.readouterr().err

    yield run
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
