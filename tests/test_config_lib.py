"""The configs of configs/ and their shared pieces (`jaxpoison.config_lib`), without training.

Every config loads at full and tiny size, takes the same data overrides and ordinary
``--config.a.b=v`` overrides as ml_collections' flags resolve them, `tiny` shrinks sizes and
nothing else, and the presets and overrides that replaced the old ``:a=b`` options set what
they say.
"""

import importlib.util
from pathlib import Path

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from jaxpoison import config_lib, specs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.py"))
TRAINERS = {"grid", "streamed", "gaussian_theory", "simplicity_bias", "rotation_ssl", "score_model"}
# The theory trainer draws its own Gaussian data: no data block, nothing for data overrides.
NO_DATA = {"configs/gaussian_theory.py"}
MNIST = ("--config.data.source=npz", "--config.data.name=mnist")


def parse(config_arg, *overrides):
    """The config that ``jaxpoison --config=<config_arg> <overrides>`` runs."""
    argv = ["jaxpoison", f"--config={REPO / config_arg}", *overrides]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return holder.value


def load(name, arg=None):
    return parse(f"configs/{name}.py" + (f":{arg}" if arg else ""))


def get_config(path, arg):
    """``get_config(arg)`` of the config file `path`, called directly (the flag wraps errors)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def flat(config, prefix=""):
    """{dotted path: value} of every leaf."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_configs_are_found():
    assert len(CONFIGS) >= 20 and "configs/quickstart.py" in CONFIGS


@pytest.mark.parametrize("tiny", [False, True], ids=["full", "tiny"])
@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_takes_the_same_data_overrides(path, tiny):
    arg = path + (":tiny" if tiny else "")
    plain = parse(arg)
    assert plain.trainer in TRAINERS and plain.name
    if path in NO_DATA:
        assert "data" not in plain and plain.trainer == "gaussian_theory"
        return
    assert set(plain.data) == set(config_lib.data())
    config = parse(arg, *MNIST, "--config.data.data_dir=/data/mnist", "--config.data.num_train=300")
    assert config.data.to_dict() == dict(
        plain.data.to_dict(), source="npz", name="mnist", data_dir="/data/mnist", num_train=300
    )
    assert {k: v for k, v in flat(config).items() if not k.startswith("data.")} == {
        k: v for k, v in flat(plain).items() if not k.startswith("data.")
    }


# (image shape, classes) of the datasets the configs name.
SHAPES = {"cifar10": ((32, 32, 3), 10), "mnist": ((28, 28, 1), 10)}


@pytest.mark.parametrize("path", [p for p in CONFIGS if parse(p).trainer == "grid"])
def test_every_config_passes_the_spec_check_of_its_data(path):
    """What a run checks before any work: every selected model and poison builds for the data
    the config names (Regions-1 on CIFAR-10 once failed this in the shipped poison family)."""
    config = parse(path)
    image_shape, num_classes = SHAPES[config.data.name]
    specs.check(config, image_shape=image_shape, num_classes=num_classes)


@pytest.mark.parametrize("path", CONFIGS)
def test_crafting_models_follow_the_data(path):
    """On MNIST-shaped data the surrogate and the error-minimizing model become cnn_mnist; a
    crafting model named on purpose (APBench's ResNet-18 in a GPU-sized config) must at least
    take MNIST's images."""
    config = parse(path, *MNIST) if path not in NO_DATA else parse(path)
    if "surrogate" in config:
        assert config.surrogate.model.name == "auto"
    for run, spec in config.get("poisons", {}).items():
        if "model" in spec and spec.model.name != "auto":
            specs.model_spec(spec.model, (28, 28, 1), num_classes=10, what=run)


@pytest.mark.parametrize("path", CONFIGS)
def test_tiny_shrinks_sizes_and_nothing_else(path):
    full, tiny = flat(parse(path)), flat(parse(path + ":tiny"))
    assert full.keys() == tiny.keys()
    for key, value in tiny.items():
        block, last = key.split(".")[0], key.split(".")[-1]
        capped = block in ("victim", "surrogate", "victims", "poisons", "objectives", "evals")
        if capped and last in config_lib.TINY_CAPS and not isinstance(value, bool):
            assert value == min(full[key], config_lib.TINY_CAPS[last]), key
        elif key in ("data.num_train", "data.num_test"):
            assert value == config_lib.TINY_DATA[last]
        elif key == "data.val_size":
            assert value == min(full[key], 20)
        elif block not in ("ssl", "theory"):  # a study's own block, shrunk by its config
            assert value == full[key], key
    if "victim.epochs" in tiny:
        assert tiny["victim.epochs"] <= 2 and tiny["victim.model.width"] <= 0.125


