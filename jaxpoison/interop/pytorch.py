"""jaxpoison classifiers in PyTorch: the same network, with a trained model's weights copied in.

PyTorch attack libraries (torchattacks, fra31/auto-attack, ...) take a ``torch.nn.Module``.
`to_torch` builds the PyTorch twin of a jaxpoison model and copies a trained model's parameters
and BatchNorm running statistics into it, in eval mode, so those libraries can evaluate the very
network jaxpoison trained (the cross-check of our AutoAttack, docs/measurement.md). The twin takes
NCHW float32 images in [0, 1] (jaxpoison's models take NHWC: `to_nchw` converts) and returns the
same logits up to float32 rounding; `max_logit_difference` measures the difference on given
images.

Twins, for the flax modules of `jaxpoison.models` (any width, any number of classes and input
channels):

- `CifarCNN` (``cnn_cifar``, both heads), `MnistCNN` (``cnn_mnist``) and `MLP` (``mlp``):
  convolutions with bias, ReLU, 2x2 max-pools; a flattening head flattens in NHWC order, as the
  flax model does, so the first linear layer takes the flax kernel as it is; ``cnn_mnist`` with
  ``normalization='batch'`` and ``pool='avg'`` (the released L2C victim) adds its BatchNorms;
- `VGG` (``vgg11`` / ``vgg16`` / ``vgg19``, BatchNorm, one linear classifier) and `ResNet18`
  (``resnet18``: the CIFAR stem, BasicBlocks, 1x1-conv + BN shortcuts). BatchNorm: flax momentum
  0.9 on the running average is PyTorch momentum 0.1; epsilon 1e-5 in both.

A twin computes in float32 whatever the module's ``dtype``. An option it does not build (a
``pool`` other than max or avg, a field added to the flax model or to a subclass, away from its
default) is refused in one line naming the option and the values it takes, never ignored.

The benchmarks' PyTorch workloads (`benchmarks/torch_reference.py`) use these twins too.

torch is an optional dependency (``pip install -e '.[torch]'``); this module imports it when it
is imported, and says how to install it when it is missing.

Example::

    from jaxpoison.interop import pytorch

    net = pytorch.to_torch(trainer.module, {"params": state.params, **state.model_state})
    x = pytorch.to_nchw(images)  # images: NHWC float in [0, 1]
    assert pytorch.max_logit_difference(net, trainer.module, variables, images) < 1e-4
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import numpy as np

from jaxpoison.models import cnn, mlp, resnet, vgg


def load():
    """Imports torch or raises an ImportError that says how to install it."""
    try:
        return importlib.import_module("torch")
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "PyTorch is not installed; jaxpoison.interop.pytorch needs it. Install the optional "
            "extra: pip install -e '.[torch]' (or pip install torch==2.13.0 "
            "--index-url https://download.pytorch.org/whl/cpu)."
        ) from e


torch = load()
nn = torch.nn
F = torch.nn.functional


def _round(channels, width):
    return max(1, int(round(channels * width)))


def _flatten_nhwc(x):
    """Flattens an NCHW map in NHWC order, the order of the flax model's reshape."""
    return x.permute(0, 2, 3, 1).flatten(1)


class CifarCNN(nn.Module):
    """`jaxpoison.models.cnn.CifarCNN`: 3x3 SAME convs with bias, ReLU, 2x2 max-pool while the
    map is taller than 1, then global mean (``head='mean'``) or flatten, then linear."""

    def __init__(
        self,
        num_classes=10,
        width=1.0,
        channels=(32, 64, 128, 128, 128),
        head="mean",
        in_channels=3,
        in_features=None,
    ):
        super().__init__()
        chans = [in_channels] + [_round(c, width) for c in channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, 3, padding=1)
            for cin, cout in zip(chans[:-1], chans[1:], strict=True)
        )
        self.head = head
        self.fc = nn.Linear(in_features or chans[-1], num_classes)

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
            if x.shape[2] > 1:
                x = F.max_pool2d(x, 2)
        x = x.mean(dim=(2, 3)) if self.head == "mean" else _flatten_nhwc(x)
        return self.fc(x)


