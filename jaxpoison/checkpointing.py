"""Orbax checkpoints of a trainer's (or a crafting loop's) state plus its JSON history.

Each checkpoint also holds the sha256 of the state's arrays and of the history, written with
them and checked on restore: a damaged latest checkpoint (a flipped bit, a truncated file) is
noticed, said, and the previous kept one is used instead.
"""

from __future__ import annotations

import errno
import shutil
import threading
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxpoison import distributed, workdir
from jaxpoison.progress import say


class CorruptCheckpointError(ValueError):
    """No checkpoint in a directory can be restored intact."""


def state_digest(state):
    """sha256 of a state pytree's arrays (PRNG keys by their key data), in leaf order."""
    leaves = [
        jax.random.key_data(a)
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
        else a
        for a in jax.tree.leaves(state)
    ]
    return workdir.array_digest(*(np.asarray(a) for a in distributed.to_host(leaves)))


def _disk_full(error):
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return isinstance(error, Exception) and (
        "No space left on device" in str(error) or "RESOURCE_EXHAUSTED" in str(error)
    )


def saved_steps(directory):
    """The steps (epochs) whose checkpoints orbax finished in `directory`, in order; [] where it
    holds none or does not exist (read only: unlike `Manager`, nothing is created)."""
    return sorted(ocp.utils.checkpoint_steps(directory)) if Path(directory).is_dir() else []


def _join_orbax_threads(timeout=60.0):
    """Waits for orbax's background writer threads (a failed save leaves some running; at exit
    they would print tracebacks about a folder already removed)."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and type(thread).__module__.startswith(
            "orbax."
        ):
            thread.join(timeout)


class Manager:
    """Keeps the latest checkpoints of ``(state pytree, history dict)`` under `directory`.

    Saving is synchronous so a SIGKILL right after `save` returns loses nothing; orbax writes
    to a temporary folder and renames it, so a killed save leaves no half-written checkpoint,
    and a failed one (disk full, an interrupt) removes that folder.

    With a `record` (what determined the state: see `jaxpoison.workdir`), the directory is
    claimed for it: a directory holding checkpoints of another record is refused with the fields
    that differ, so a changed spec never resumes from stale state.
    """

    def __init__(self, directory, max_to_keep=2, *, record=None):
        self.directory = Path(directory).absolute()
        if record is not None:
            workdir.claim(self.directory, record)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self):
        return self._manager.latest_step()

    def save(self, step, state, history):
        integrity = {
            "state_sha256": state_digest(state),
            "history_sha256": workdir.content_key(history),
        }
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    history=ocp.args.JsonSave(history),
                    integrity=ocp.args.JsonSave(integrity),
                ),
            )
            self._manager.wait_until_finished()
        except BaseException as e:  # disk full, an interrupt: no half-written step is left
            self._clean_up_after(e, f"checkpoint step {step}")

    def _clean_up_after(self, error, what):
        """Removes the temp folders of a failed write and raises `error` (a full disk as one
        OSError that says how to go on)."""
        try:  # let orbax's writer threads end before their folders go
            self._manager.wait_until_finished()
        except BaseException:
            pass
        _join_orbax_threads()
        for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(error):  # TensorStore says so in a ValueError of many lines
            raise OSError(
                errno.ENOSPC,
                f"No space left on device for {what}; free some space (or use a workdir on a "
                "larger disk) and rerun the same command to resume",
                str(self.directory),
            ) from error
        raise error

    def _restore_step(self, step, abstract):
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                history=ocp.args.JsonRestore(),
                integrity=ocp.args.JsonRestore(),
            ),
        )
        state, history = restored["state"], dict(restored["history"])
        expected = dict(restored["integrity"])
        if state_digest(state) != expected.get("state_sha256"):
            raise CorruptCheckpointError("its arrays do not match the sha256 saved with them")
        if workdir.content_key(history) != expected.get("history_sha256"):
            raise CorruptCheckpointError("its history does not match the sha256 saved with it")
        return state, history

    def restore(self, template):
        """Returns ``(state, history, step)`` of the latest intact checkpoint, shaped like
        `template`; a damaged newer one is said and skipped.

        Raises:
          CorruptCheckpointError: when no kept checkpoint is intact.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        damaged = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state, history = self._restore_step(step, abstract)
            except Exception as e:  # orbax / TensorStore raise many types for a damaged file
                reason = (
                    str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                )
                damaged.append(f"step {step}: {reason}")
                continue
            if damaged:
                say(
                    f"warning: damaged checkpoint in {self.directory} ({'; '.join(damaged)}); "
                    f"resuming from step {step} instead."
                )
            return state, history, step
        raise CorruptCheckpointError(
            f"no intact checkpoint in {self.directory} ({'; '.join(damaged) or 'none kept'}); "
            "delete that directory to start this part afresh."
        )

    def close(self):
        try:  # orbax raises here an error of a background write that `save` did not see
            self._manager.close()
        except BaseException as e:
            self._clean_up_after(e, "the last checkpoint")
