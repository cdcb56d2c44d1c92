"""Per-batch optimisers over a perturbation delta: PGD (maximise or minimise), MI-FGSM, APGD
(AutoAttack's APGD-CE / APGD-T), the Square attack, and the minimal-perturbation attacks
FAB-T, Carlini–Wagner ℓ2 and DeepFool.

`ATTACKS` holds the optimisers that share `pgd`'s signature (poisons and objectives pick them by
name); `apgd`, `apgd_targeted` and `square` return a result with the points they fooled;
`fab_targeted`, `carlini_wagner_l2` and `deepfool` the closest misclassified points they found
and their norms.
"""

from jaxpoison.attacks.apgd import APGDResult, apgd, apgd_targeted
from jaxpoison.attacks.cw import CWResult, carlini_wagner_l2
from jaxpoison.attacks.deepfool import DeepFoolResult, deepfool
from jaxpoison.attacks.fab import FABResult, fab_targeted
from jaxpoison.attacks.pgd import mifgsm, model_loss, pgd
from jaxpoison.attacks.square import SquareResult, square

ATTACKS = {"pgd": pgd, "mifgsm": mifgsm}

__all__ = [
    "APGDResult",
    "ATTACKS",
    "CWResult",
    "DeepFoolResult",
    "FABResult",
    "SquareResult",
    "apgd",
    "apgd_targeted",
    "carlini_wagner_l2",
    "deepfool",
    "fab_targeted",
    "mifgsm",
    "model_loss",
    "pgd",
    "square",
]