class MnistCNN(nn.Module):
    """`jaxpoison.models.cnn.MnistCNN`: conv5x5(20)-pool-conv5x5(50)-pool-FC(500)-FC(K).

    With ``normalization='batch'`` BatchNorm follows both convolutions, the hidden FC layer (each
    before its ReLU) and the logits; ``pool`` is ``max`` or ``avg``.
    """

    def __init__(
        self,
        num_classes=10,
        width=1.0,
        in_channels=1,
        in_features=None,
        normalization="none",
        pool="max",
    ):
        if normalization not in ("none", "batch"):
            raise ValueError(
                f"MnistCNN twin: normalization={normalization!r}; use 'none' or 'batch'."
            )
        if pool not in ("max", "avg"):
            raise ValueError(f"MnistCNN twin: pool={pool!r}; use 'max' or 'avg'.")
        super().__init__()
        c1, c2, hidden = _round(20, width), _round(50, width), _round(500, width)
        self.conv1 = nn.Conv2d(in_channels, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        if normalization == "batch":
            norms = [nn.BatchNorm2d(c1), nn.BatchNorm2d(c2), nn.BatchNorm1d(hidden)]
            norms.append(nn.BatchNorm1d(num_classes))
        else:
            norms = [nn.Identity() for _ in range(4)]
        self.norms = nn.ModuleList(norms)
        self.pool = F.avg_pool2d if pool == "avg" else F.max_pool2d

    def forward(self, x):
        x = self.pool(F.relu(self.norms[0](self.conv1(x))), 2)
        x = self.pool(F.relu(self.norms[1](self.conv2(x))), 2)
        x = F.relu(self.norms[2](self.fc1(_flatten_nhwc(x))))
        return self.norms[3](self.fc2(x))


class MLP(nn.Module):
    """`jaxpoison.models.mlp.MLP`: flatten (NHWC order), ReLU layers, then linear."""

    def __init__(self, num_classes=10, width=1.0, hidden=(512, 512), in_features=None):
        super().__init__()
        sizes = [in_features] + [max(1, int(h * width)) for h in hidden]
        self.hidden = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.fc = nn.Linear(sizes[-1], num_classes)

    def forward(self, x):
        x = _flatten_nhwc(x)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.fc(x)


class VGG(nn.Module):
    """`jaxpoison.models.vgg.VGG`: bias-free 3x3 convs + BatchNorm + ReLU, max-pools, global
    mean, one linear classifier."""

    def __init__(self, num_classes=10, depth=11, width=1.0, in_channels=3):
        super().__init__()
        layers, cin = [], in_channels
        for v in vgg.CFG[depth]:
            if v == "M":
                layers.append("M")
                continue
            cout = max(1, int(v * width))
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1),
                nn.ReLU(inplace=True),
            ]
            cin = cout
        self.layers = nn.ModuleList(m for m in layers if m != "M")
        self.plan = layers
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        it = iter(self.layers)
        for v in self.plan:
            if v == "M":
                if x.shape[2] > 1:
                    x = F.max_pool2d(x, 2)
            else:
                x = next(it)(x)
        return self.fc(x.mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu((x if self.shortcut is None else self.shortcut(x)) + y)


class ResNet18(nn.Module):
    """`jaxpoison.models.resnet.ResNet18`: 3x3 stem without max-pool, BasicBlocks, global mean,
    linear."""

    def __init__(self, num_classes=10, width=1.0, stage_sizes=(2, 2, 2, 2), in_channels=3):
        super().__init__()
        base = max(1, int(64 * width))
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base)
        )
        blocks, cin = [], base
        for i, n in enumerate(stage_sizes):
            for j in range(n):
                cout = base * 2**i
                blocks.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


# Twins built from a name alone (randomly initialised, CIFAR-shaped input; the benchmarks time
# them). `to_torch` builds every twin, the flattening ones included, from a trained model.
MODELS = {
    "cnn_cifar": CifarCNN,
    "vgg11": lambda num_classes=10, width=1.0, **kw: VGG(num_classes, 11, width, **kw),
    "vgg16": lambda num_classes=10, width=1.0, **kw: VGG(num_classes, 16, width, **kw),
    "vgg19": lambda num_classes=10, width=1.0, **kw: VGG(num_classes, 19, width, **kw),
    "resnet18": ResNet18,
}


def _tensor(a):
    return torch.from_numpy(np.array(a, np.float32, order="C"))  # a writable copy


def _put(dst, value, what):
    """Copies `value` into the torch tensor `dst`, refusing another shape."""
    value = np.asarray(value, np.float32)
    if value.shape != tuple(dst.shape):
        raise ValueError(f"{what} of shape {value.shape} does not fit {tuple(dst.shape)}")
    dst.copy_(_tensor(value))


