"""A run's workdir and the content keys that make its artifacts impossible to mix up.

A leaf module: it imports nothing else of jaxpoison but the progress log, so every layer can use
it. The workdir of every config run looks the same::

    WORKDIR/config.json                  the resolved config, written first
    WORKDIR/checkpoints/<part>/<key>/    orbax checkpoints of a victim, surrogate or crafting run
    WORKDIR/poison/<run>/<key>/          a crafted poison (state.npz + metadata.json)
    WORKDIR/results.json                 written last and atomically
    WORKDIR/log.txt                      the progress lines as plain text

``<key>`` is the `content_key` of a *record*: a JSON-able dict of everything that determined the
artifact (its spec, a digest of the data it saw, the PRNG key, the models it used, and
`ARTIFACT_VERSION`). A changed spec therefore lands in a new directory and is crafted or trained
afresh, and an artifact is reused only on an exact match. Each keyed directory also holds its
record as ``spec.json``, so a person can see what made it (and `differences` can say what
changed).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import jax
import numpy as np

from jaxpoison import distributed
from jaxpoison.progress import say, set_log_file

# Bump when a change of code changes what an unchanged spec produces (a poison's update rule, the
# train step, the data pipeline): every stored artifact then gets a new key and is made again.
ARTIFACT_VERSION = 2

KEY_LENGTH = 16  # hex digits of the sha256 used in directory names


class StaleArtifactError(ValueError):
    """A directory holds state made by another record than the one asked for."""


class DamagedFileError(ValueError):
    """A JSON file of a workdir cannot be read (truncated, bit-flipped, not UTF-8)."""


def read_json(path, fix):
    """The JSON data in `path`.

    Raises:
      DamagedFileError: when the file is not valid JSON; the message names the file and `fix`.
    """
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise DamagedFileError(f"{path} is damaged ({type(e).__name__}: {reason}); {fix}") from None


def plain(value):
    """`value` with ConfigDicts (and anything mapping-like) as dicts and tuples as lists."""
    if hasattr(value, "items"):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def canonical(value):
    """`value` as plain JSON data: dicts, lists, str, int, float, bool, None.

    PRNG keys become their key data, numpy and jax scalars and arrays Python numbers and lists.
    Raises TypeError for anything else (a record must say what determined an artifact in data).
    """
    if hasattr(value, "items"):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(value)).tolist()
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(value).tolist()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"{type(value).__name__} {value!r} cannot be part of an artifact record.")


def content_key(record):
    """The sha256 (hex) of the canonical JSON of `record`."""
    text = json.dumps(canonical(record), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def array_digest(*arrays, uint8_as=None, chunk=4096):
    """sha256 (hex) of arrays' dtypes, shapes and bytes (None entries count as absent).

    With `uint8_as` (a function of a uint8 array, e.g. `data.as_float_images`), every uint8 array
    is hashed as ``uint8_as(a)`` would be, converted `chunk` rows at a time (no converted copy of
    the whole array): the same digest as for the converted array.
    """
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none;")
            continue
        a = np.ascontiguousarray(np.asarray(a))
        if uint8_as is not None and a.dtype == np.uint8:
            h.update(f"{np.asarray(uint8_as(a[:0])).dtype.str}{a.shape};".encode())
            for i in range(0, len(a), chunk):
                h.update(np.ascontiguousarray(uint8_as(a[i : i + chunk])).tobytes())
            continue
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.reshape(-1).view(np.uint8))  # the bytes in place: no copy of a large array
    return h.hexdigest()


def differences(stored, wanted, prefix=""):
    """Dotted paths of the fields in which two records differ, e.g. ``['spec.optimizer.lr']``."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        out = []
        for k in sorted(stored.keys() | wanted.keys()):
            out += differences(stored.get(k), wanted.get(k), f"{prefix}{k}.")
        return out
    return [] if stored == wanted else [prefix.rstrip(".") or "(record)"]


def keyed_dir(parent, record):
    """``parent/<first KEY_LENGTH hex digits of content_key(record)>``."""
    return Path(parent) / content_key(record)[:KEY_LENGTH]


