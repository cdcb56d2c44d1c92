"""Robust (REM) and stable (SEM) error-minimizing noise: unlearnable under adversarial training.

Error-minimizing noise stops working when the victim trains adversarially: PGD-AT's inner
maximisation undoes a noise that only *minimises* the loss. Fu et al. (2022) craft the noise
against the adversary, a min-min-max over the crafting model θ, the noise δ (radius ε) and an
adversarial perturbation ρ of smaller radius ε_a, in expectation over the victim's augmentations
T (random crop and flip):

    min_θ  E_(x, y)  min_{‖δ‖ <= ε}  E_T  max_{‖ρ‖ <= ε_a}  CE(f_θ(T(x + δ) + ρ), y).

The crafting model is trained with PGD-AT (radius ε_a) on the augmented noisy data, and δ descends
the gradient of the loss at the adversarial example of each of `num_samples` augmentations.
Liu et al. (2024, SEM) observe that the noise's robustness comes from its stability against
*random* perturbations more than from the worst case, and replace ρ by uniform noise in the
ε_a ball when crafting δ (faster: no inner PGD), keeping the adversarially trained model.

Both are settings of the error-minimizing engine (`error_minimizing.min_min`). As there, δ is
refined from its current value at every visit of its batch (the reference restarts it from
uniform noise each time and regenerates all of it with the final model after 5,000 steps), the
crafting model, its optimizer and counters are part of the state (a killed craft resumes
exactly), and the noise is sample-wise (the papers') or class-wise (``class_wise=True``). ℓ∞ and ℓ2
balls are both taken; ρ lives in the poison's norm at radius `adversarial_epsilon`.

References:
  Fu, He, Liu, Shen, Tao. "Robust Unlearnable Examples: Protecting Data Against Adversarial
  Learning." ICLR 2022 (code: fshp971/robust-unlearnable-examples).
  Liu, Xu, Chen, Sun. "Stable Unlearnable Example: Enhancing the Robustness of Unlearnable
  Examples via Stable Error-Minimizing Noise." AAAI 2024 (arXiv 2311.13091; code:
  liuyixin-louis/Stable-Unlearnable-Example).
"""

from __future__ import annotations

from jaxpoison.poisons.error_minimizing import Inner, min_min


def _robust(
    name,
    kind,
    *,
    threat,
    num_classes,
    image_shape,
    class_wise,
    model,
    optimizer,
    num_epochs,
    num_steps,
    step_size,
    adversarial_epsilon,
    adversarial_steps,
    adversarial_step_size,
    num_samples,
    crop_padding,
    flip,
    train_steps,
    stop_accuracy,
):
    epsilon = float(threat.epsilon)
    adversarial_epsilon = epsilon / 2 if adversarial_epsilon is None else adversarial_epsilon
    if not 0 < adversarial_epsilon <= epsilon:
        raise ValueError(
            f"{name}: adversarial_epsilon={adversarial_epsilon} must be in (0, epsilon = "
            f"{epsilon:.6g}]: the noise cannot outweigh a larger adversary (papers: epsilon / 2)."
        )
    for field, value in [
        ("num_samples", num_samples),
        ("adversarial_steps", adversarial_steps),
        ("num_steps", num_steps),
    ]:
        if int(value) != value or value < 1:
            raise ValueError(f"{name}: {field}={value} must be a whole number >= 1.")
    if int(crop_padding) != crop_padding or crop_padding < 0:
        raise ValueError(
            f"{name}: crop_padding={crop_padding} must be a whole number of pixels >= 0 (0: "
            "no crops)."
        )
    if train_steps is not None and (int(train_steps) != train_steps or train_steps < 1):
        raise ValueError(
            f"{name}: train_steps={train_steps} must be a whole number >= 1, or None to train the "
            "crafting model on every batch."
        )
    inner = Inner(
        kind=kind,
        threat=threat.replace(epsilon=adversarial_epsilon, quantize=False),
        num_steps=int(adversarial_steps),
        step_size=(
            2 * adversarial_epsilon / adversarial_steps
            if adversarial_step_size is None
            else adversarial_step_size
        ),
    )
    return min_min(
        threat=threat,
        num_classes=num_classes,
        image_shape=image_shape,
        class_wise=class_wise,
        model=model,
        optimizer=optimizer,
        num_epochs=num_epochs,
        num_steps=int(num_steps),
        step_size=2 * epsilon / num_steps if step_size is None else step_size,
        train_steps=train_steps,
        stop_accuracy=stop_accuracy,
        inner=inner,
        num_samples=int(num_samples),
        crop_padding=int(crop_padding),
        flip=bool(flip),
    )


