"""AVATAR-style diffusion purification (Dolatabadi, Erfani & Leckie, SaTML 2024): every training
image is diffused to t* with the forward process and denoised back to t = 0 by a pretrained score
model (DiffPure's purification, applied to the training set), which washes out a small poison
while keeping the image. A dataset-stage transform: run once over the (poisoned) training set.

The score model is a path (`jaxpoison.diffusion.io`): a directory written by
``jaxpoison --config=configs/score_model.py --workdir=DIR`` (``DIR/score_model``) or by
`jaxpoison.diffusion.save`, or a score_sde ``checkpoint_<N>`` file (with ``model`` /
``image_shape`` naming its architecture when it is not score_sde's CIFAR-10 DDPM). The function
carries ``identity = {'score_model_sha256': ...}``, the sha256 of the model's files, which the
victims' checkpoint keys include: another score model at the same path trains afresh.

References:
  Dolatabadi, Erfani, Leckie. "The Devil's Advocate: Shattering the Illusion of Unexploitable
  Data using Diffusion Models." SaTML 2024 (hmdolatabadi/AVATAR).
  Nie et al. "Diffusion Models for Adversarial Purification." ICML 2022 (DiffPure).
"""

from __future__ import annotations

from jaxpoison.diffusion import io, sampling


def diffusion_purification(
    *,
    score_model,
    t_star=0.1,
    num_steps=None,
    sampler="ddpm",
    batch_size=256,
    model=None,
    image_shape=None,
):
    """The dataset-stage transform ``fn(key, images, labels) -> images``.

    Args:
      score_model: path of the score model (a jaxpoison directory or a score_sde file).
      t_star: fraction of the T diffusion steps to noise to (AVATAR on CIFAR-10: 0.1, 100 of
        1,000).
      num_steps: reverse steps from t* to 0 (None: every one, as AVATAR; fewer are strided).
      sampler: ``'ddpm'`` (ancestral) or ``'ddim'`` (deterministic).
      batch_size: images per score-model call (memory only; the result does not depend on it).
      model, image_shape: for a score_sde file, the U-Net fields and image shape it was trained
        with (default: score_sde's CIFAR-10 DDPM, 32 x 32 x 3).

    Raises:
      ValueError: a bad setting, a score model that is missing, unreadable or not the U-Net's.
    """
    sampling.check(t_star=t_star, num_steps=num_steps, sampler=sampler, batch_size=batch_size)
    if not isinstance(score_model, str) or not score_model:
        raise ValueError(
            f"diffusion_purification: score_model={score_model!r} must be the path of a score "
            "model; train one with `jaxpoison --config=configs/score_model.py --workdir=DIR` "
            "and pass DIR/score_model."
        )
    fields = {}
    if model is not None:
        fields["model"] = dict(model)
    if image_shape is not None:
        fields["image_shape"] = tuple(image_shape)
    try:
        loaded = io.load(score_model, **fields)
    except TypeError as e:
        raise ValueError(
            f"diffusion_purification: model/image_shape apply to score_sde files only ({e}); "
            f"drop them for {score_model}."
        ) from e
    shape = tuple(loaded.spec["image_shape"])

    def fn(key, images, labels):
        del labels
        if tuple(images.shape[1:]) != shape:
            raise ValueError(
                f"diffusion_purification: the score model {score_model} was trained on {shape} "
                f"images, the training images are {tuple(images.shape[1:])}; use a score model "
                "of this dataset."
            )
        return sampling.purify(
            loaded.params,
            images,
            key,
            module=loaded.module,
            schedule=loaded.schedule,
            t_star=t_star,
            num_steps=num_steps,
            sampler=sampler,
            batch_size=batch_size,
        )

    fn.identity = {"score_model_sha256": io.content_hash(score_model)}
    return fn


__all__ = ["diffusion_purification"]