def claim(directory, record):
    """Makes `directory` the home of the state that `record` determines.

    Writes ``spec.json`` (the record) into a new directory; accepts a directory whose
    ``spec.json`` holds the same record. With several processes every one checks the directory
    before the writing one writes (a barrier between), so all see the same state and agree:
    none can mistake the writer's half-made ``spec.json`` for state of unknown origin.

    Raises:
      StaleArtifactError: when `directory` holds state of another record, or files but no record
        (made before artifacts were keyed): it names the fields that differ and the fix.
    """
    directory = Path(directory)
    spec_path = directory / "spec.json"
    wanted = canonical(record)
    if spec_path.is_file():
        stored = read_json(spec_path, f"delete {directory} to make that part afresh.")
        changed = differences(stored, wanted)
        if changed:
            raise StaleArtifactError(
                f"{directory} holds state made by another spec (it differs in "
                f"{', '.join(changed)}); delete that directory or use another one."
            )
        return directory
    if directory.is_dir() and any(directory.iterdir()):
        raise StaleArtifactError(
            f"{directory} holds state of unknown origin (no spec.json: made before artifacts "
            "were keyed); delete that directory or use another one."
        )
    # Named by the record, not the path: the processes of a run may see the shared workdir under
    # other absolute paths (a relative --workdir, another mount point); barrier names must agree.
    key = content_key(wanted)[:KEY_LENGTH]
    distributed.barrier(f"claim {key}")  # every process has looked: now it may change
    # written before anyone looks again; a failed write fails every process
    distributed.on_writer(f"claimed {key}", lambda: write_json_atomic(spec_path, wanted))
    return directory


