"""The victim trainer: one jitted step, seeds on a leading axis, batches split on a Mesh.

The training set lives on the devices (replicated); each step gathers its batch by index inside
the compiled program, so no images cross the host boundary during training. Seeds are a leading
axis of every state array: one compiled program trains them all. The batch axis is split over
the mesh's ``data`` axis (`jaxpoison.sharding`), so the same code runs on one CPU or many
accelerators.

Usage::

    trainer = Trainer.from_config(config.victim, num_classes=10, image_shape=(32, 32, 3))
    states, history = trainer.fit(train_data, key=key, num_seeds=3)
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxpoison import checkpointing, data, losses, models, sharding, specs, transforms
from jaxpoison.privacy import DPSGD
from jaxpoison.progress import progress_bar, say
from jaxpoison.train_state import init_state, make_optimizer, over_seeds, train_step
from jaxpoison.workdir import ARTIFACT_VERSION, array_digest, keyed_dir, plain

# Victim-spec fields that do not change the trained state (left out of checkpoint records).
_NOT_DETERMINING = ("checkpoint_every", "eval_batch_size", "num_seeds", "seed_devices")

try:  # glibc (Linux); elsewhere nothing to call
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
except (AttributeError, OSError, TypeError):
    _MALLOC_TRIM = None


def release_host_memory():
    """Hands the free pages of the process's heap back to the system (glibc's ``malloc_trim``;
    nothing without glibc). Numbers do not change.

    XLA frees most of what a compilation allocates, but glibc keeps the pages of a fragmented
    heap resident: 0.05-0.1 GB per compiled program on full CIFAR-10, adding up over the
    crafting, the victim's step, its evaluations and the checkpoint. `fit` calls it after each
    epoch's steps, the grid trainer after crafting and after each run.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _determining(config):
    """The victim spec fields that change the trained state: what its checkpoints are keyed by.
    Fields at the defaults that predate them (``poison_ratio`` 1, ``model.dtype`` float32) are
    left out, so adding them kept every earlier checkpoint's key."""
    spec = {k: v for k, v in plain(config).items() if k not in _NOT_DETERMINING}
    if spec.get("poison_ratio") == 1.0:
        del spec["poison_ratio"]
    if isinstance(spec.get("model"), dict) and spec["model"].get("dtype") == "float32":
        spec["model"] = {k: v for k, v in spec["model"].items() if k != "dtype"}
    return spec


def _module_key(module):
    """``repr(module)`` without its `models.ADDED_FIELDS` at their defaults (fields added after
    checkpoints were first keyed by the module's repr; a field away from its default keeps its
    line), so adding them kept every earlier checkpoint's key (and the keys of the poisons
    crafted with such surrogates)."""
    added = models.ADDED_FIELDS.get(type(module), {})
    at_default = {f"    {name} = {value!r}" for name, value in added.items()}
    return "\n".join(line for line in repr(module).splitlines() if line not in at_default)


