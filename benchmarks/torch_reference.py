"""PyTorch reference models and workloads, equal in architecture to jaxpoison's.

Used by `benchmarks/spine.py`, `crafting.py` and `defenses.py` to time jaxpoison against
PyTorch on the same CPU. torch is an optional dependency (``pip install -e '.[torch]'``): this
module imports it at import time, so import it lazily (`load()` gives a clear message when
torch is missing).

Models (CIFAR shapes, NCHW tensors, optionally in channels-last memory format), the twins of
`jaxpoison.interop.pytorch` (which also copies trained jaxpoison weights into them):
  - ``cnn_cifar``: five 3x3 SAME convs (32, 64, 128, 128, 128) with bias, each ReLU + 2x2
    max-pool while the spatial size is > 1, global mean, linear (jaxpoison.models.cnn.CifarCNN);
  - ``vgg11``: VGG-11 with BatchNorm, bias-free convs, one linear classifier
    (jaxpoison.models.vgg.VGG, depth 11);
  - ``resnet18``: ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), BasicBlocks,
    1x1-conv + BN shortcuts (jaxpoison.models.resnet.ResNet18).
Each takes the same `width` multiplier with the same rounding as the Flax models. BatchNorm:
flax momentum 0.9 on the running average = PyTorch momentum 0.1; epsilon 1e-5.

Workloads:
  - `make_train_step`: SGD, momentum 0.9, coupled weight decay 5e-4, mean cross-entropy,
    train-mode model; the batch is gathered by index from a resident training set (as the
    jaxpoison trainer does).
  - `make_pgd`: PGD ℓ∞ with random start on the eval-mode model, sign steps, projection onto
    the ε-ball and the [0, 1] box; gradients only with respect to the input. ``maximize=False``
    descends the loss (a targeted attack when given target labels: P1 crafting).
  - `make_pgd_at_step`: one PGD-AT step (Madry et al. 2018), `jaxpoison.objectives.pgd_at`:
    `make_pgd` (uniform random start, eval-mode model) on the batch, then one SGD step on the
    mean cross-entropy at the detached x + δ with the model in train mode.
  - `make_trades_step`: one TRADES step (Zhang et al. 2019), `jaxpoison.objectives.trades`:
    the KL maximisation from 0.001·N(0, I) on the eval-mode model against its clean
    predictions, then one SGD step on CE(f(x), y) + β KL(p(x) ‖ p(x_adv)) in train mode.
  - `make_error_minimizing_pass`: one pass of error-minimizing noise (Huang et al. 2021) over
    a training set, the loop of `jaxpoison.poisons.error_minimizing`: per batch an SGD step
    of the crafting model on the perturbed batch (`train_steps` of them spread over the pass),
    then PGD descent on the batch's δ, then the model's accuracy on the perturbed batch.
  - `make_tap_attack`: TAP crafting (Fowl et al. 2021), `jaxpoison.poisons.tap`: targeted
    PGD ℓ∞ on the eval-mode model with a random translation (zero fill) and flip of x + δ inside
    the loss at every step, `num_restarts` random starts, the restart with the lowest
    un-augmented target loss kept per example.
  - `make_rem_pass`: one pass of robust error-minimizing noise (Fu et al. 2022),
    `jaxpoison.poisons.robust_error_minimizing`: per batch one PGD-AT step (radius ε_a) of the
    crafting model on the augmented perturbed batch, then descent on δ where each step sums,
    over `num_samples` augmentations, the gradient at the PGD adversary (radius ε_a) of the
    augmented image, held fixed (Danskin).
"""

from __future__ import annotations

import contextlib

from jaxpoison.interop.pytorch import MODELS, load

torch = load()
nn = torch.nn
F = torch.nn.functional


