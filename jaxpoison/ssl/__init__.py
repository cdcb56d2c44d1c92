"""Self-supervised learning as a defense: rotation prediction (Gidaris et al. 2018) on the
(poisoned) training images, then a linear probe on the frozen features (Tao et al. 2021).

- `rotation`: the four rotations of a batch and `rotation.pretext(objective)`, which turns any
  training objective of `jaxpoison.objectives` (``erm`` = ST, ``pgd_at`` = AT on the pretext loss)
  into the 4-way rotation-prediction objective; the victim trainer runs it unchanged.
- `probe`: penultimate features of a trained model over a dataset, and a multinomial logistic
  regression fitted on them by full-batch gradient descent.

The trainer ``config.trainer = 'rotation_ssl'`` is `jaxpoison.trainers.rotation_ssl`.
"""

from jaxpoison.ssl import probe, rotation

__all__ = ["probe", "rotation"]
