"""Orbax checkpoints of a trainer's (or a crafting loop's) state plus its JSON history."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxpoison import workdir


class Manager:
    """Keeps the latest checkpoints of ``(state pytree, history dict)`` under `directory`.

    Saving is synchronous so a SIGKILL right after `save` returns loses nothing; orbax writes
    to a temporary folder and renames it, so a killed save leaves no half-written checkpoint.

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
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)
            ),
        )
        self._manager.wait_until_finished()

    def restore(self, template):
        """Returns ``(state, history, step)`` of the latest checkpoint, shaped like `template`."""
        step = self._manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["history"]), step

    def close(self):
        self._manager.close()