@pytest.mark.parametrize("path", CONFIGS)
def test_old_options_are_refused_naming_the_override(path):
    for arg in ("epochs=20", "only=random+regions", "tiny,tiny", "tiny,"):
        with pytest.raises(ValueError, match="Unknown config argument") as info:
            get_config(path, arg)
        message = str(info.value)
        assert "\n" not in message and "--config.<field>=<value>" in message
    with pytest.raises(flags.IllegalFlagValueError, match="--config.victim.epochs=20"):
        parse(path + ":epochs=20")  # what the command line says


@pytest.mark.parametrize(
    "name, arg, match",
    [
        ("poison_family", "static,crafted", "static and crafted exclude each other"),
        ("defenses_cifar10", "small,family", "small and family exclude each other"),
        ("quickstart", "family", "takes only tiny"),
        ("defenses_cifar10", "familly", "takes tiny, small, family or sweep"),
    ],
)
def test_preset_conflicts_and_typos(name, arg, match):
    with pytest.raises(ValueError, match=match):
        get_config(f"configs/{name}.py", arg)


def test_fields_of_unselected_runs_and_selections_are_ordinary_overrides():
    config = parse(
        "configs/poison_family.py:static",
        "--config.poisons.error_minimizing.num_epochs=3",
        "--config.surrogate.epochs=2",
    )
    assert config.select.poisons == config_lib.STATIC and config.include_clean
    assert set(config.poisons) == set(config_lib.FAMILY_SPECS)
    assert config.poisons.error_minimizing.num_epochs == 3 and config.surrogate.epochs == 2
    crafted = load("poison_family", "crafted")
    assert not crafted.include_clean
    assert set(crafted.select.poisons) == set(config_lib.FAMILY_SPECS) - set(config_lib.STATIC)
    picked = parse(
        "configs/poison_family.py",
        "--config.select.poisons=('random','regions')",
        "--config.victim.epochs=20",
    )
    assert picked.select.poisons == ("random", "regions") and picked.victim.epochs == 20
    # Repeated flags build a tuple too.
    repeated = parse(
        "configs/poison_family.py",
        "--config.select.poisons=random",
        "--config.select.poisons=regions",
    )
    assert repeated.select.poisons == ("random", "regions")


def test_defenses_overrides_that_replaced_the_options():
    config = parse(
        "configs/defenses_cifar10.py:family",
        "--config.select.objectives=('erm','gairat')",
        "--config.select.poisons=('regions4',)",
        "--config.include_clean=False",
        "--config.victim.epochs=20",
        "--config.data.val_size=250",
        "--config.victim.optimizer.warmup_epochs=2",
        "--config.objectives.gairat.begin=0.5",
    )
    assert config.select.objectives == ("erm", "gairat") and config.select.poisons == ("regions4",)
    assert not config.include_clean and config.victim.epochs == 20 and config.data.val_size == 250
    assert config.victim.optimizer.warmup_epochs == 2.0 and config.objectives.gairat.begin == 0.5
    assert load("defenses_cifar10", "family").objectives.gairat.begin is None
    # One defender radius for every defense; the attacker's stays.
    wider = parse("configs/defenses_cifar10.py:family", "--config.defender_epsilon=0.0625")
    for label, spec in wider.objectives.items():
        if "epsilon" in spec:
            assert spec.epsilon == 0.0625, label
    assert wider.objectives.fast_at.step_size == pytest.approx(1.25 * 0.0625)
    assert wider.threat.epsilon == pytest.approx(8 / 255)


def test_defenses_presets():
    from jaxpoison import objectives

    full = load("defenses_cifar10")
    assert set(full.objectives) == set(objectives.OBJECTIVES) and full.select.objectives == ()
    assert full.data.num_train == 10000 and full.objectives.pgd_at.num_steps == 10
    small = load("defenses_cifar10", "small")
    assert small.select.poisons == ("P5_random", "regions4")
    assert small.select.objectives == ("erm", "pgd_at") and small.objectives.pgd_at.num_steps == 5
    assert (small.data.num_train, small.victim.epochs, small.victim.model.width) == (5000, 10, 0.5)
    family = load("defenses_cifar10", "family")
    assert family.objectives.fast_at.num_steps == 1 and family.data.num_train == 2500
    sweep = load("defenses_cifar10", "family,sweep")
    assert sweep.budget_sweep.objective == "pgd_at"
    assert set(sweep.select.objectives) == {"erm", "pgd_at"} | {
        f"pgd_at_eps{k}" for k in (2, 4, 12, 16)
    }
    for k in (2, 4, 12, 16):
        eps4 = sweep.objectives[f"pgd_at_eps{k}"]
        assert eps4.epsilon == pytest.approx(k / 255) and eps4.step_size == pytest.approx(k / 1020)
        assert eps4.num_steps == family.objectives.pgd_at.num_steps
    assert set(sweep.objectives) > set(family.objectives)  # every spec stays
    own = load("defenses_cifar10", "sweep")  # the sweep on the config's own settings too
    assert own.budget_sweep.objective == "pgd_at" and "evals" not in own
    assert set(own.select.objectives) == set(sweep.select.objectives)


