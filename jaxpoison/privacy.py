"""DP-SGD (Abadi et al. 2016) as a defense: per-example gradient clipping and Gaussian noise in
the victim's training step, with the privacy spent reported by an accountant.

A defense asks for it with a ``privacy`` field beside its objective::

    config.objectives.dp_sgd = dict(
        name="erm", privacy=dict(l2_norm_clip=1.0, noise_multiplier=1.0, delta=1e-5)
    )

Each step then computes every example's gradient (``vmap`` of the objective on one example),
scales it to ℓ2 norm at most C = ``l2_norm_clip`` (over all parameters), sums them, adds
N(0, σ²C² I) with σ = ``noise_multiplier``, divides by the batch size and hands the result to
the optimizer (SGD, weight decay and schedule as configured). The noise is drawn from the step's
key, so seeds differ and a run is reproducible.

BatchNorm couples the examples of a batch, so per-example gradients and DP-SGD's guarantee need
a model without it (the CIFAR CNN ``cnn_cifar``, ``cnn_mnist``, ``mlp``); models with batch
statistics are refused.

Accounting: `epsilon` composes the subsampled Gaussian mechanism over every step with the RDP
accountant of Google's ``dp-accounting`` (PyPI; chosen over optax's DP transforms, which hold no
accountant, and jax-privacy, whose training loop would replace ours). It assumes Poisson sampling
at rate q = batch size / training-set size, as Abadi et al. and the common libraries report;
the trainer draws fixed-size shuffled batches, for which this is the usual approximation. Each
run's ε at ``delta`` is in ``results['runs'][run]['privacy']``.

References:
  Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang. "Deep Learning with Differential
  Privacy." CCS 2016.
  Mironov. "Rényi Differential Privacy." CSF 2017.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


def _positive(field, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"privacy.{field}={value!r} must be a positive number.")
    if value <= 0:
        raise ValueError(f"privacy.{field}={value!r} must be positive.")


@dataclasses.dataclass(frozen=True)
class DPSGD:
    """DP-SGD's settings: clip norm C, noise multiplier σ and the δ that ε is reported at."""

    l2_norm_clip: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5

    def __post_init__(self):
        _positive("l2_norm_clip", self.l2_norm_clip)
        if isinstance(self.noise_multiplier, bool) or not isinstance(
            self.noise_multiplier, (int, float)
        ):
            raise ValueError(
                f"privacy.noise_multiplier={self.noise_multiplier!r} must be a number >= 0."
            )
        if not self.noise_multiplier >= 0:
            raise ValueError(f"privacy.noise_multiplier={self.noise_multiplier!r} must be >= 0.")
        _positive("delta", self.delta)
        if self.delta >= 1:
            raise ValueError(f"privacy.delta={self.delta!r} must lie in (0, 1), e.g. 1e-5.")

    def aggregate(self, per_example_grads, key):
        """The noisy mean gradient: clip each example's gradient to norm C, sum, add
        N(0, σ²C²), divide by the batch size."""
        leaves, treedef = jax.tree.flatten(per_example_grads)
        batch = leaves[0].shape[0]
        norms = jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(batch, -1)), axis=1) for g in leaves))
        scale = jnp.minimum(1.0, self.l2_norm_clip / jnp.maximum(norms, 1e-12))
        keys = jax.random.split(key, len(leaves))
        noisy = [
            (
                jnp.tensordot(scale, g, axes=1)
                + self.noise_multiplier
                * self.l2_norm_clip
                * jax.random.normal(k, g.shape[1:], g.dtype)
            )
            / batch
            for g, k in zip(leaves, keys, strict=True)
        ]
        return jax.tree.unflatten(treedef, noisy), {
            "grad_norm": jnp.mean(norms),
            "clipped": jnp.mean((norms > self.l2_norm_clip).astype(jnp.float32)),
        }

    def epsilon(self, *, num_examples, batch_size, steps):
        """ε at `delta` after `steps` steps of batches of `batch_size` from `num_examples`
        (RDP accountant, Poisson subsampling at q = batch_size / num_examples); inf without
        noise."""
        import dp_accounting

        if self.noise_multiplier == 0:
            return math.inf
        q = min(1.0, batch_size / num_examples)
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                q, dp_accounting.GaussianDpEvent(self.noise_multiplier)
            ),
            int(steps),
        )
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(event)
        return float(accountant.get_epsilon(self.delta))


def make(spec):
    """A `DPSGD` from a ``privacy`` field (a dict of its fields), or None for None / empty."""
    if not spec:
        return None
    fields = dict(spec)
    known = {f.name for f in dataclasses.fields(DPSGD)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"privacy does not take {unknown}; it accepts {sorted(known)}.")
    return DPSGD(**fields)