def _on_mesh(method):
    """Runs a `Trainer` method under its mesh (`jax.set_mesh`), where `sharding` finds it."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return method(self, *args, **kwargs)

    return run


@dataclasses.dataclass(frozen=True)
class TrainData:
    """Arrays the trainer reads: images and int labels, as jax arrays.

    Images stay as they came: uint8 (0..255; the clean test and validation sets, a clean or
    uint8 training set) or float32 in [0, 1] (poisoned training images). The compiled step and
    the evaluations convert each batch with `data.device_float`, so uint8 data is held on the
    devices at a quarter of the float size, and the numbers are the same bits either way.

    `digest` (sha256 of every array, uint8 images hashed as the floats they stand for, and the
    augmentation settings, computed on the host by `create`) keys the checkpoints of victims
    trained on it.

    `stream`: a `data.streaming.Stream`, the training split read from disk batch by batch (and
    its poison applied in the step) instead of `x_train` and `y_train`, which are then None.
    """

    x_train: jax.Array | None
    y_train: jax.Array | None
    x_test: jax.Array
    y_test: jax.Array
    x_val: jax.Array | None = None
    y_val: jax.Array | None = None
    crop_padding: int = 0
    flip: bool = False
    digest: str = ""
    x_clean: jax.Array | None = None
    stream: data.streaming.Stream | None = None

    @property
    def num_train(self):
        """The number of training examples."""
        return self.stream.num_examples if self.stream is not None else self.y_train.shape[0]

    @classmethod
    def create(
        cls,
        x_train,
        y_train,
        x_test,
        y_test,
        x_val=None,
        y_val=None,
        *,
        crop_padding=0,
        flip=False,
        mesh=None,
        x_clean=None,
        stream=None,
    ):
        """Moves arrays to the devices, the training images split along the mesh's ``data``
        axis (`sharding.place_examples`), the rest replicated: uint8 images as they are, others
        through `data.as_float_images` (floats in [0, 1]; NaN, inf, channel-first and other
        ranges refused).
        `x_clean`: the clean images of a poisoned `x_train`, example by example, for a victim's
        ``poison_ratio`` (None when not needed).
        `stream`: a `data.streaming.Stream` of the training split, with `x_train`, `y_train`
        and `x_clean` None."""
        if (stream is None) == (x_train is None) or (stream is not None and x_clean is not None):
            raise data.DataError(
                "TrainData: pass the training images either as x_train and y_train or as a "
                "stream (then x_train=None, y_train=None and no x_clean)."
            )
        mesh = mesh or sharding.data_mesh()
        rep = sharding.replicated(mesh)

        def images(a, split):
            if a is None or len(a) == 0:
                return None
            a = np.asarray(a)
            if a.dtype == np.uint8:
                data.check_image_shape(a.shape, f"TrainData: {split} images")
                return a
            return data.as_float_images(a, what=f"TrainData: {split} images")

        def labels(a, x, split):
            if x is None:
                return None
            a = np.asarray(a)
            if a.shape != (len(x),):
                raise data.DataError(
                    f"TrainData: {split} labels of shape {a.shape} for {len(x)} images; pass "
                    "one integer label per image."
                )
            return a.astype(np.int32)

        xs = [images(x_train, "train"), images(x_test, "test"), images(x_val, "val")]
        splits = ("train", "test", "val")
        ys = [labels(y, x, n) for y, x, n in zip((y_train, y_test, y_val), xs, splits, strict=True)]
        clean = images(x_clean, "clean train")
        if clean is not None and clean.shape != xs[0].shape:
            raise data.DataError(
                f"TrainData: clean images of shape {clean.shape} for training images of shape "
                f"{xs[0].shape}; pass the clean version of every training image."
            )
        arrays = [xs[0], ys[0], xs[1], ys[1], xs[2], ys[2]]
        extra = [] if clean is None else [clean]
        streamed = [] if stream is None else [np.frombuffer(bytes.fromhex(stream.digest), "u4")]
        digest = array_digest(
            *arrays,
            *extra,
            *streamed,
            np.asarray([crop_padding, int(flip)]),
            uint8_as=data.as_float_images,
        )
        placed = [
            None
            if a is None
            else sharding.place_examples(a, mesh)
            if i in (0, 6)  # training images (and their clean twins): split along the examples
            else jax.device_put(a, rep)
            for i, a in enumerate([*arrays, clean])
        ]
        return cls(*placed[:6], crop_padding, flip, digest, placed[6], stream)

    def on(self, mesh):
        """These arrays placed on `mesh` as `create` places them (itself if they are there)."""
        if getattr(self.x_test.sharding, "mesh", None) == mesh:
            return self
        rep = sharding.replicated(mesh)
        moved = {
            k: sharding.place_examples(a, mesh)
            if k in ("x_train", "x_clean")
            else jax.device_put(a, rep)
            for k in ("x_train", "y_train", "x_test", "y_test", "x_val", "y_val", "x_clean")
            if (a := getattr(self, k)) is not None
        }
        return dataclasses.replace(self, **moved)


@dataclasses.dataclass
class Trainer:
    """Trains victims with a pluggable objective. Build with `from_config`.

    Attributes:
      module: the flax model.
      objective: ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)``; its batch
        holds ``image``, ``label``, ``index`` and the float32 scalars ``progress`` (fraction of
        the schedule done, in [0, 1)) and ``epoch`` (see `train_step`).
      epochs, batch_size, eval_batch_size: loop sizes.
      optimizer_kwargs: keyword arguments of `make_optimizer` (without epochs/steps_per_epoch).
      checkpoint_every: save every this many epochs (0 = only at the end) when given a directory.
      spec: the plain victim spec that built it (set by `from_config`); checkpoints are keyed by
        it (see `record`), so a `Trainer` built by hand needs one to checkpoint.
      transforms: the defense's data-side `transforms.Pipeline` (the objective spec's
        ``transforms``): dataset-stage ones applied by `purified`, batch-stage ones in the step.
      privacy: DP-SGD's settings (the objective spec's ``privacy``), or None.
      poison_ratio: the share of every batch trained on its poisoned images, the rest on their
        clean ones (``victim.poison_ratio``, APBench's ratio; 1 = all poisoned); below 1 the
        training data needs ``x_clean``.
    """

    module: Any
    objective: Callable
    image_shape: tuple
    epochs: int
    batch_size: int
    optimizer_kwargs: dict
    eval_batch_size: int = 500
    checkpoint_every: int = 1
    seed_strategy: str = "auto"
    mesh: Mesh | None = None
    spec: dict | None = None
    transforms: transforms.Pipeline = dataclasses.field(default_factory=transforms.Pipeline)
    privacy: DPSGD | None = None
    poison_ratio: float = 1.0

    @classmethod
    def from_config(cls, config, *, num_classes, image_shape, mesh=None):
        """From a `victim` ConfigDict: model{name,width}, objective{name,...}, optimizer{...}."""
        model = dict(plain(config.model))  # name, width and the model's own fields (dtype, ...)
        module = models.make(model.pop("name"), num_classes=num_classes, **model)
        defense = specs.defense(config.get("objective", {"name": "erm"}), num_classes=num_classes)
        ratio = config.get("poison_ratio", 1.0)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(
                f"victim.poison_ratio={ratio!r} must lie in (0, 1]: the share of every batch that "
                "stays poisoned (APBench's ratio / 100; 1 poisons every example)."
            )
        if defense.privacy is not None:
            shapes = jax.eval_shape(
                lambda: models.init(module, jax.random.key(0), tuple(image_shape))
            )
            stats = sorted(k for k in shapes if k != "params")
            if stats:
                raise ValueError(
                    f"DP-SGD (privacy) needs per-example gradients, but model "
                    f"{config.model.name!r} keeps {stats} (BatchNorm couples the examples of a "
                    "batch); use a model without it, e.g. cnn_cifar, cnn_mnist or mlp."
                )
        if mesh is None:
            mesh = sharding.data_mesh(seeds=config.get("seed_devices", 1))
        return cls(
            module=module,
            objective=defense.objective,
            image_shape=tuple(image_shape),
            epochs=config.epochs,
            batch_size=config.batch_size,
            optimizer_kwargs=dict(config.optimizer),
            eval_batch_size=config.get("eval_batch_size", 500),
            checkpoint_every=config.get("checkpoint_every", 1),
            seed_strategy=config.get("seed_strategy", "auto"),
            mesh=mesh,
            spec=_determining(config),
            transforms=defense.transforms,
            privacy=defense.privacy,
            poison_ratio=ratio,
        )

    def __post_init__(self):
        self.mesh = self.mesh or sharding.data_mesh()
        self.apply_fn = models.make_apply_fn(self.module)
        self._compiled = {}

    # ----- pure functions of one seed ------------------------------------------------------------

    def optimizer(self, steps_per_epoch):
        return make_optimizer(
            epochs=self.epochs, steps_per_epoch=steps_per_epoch, **self.optimizer_kwargs
        )

    def init(self, key, steps_per_epoch):
        """A fresh `TrainState` for one seed."""
        return init_state(self.module, key, self.image_shape, self.optimizer(steps_per_epoch))

    def predict(self, state, x):
        """Eval-mode logits of one seed on a batch."""
        return self.apply_fn({"params": state.params, **state.model_state}, x, train=False)[0]

    # ----- compiled, vmapped over seeds ----------------------------------------------------------

    def compiled_step(self, steps_per_epoch, crop_padding, flip, mixed=False, stream=None):
        """The jitted multi-seed step ``(states, x, y, idx[S,B], keys[S]) -> (states, metrics)``;
        with `mixed`, ``(states, x, y, idx, keys, x_clean)``: the first ``floor(poison_ratio *
        B)`` positions of each (shuffled) batch take their poisoned image, the others their
        clean one (APBench's poison ratio, a new draw of which examples every epoch).

        With `stream` (a `data.streaming.Stream`): ``(states, image, label, idx, keys,
        poison_state)``, the batch itself as read from disk (uint8 images [S, B, H, W, C] and
        labels [S, B]), the stream's poison applied to it by `idx` inside the step (then
        `mixed` keeps the images as read at the clean positions)."""
        apply = None if stream is None else stream.poison_apply
        cache_key = ("step", steps_per_epoch, crop_padding, flip, mixed, stream is not None, apply)
        if cache_key not in self._compiled:
            tx = self.optimizer(steps_per_epoch)
            poisoned = int(self.poison_ratio * self.batch_size)

            def step(states, x, y, idx, keys, extra=None):
                # idx is [S, B]: the batch axis is 1. In memory x, y are the training set and
                # extra its clean images; streamed x, y are the batch and extra the poison state.
                if stream is None:
                    image, label = data.device_float(sharding.gather_examples(x, idx)), y[idx]
                    if mixed:
                        clean = data.device_float(sharding.gather_examples(extra, idx))
                else:
                    image = clean = data.device_float(x)
                    label = y
                    if apply is not None:
                        batch = {"image": image, "label": label, "index": idx}
                        batch = jax.vmap(apply, in_axes=(None, 0))(extra, batch)
                        image, label = batch["image"], batch["label"]
                if mixed:
                    keep = (jnp.arange(idx.shape[1]) < poisoned).reshape(1, -1, 1, 1, 1)
                    image = jnp.where(keep, image, clean)
                batch = sharding.batch({"image": image, "label": label, "index": idx}, axis=1)
                one = lambda s, b, k: train_step(
                    s,
                    b,
                    k,
                    apply_fn=self.apply_fn,
                    objective=self.objective,
                    tx=tx,
                    crop_padding=crop_padding,
                    flip=flip,
                    schedule=(self.epochs, steps_per_epoch),
                    augment=self.transforms.augment if self.transforms.batch else None,
                    private=self.privacy,
                )
                return over_seeds(one, self.seed_strategy)(states, batch, keys)

            # The seeds split along the mesh's ``seed`` axis, if it has one.
            streamed = stream is not None  # a streamed batch leads with the seeds, a dataset not
            seeded = (True, streamed, streamed, True, True) + ((False,) * (mixed or streamed))
            body = sharding.over_seed_axis(step, self.mesh, seeded)
            self._compiled[cache_key] = jax.jit(body, donate_argnums=0)
        return self._compiled[cache_key]

    def privacy_spent(self, num_examples, epochs=None):
        """DP-SGD's guarantee after training on `num_examples` for `epochs` (default: the
        schedule): ``{'epsilon', 'delta', 'noise_multiplier', 'l2_norm_clip', 'steps',
        'sampling_rate'}``, or None without DP-SGD."""
        if self.privacy is None:
            return None
        steps = (self.epochs if epochs is None else epochs) * (num_examples // self.batch_size)
        return {
            "epsilon": self.privacy.epsilon(
                num_examples=num_examples, batch_size=self.batch_size, steps=steps
            ),
            "delta": self.privacy.delta,
            "noise_multiplier": self.privacy.noise_multiplier,
            "l2_norm_clip": self.privacy.l2_norm_clip,
            "steps": steps,
            "sampling_rate": self.batch_size / num_examples,
        }

    def purified(self, train_data, key):
        """`train_data` with its training images through the dataset-stage transforms (once,
        compiled, on the devices); unchanged without any."""
        if not self.transforms.dataset:
            return train_data
        fn = self._cached(
            "purify",
            None,
            lambda: jax.jit(
                lambda k, x, y: sharding.examples(
                    self.transforms.purify(k, data.device_float(x), y), x.shape[0]
                )
            ),
        )
        purify_key = jax.random.fold_in(key, 3)
        x = fn(purify_key, train_data.x_train, train_data.y_train)
        clean = train_data.x_clean
        if clean is not None:
            clean = fn(purify_key, clean, train_data.y_train)
        return dataclasses.replace(train_data, x_train=x, x_clean=clean)

    def evaluate(self, states, x, y):
        """Eval-mode accuracy and mean loss of every seed on (x, y): dict of [S] arrays.

        `x`: uint8 images (kept uint8, converted per batch) or floats in [0, 1]
        (`data.as_float_images`), `y`: int labels.
        """
        if getattr(x, "dtype", None) == np.uint8:
            data.check_image_shape(np.shape(x), "Trainer.evaluate: images")
        else:
            x = data.as_float_images(x, what="Trainer.evaluate: images")
        if len(y) != len(x):
            raise data.DataError(
                f"Trainer.evaluate: {len(y)} labels for {len(x)} images; pass one label per image."
            )
        return self._evaluate_checked(states, x, jnp.asarray(y, jnp.int32))

    def _evaluate_checked(self, states, x, y):
        """`evaluate` of checked images: uint8, or float32 in [0, 1] (the `TrainData` arrays)."""
        batch_size = min(self.eval_batch_size, len(y))
        if ("eval", batch_size) not in self._compiled:
            fn = functools.partial(self._evaluate, batch_size=batch_size)
            self._compiled[("eval", batch_size)] = jax.jit(
                sharding.over_seed_axis(fn, self.mesh, (True, False, False)),
                out_shardings=sharding.replicated(self.mesh),  # [S] numbers every host reads
            )
        with jax.set_mesh(self.mesh):
            return self._compiled[("eval", batch_size)](states, x, y)

    def _evaluate(self, states, x, y, batch_size):
        n = y.shape[0]
        n_dev = self.mesh.devices.size
        batch_size = -(-batch_size // n_dev) * n_dev
        num_batches = -(-n // batch_size)
        pad = num_batches * batch_size - n
        xb = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(
            num_batches, batch_size, *x.shape[1:]
        )
        yb = jnp.pad(y, (0, pad)).reshape(num_batches, batch_size)
        mask = (jnp.arange(num_batches * batch_size) < n).reshape(num_batches, batch_size)

        def per_batch(inputs):
            xs, ys, ms = inputs
            xs = sharding.batch(data.device_float(xs))
            predict = over_seeds(lambda s: self.predict(s, xs), self.seed_strategy)
            logits = predict(states)  # [S, B, K]
            correct = jnp.sum(jax.vmap(losses.accuracy, (0, None))(logits, ys) * ms, axis=1)
            loss = jnp.sum(jax.vmap(losses.cross_entropy, (0, None))(logits, ys) * ms, axis=1)
            return correct, loss

        correct, loss = jax.lax.map(per_batch, (xb, yb, mask))
        return {"accuracy": correct.sum(0) / n, "loss": loss.sum(0) / n}

    # ----- the loop ------------------------------------------------------------------------------

    def record(self, train_data, *, key, num_seeds):
        """What determines the victims `fit` trains: the content-key record of their checkpoints.

        Raises:
          ValueError: for a `Trainer` without `spec` (its objective and model are code, not data).
        """
        if self.spec is None:
            raise ValueError(
                "this Trainer has no spec, so its checkpoints cannot be keyed; build it with "
                "Trainer.from_config, pass spec= (the dict that determines it), or fit without "
                "ckpt_dir."
            )
        record = {
            "kind": "victim",
            "version": ARTIFACT_VERSION,
            "trainer": self.spec,
            "module": _module_key(self.module),
            "image_shape": list(self.image_shape),
            "data": train_data.digest,
            "key": key,
            "num_seeds": int(num_seeds),
        }
        if self.transforms.identity:  # e.g. a score model's sha256; absent: the key is unchanged
            record["transforms"] = [[name, ident] for name, ident in self.transforms.identity]
        return record

    def checkpoint_dir(self, ckpt_root, train_data, *, key, num_seeds):
        """``ckpt_root/<content key of record>``: where `fit` keeps these victims' checkpoints."""
        return keyed_dir(ckpt_root, self.record(train_data, key=key, num_seeds=num_seeds))

    def _steps(self, a, *, axis):
        """The entries of `a` along `axis`, one per step, each sliced on the devices by a cursor
        that stays there: no transfer per step, one small program. (`jnp.unstack` compiles one
        program with an output per step: 0.75 GB of host memory and ~50 s for 781 steps.)"""
        take = self._cached(
            "take",
            axis,
            lambda: jax.jit(
                lambda a, i: (jax.lax.dynamic_index_in_dim(a, i, axis, keepdims=False), i + 1)
            ),
        )
        cursor = jnp.zeros((), jnp.int32)
        for _ in range(a.shape[axis]):
            entry, cursor = take(a, cursor)
            yield entry

    def _cached(self, name, arg, build):
        """A jitted helper built once per (name, arg), so repeated `fit` calls reuse it."""
        if (name, arg) not in self._compiled:
            self._compiled[(name, arg)] = build()
        return self._compiled[(name, arg)]

    def _untrained_history(self, states, train_data):
        """The history of an untrained victim (``epochs=0``): one entry, its initialisation.

        ``train/*`` are the eval-mode loss and accuracy on the training set (no step was taken to
        average over), the other splits as after an epoch.
        """
        record = {
            f"train/{k}": v
            for k, v in self._evaluate_checked(
                states, train_data.x_train, train_data.y_train
            ).items()
        }
        for split in ("test", "val"):
            x, y = getattr(train_data, f"x_{split}"), getattr(train_data, f"y_{split}")
            if x is not None:
                record |= {
                    f"{split}/{k}": v for k, v in self._evaluate_checked(states, x, y).items()
                }
        return {
            k: [[float(a) for a in np.atleast_1d(v)]] for k, v in jax.device_get(record).items()
        }

    def init_seeds(self, key, num_seeds, steps_per_epoch):
        keys = jax.random.split(jax.random.fold_in(key, 0), num_seeds)
        init = self._cached(
            "init",
            steps_per_epoch,
            lambda: jax.jit(jax.vmap(lambda k: self.init(k, steps_per_epoch))),
        )
        states = init(keys)
        # Placed as the compiled step returns them (replicated, or split along ``seed``):
        # otherwise the step compiles twice.
        return jax.device_put(states, sharding.seed_sharding(self.mesh))

    @_on_mesh
    def fit(
        self,
        train_data: TrainData,
        *,
        key,
        num_seeds=1,
        ckpt_dir=None,
        name="",
        progress=True,
        epoch_callback=None,
        epochs=None,
    ):
        """Trains `num_seeds` victims at once and evaluates them on the test set after every epoch.

        Args:
          train_data: a `TrainData`.
          key: PRNG key of this run; seed s uses ``fold_in``-derived keys of it.
          num_seeds: victims trained in parallel (a leading axis of every state array).
          ckpt_dir: if given, the state and history are saved every `checkpoint_every` epochs
            under ``ckpt_dir/<key>`` (`checkpoint_dir`: the content key of everything that
            determines these victims) and a run that finds a checkpoint there resumes from it; a
            changed spec, data or key gets a new directory and trains afresh.
          name: shown on the progress bar.
          progress: show a progress bar.
          epoch_callback: optional ``f(epoch, states, history)`` called after each epoch.
          epochs: stop after this many epochs of the schedule (default `self.epochs`, the whole
            schedule; the learning-rate schedule always spans `self.epochs`). ``0`` returns the
            untrained victim, e.g. the *Naive* model of Tao et al. 2022.

        Returns:
          (states, history), history mapping ``train/loss``, ``train/accuracy``,
          ``test/accuracy``, ``test/loss`` (and ``val/accuracy``, ``val/loss``) to lists over
          epochs of lists over seeds. With zero epochs (``epochs=0`` here or in the config) the
          states are the initialisation and the history holds one entry, its evaluation (see
          `_untrained_history`).
        """
        stop = self.epochs if epochs is None else epochs
        if not 0 <= stop <= self.epochs:
            raise ValueError(f"epochs={epochs} must lie in [0, {self.epochs}] (the schedule).")
        n = train_data.num_train
        steps_per_epoch = n // self.batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"batch_size={self.batch_size} exceeds the {n} training examples.")
        sharding.note_indivisible(f"{name or 'train'}: batch_size", self.batch_size, self.mesh)
        groups = sharding.seed_devices(self.mesh)
        if num_seeds % groups:
            raise ValueError(
                f"num_seeds={num_seeds} victims cannot be split over the mesh's {groups} seed "
                f"devices (victim.seed_devices); use a multiple of {groups} seeds."
            )
        stream = train_data.stream
        refused = stream is not None and (
            "dataset-stage transforms (purification) need the training set in memory"
            if self.transforms.dataset
            else "victim.seed_devices > 1 is not supported"
            if groups > 1
            else "an untrained victim (epochs=0) is evaluated on the whole training set"
            if stop == 0
            else ""
        )
        if refused:
            raise ValueError(
                f"{name or 'train'}: streamed training data: {refused}; train from in-memory "
                "TrainData (x_train, y_train) instead."
            )
        train_data = self.purified(train_data.on(self.mesh), key)
        mixed = self.poison_ratio < 1.0
        if mixed and train_data.x_clean is None and stream is None:
            raise ValueError(
                f"victim.poison_ratio={self.poison_ratio} mixes clean images into each batch, but "
                "the training data has none: build it with train_data_from(..., x_clean=...)."
            )
        step_fn = self.compiled_step(
            steps_per_epoch, train_data.crop_padding, train_data.flip, mixed, stream
        )
        extra = (stream.poison_state,) if stream else (train_data.x_clean,) if mixed else ()
        seed_keys = jax.random.split(key, num_seeds)
        perm_fn = self._cached(
            "perms",
            n,
            lambda: jax.jit(
                jax.vmap(
                    lambda k, e: data.epoch_batches(
                        jax.random.fold_in(jax.random.fold_in(k, 1), e), n, self.batch_size
                    ),
                    in_axes=(0, None),
                )
            ),
        )
        # Step s of seed k uses fold_in(fold_in(k, 2), s); one call draws a whole epoch's keys
        # [steps, seeds], so the step loop below moves nothing from the host to the devices.
        epoch_keys_fn = self._cached(
            "epoch_keys",
            steps_per_epoch,
            lambda: jax.jit(
                lambda ks, e: jax.vmap(
                    lambda s: jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, 2), s))(
                        ks
                    )
                )(e * steps_per_epoch + jnp.arange(steps_per_epoch))
            ),
        )

        manager = None
        if ckpt_dir:
            record = self.record(train_data, key=key, num_seeds=num_seeds)
            manager = checkpointing.Manager(keyed_dir(ckpt_dir, record), record=record)
        history, start_epoch = {}, 0
        states = self.init_seeds(key, num_seeds, steps_per_epoch)
        if manager is not None and manager.latest_step() is not None:
            states, history, start_epoch = manager.restore(states)
            say(f"{name or 'train'}: resumed from epoch {start_epoch} ({manager.directory})")
        states = jax.device_put(states, sharding.seed_sharding(self.mesh))

        if stop == 0 and not history:
            history = self._untrained_history(states, train_data)
        bar = progress_bar(
            total=stop * steps_per_epoch,
            initial=start_epoch * steps_per_epoch,
            desc=name or "train",
            disable=not progress,
        )
        for epoch in range(start_epoch, stop):
            # Per step [seeds, batch] indices and [seeds] keys, split on the devices up front;
            # streamed, the order goes to the host once and the batches come back read from disk.
            order = perm_fn(seed_keys, epoch)
            if stream is None:
                inputs = (
                    (train_data.x_train, train_data.y_train, b) for b in self._steps(order, axis=1)
                )
            else:
                inputs = stream.epoch(order, self.mesh)
            step_keys = self._steps(epoch_keys_fn(seed_keys, epoch), axis=0)
            sums = None
            for batch, step_key in zip(inputs, step_keys, strict=True):
                states, metrics = step_fn(states, *batch, step_key, *extra)
                sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
                bar.update(1, pending=metrics)
            record = {f"train/{k}": v / steps_per_epoch for k, v in sums.items()}
            release_host_memory()  # what compiling the step left behind
            for split in ("test", "val"):
                x, y = getattr(train_data, f"x_{split}"), getattr(train_data, f"y_{split}")
                if x is not None:
                    record |= {
                        f"{split}/{k}": v for k, v in self._evaluate_checked(states, x, y).items()
                    }
            # Every host reads the [S] numbers (split along ``seed`` if the mesh has it).
            record = jax.device_get(jax.device_put(record, sharding.replicated(self.mesh)))
            if not all(np.isfinite(v).all() for v in record.values()):
                raise FloatingPointError(
                    f"{name}: non-finite metrics at epoch {epoch + 1}: {record}"
                    "; lower the learning rate or check the data."
                )
            for k, v in record.items():
                history.setdefault(k, []).append([float(a) for a in np.atleast_1d(v)])
            bar.set_postfix(
                epoch=epoch + 1,
                loss=f"{np.mean(record['train/loss']):.3f}",
                test_acc=f"{np.mean(record['test/accuracy']):.3f}",
            )
            bar.log(
                f"{name} epoch {epoch + 1}/{stop} "
                + " ".join(f"{k}={np.mean(v):.4f}" for k, v in record.items())
            )
            if epoch_callback is not None:
                epoch_callback(epoch, states, history)
            done = epoch + 1
            if manager is not None and (
                done == stop or (self.checkpoint_every and done % self.checkpoint_every == 0)
            ):
                manager.save(done, states, history)
        bar.close()
        if manager is not None:
            manager.close()
        return states, history


def train_data_from(
    x_train,
    y_train,
    dataset: data.Dataset,
    *,
    x_val=None,
    y_val=None,
    crop_padding=0,
    flip=False,
    mesh=None,
    x_clean=None,
):
    """`TrainData` for training images (possibly poisoned) and the clean test set of `dataset`;
    `x_clean`, the clean version of each training image, for a victim's ``poison_ratio``."""
    return TrainData.create(
        x_train,
        y_train,
        dataset.x_test,
        dataset.y_test,
        x_val,
        y_val,
        crop_padding=crop_padding,
        flip=flip,
        mesh=mesh,
        x_clean=x_clean,
    )


__all__ = ["TrainData", "Trainer", "release_host_memory", "train_data_from"]
