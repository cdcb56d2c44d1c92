"""Per-batch optimisers over a perturbation delta: PGD (maximise or minimise) and MI-FGSM."""

from jaxpoison.attacks.pgd import mifgsm, model_loss, pgd

ATTACKS = {"pgd": pgd, "mifgsm": mifgsm}

__all__ = ["ATTACKS", "mifgsm", "model_loss", "pgd"]
