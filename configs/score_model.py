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
* ``cpu``: a U-Net small enough for 2 CPU cores (nf 16, ch_mult (1, 2), one block per level,
  attention only in the middle, dropout 0.1; 165k parameters), 300 steps of batch 32, Adam 1e-3
  after 20 warmup steps, EMA 0.99, on the same 50,000 images: 17 min on the shared cores, final
  ε-loss 0.067. Weak: it denoises, it does not generate.

Expected (``cpu``, 2026-12-06): mean ε-loss 0.88 over the first 25 steps, 0.067 over the last
25; as the ``diffusion`` column of configs/apbench.py:cpu it lifts OPS from 23.3 to 41.0 % and
EM not at all (docs/results/2026-12-diffusion-purification.md).
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
        config.model.update(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
        config.training.update(
            num_steps=300,
            batch_size=32,
            learning_rate=1e-3,
            warmup_steps=20,
            ema_decay=0.99,
            checkpoint_every=50,
            log_every=25,
        )
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
