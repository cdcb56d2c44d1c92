"""Score models on disk: jaxpoison's own format, and score_sde's Flax checkpoints.

Two formats are read by `load`:

* **jaxpoison** (written by `save`, e.g. by ``configs/score_model.py``): a directory holding
  ``score_model.json`` (``{'format': 'jaxpoison.score_model', 'spec': {'model', 'schedule',
  'image_shape'}}``) and ``params/``, the parameters as an orbax checkpoint.
* **score_sde** (yang-song/score_sde, Flax): a ``checkpoint_<N>`` file written by
  ``flax.training.checkpoints.save_checkpoint``: the msgpack of the training ``State``'s state
  dict, ``{'step', 'optimizer': {'target': params, 'state': ...}, 'lr', 'model_state',
  'ema_rate', 'params_ema', 'rng'}``. The parameters of its ``ddpm`` model (``models/ddpm.py``)
  are `unet.UNet`'s tree; the EMA parameters (``params_ema``, what score_sde samples with) are
  read by default. The file does not name the architecture: pass the model's fields (default:
  ``configs/vp/ddpm/cifar10.py``, `unet.UNet()`), the image shape (default 32 x 32 x 3) and the
  schedule (default: its discrete VP SDE, linear β 1e-4 .. 0.02 over 1,000 steps). Tested on
  files written in that layout from small configurations (the released checkpoints could not be
  downloaded here); the NCSN++ / DDPM++ models of score_sde are other architectures and are
  refused by the shape check.

Both are checked against the U-Net's parameter shapes; a mismatch is one ValueError naming the
file, the first differences and the fix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxpoison.diffusion import score
from jaxpoison.workdir import write_json_atomic

FORMAT = "jaxpoison.score_model"
SPEC_FILE = "score_model.json"
SCORE_SDE_CIFAR10 = {"model": {}, "schedule": {}, "image_shape": [32, 32, 3]}
_FIX = (
    "pass the score model's architecture (model=dict(nf=..., ch_mult=..., num_res_blocks=..., "
    "attn_resolutions=...), image_shape=...) it was trained with, or a checkpoint of that one"
)


def content_hash(path):
    """sha256 (hex) of a score model on disk: the file's bytes, or every file of the directory
    (relative paths and bytes, in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def _flat(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in p): leaf
        for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def check_params(params, module, image_shape, *, source):
    """Raises ValueError unless `params` has exactly the U-Net's parameter names and shapes."""
    want = score.param_shapes(module, image_shape)
    have = {k: tuple(np.shape(v)) for k, v in _flat(params).items()}
    problems = [f"missing {k}" for k in sorted(want.keys() - have.keys())]
    problems += [f"unexpected {k}" for k in sorted(have.keys() - want.keys())]
    problems += [
        f"{k} has shape {list(have[k])}, the U-Net {list(want[k])}"
        for k in sorted(want.keys() & have.keys())
        if have[k] != want[k]
    ]
    if problems:
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        raise ValueError(
            f"score model {source}: its parameters do not match the U-Net (nf={module.nf}, "
            f"ch_mult={tuple(module.ch_mult)}, num_res_blocks={module.num_res_blocks}, "
            f"attn_resolutions={tuple(module.attn_resolutions)}) on {tuple(image_shape)} images "
            f"({len(problems)} differences: {shown}); {_FIX}."
        )


def save(path, model):
    """Writes a `score.ScoreModel` to directory `path` (jaxpoison's format; replaces it)."""
    path = Path(path).absolute()
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path / "params", jax.device_get(model.params), force=True)
    ckpt.wait_until_finished()
    write_json_atomic(path / SPEC_FILE, {"format": FORMAT, "spec": model.spec})
    return path


def _load_own(path):
    meta = json.loads((path / SPEC_FILE).read_text())
    if meta.get("format") != FORMAT or "spec" not in meta:
        raise ValueError(
            f"score model {path}: {SPEC_FILE} is not a jaxpoison score model's; write it with "
            "jaxpoison.diffusion.save (or configs/score_model.py)."
        )
    spec = meta["spec"]
    module, schedule = score.build(spec)
    params = ocp.StandardCheckpointer().restore(path / "params")
    check_params(params, module, spec["image_shape"], source=str(path))
    return score.ScoreModel(module, jax.device_get(params), schedule, spec)


def load_score_sde_checkpoint(
    path, *, model=None, schedule=None, image_shape=(32, 32, 3), ema=True
):
    """A `score.ScoreModel` from a score_sde ``checkpoint_<N>`` file (see the module docstring).

    Args:
      path: the file.
      model: `unet.UNet` fields of the checkpoint's ``config.model`` (default: score_sde's
        CIFAR-10 DDPM).
      schedule: `schedule.make` fields (default: linear, 1,000 steps, as its discrete VP SDE).
      image_shape: [H, W, C] of the images it was trained on.
      ema: read ``params_ema`` (True, what score_sde samples with) or ``optimizer.target``.

    Raises:
      ValueError: not a score_sde checkpoint, or parameters that do not fit the U-Net.
    """
    path = Path(path)
    try:
        state = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several types for a file that is not msgpack
        raise ValueError(
            f"score model {path}: not a flax msgpack checkpoint ({type(e).__name__}); give a "
            f"score_sde checkpoint_<N> file or a directory written by jaxpoison.diffusion.save."
        ) from e
    if not isinstance(state, dict) or not (
        "params_ema" in state or "target" in (state.get("optimizer") or {})
    ):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"score model {path}: a msgpack file without score_sde's 'params_ema' or "
            f"'optimizer.target' (found {found}); give a score_sde checkpoint_<N> file or a "
            "directory written by jaxpoison.diffusion.save."
        )
    params = state["params_ema"] if ema and "params_ema" in state else state["optimizer"]["target"]
    spec = {
        "model": dict(model or {}),
        "schedule": dict(schedule or {}),
        "image_shape": list(image_shape),
    }
    module, sched = score.build(spec)
    check_params(params, module, image_shape, source=str(path))
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    return score.ScoreModel(module, params, sched, spec)


def load(path, **score_sde_fields):
    """The score model at `path`: a jaxpoison directory or a score_sde checkpoint file
    (`score_sde_fields`: `load_score_sde_checkpoint`'s keywords, for that format only).

    Raises:
      ValueError: a path that does not exist or holds neither format, or mismatched parameters.
    """
    path = Path(path).expanduser()
    if path.is_dir() and (path / SPEC_FILE).is_file():
        return _load_own(path)
    if path.is_file():
        return load_score_sde_checkpoint(path, **score_sde_fields)
    what = "is a directory without " + SPEC_FILE if path.is_dir() else "does not exist"
    raise ValueError(
        f"score model {path} {what}; train one with `jaxpoison --config=configs/score_model.py "
        "--workdir=DIR` (it writes DIR/score_model) or give a score_sde checkpoint_<N> file."
    )


__all__ = ["FORMAT", "check_params", "content_hash", "load", "load_score_sde_checkpoint", "save"]