def make(name, *, num_classes=10, width=1.0, channels_last=True):
    """The model `name` at `width`, in channels-last memory format if asked."""
    if name not in MODELS:
        raise ValueError(f"No PyTorch reference for {name!r}; use one of {sorted(MODELS)}.")
    model = MODELS[name](num_classes=num_classes, width=width)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _to_format(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def _sgd(model, learning_rate, momentum, weight_decay):
    """SGD with momentum and coupled weight decay (optax's add_decayed_weights + sgd)."""
    return torch.optim.SGD(
        model.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay
    )


def _sgd_step(opt, loss):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


@contextlib.contextmanager
def _frozen_eval(model):
    """The model in eval mode with its parameters frozen: an inner attack needs gradients only
    with respect to the input (the caller puts the model back in train mode for its loss)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def _project_linf(delta, x, epsilon, channels_last):
    """Clips delta to the ℓ∞ ball of radius epsilon and x + delta to the [0, 1] box."""
    return _to_format((x + delta.clamp(-epsilon, epsilon)).clamp_(0, 1) - x, channels_last)


def make_train_step(
    model, *, learning_rate=0.1, momentum=0.9, weight_decay=5e-4, channels_last=True
):
    """``step(x_train, y_train, idx) -> loss``: one SGD step on the batch ``x_train[idx]``."""
    opt = _sgd(model, learning_rate, momentum, weight_decay)

    def step(x_train, y_train, idx):
        model.train()
        x = _to_format(x_train[idx], channels_last)
        return _sgd_step(opt, F.cross_entropy(model(x), y_train[idx]))

    return step


def make_pgd(
    model,
    *,
    epsilon=8 / 255,
    step_size=2 / 255,
    num_steps=10,
    maximize=True,
    channels_last=True,
):
    """``attack(x, y, generator) -> delta``: PGD ℓ∞ with random start on the eval-mode model."""
    sign = 1.0 if maximize else -1.0

    def attack(x, y, generator=None):
        x = _to_format(x, channels_last)
        with _frozen_eval(model):
            delta = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * epsilon
            delta = _to_format((x + delta).clamp_(0, 1) - x, channels_last)
            for _ in range(num_steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(model(x + delta), y, reduction="sum")
                (g,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta = (delta + sign * step_size * g.sign()).clamp_(-epsilon, epsilon)
                    delta = (x + delta).clamp_(0, 1) - x
        return delta.detach()

    return attack


def make_pgd_at_step(
    model,
    *,
    epsilon=8 / 255,
    step_size=2 / 255,
    num_steps=10,
    learning_rate=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    channels_last=True,
):
    """``step(x_train, y_train, idx, generator) -> loss``: one PGD-AT step on ``x_train[idx]``.

    The inner maximisation is `make_pgd` (ℓ∞, uniform random start, eval-mode model, summed
    cross-entropy); the outer loss is the mean cross-entropy at the detached x + δ* with the
    model in train mode, as `jaxpoison.objectives.pgd_at` computes it (Madry et al. 2018).
    """
    attack = make_pgd(
        model,
        epsilon=epsilon,
        step_size=step_size,
        num_steps=num_steps,
        channels_last=channels_last,
    )
    opt = _sgd(model, learning_rate, momentum, weight_decay)

    def step(x_train, y_train, idx, generator=None):
        x = _to_format(x_train[idx], channels_last)
        y = y_train[idx]
        x_adv = x + attack(x, y, generator)
        model.train()
        return _sgd_step(opt, F.cross_entropy(model(x_adv), y))

    return step


def make_trades_step(
    model,
    *,
    beta=6.0,
    epsilon=8 / 255,
    step_size=2 / 255,
    num_steps=10,
    init_scale=1e-3,
    learning_rate=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    channels_last=True,
):
    """``step(x_train, y_train, idx, generator) -> loss``: one TRADES step on ``x_train[idx]``.

    As `jaxpoison.objectives.trades` computes it (Zhang et al. 2019): on the eval-mode model,
    δ starts at ``init_scale * N(0, I)`` (projected) and ascends the summed KL(p(x) ‖ p(x + δ))
    by ℓ∞ sign steps against the clean predictions p(x), computed once; then, in train mode,
    two passes (clean, adversarial) give ``CE(f(x), y) + beta * mean KL(p(x) ‖ p(x_adv))`` with
    the gradient through both distributions. The reference code recomputes the clean
    predictions at every inner step and a third time in the outer loss; computing them once is
    the same mathematics, so both frameworks do the same work here.
    """
    opt = _sgd(model, learning_rate, momentum, weight_decay)

    def step(x_train, y_train, idx, generator=None):
        x = _to_format(x_train[idx], channels_last)
        y = y_train[idx]
        with _frozen_eval(model):
            with torch.no_grad():
                log_p = F.log_softmax(model(x), dim=1)
                delta = init_scale * torch.randn(x.shape, generator=generator)
                delta = _project_linf(delta, x, epsilon, channels_last)
            for _ in range(num_steps):
                delta.requires_grad_(True)
                log_q = F.log_softmax(model(x + delta), dim=1)
                kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
                (g,) = torch.autograd.grad(kl, delta)
                with torch.no_grad():
                    delta = _project_linf(delta + step_size * g.sign(), x, epsilon, channels_last)
        x_adv = x + delta.detach()
        model.train()
        logits = model(x)
        logits_adv = model(x_adv)
        natural = F.cross_entropy(logits, y)
        robust = F.kl_div(
            F.log_softmax(logits_adv, dim=1),
            F.log_softmax(logits, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return _sgd_step(opt, natural + beta * robust)

    return step


def make_error_minimizing_pass(
    model,
    *,
    epsilon=8 / 255,
    step_size=0.8 / 255,
    num_steps=20,
    train_steps=10,
    batch_size=256,
    learning_rate=0.1,
    channels_last=True,
):
    """``craft_pass(x_train, y_train, delta, order) -> accuracy``: one pass of error-minimizing
    noise over the training set, updating `delta` [N, C, H, W] in place."""
    opt = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9, weight_decay=5e-4)

    def craft_pass(x_train, y_train, delta, order):
        n = len(order)
        steps = -(-n // batch_size)
        train_every = max(1, steps // max(1, train_steps))
        correct = 0
        for i in range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = _to_format(x_train[idx], channels_last)
            y = y_train[idx]
            if i % train_every == 0 and i // train_every < train_steps:
                model.train()
                loss = F.cross_entropy(model((x + delta[idx]).clamp(0, 1)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            d = _to_format(delta[idx], channels_last)
            for _ in range(num_steps):
                d.requires_grad_(True)
                loss = F.cross_entropy(model(x + d), y, reduction="sum")
                (g,) = torch.autograd.grad(loss, d)
                with torch.no_grad():
                    d = (d - step_size * g.sign()).clamp_(-epsilon, epsilon)
                    d = (x + d).clamp_(0, 1) - x
            with torch.no_grad():
                delta[idx] = d
                correct += (model(x + d).argmax(1) == y).sum().item()
            for p in model.parameters():
                p.requires_grad_(True)
        return correct / n

    return craft_pass


def augment(x, *, crop_padding, flip, generator=None):
    """Random translations by up to `crop_padding` pixels (zero fill) and horizontal flips of
    an NCHW batch, per example and differentiable in `x` (`jaxpoison.data.pipeline.augment`)."""
    b, _, h, w = x.shape
    if crop_padding:
        p = crop_padding
        padded = F.pad(x, (p, p, p, p))
        off = torch.randint(0, 2 * p + 1, (b, 2), generator=generator)
        rows = (off[:, :1] + torch.arange(h))[:, None, :, None]
        cols = (off[:, 1:] + torch.arange(w))[:, None, None, :]
        x = padded[
            torch.arange(b)[:, None, None, None],
            torch.arange(x.shape[1])[None, :, None, None],
            rows,
            cols,
        ]
    if flip:
        mask = torch.rand(b, 1, 1, 1, generator=generator) < 0.5
        x = torch.where(mask, x.flip(3), x)
    return x


def make_tap_attack(
    model,
    *,
    epsilon=8 / 255,
    step_size=8 / 255 / 20,
    num_steps=250,
    num_restarts=8,
    crop_padding=4,
    flip=True,
    channels_last=True,
):
    """``attack(x, targets, generator) -> delta``: TAP's targeted PGD with augmentation inside the
    loss and restarts, the restart with the lowest un-augmented target loss kept per example."""

    def once(x, t, generator):
        delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * epsilon
        delta = _project_linf(delta, x, epsilon, channels_last)
        for _ in range(num_steps):
            delta.requires_grad_(True)
            images = augment(x + delta, crop_padding=crop_padding, flip=flip, generator=generator)
            loss = F.cross_entropy(model(_to_format(images, channels_last)), t, reduction="sum")
            (g,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = _project_linf(delta - step_size * g.sign(), x, epsilon, channels_last)
        return delta.detach()

    def attack(x, t, generator=None):
        x = _to_format(x, channels_last)
        with _frozen_eval(model):
            best, best_loss = None, None
            for _ in range(num_restarts):
                delta = once(x, t, generator)
                with torch.no_grad():
                    loss = F.cross_entropy(model(x + delta), t, reduction="none")
                if best is None:
                    best, best_loss = delta, loss
                else:
                    better = (loss < best_loss)[:, None, None, None]
                    best = torch.where(better, delta, best)
                    best_loss = torch.minimum(loss, best_loss)
        return best

    return attack


def make_rem_pass(
    model,
    *,
    epsilon=8 / 255,
    step_size=1.6 / 255,
    num_steps=10,
    adversarial_epsilon=4 / 255,
    adversarial_step_size=0.8 / 255,
    adversarial_steps=10,
    num_samples=5,
    crop_padding=4,
    flip=True,
    batch_size=256,
    learning_rate=0.1,
    channels_last=True,
):
    """``craft_pass(x_train, y_train, delta, order, generator) -> accuracy``: one pass of REM
    noise over the training set (the model trained on every batch), updating `delta` in place."""
    adversary = make_pgd(
        model,
        epsilon=adversarial_epsilon,
        step_size=adversarial_step_size,
        num_steps=adversarial_steps,
        channels_last=channels_last,
    )
    opt = _sgd(model, learning_rate, 0.9, 5e-4)

    def craft_pass(x_train, y_train, delta, order, generator=None):
        n = len(order)
        correct = 0
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            x = _to_format(x_train[idx], channels_last)
            y = y_train[idx]
            # PGD-AT step of the crafting model on the augmented perturbed batch.
            images = augment(
                (x + delta[idx]).clamp(0, 1),
                crop_padding=crop_padding,
                flip=flip,
                generator=generator,
            )
            images = _to_format(images, channels_last)
            x_adv = images + adversary(images, y, generator)
            model.train()
            _sgd_step(opt, F.cross_entropy(model(x_adv), y))
            # Descent on δ through the adversary of each augmentation.
            d = _project_linf(delta[idx], x, epsilon, channels_last)
            with _frozen_eval(model):
                for _ in range(num_steps):
                    g = torch.zeros_like(d)
                    for _ in range(num_samples):
                        d.requires_grad_(True)
                        images = augment(
                            x + d, crop_padding=crop_padding, flip=flip, generator=generator
                        )
                        images = _to_format(images, channels_last)
                        rho = adversary(images.detach(), y, generator)
                        loss = F.cross_entropy(model(images + rho), y, reduction="sum")
                        (gs,) = torch.autograd.grad(loss, d)
                        g += gs
                    with torch.no_grad():
                        d = _project_linf(
                            d.detach() - step_size * g.sign(), x, epsilon, channels_last
                        )
                with torch.no_grad():
                    delta[idx] = d
                    correct += (model(x + d).argmax(1) == y).sum().item()
        return correct / n

    return craft_pass


def forward_flops(model, image_shape=(3, 32, 32)):
    """Multiply-adds x 2 of the convolutions and linear layers for one example, and of the
    first convolution alone (whose input gradient a training step does not need)."""
    counts = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_out = module.in_channels // module.groups * kh * kw
            counts.append(2 * output.numel() * per_out)
        elif isinstance(module, nn.Linear):
            counts.append(2 * output.numel() * module.in_features)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *image_shape))
    model.train(was_training)
    for h in handles:
        h.remove()
    return sum(counts), counts[0]
