"""Theory testbed: the mixture-Gaussian model of Tao et al. (2021), where delusive poisons and
adversarial training can be analysed in closed form and checked by sampling and training.

- `gaussian`: the clean and the two delusive distributions, Bayes-optimal and optimal linear
  ℓ∞-robust classifiers, closed-form natural accuracy, Monte Carlo.
- `linear`: linear classifiers trained on samples with the library's objectives.
- `runner`: the ``gaussian_theory`` experiment (Figure 2) that ``configs/gaussian_theory.py`` runs.
"""

from jaxpoison.theory import gaussian, linear, runner

__all__ = ["gaussian", "linear", "runner"]