def test_family_presets_share_the_poison_family_settings():
    """So artifacts and surrogates of a poison_family workdir are those of the other configs."""
    family = load("poison_family")
    defenses = load("defenses_cifar10", "family")
    rotation = load("rotation_ssl", "family")
    runs = {
        "P1_adversarial": "adversarial",
        "P5_random": "random",
        "error_minimizing_class_wise": "error_minimizing_class_wise",
        "regions4": "regions",
    }
    for run, key in runs.items():
        assert defenses.poisons[run].to_dict() == family.poisons[key].to_dict(), run
    assert rotation.poisons.regions4.to_dict() == family.poisons.regions.to_dict()
    for config in (defenses, rotation):
        assert config.surrogate.to_dict() == family.surrogate.to_dict()
    assert defenses.data.to_dict() == family.data.to_dict()
    assert rotation.data.to_dict() == dict(family.data.to_dict(), crop_padding=4)
    # The L2C run is configs/l2c_cifar10.py:cpu's generator, Algorithm 2, 32 epochs, its ε.
    l2c = load("l2c_cifar10", "cpu")
    expected = dict(
        l2c.poisons.l2c.to_dict(), method="algorithm2", num_epochs=32, threat=l2c.threat.to_dict()
    )
    assert defenses.poisons.L2C.to_dict() == expected
    assert load("defenses_cifar10").poisons.L2C.generator.width == 1.0


def test_shared_radius_is_one_field_reference():
    config = parse("configs/substandard.py", "--config.threat.epsilon=0.0625")
    assert config.evals.linf.epsilon == 0.0625 and config.evals.l2.epsilon == 0.5
    assert list(load("substandard", "linf").evals) == ["linf"]


def test_l2c_presets():
    from jaxpoison.evaluation import transfer

    mnist = load("l2c_mnist")
    assert "victims" not in mnist and not mnist.poisons.l2c.label_specific
    cpu = load("l2c_mnist", "cpu,transfer")
    assert cpu.data.num_train == 10000 and cpu.poisons.l2c.unroll_steps == 5
    assert cpu.victims.resnet18.model.to_dict() == {"name": "resnet18", "width": 0.25}
    assert set(cpu.victims) == {"cnn_mnist", "mlp", "cnn_cifar", "vgg11", "resnet18"}
    assert transfer.crafting_architecture(cpu.to_dict(), "l2c") == "cnn_mnist"
    label = load("l2c_mnist", "cpu,label_specific")
    assert label.poisons.l2c.label_specific and label.poisons.l2c.target == "next"
    assert label.data.to_dict() == cpu.data.to_dict()
    cifar = load("l2c_cifar10", "transfer")
    assert cifar.poisons.l2c.method == "algorithm2" and cifar.data.num_train == 10000
    assert {k: v.model.width for k, v in cifar.victims.items()} == {
        "cnn_cifar": 1.0,
        "mlp": 0.5,
        "vgg11": 0.25,
        "resnet18": 0.25,
    }
    reduced = load("l2c_cifar10", "cpu,transfer")
    assert reduced.poisons.l2c.method == "exact" and reduced.victims.cnn_cifar.model.width == 0.5
    assert transfer.crafting_architecture(cifar.to_dict(), "l2c") == "cnn_cifar"
    some = parse("configs/l2c_cifar10.py:cpu,transfer", "--config.select.victims=('mlp',)")
    assert some.select.victims == ("mlp",) and set(some.victims) == set(reduced.victims)


