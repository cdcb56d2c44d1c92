"""Theory testbed: the mixture-Gaussian model of Tao et al. (2021), where delusive poisons and
adversarial training can be analysed in closed form and checked by sampling and training.

- `gaussian`: the clean and the two delusive distributions, Bayes-optimal and optimal linear
  ℓ∞-robust classifiers, closed-form natural accuracy, Monte Carlo.
- `linear`: linear classifiers trained on samples with the library's objectives.

The ``gaussian_theory`` trainer (`jaxpoison.trainers.gaussian_theory`) runs Figure 2.
"""

from jaxpoison.theory import gaussian, linear

__all__ = ["gaussian", "linear"]