def _conv(dst, p):
    """A flax Conv's kernel [kh, kw, in, out] (and bias) into a torch Conv2d [out, in, kh, kw]."""
    kernel = np.asarray(p["kernel"])
    _put(
        dst.weight,
        np.transpose(kernel, (3, 2, 0, 1)) if kernel.ndim == 4 else kernel,
        "a conv kernel",
    )
    if dst.bias is not None:
        _put(dst.bias, p["bias"], "a conv bias")


def _dense(dst, p):
    kernel = np.asarray(p["kernel"])
    _put(dst.weight, kernel.T if kernel.ndim == 2 else kernel, "a dense kernel")
    _put(dst.bias, p["bias"], "a dense bias")


def _bn(dst, p, stats):
    _put(dst.weight, p["scale"], "a BatchNorm scale")
    _put(dst.bias, p["bias"], "a BatchNorm bias")
    _put(dst.running_mean, stats["mean"], "a BatchNorm mean")
    _put(dst.running_var, stats["var"], "a BatchNorm variance")


# The fields of each flax model its twin builds, besides num_classes, width and dtype (a twin
# computes in float32) and flax's parent and name: a module with any other field away from its
# default (a field added to the flax model, or to a subclass of it) is refused, not exported as
# another network.
_TWIN_FIELDS = {
    cnn.CifarCNN: ("channels", "head"),
    cnn.MnistCNN: ("normalization", "pool"),
    mlp.MLP: ("hidden",),
    vgg.VGG: ("depth",),
    resnet.ResNet: ("block", "stage_sizes"),
}


def _same(value, default):
    """``value == default``, an array compared whole (`np.array_equal`: its ``==`` is
    elementwise)."""
    try:
        return bool(value == default)
    except (ValueError, TypeError):  # an array's truth value is ambiguous
        return bool(np.array_equal(value, default))


