"""Data-side defenses: what is done to the training data, one registry beside the objectives.

A defense in jaxpoison is an entry of ``config.objectives`` (or ``config.victim.objective``):
the objective says how the loss is computed (`jaxpoison.objectives`: ST, PGD-AT, TRADES, ...),
its optional ``transforms`` field what is done to the training images first, in the order
given (a mapping runs in `TRANSFORMS` order, since ml_collections sorts a ConfigDict's keys; a
tuple of names or ``{'name', **kwargs}`` dicts runs in its own order), by name of `TRANSFORMS`
with its keyword arguments::

    config.objectives.jpeg = dict(name="erm", transforms=dict(jpeg=dict(quality=10)))
    config.objectives.gray_at = dict(name="pgd_at", transforms=dict(grayscale={}))

Transforms have one of two stages (`STAGES`):

``dataset``  applied once to the (poisoned) training set before training, on the devices, in
             chunks: ``fn(key, images, labels) -> images``. Test images are left as they are
             (APBench and the ISS paper transform the training images only).
``batch``    applied inside the compiled training step to each batch after the random crop and
             flip, with a new key per step: ``fn(key, batch) -> batch``.

==================  =======  ===========================================================
``grayscale``       dataset  ISS: the luma in every channel
``jpeg``            dataset  ISS: JPEG at ``quality`` (10), in JAX, checked against Pillow
``bit_depth``       dataset  ISS: the top ``bits`` (2) bits of each 8-bit value
``gaussian_blur``   dataset  ``kernel_size`` (3) x k Gaussian, ``sigma`` (0.1)
``orthogonal_projection``
                    dataset  a linear model's class directions projected out of the images
``diffusion_purification``
                    dataset  AVATAR: diffused to ``t_star`` (0.1) and denoised by a score model
``cutout``          batch    a ``length`` (16) pixel square set to 0
``mixup``           batch    pairs mixed, λ ~ Beta(``alpha``, α), α = 1; `erm` only
``cutmix``          batch    a box of a partner image, area 1 - λ; `erm` only
==================  =======  ===========================================================

`mixup` and `cutmix` mix labels (`MIXES_LABELS`): they add ``batch['mix']`` and only the `erm`
objective trains on it (the trainer refuses them with another objective). Add your own with
`register`; the victim checkpoints and results are keyed by the transforms' names and
arguments, so a run with a new transform never reuses another's victims; a dataset-stage function
with an ``identity`` attribute (a JSON-able dict, e.g. the sha256 of the score model
``diffusion_purification`` reads) adds it to those keys (`Pipeline.identity`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxpoison import _registry
from jaxpoison.transforms import augment, compression, diffusion, projection

STAGES = ("dataset", "batch")

# Images per chunk of a dataset-stage transform written per image (bounds device memory).
CHUNK = 1024


class Transform(NamedTuple):
    """A registered transform: its factory (keyword arguments -> function) and its stage."""

    factory: Callable
    stage: str


def per_image(factory):
    """A dataset-stage factory from one whose function maps an image batch ``[B, H, W, C]`` to
    images of the same shape, example by example (it is applied in chunks of `CHUNK`)."""

    @functools.wraps(factory)
    def make(**kwargs):
        fn = factory(**kwargs)

        def on_dataset(key, images, labels):
            del key, labels
            n = images.shape[0]
            chunk = min(CHUNK, n)
            pad = -n % chunk
            x = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
            x = x.reshape(-1, chunk, *images.shape[1:])
            return jax.lax.map(fn, x).reshape(-1, *images.shape[1:])[:n]

        return on_dataset

    return make


TRANSFORMS = {
    "grayscale": Transform(per_image(compression.grayscale), "dataset"),
    "jpeg": Transform(per_image(compression.jpeg), "dataset"),
    "bit_depth": Transform(per_image(compression.bit_depth), "dataset"),
    "gaussian_blur": Transform(per_image(augment.gaussian_blur), "dataset"),
    "orthogonal_projection": Transform(projection.orthogonal_projection, "dataset"),
    "diffusion_purification": Transform(diffusion.diffusion_purification, "dataset"),
    "cutout": Transform(augment.cutout, "batch"),
    "mixup": Transform(augment.mixup, "batch"),
    "cutmix": Transform(augment.cutmix, "batch"),
}

# Names of TRANSFORMS that mix labels (add ``batch['mix']``); `register` adds to it.
MIXES_LABELS = {"mixup", "cutmix"}


def register(name, factory, *, stage, mixes_labels=False, overwrite=False):
    """Adds a transform (a data-side defense) to `TRANSFORMS`.

    Args:
      name: the name a ``transforms`` field uses.
      factory: ``factory(**kwargs) -> fn``; for stage ``dataset`` ``fn(key, images, labels) ->
        images`` on the whole training set (wrap a per-image function with `per_image`), for
        ``batch`` ``fn(key, batch) -> batch`` inside the training step.
      stage: ``"dataset"`` or ``"batch"``.
      mixes_labels: the batch function adds ``batch['mix'] = {'label', 'weight'}``.
      overwrite: replace a transform already registered under `name`.

    Example::

      def invert():
          return lambda images: 1.0 - images

      transforms.register("invert", transforms.per_image(invert), stage="dataset")
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: use one of {STAGES}.")
    factories = {n: t.factory for n, t in TRANSFORMS.items()}
    _registry.add(factories, name, factory, kind="transform", overwrite=overwrite)
    TRANSFORMS[name] = Transform(factory, stage)
    (MIXES_LABELS.add if mixes_labels else MIXES_LABELS.discard)(name)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """The transforms of one defense, built: `purify` (dataset stage) and `augment` (batch)."""

    dataset: tuple = ()
    batch: tuple = ()
    names: tuple = ()
    identity: tuple = ()  # (name, fn.identity) of the functions that carry one, in order

    @property
    def mixes_labels(self):
        return any(name in MIXES_LABELS for name in self.names)

    def __bool__(self):
        return bool(self.names)

    def purify(self, key, images, labels):
        """The training images after every dataset-stage transform, in order."""
        for i, fn in enumerate(self.dataset):
            images = fn(jax.random.fold_in(key, i), images, labels)
        return images

    def augment(self, key, batch):
        """The batch after every batch-stage transform, in order."""
        for i, fn in enumerate(self.batch):
            batch = fn(jax.random.fold_in(key, i), batch)
        return batch


