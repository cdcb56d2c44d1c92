"""The ``score_model`` trainer (``config.trainer = 'score_model'``): trains a score model on a
dataset's training images and saves it where ``diffusion_purification`` reads it.

    jaxpoison --config=configs/score_model.py --workdir=/tmp/score_cifar10

Config fields: ``seed``, ``data`` (`jaxpoison.data.load`'s fields; only the training images are
used), ``model`` (`unet.UNet` fields), ``schedule`` (`schedule.make` fields) and ``training``
(`score.train_score_model`'s recipe: ``num_steps``, ``batch_size``, ``learning_rate``,
``warmup_steps``, ``grad_clip``, ``ema_decay``, ``flip``, ``checkpoint_every``, ``log_every``).

The workdir receives ``config.json``, ``checkpoints/score_model/<key>/`` (resumable: a killed
run continues from its last checkpoint), ``score_model/`` (the EMA parameters and their spec:
pass this path as ``score_model`` of ``diffusion_purification``), ``results.json`` (the loss per
``log_every`` steps, the wall time, the model's sha256) and ``log.txt``.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax

from jaxpoison import data
from jaxpoison.diffusion import io, score
from jaxpoison.progress import say
from jaxpoison.workdir import close_run, open_run, plain, results_header


def train_and_evaluate(config, workdir, *, progress=True):
    """Trains, saves ``workdir/score_model`` and writes ``results.json``; returns the results."""
    t_start = time.time()
    workdir = Path(workdir)
    done = open_run(config, workdir)
    if done is not None:
        return done
    dataset = data.load(config.data)
    recipe = dict(plain(config.training))
    model, history = score.train_score_model(
        dataset.x_train,
        key=jax.random.key(config.seed),
        model=plain(config.model),
        schedule=plain(config.schedule),
        ckpt_dir=workdir / "checkpoints" / "score_model",
        progress=progress,
        **recipe,
    )
    path = io.save(workdir / "score_model", model)
    digest = io.content_hash(path)
    say(f"score model: {path} (sha256 {digest[:12]}), final loss {history['train/loss'][-1]:.4f}")
    results = {
        **results_header(config, t_start=t_start, dataset=dataset),
        "score_model": {"path": str(path), "sha256": digest, "spec": model.spec},
        "history": history,
    }
    close_run(results, workdir)
    return results


__all__ = ["train_and_evaluate"]