def _brief(value):
    """`repr` on one line: an array by its shape and dtype (its repr spans lines)."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"<{np.dtype(value.dtype).name} array of shape {tuple(value.shape)}>"
    return " ".join(repr(value).split())


def _refuse_unbuilt_fields(module):
    """Raises ValueError naming a field of `module` that its twin does not build."""
    base = next((c for c in _TWIN_FIELDS if isinstance(module, c)), None)
    if base is None:
        return  # no twin at all: `_twin` says so
    builds = {"num_classes", "width", "dtype", "parent", "name", *_TWIN_FIELDS[base]}
    for field in dataclasses.fields(module):
        if field.name in builds:
            continue
        value = getattr(module, field.name)
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:  # a required field the twin knows nothing of: any value is another network
            default = dataclasses.MISSING
        if default is dataclasses.MISSING or not _same(value, default):
            takes = (
                ", a field without a default that it knows nothing of"
                if default is dataclasses.MISSING
                else f"; it takes only {field.name}={_brief(default)}"
            )
            raise ValueError(
                f"The PyTorch twin of {type(module).__name__} does not build "
                f"{field.name}={_brief(value)}{takes} (it builds "
                f"{', '.join(sorted(builds - {'parent', 'name'}))})."
            )


def _twin(module, params):
    """The torch twin of the flax `module` and its copy function ``(twin, params, stats)``."""
    _refuse_unbuilt_fields(module)
    k = module.num_classes
    if isinstance(module, cnn.CifarCNN):
        if module.head not in ("mean", "flatten"):
            raise ValueError(f"CifarCNN head={module.head!r}; use 'mean' or 'flatten'.")
        net = CifarCNN(
            k,
            module.width,
            tuple(module.channels),
            module.head,
            in_channels=params["Conv_0"]["kernel"].shape[2],
            in_features=params["Dense_0"]["kernel"].shape[0],
        )

        def copy(net, p, s):
            for i, conv in enumerate(net.convs):
                _conv(conv, p[f"Conv_{i}"])
            _dense(net.fc, p["Dense_0"])

    elif isinstance(module, cnn.MnistCNN):
        net = MnistCNN(
            k,
            module.width,
            in_channels=params["Conv_0"]["kernel"].shape[2],
            in_features=params["Dense_0"]["kernel"].shape[0],
            normalization=module.normalization,
            pool=module.pool,
        )

        def copy(net, p, s):
            _conv(net.conv1, p["Conv_0"])
            _conv(net.conv2, p["Conv_1"])
            _dense(net.fc1, p["Dense_0"])
            _dense(net.fc2, p["Dense_1"])
            if module.normalization == "batch":
                for i, bn in enumerate(net.norms):
                    _bn(bn, p[f"BatchNorm_{i}"], s[f"BatchNorm_{i}"])

    elif isinstance(module, mlp.MLP):
        net = MLP(
            k,
            module.width,
            tuple(module.hidden),
            in_features=params["Dense_0"]["kernel"].shape[0],
        )

        def copy(net, p, s):
            for i, layer in enumerate(net.hidden):
                _dense(layer, p[f"Dense_{i}"])
            _dense(net.fc, p[f"Dense_{len(net.hidden)}"])

    elif isinstance(module, vgg.VGG):
        net = VGG(k, module.depth, module.width, in_channels=params["Conv_0"]["kernel"].shape[2])

        def copy(net, p, s):
            convs = [m for m in net.layers if isinstance(m, nn.Conv2d)]
            norms = [m for m in net.layers if isinstance(m, nn.BatchNorm2d)]
            for i, (conv, bn) in enumerate(zip(convs, norms, strict=True)):
                _conv(conv, p[f"Conv_{i}"])
                _bn(bn, p[f"BatchNorm_{i}"], s[f"BatchNorm_{i}"])
            _dense(net.fc, p["Dense_0"])

    elif isinstance(module, resnet.ResNet) and module.block is resnet.BasicBlock:
        net = ResNet18(
            k,
            module.width,
            tuple(module.stage_sizes),
            in_channels=params["Conv_0"]["kernel"].shape[2],
        )

        def copy(net, p, s):
            _conv(net.stem[0], p["Conv_0"])
            _bn(net.stem[1], p["BatchNorm_0"], s["BatchNorm_0"])
            for i, block in enumerate(net.blocks):
                bp, bs = p[f"BasicBlock_{i}"], s[f"BasicBlock_{i}"]
                _conv(block.conv1, bp["Conv_0"])
                _bn(block.bn1, bp["BatchNorm_0"], bs["BatchNorm_0"])
                _conv(block.conv2, bp["Conv_1"])
                _bn(block.bn2, bp["BatchNorm_1"], bs["BatchNorm_1"])
                if block.shortcut is not None:
                    _conv(block.shortcut[0], bp["Conv_2"])
                    _bn(block.shortcut[1], bp["BatchNorm_2"], bs["BatchNorm_2"])
            _dense(net.fc, p["Dense_0"])

    else:
        raise ValueError(
            f"No PyTorch twin for {type(module).__name__}; to_torch exports "
            "cnn_cifar, cnn_mnist, mlp, vgg11/16/19 and resnet18 (BasicBlock ResNets)."
        )
    return net, copy


def to_torch(module, variables):
    """The PyTorch twin of a trained jaxpoison model, its weights copied in, in eval mode.

    Args:
      module: the flax model (e.g. ``models.make('cnn_cifar', num_classes=10, width=0.5)``,
        or `training.Trainer.module`).
      variables: one model's variables, ``{'params': ..., 'batch_stats': ...}`` (``batch_stats``
        only for models with BatchNorm), e.g. ``{'params': state.params, **state.model_state}``
        of a `TrainState`. A state trained over several seeds has a leading seed axis: pick one
        seed first (``jax.tree.map(lambda a: a[i], state)``).

    Returns:
      A ``torch.nn.Module`` in eval mode with ``requires_grad`` on its parameters, mapping NCHW
      float32 images in [0, 1] to the logits of `module` in eval mode.

    Raises:
      ValueError: `module` has no twin here, or `variables` do not fit it (the message names
        the shapes that do not match; a leading seed axis is the usual cause).
    """
    variables = jax.device_get(variables)
    params, stats = variables["params"], variables.get("batch_stats", {})
    net, copy = _twin(module, params)
    try:
        with torch.no_grad():
            copy(net, params, stats)
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(
            f"The variables do not fit {type(module).__name__} (width {module.width}): {e!s}. "
            "Pass one model's variables (index a leading seed axis first) and the module they "
            "were trained with."
        ) from e
    return net.eval()


def to_nchw(images):
    """NHWC images (numpy or jax) as a contiguous float32 NCHW torch tensor."""
    return _tensor(np.transpose(np.asarray(images), (0, 3, 1, 2)))


def max_logit_difference(net, module, variables, images, *, batch_size=500):
    """max |logits_torch - logits_jax| over `images` (NHWC in [0, 1]), both models in eval mode."""
    worst = 0.0
    for i in range(0, len(images), batch_size):
        x = np.asarray(images[i : i + batch_size], np.float32)
        ours = np.asarray(module.apply(variables, x, train=False))
        with torch.no_grad():
            theirs = net(to_nchw(x)).numpy()
        worst = max(worst, float(np.max(np.abs(ours - theirs))))
    return worst


__all__ = ["MODELS", "load", "max_logit_difference", "to_nchw", "to_torch"]