def _items(spec):
    """(name, kwargs) pairs of a ``transforms`` field, in the order they run."""
    if isinstance(spec, str):
        spec = (spec,)
    if isinstance(spec, Mapping):
        # ml_collections sorts a ConfigDict's keys, so a mapping runs in registry order.
        order = {name: i for i, name in enumerate(TRANSFORMS)}
        return sorted(spec.items(), key=lambda item: order.get(item[0], -1))
    items = []
    for entry in spec:
        if isinstance(entry, Mapping):
            entry = dict(entry)
            items.append((entry.pop("name", None), entry))
        else:
            items.append((entry, None))
    return items


def make(spec, *, num_classes=None):
    """Builds the `Pipeline` of a ``transforms`` field.

    Args:
      spec: None; a mapping from names of `TRANSFORMS` to their keyword arguments (a dict or
        None), run in the order of `TRANSFORMS` (ml_collections does not keep a ConfigDict's
        order); or a sequence of names and ``{'name', **kwargs}`` dicts, run in its order.
      num_classes: passed to the factories that take ``num_classes`` (e.g.
        ``orthogonal_projection``) where the spec does not set it.

    Raises:
      ValueError: an unknown name, a keyword the transform does not take or refuses, or a
        second transform that mixes labels.
    """
    if not spec:
        return Pipeline()
    dataset, batch, names, identity = [], [], [], []
    for name, kwargs in _items(spec):
        if name not in TRANSFORMS:
            raise ValueError(f"unknown transform {name!r}; use one of {sorted(TRANSFORMS)}.")
        kwargs = dict(kwargs or {})
        transform = TRANSFORMS[name]
        if num_classes is not None and _registry.accepts(transform.factory, "num_classes"):
            kwargs.setdefault("num_classes", num_classes)
        _registry.check_arguments("transform", name, transform.factory, kwargs)
        fn = transform.factory(**kwargs)
        (dataset if transform.stage == "dataset" else batch).append(fn)
        names.append(name)
        if getattr(fn, "identity", None) is not None:
            identity.append((name, fn.identity))
    mixing = [n for n in names if n in MIXES_LABELS]
    if len(mixing) > 1:
        raise ValueError(f"transforms {mixing} both mix labels; keep one of them in this defense.")
    return Pipeline(tuple(dataset), tuple(batch), tuple(names), tuple(identity))


__all__ = [
    "MIXES_LABELS",
    "STAGES",
    "TRANSFORMS",
    "Pipeline",
    "Transform",
    "make",
    "per_image",
    "register",
]