def robust_error_minimizing(
    *,
    threat,
    num_classes,
    image_shape,
    class_wise=False,
    model=None,
    optimizer=None,
    num_epochs=13,
    num_steps=10,
    step_size=None,
    adversarial_epsilon=None,
    adversarial_steps=10,
    adversarial_step_size=None,
    num_samples=5,
    crop_padding=4,
    flip=True,
    train_steps=None,
    stop_accuracy=None,
):
    """Robust error-minimizing noise, REM (Fu et al. 2022).

    Defaults are the reference's CIFAR-10 settings (scripts/cifar10/gen_rem.sh), fitted to the
    crafting engine's passes: 13 passes training the model on every batch (the reference's 5,000
    steps of 128 images are 12.8 passes over CIFAR-10's 50,000).

    Args:
      threat: an `LpBall` (ε; the reference: ℓ∞ 8/255).
      num_classes: K.
      image_shape: (H, W, C).
      class_wise: one δ per class instead of one per example (the paper's is sample-wise).
      model: ``{'name', 'width'}`` of the crafting model (default ResNet-18).
      optimizer: `train_state.make_optimizer` keyword arguments (default SGD lr 0.1, momentum 0.9,
        weight decay 5e-4, constant; the reference decays ×0.1 at 40 % and 80 % of its steps:
        ``schedule='piecewise', milestones=(0.4, 0.8)`` with an int `train_steps`).
      num_epochs: passes over the training set.
      num_steps: descent steps on δ per batch and pass (10).
      step_size: descent step (default 2ε / `num_steps`: the reference's ε/5 = 1.6/255 at 10).
      adversarial_epsilon: ε_a of ρ and of the crafting model's PGD-AT (default ε/2, 4/255).
      adversarial_steps: PGD steps for ρ and for the model's adversarial training (10).
      adversarial_step_size: their step (default 2ε_a / `adversarial_steps`: the reference's
        ε_a/5 = 0.8/255 at 10).
      num_samples: augmentations T averaged per descent step (5).
      crop_padding, flip: T, a random crop after zero padding and a horizontal flip (4, True).
      train_steps: crafting model steps per pass, spread over it; None: every batch.
      stop_accuracy: stop after a pass whose eval accuracy of the crafting model on the noisy
        data reaches this; None (the reference's fixed step count) runs every pass.

    Returns:
      A `Poison` whose state is an `error_minimizing.MinMinState`.

    References:
      Fu et al. 2022, "Robust Unlearnable Examples: Protecting Data Against Adversarial
      Learning", ICLR.
    """
    return _robust("robust_error_minimizing", "pgd", **locals())


def stable_error_minimizing(
    *,
    threat,
    num_classes,
    image_shape,
    class_wise=False,
    model=None,
    optimizer=None,
    num_epochs=13,
    num_steps=10,
    step_size=None,
    adversarial_epsilon=None,
    adversarial_steps=10,
    adversarial_step_size=None,
    num_samples=5,
    crop_padding=4,
    flip=True,
    train_steps=None,
    stop_accuracy=None,
):
    """Stable error-minimizing noise, SEM (Liu et al. 2024): REM with ρ uniform in the ε_a ball.

    The noise descends ``CE(f(T(x + δ) + ρ))`` with ρ a fresh uniform draw per augmentation
    (the reference's ``_get_adv_`` replaced by uniform noise); the crafting model is still
    trained with PGD-AT (`adversarial_steps`, `adversarial_step_size`), as in the REM code the
    SEM reference modifies. Arguments and defaults as `robust_error_minimizing`.

    References:
      Liu et al. 2024, "Stable Unlearnable Example: Enhancing the Robustness of Unlearnable
      Examples via Stable Error-Minimizing Noise", AAAI.
    """
    return _robust("stable_error_minimizing", "random", **locals())
