"""Per-batch optimisers over a perturbation delta: PGD (maximise or minimise), MI-FGSM, APGD
(AutoAttack's APGD-CE / APGD-T) and the Square attack.

`ATTACKS` holds the optimisers that share `pgd`'s signature (poisons and objectives pick them by
name); `apgd`, `apgd_targeted` and `square` return a result with the points they fooled.
"""

from jaxpoison.attacks.apgd import APGDResult, apgd, apgd_targeted
from jaxpoison.attacks.pgd import mifgsm, model_loss, pgd
from jaxpoison.attacks.square import SquareResult, square

ATTACKS = {"pgd": pgd, "mifgsm": mifgsm}

__all__ = [
    "APGDResult",
    "ATTACKS",
    "SquareResult",
    "apgd",
    "apgd_targeted",
    "mifgsm",
    "model_loss",
    "pgd",
    "square",
]