def run_key(root, name):
    """A key for the named part of the experiment, independent of the order parts run in."""
    return jax.random.fold_in(root, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def write_json_atomic(path, obj):
    """Writes JSON to `path` through a temporary file and a rename (never half-written); in the
    writing process only (`distributed.is_writer`)."""
    if not distributed.is_writer():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:  # disk full, an object JSON cannot hold, an interrupt: no leftovers
        Path(tmp).unlink(missing_ok=True)
        raise


class WorkdirError(ValueError):
    """The workdir cannot be used: a file, under a file, or not writable."""


class WorkdirInUse(WorkdirError):
    """Another process is running in the workdir."""


@contextlib.contextmanager
def locked(workdir):
    """Holds ``WORKDIR/.lock`` (an advisory ``flock``) while a run uses `workdir`.

    A second process on the same workdir is refused at once, naming the holder's PID; the lock
    goes with its process, so a killed run never leaves a stale one. In a run of several
    processes (`jaxpoison.distributed`) the writing one holds it for all.

    Raises:
      WorkdirInUse: when another process holds the lock.
      WorkdirError: when `workdir` is a file, under a file, or not writable.
    """
    workdir = Path(workdir)
    if not distributed.is_writer():
        yield workdir
        return
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file, not a directory; name a directory.")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except (NotADirectoryError, FileExistsError) as e:
        files = [p for p in workdir.absolute().parents if p.exists() and not p.is_dir()]
        raise WorkdirError(
            f"cannot make --workdir {workdir}: {files[-1] if files else e.filename} is a file, "
            "not a directory; name a directory whose parents are directories."
        ) from None
    except PermissionError as e:
        raise WorkdirError(
            f"cannot write in --workdir {workdir} (permission denied: {e.filename}); name a "
            "directory you can write to."
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise WorkdirInUse(
                f"{workdir} is in use by process {holder}; wait for it to finish, stop it, or "
                "use another --workdir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield workdir
    finally:
        os.close(fd)  # releases the lock


def open_run(config, workdir):
    """Returns the complete results found in `workdir`, or None after removing the temporary
    files a killed run left (`remove_stale_temporaries`), writing ``config.json`` and opening
    ``log.txt`` for a new (or resumed) run.

    A damaged ``results.json`` (not valid JSON, or not matching the sha256 `close_run` saved in
    it) is said and made again: the checkpoints and poisons it came from are reused.

    Raises:
      ValueError: when `workdir` holds complete results of another config.
    """
    workdir = Path(workdir)
    results_path = workdir / "results.json"
    results = {}
    if results_path.is_file():
        try:
            results = read_json(results_path, "")
            stored = results.pop("results_sha256", None) if isinstance(results, dict) else None
            if stored is not None and content_key(results) != stored:
                raise DamagedFileError(
                    f"{results_path} does not match the sha256 saved in it (damaged or edited)"
                )
        except DamagedFileError as e:  # made from the kept checkpoints and poisons again
            say(f"warning: {str(e).rstrip('; ')}; running again to rewrite it.")
            results = {}
        if isinstance(results, dict) and results.get("complete"):
            wanted = json.loads(json.dumps(plain(config)))  # as stored: lists, not tuples
            changed = differences(results.get("config", {}), wanted)
            if changed:
                raise ValueError(
                    f"{results_path} holds the complete results of another config (it differs in "
                    f"{', '.join(changed)}). Use a new workdir, or move results.json away to "
                    "extend this one: poisons and victims whose specs match exactly are reused, "
                    "the others are made afresh."
                )
            say(f"{results_path} is complete; nothing to do (delete it to run again).")
            return results

    def start():  # in the writing process only (the log file is the writer's alone)
        workdir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(workdir)
        set_log_file(workdir / "log.txt")
        write_json_atomic(workdir / "config.json", plain(config))

    # The other processes start on a tidied workdir; a writer that cannot write fails them all.
    distributed.on_writer("open_run", start)
    return None


def stale_temporaries(workdir):
    """The temporary files and folders of writes that never finished under `workdir` (a run
    killed by SIGKILL or a power cut cannot remove them itself): ``.<name>.<random>[.ext]`` of
    `write_json_atomic`, plots and poison artifacts, and orbax's ``*.orbax-checkpoint-tmp*``."""
    out = []
    for path in sorted(Path(workdir).rglob("*")):
        name = path.name
        temp = (name.startswith(".") and name.count(".") >= 2) or "orbax-checkpoint-tmp" in name
        if temp and not any(parent in out for parent in path.parents):
            out.append(path)
    return out


def remove_stale_temporaries(workdir):
    """Removes `stale_temporaries` (call it holding the workdir's lock: no writer is running)."""
    for path in stale_temporaries(workdir):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def results_header(config, *, t_start, dataset=None):
    """The fields every ``results.json`` starts with: ``complete``, the version, backend and
    device count, the wall time since `t_start`, the config, and, given a `data.Dataset`, its
    name, fingerprint and class names (``jaxpoison report`` compares and shows them)."""
    from jaxpoison import __version__

    header = {
        "complete": True,
        "jaxpoison_version": __version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "wall_time_s": time.time() - t_start,
        "config": plain(config),
    }
    if dataset is not None:
        header["dataset"] = {
            "name": dataset.name,
            "fingerprint": dataset.fingerprint(),
            "class_names": list(dataset.class_names),
        }
    return header


def close_run(results, workdir, *, plots=()):
    """Writes ``results.json`` atomically, with the sha256 of its content (``results_sha256``,
    checked by `open_run`), names it and the `plots` in the log, closes the log."""
    path = Path(workdir) / "results.json"
    write_json_atomic(path, {**results, "results_sha256": content_key(results)})
    listed = f"  plots: {', '.join(Path(f).name for f in plots)}" if plots else ""
    say(f"results: {path}{listed}")
    set_log_file(None)


__all__ = [
    "ARTIFACT_VERSION",
    "DamagedFileError",
    "StaleArtifactError",
    "WorkdirError",
    "WorkdirInUse",
    "array_digest",
    "canonical",
    "claim",
    "close_run",
    "content_key",
    "differences",
    "keyed_dir",
    "locked",
    "open_run",
    "plain",
    "read_json",
    "remove_stale_temporaries",
    "results_header",
    "run_key",
    "stale_temporaries",
    "write_json_atomic",
]
