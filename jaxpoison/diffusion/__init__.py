"""Diffusion models for data-side purification (AVATAR, DiffPure): a DDPM noise-prediction
U-Net in Flax laid out as score_sde's (`unet`), variance-preserving schedules (`schedule`), the
ε-prediction loss and a resumable trainer (`score`), purification by the forward and reverse
processes (`sampling`), and score models on disk, ours and score_sde's (`io`).

    model, _ = diffusion.train_score_model(images, key=key, num_steps=2000,
                                           model=dict(nf=32, ch_mult=(1, 2, 2)))
    diffusion.save("/tmp/score_model", model)
    clean = diffusion.purify(model.params, poisoned, key, module=model.module,
                             schedule=model.schedule, t_star=0.1, num_steps=20)

The transform ``diffusion_purification`` (`jaxpoison.transforms`) runs `purify` over a training
set as a defense; ``configs/score_model.py`` trains and saves a score model from the command line.
"""

from jaxpoison.diffusion import io, sampling, schedule, score, unet
from jaxpoison.diffusion.io import content_hash, load, load_score_sde_checkpoint, save
from jaxpoison.diffusion.sampling import purify
from jaxpoison.diffusion.score import ScoreModel, loss_fn, train_score_model, train_step
from jaxpoison.diffusion.unet import UNet

__all__ = [
    "ScoreModel",
    "UNet",
    "content_hash",
    "io",
    "load",
    "load_score_sde_checkpoint",
    "loss_fn",
    "purify",
    "sampling",
    "save",
    "schedule",
    "score",
    "train_score_model",
    "train_step",
    "unet",
]