def test_sweep_and_matrix_configs_hold_every_spec():
    sweep = load("lambda_sweep")
    assert set(sweep.objectives) == {"erm", "pgd_at"} | {
        f"{family}_{lam:g}" for family in ("trades", "thrm") for lam in (1, 3, 6, 12)
    }
    for label, spec in sweep.objectives.items():
        if spec.name in ("trades", "thrm"):
            assert label == f"{spec.name}_{spec.beta:g}"
    assert sweep.evals[sweep.lambda_sweep.eval].name == "risk"
    matrix = load("transfer")
    archs = {"mlp", "cnn_cifar", "vgg11", "resnet18", "wrn28"}
    assert set(matrix.victims) == archs
    assert set(matrix.poisons) == {f"em_{a}" for a in archs} | {"regions4"}
    assert matrix.poisons.em_wrn28.surrogate.model.to_dict() == matrix.victims.wrn28.model.to_dict()
    speed = load("learning_speed")
    assert speed.select.poisons == config_lib.STATIC and speed.victim.epochs == 15
    assert set(speed.poisons) == set(config_lib.FAMILY_SPECS)


def test_study_presets():
    assert load("simplicity_bias", "mlp").victim.model.to_dict() == {"name": "mlp", "width": 0.5}
    assert load("simplicity_bias").victim.model.head == "flatten"
    clean = load("spine_cifar10", "clean30")
    assert len(clean.poisons) == 0 and clean.victim.epochs == 30 and clean.victim.num_seeds == 1
    rotation = load("rotation_ssl")
    assert set(rotation.objectives) == {"st", "at", "fast_at"} and rotation.data.num_train == 5000
    assert set(load("rotation_ssl", "family").poisons) == {
        "P3_universal_adversarial",
        "error_minimizing_class_wise",
        "regions4",
    }
    tiny = load("rotation_ssl", "tiny")
    assert tiny.ssl.probe.num_steps == 50 and tiny.ssl.pretext_test_size == 100
    theory = parse("configs/gaussian_theory.py:tiny", "--config.theory.epsilon=0.03")
    assert theory.theory.epsilon == 0.03 and theory.theory.mc_dims == (10, 10000)
    assert load("gaussian_theory").theory.epsilon is None


def test_l2c_crafting_victim_takes_the_released_network_on_the_command_line():
    """``--config.poisons.l2c.victim.normalization=batch ...pool=avg`` crafts against the
    released network; at the defaults the :cpu poison's record keeps the key it had before the
    config held these fields (computed on d93265f), so no earlier poison is crafted again."""
    import jax

    from jaxpoison import workdir
    from jaxpoison.poisons import l2c

    shape = dict(image_shape=(28, 28, 1), num_classes=10)

    def key(config):
        ps = specs.poison_spec(config, "l2c", **shape)
        record = specs.poison_record(ps, fingerprint="d", key=jax.random.key(0), **shape)
        return workdir.content_key(record)

    default = load("l2c_mnist", "cpu")
    assert key(default) == "4bf163fdc2f34334b69577c091efbf21676fd0c9ba87d45ffc9b9a10f9911faf"
    released = parse(
        "configs/l2c_mnist.py:cpu",
        "--config.poisons.l2c.victim.normalization=batch",
        "--config.poisons.l2c.victim.pool=avg",
    )
    victim = released.poisons.l2c.victim.to_dict()
    assert victim == dict(name="cnn_mnist", width=0.5, normalization="batch", pool="avg")
    module = l2c.make_victim(victim, num_classes=10)
    assert (module.normalization, module.pool) == ("batch", "avg")
    assert key(released) != key(default)


def test_l2c_crafting_victim_takes_another_model_on_the_command_line():
    """``--config.poisons.l2c.victim.name=mlp`` crafts against an MLP: the config's cnn_mnist
    normalization and pool, at their defaults, are left out (an MLP takes neither), so the poison
    builds and keeps the key it had before the config held them (computed on d93265f); away
    from their defaults they are refused, naming them."""
    import jax

    from jaxpoison import workdir

    shape = dict(image_shape=(28, 28, 1), num_classes=10)
    config = parse("configs/l2c_mnist.py:cpu", "--config.poisons.l2c.victim.name=mlp")
    specs.check(config, **shape)
    ps = specs.poison_spec(config, "l2c", **shape)
    record = specs.poison_record(ps, fingerprint="d", key=jax.random.key(0), **shape)
    key = "ca89683e538df2e4a0c4fe99312f5ab47a778279a57e196da9c99cd006f0d48e"
    assert workdir.content_key(record) == key
    batch = parse(
        "configs/l2c_mnist.py:cpu",
        "--config.poisons.l2c.victim.name=mlp",
        "--config.poisons.l2c.victim.normalization=batch",
    )
    with pytest.raises(ValueError, match=r"does not take argument\(s\) \['normalization'\]"):
        specs.check(batch, **shape)
