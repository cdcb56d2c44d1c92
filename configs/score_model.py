r"""A diffusion score model (DDPM U-Net, ε-prediction) for the ``diffusion_purification`` defense.

  jaxpoison --config=configs/score_model.py:cpu --workdir=/tmp/score_cifar10      # 2 CPU cores
  jaxpoison --config=configs/score_model.py --workdir=/tmp/score_cifar10_gpu      # GPU-sized
  (``tiny`` shrinks the data only, as in every config; a smoke run of a few seconds:
  --config.training.num_steps=4 --config.model.nf=8 --config.model.ch_mult="(1,)")

Writes ``WORKDIR/score_model`` (pass it as ``score_model`` of ``diffusion_purification``, e.g.
``--config.score_model=WORKDIR/score_model`` of configs/apbench.py) and ``results.json`` with
the loss curve; a killed run resumes from ``WORKDIR/checkpoints``.

Presets:

* (default, GPU-sized) score_sde's CIFAR-10 DDPM (``configs/vp/ddpm/cifar10.py``): nf 128,
  ch_mult (1, 2, 2, 2), 2 residual blocks per level, attention at 16 x 16, dropout 0.1, linear β
  over 1,000 steps, batch 128, Adam 2e-4 with 5,000 warmup steps, clipping 1, EMA 0.9999, flips,
  on the 50,000 CIFAR-10 training images; 1.3 M steps as the reference. Not run here.
* ``cpu``: a U-Net small enough for 2 CPU cores (nf 32, ch_mult (1, 2, 2), one block per level,
  attention at 8 x 8 only, dropout 0.1), batch 64, Adam 2e-4 after 200 warmup steps, EMA 0.999,
  on the same 50,000 images. Weak: it denoises a little, it does not generate.

Expected: ``cpu`` is measured in docs/results/2026-12-diffusion-purification.md.
"""

import ml_collections

from jaxpoison import config_lib

PRESETS = ("cpu",)


def get_config(arg=None):
    chosen = config_lib.preset(arg, PRESETS)
    config = ml_collections.ConfigDict()
    config.trainer = "score_model"
    config.name = "score model: DDPM U-Net on CIFAR-10"
    config.seed = 0
    config.data = config_lib.data("cifar10")
    config.model = dict(
        nf=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        resamp_with_conv=True,
    )
    config.schedule = dict(name="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    config.training = dict(
        num_steps=1_300_000,
        batch_size=128,
        learning_rate=2e-4,
        warmup_steps=5000,
        grad_clip=1.0,
        ema_decay=0.9999,
        flip=True,
        checkpoint_every=10_000,
        log_every=1000,
    )
    if "cpu" in chosen:
        config.name = "score model: small DDPM U-Net on CIFAR-10 (CPU)"
        config.model.update(nf=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,))
        config.training.update(
            num_steps=4000,
            batch_size=64,
            warmup_steps=200,
            ema_decay=0.999,
            checkpoint_every=250,
            log_every=100,
        )
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
