"""Tests of the training objectives (defenses): finite losses and gradients, inner attacks inside
the defender's ball and run in eval mode, one compilation per configuration, and the vectorised
early stopping of FAT / the geometry values of GAIRAT against plain per-example loops."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxpoison import _registry, attacks, losses, models, objectives, specs, threat, training
from jaxpoison.objectives import gairat, inner

pytestmark = pytest.mark.usefixtures("fast_compiles")

EPS = 8 / 255
SHAPE = (8, 8, 3)
BATCH = 16

# (id, registry name, keywords): every configuration is compiled once, its step called twice.
CONFIGS = [
    ("erm", "erm", {}),
    ("rand_noise", "rand_noise", dict(epsilon=EPS)),
    ("pgd_at", "pgd_at", dict(epsilon=EPS, num_steps=3, step_size=EPS / 2)),
    ("trades", "trades", dict(beta=6.0, epsilon=EPS, num_steps=3, step_size=EPS / 2)),
    ("thrm_l2", "thrm", dict(beta=6.0, norm="l2", epsilon=0.5, num_steps=3, step_size=0.2)),
    ("mart", "mart", dict(beta=6.0, epsilon=EPS, num_steps=3, step_size=EPS / 2)),
    ("fat", "fat", dict(tau=1, epsilon=EPS, num_steps=3, step_size=EPS / 2)),
    ("gairat", "gairat", dict(lam=-1.0, epsilon=EPS, num_steps=4, step_size=EPS / 2)),
    ("ueraser", "ueraser", dict(num_copies=2)),
    ("gaussian_noise", "gaussian_noise", {}),
    ("ibp", "ibp", dict(epsilon=EPS, warmup=0.0, ramp=0.0)),
]
# Objectives without an inner attack: no adversarial example to check (ibp bounds the ball).
NO_INNER = ("erm", "ueraser", "gaussian_noise", "ibp")
IDS = [c[0] for c in CONFIGS]


class TinyBN(nn.Module):
    """Dense-BatchNorm-ReLU-Dense: small, and with running statistics to check eval-mode attacks."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(16)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(self.num_classes)(nn.relu(x))


MODULE = TinyBN()
APPLY = models.make_apply_fn(MODULE)


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    """These tests check logic, not speed: let XLA skip most optimisations (compile is faster)."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def setup():
    keys = jax.random.split(jax.random.key(0), 4)
    variables = models.init(MODULE, keys[0], SHAPE)
    # Non-trivial running statistics, so eval and train mode differ.
    variables["batch_stats"] = jax.tree.map(lambda a: a + 0.3, variables["batch_stats"])
    labels = jnp.arange(BATCH) % 10
    batch1 = {"image": jax.random.uniform(keys[1], (BATCH, *SHAPE)), "label": labels}
    batch2 = {"image": jax.random.uniform(keys[2], (BATCH, *SHAPE)), "label": labels[::-1]}
    return variables, batch1, batch2, keys[3]


def make_step(objective):
    def step(variables, batch, key):
        def loss_fn(params):
            return objective({**variables, "params": params}, batch, key, apply_fn=APPLY)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        return loss, aux, grads

    return jax.jit(chex.assert_max_traces(step, n=1))


@pytest.fixture(scope="module")
def results(setup):
    """{config id: (first-call outputs, outputs on a batch that differs except in example 0)}."""
    variables, batch1, batch2, key = setup
    # Same first example, all others different: an eval-mode attack must not notice.
    batch_other = {
        "image": batch1["image"].at[1:].set(batch2["image"][1:]),
        "label": batch1["label"],
    }
    out = {}
    for cid, name, kwargs in CONFIGS:
        chex.clear_trace_counter()  # chex counts traces per code object, shared by the closures
        step = make_step(objectives.make(name, **kwargs))
        first = step(variables, batch1, key)
        step(variables, batch2, key)  # same shapes: must not retrace (assert_max_traces)
        other = step(variables, batch_other, key)
        out[cid] = (first, other)
    return out


def _kwargs(cid):
    return dict(CONFIGS[IDS.index(cid)][2])


def _ball(cid):
    kw = _kwargs(cid)
    return threat.make(epsilon=kw["epsilon"], norm=kw.get("norm", "linf"))


@pytest.mark.parametrize("cid", IDS)
def test_loss_and_gradient_finite(results, cid):
    (loss, aux, grads), _ = results[cid]
    assert loss.shape == () and np.isfinite(loss)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.isfinite(g).all() for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
    assert {"loss", "accuracy"} <= set(aux["metrics"])
    assert all(np.isfinite(v) for v in aux["metrics"].values())
    np.testing.assert_allclose(aux["metrics"]["loss"], loss, rtol=1e-6)


@pytest.mark.parametrize("cid", IDS)
def test_model_state_updated_in_training_mode(setup, results, cid):
    variables = setup[0]
    (_, aux, _), _ = results[cid]
    state = aux["model_state"]
    assert jax.tree.structure(state) == jax.tree.structure(
        {"batch_stats": variables["batch_stats"]}
    )
    diff = jax.tree.map(
        lambda a, b: float(jnp.abs(a - b).max()), state["batch_stats"], variables["batch_stats"]
    )
    assert max(jax.tree.leaves(diff)) > 0


@pytest.mark.parametrize("cid", [c for c in IDS if c not in NO_INNER])
def test_inner_attack_respects_defenders_ball(setup, results, cid):
    x = setup[1]["image"]
    (_, aux, _), _ = results[cid]
    delta = aux["adversarial"] - x
    assert float(jnp.max(_ball(cid).norm_of(delta))) <= _kwargs(cid)["epsilon"] * (1 + 1e-5) + 1e-7
    assert float(aux["adversarial"].min()) >= 0.0 and float(aux["adversarial"].max()) <= 1.0
    assert float(jnp.max(_ball(cid).norm_of(delta))) > 0


@pytest.mark.parametrize("cid", [c for c in IDS if c not in NO_INNER])
def test_inner_attack_runs_in_eval_mode(results, cid):
    """In eval mode example 0's perturbation cannot depend on the other examples of the batch
    (in training mode BatchNorm's batch statistics would couple them)."""
    (first, other) = results[cid]
    np.testing.assert_allclose(first[1]["adversarial"][0], other[1]["adversarial"][0], atol=1e-6)


@pytest.mark.parametrize("cid", ["trades", "thrm_l2"])
def test_natural_term_is_erm(results, cid):
    """The natural term of TRADES / THRM is exactly standard training's loss."""
    (_, aux, _), _ = results[cid]
    (erm_loss, _, _), _ = results["erm"]
    np.testing.assert_allclose(aux["metrics"]["natural_loss"], erm_loss, rtol=1e-6)


def test_inner_attacks_move_the_loss_the_right_way(setup, results):
    """PGD-AT / MART raise the eval-mode cross-entropy, THRM's hypocritical example lowers it."""
    variables, batch = setup[0], setup[1]
    ce = jax.jit(
        lambda x: losses.cross_entropy(APPLY(variables, x, train=False)[0], batch["label"])
    )
    clean = float(ce(batch["image"]).mean())
    for cid in ("pgd_at", "mart", "gairat"):
        assert float(ce(results[cid][0][1]["adversarial"]).mean()) > clean
    assert float(ce(results["thrm_l2"][0][1]["adversarial"]).mean()) < clean


def test_every_registry_entry(setup):
    """Every OBJECTIVES entry, with its default hyperparameters (and a radius where it needs
    one): the right output structure (abstractly evaluated: traced, not compiled)."""
    variables, batch, _, key = setup
    assert set(objectives.OBJECTIVES) == {
        "erm",
        "rand_noise",
        "pgd_at",
        "trades",
        "thrm",
        "mart",
        "fat",
        "gairat",
        "ueraser",
        "gaussian_noise",
        "ibp",
    }
    assert {c[1] for c in CONFIGS} == set(objectives.OBJECTIVES)
    for name in objectives.OBJECTIVES:
        objective = objectives.make(
            name, **({"epsilon": EPS} if name in objectives.ADVERSARIAL else {})
        )

        def run(params, objective=objective):
            return jax.value_and_grad(
                lambda p: objective({**variables, "params": p}, batch, key, apply_fn=APPLY),
                has_aux=True,
            )(params)

        (loss, aux), grads = jax.eval_shape(run, variables["params"])
        assert loss.shape == ()
        assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
        assert jax.tree.structure(aux["model_state"]) == jax.tree.structure(
            {"batch_stats": variables["batch_stats"]}
        )
        assert all(v.shape == () for v in aux["metrics"].values())
        if name in objectives.ADVERSARIAL and name not in NO_INNER:
            assert aux["adversarial"].shape == batch["image"].shape
    with pytest.raises(ValueError, match="Unknown objective"):
        objectives.make("nope")
    with pytest.raises(ValueError, match="epsilon"):
        objectives.make("pgd_at", epsilon=8)


def test_adversarial_objectives_need_a_radius_and_take_one_ball_form():
    """No hidden default radius: every defense refuses to be built without threat= or epsilon=,
    and refuses both at once; ADVERSARIAL is exactly the objectives that take a ball."""
    takes_ball = {n for n, f in objectives.OBJECTIVES.items() if _registry.accepts(f, "threat")}
    assert takes_ball == objectives.ADVERSARIAL
    for name in objectives.ADVERSARIAL:
        with pytest.raises(
            ValueError, match=f"^{name} needs a radius: pass threat=.*config.threat"
        ):
            objectives.make(name, norm="linf")
        with pytest.raises(ValueError, match="got threat= and epsilon=.*not both"):
            objectives.make(name, threat=threat.make(epsilon=EPS), epsilon=EPS)


def test_threat_ball_and_its_fields_give_bit_identical_losses(setup):
    """`threat=LpBall(...)` (what a poison takes) is the same defense as the equivalent fields."""
    variables, batch, _, key = setup
    mask = np.zeros(SHAPE, np.float32)
    mask[:4] = 1.0
    fields = dict(norm="l2", epsilon=0.5, mask=mask)
    hyper = dict(beta=6.0, num_steps=3, step_size=0.2)
    run = lambda obj: jax.jit(lambda v, b, k: obj(v, b, k, apply_fn=APPLY))(variables, batch, key)
    loss, aux = run(objectives.make("trades", threat=threat.make(**fields), **hyper))
    ref, ref_aux = run(objectives.make("trades", **fields, **hyper))
    np.testing.assert_array_equal(loss, ref)
    np.testing.assert_array_equal(aux["adversarial"], ref_aux["adversarial"])
    assert float(jnp.abs(aux["adversarial"] - batch["image"])[:, 4:].max()) == 0.0  # the mask
    assert float(jnp.abs(aux["adversarial"] - batch["image"]).max()) > 0.0


def test_specs_objective_ties_the_defender_to_the_config_threat():
    """A config's one threat block gives every objective spec without its own radius that
    radius (and norm); a spec with its own keeps it; the radius is one FieldReference."""
    config = ml_collections.ConfigDict()
    radius = ml_collections.FieldReference(0.5)
    config.threat = dict(norm="l2", epsilon=radius)
    spec = specs.objective(config, {"name": "pgd_at", "num_steps": 2})
    assert (spec["norm"], spec["epsilon"]) == ("l2", 0.5)
    own = specs.objective(config, {"name": "pgd_at", "norm": "linf", "epsilon": EPS})
    assert (own["norm"], own["epsilon"]) == ("linf", EPS)
    assert specs.objective(config, {"name": "erm"}) == {"name": "erm"}
    radius.set(0.25)  # --config.threat.epsilon=0.25 moves the defender's radius with it
    spec = specs.objective(config, {"name": "pgd_at"})
    assert spec["epsilon"] == 0.25
    objectives.make(spec.pop("name"), **spec)  # builds: the radius came from the config
    bare = specs.objective(ml_collections.ConfigDict(), {"name": "pgd_at"})  # no config.threat
    with pytest.raises(ValueError, match="pgd_at needs a radius"):
        objectives.make(bare.pop("name"), **bare)


# ----- early-stopped PGD and geometry values against per-example loops -------------------------


@pytest.fixture(scope="module")
def linear_problem():
    """A 5-class linear model on 4x4x3 inputs, and jitted single-example helpers for the loops."""
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    w = jax.random.normal(k1, (4 * 4 * 3, 5)) * 3.0
    x = jax.random.uniform(k2, (10, 4, 4, 3))
    y = jnp.arange(10) % 5
    logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w
    grad = jax.jit(jax.grad(lambda d, xi, yi: losses.cross_entropy(logits_fn(xi + d), yi)[0]))
    pred = jax.jit(lambda d, xi: jnp.argmax(logits_fn(xi + d), -1)[0])
    return logits_fn, x, y, k3, grad, pred


def _loop_reference(problem, delta0, *, eps, step_size, num_steps, tau):
    """Algorithm 1 of FAT, one example at a time, in plain Python control flow."""
    _, x, y, _, grad, pred = problem
    deltas, kappas, moves = [], [], []
    for i in range(x.shape[0]):
        xi, yi, d = x[i : i + 1], y[i : i + 1], np.asarray(delta0[i : i + 1])
        control, kappa, moved, stopped = tau, 0, 0, False
        for _ in range(num_steps):
            correct = int(pred(d, xi)) == int(yi[0])
            kappa += correct
            if stopped:
                continue
            if tau is not None and not correct:
                if control == 0:
                    stopped = True
                    continue
                control -= 1
            d = d + step_size * np.sign(np.asarray(grad(d, xi, yi)))
            d = np.clip(np.clip(d, -eps, eps) + np.asarray(xi), 0.0, 1.0) - np.asarray(xi)
            moved += 1
        deltas.append(d[0])
        kappas.append(kappa)
        moves.append(moved)
    return np.stack(deltas), np.array(kappas), np.array(moves)


@pytest.mark.parametrize("tau", [0, 1, None])
def test_early_stopped_pgd_matches_per_example_loop(linear_problem, tau):
    logits_fn, x, y, key = linear_problem[:4]
    eps, step_size, num_steps = 0.1, 0.03, 5
    tm = threat.make(epsilon=eps)
    delta0 = tm.random_init(key, x)
    delta, stats = inner.pgd_with_stats(
        logits_fn,
        losses.cross_entropy,
        x,
        y,
        delta=delta0,
        threat=tm,
        num_steps=num_steps,
        step_size=step_size,
        tau=tau,
    )
    ref_delta, ref_kappa, ref_moves = _loop_reference(
        linear_problem, delta0, eps=eps, step_size=step_size, num_steps=num_steps, tau=tau
    )
    np.testing.assert_allclose(delta, ref_delta, atol=1e-6)
    np.testing.assert_array_equal(stats["num_moves"], ref_moves)
    if tau is None:
        np.testing.assert_array_equal(stats["kappa"], ref_kappa)
        assert (ref_moves == num_steps).all()
    else:
        assert (ref_moves < num_steps).any()  # the stop is exercised


def test_fat_without_stopping_is_pgd(linear_problem):
    """With tau >= K no example ever stops: FAT's search is `attacks.pgd` from the same start."""
    logits_fn, x, y, key = linear_problem[:4]
    tm = threat.make(epsilon=0.1)
    kw = dict(threat=tm, num_steps=5, step_size=0.03)
    delta, _ = inner.pgd_with_stats(
        logits_fn, losses.cross_entropy, x, y, delta=tm.random_init(key, x), tau=5, **kw
    )
    expected = attacks.pgd(lambda z, t: losses.cross_entropy(logits_fn(z), t), x, y, key=key, **kw)
    np.testing.assert_allclose(delta, expected, atol=1e-6)


def test_gair_weights():
    kappa = jnp.array([0, 1, 2, 5, 10, 10])
    for fn in gairat.WEIGHT_FNS:
        w = gairat.gair_weights(kappa, 10, lam=-1.0, weight_fn=fn)
        np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-6)
        assert (np.diff(np.asarray(w)) <= 1e-7).all()  # closer to the boundary: more weight
    w = gairat.gair_weights(kappa, 10, weight_fn="discrete")
    raw = (11.0 - np.asarray(kappa)) / 11.0
    np.testing.assert_allclose(w, raw / raw.mean(), rtol=1e-6)
    np.testing.assert_allclose(gairat.gair_weights(kappa, 10, lam=float("inf")), 1.0)
    with pytest.raises(ValueError, match="weight_fn"):
        gairat.make(weight_fn="cubic", epsilon=EPS)


# ----- schedules over training: batch['progress'] ----------------------------------------------

FAST = dict(epsilon=EPS, num_steps=3, step_size=EPS / 2)


def make_progress_step(objective):
    """Jitted ``(variables, batch, key) -> (loss, aux)``: one trace for every progress value."""

    def step(variables, batch, key):
        return objective(variables, batch, key, apply_fn=APPLY)

    return jax.jit(chex.assert_max_traces(step, n=1))


def _at(batch, progress):
    return batch | {"progress": jnp.float32(progress)}


def test_fat_dynamic_tau_follows_progress(setup):
    """τ of the reference's dynamic schedule (0 before 50/120, 1, then 2 from 90/120), picked
    from batch['progress'] in one compiled program, reaches the early-stopped search: examples
    move further with each τ (the traced τ itself is checked against the loop reference in
    `test_early_stopped_pgd_with_traced_tau_matches_loop`)."""
    variables, batch, _, key = setup
    chex.clear_trace_counter()
    step = make_progress_step(objectives.make("fat", tau_schedule="dynamic", **FAST))
    steps = {}
    for progress, tau in [(0.0, 0), (0.41, 0), (50 / 120, 1), (0.6, 1), (0.75, 2), (0.99, 2)]:
        _, aux = step(variables, _at(batch, progress), key)
        assert float(aux["metrics"]["tau"]) == tau, progress
        steps.setdefault(tau, set()).add(float(aux["metrics"]["mean_steps"]))
    assert all(len(v) == 1 for v in steps.values())  # same key, same τ: same search
    assert min(steps[0]) < min(steps[1]) < min(steps[2])
    chex.clear_trace_counter()


def test_pgd_at_epsilon_ramp_follows_progress(setup):
    """With epsilon_ramp=0.5 the ball grows linearly to ε at half of training, in one compiled
    program; after the ramp the loss is plain PGD-AT's with the same key."""
    variables, batch, _, key = setup
    chex.clear_trace_counter()
    step = make_progress_step(objectives.make("pgd_at", epsilon_ramp=0.5, **FAST))
    for progress, scale in [(0.0, 0.0), (0.1, 0.2), (0.25, 0.5), (0.5, 1.0), (0.9, 1.0)]:
        _, aux = step(variables, _at(batch, progress), key)
        delta = np.abs(np.asarray(aux["adversarial"] - batch["image"]))
        assert delta.max() <= scale * EPS + 1e-6, progress
        assert delta.max() >= 0.9 * scale * EPS, progress  # the search reaches the grown ball
    chex.clear_trace_counter()
    loss, _ = step(variables, _at(batch, 0.7), key)
    ref, _ = jax.jit(lambda v, b, k: objectives.make("pgd_at", **FAST)(v, b, k, apply_fn=APPLY))(
        variables, batch, key
    )
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    with pytest.raises(ValueError, match="epsilon_ramp=2"):
        objectives.make("pgd_at", epsilon=EPS, epsilon_ramp=2)


def test_early_stopped_pgd_with_traced_tau_matches_loop(linear_problem):
    """τ as a traced argument (FAT's schedule): one compiled search, per-example loop results."""
    logits_fn, x, y, key = linear_problem[:4]
    eps, step_size, num_steps = 0.1, 0.03, 5
    tm = threat.make(epsilon=eps)
    delta0 = tm.random_init(key, x)
    chex.clear_trace_counter()

    def search(tau):
        kw = dict(delta=delta0, threat=tm, num_steps=num_steps, step_size=step_size)
        return inner.pgd_with_stats(logits_fn, losses.cross_entropy, x, y, tau=tau, **kw)

    search = jax.jit(chex.assert_max_traces(search, n=1))
    for tau in (0, 1, 2):
        delta, stats = search(jnp.int32(tau))
        ref_delta, _, ref_moves = _loop_reference(
            linear_problem, delta0, eps=eps, step_size=step_size, num_steps=num_steps, tau=tau
        )
        np.testing.assert_allclose(delta, ref_delta, atol=1e-6)
        np.testing.assert_array_equal(stats["num_moves"], ref_moves)
    chex.clear_trace_counter()


GAIRAT_SCHEDULES = [
    # (keywords, [(progress, λ the weights must use; None = burn-in, all weights 1)])
    (
        dict(begin=0.5, lam_schedule="piecewise"),
        [(0.0, None), (0.49, None), (0.5, -1.0), (0.7, -1.0), (0.75, -2.0), (0.95, -2.5)],
    ),
    (
        dict(begin=0.25, lam_schedule="linear", lam_max=2.0),
        [(0.2, None), (0.25, 2.0 - 0.25 * 3.0), (0.9, 2.0 - 0.9 * 3.0)],
    ),
    (dict(lam=1.0, lam_schedule=((0.3, 0.0), (0.6, -2.0))), [(0.1, 1.0), (0.3, 0.0), (0.8, -2.0)]),
    (dict(begin=0.5, weight_fn="discrete"), [(0.3, None), (0.6, -1.0)]),
]


@pytest.mark.parametrize(
    "kwargs, expected", GAIRAT_SCHEDULES, ids=["piecewise", "linear", "pairs", "discrete"]
)
def test_gairat_schedule_follows_progress(setup, kwargs, expected):
    variables, batch, _, key = setup
    chex.clear_trace_counter()
    step = make_progress_step(objectives.make("gairat", **FAST, **kwargs))
    for progress, lam in expected:
        _, aux = step(variables, _at(batch, progress), key)
        assert len(np.unique(aux["kappa"])) > 1  # else every λ gives equal weights
        if lam is None:
            np.testing.assert_array_equal(aux["weights"], 1.0)
        else:
            want = gairat.gair_weights(
                aux["kappa"], 3, lam=lam, weight_fn=kwargs.get("weight_fn", "tanh")
            )
            np.testing.assert_allclose(
                aux["weights"], want, rtol=1e-5, atol=1e-6, err_msg=f"{progress}"
            )
            assert float(np.std(aux["weights"])) > 1e-3
        if "begin" in kwargs:
            assert float(aux["metrics"]["reweighted"]) == (lam is not None)
        else:
            assert "reweighted" not in aux["metrics"]
    chex.clear_trace_counter()


def test_gairat_burn_in_is_pgd_at(setup):
    """Before `begin` GAIRAT is plain PGD-AT: the same loss as `pgd_at` with the same key."""
    variables, batch, _, key = setup
    run = lambda obj: jax.jit(lambda v, b, k: obj(v, b, k, apply_fn=APPLY))
    loss, _ = run(objectives.make("gairat", begin=0.5, **FAST))(variables, _at(batch, 0.2), key)
    ref, _ = run(objectives.make("pgd_at", **FAST))(variables, batch, key)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_missing_progress_is_the_start_of_training(setup, caplog):
    """Callers that build their own batches (no 'progress') get the schedule's start, a warning,
    and no crash."""
    variables, batch, _, key = setup
    assert float(inner.progress_of({}, name="x")) == 0.0
    assert float(inner.progress_of({"progress": jnp.float32(0.3)}, name="x")) == pytest.approx(0.3)
    for name, kwargs in [("fat", dict(tau_schedule="dynamic")), ("gairat", dict(begin=0.5))]:
        kwargs["epsilon"] = EPS
        caplog.clear()
        objective = functools.partial(objectives.make(name, **kwargs), apply_fn=APPLY)
        loss, _ = jax.eval_shape(objective, variables, batch, key)
        assert loss.shape == ()
        assert any(name in r.message and "progress" in r.message for r in caplog.records)


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="tau_schedule"):
        objectives.make("fat", epsilon=EPS, tau_schedule="cosine")
    with pytest.raises(ValueError, match="fractions"):
        objectives.make("fat", epsilon=EPS, tau_schedule=((1.5, 1),))
    with pytest.raises(ValueError, match="integer"):
        objectives.make("fat", epsilon=EPS, tau_schedule=((0.5, 1.5),))
    with pytest.raises(ValueError, match="integer"):
        objectives.make("fat", epsilon=EPS, tau_schedule=((0.5, float("inf")),))
    with pytest.raises(ValueError, match="lam_schedule"):
        objectives.make("gairat", epsilon=EPS, lam_schedule="cosine")
    with pytest.raises(ValueError, match="finite"):
        objectives.make(
            "gairat", epsilon=EPS, lam_schedule="linear"
        )  # lam_max = +inf, as in the reference
    with pytest.raises(ValueError, match="begin"):
        objectives.make("gairat", epsilon=EPS, begin=60)


def test_trainer_puts_progress_into_every_batch():
    """`Trainer.fit` gives the objective progress = k / total and epoch = k / steps_per_epoch at
    global step k, for 2 epochs of 3 steps, from one compiled step."""
    seen, traces = [], []

    def spy(variables, batch, key, *, apply_fn):
        traces.append(1)
        logits, state = apply_fn(variables, batch["image"], train=True)
        loss = jnp.mean(losses.cross_entropy(logits, batch["label"]))
        record = lambda p, e: seen.append((float(p), float(e)))
        jax.debug.callback(record, batch["progress"], batch["epoch"])
        metrics = {"loss": loss, "progress": batch["progress"], "epoch": batch["epoch"]}
        return loss, {"model_state": state, "metrics": metrics}

    rng = np.random.default_rng(0)
    x, y = rng.random((14, *SHAPE), dtype=np.float32), np.arange(14) % 10
    data = training.TrainData.create(x[:12], y[:12], x[12:], y[12:])
    trainer = training.Trainer(
        module=MODULE,
        objective=spy,
        image_shape=SHAPE,
        epochs=2,
        batch_size=4,
        optimizer_kwargs=dict(learning_rate=0.01, schedule="constant"),
    )
    _, history = trainer.fit(data, key=jax.random.key(0), progress=False)
    assert len(traces) == 1  # one trace (so one compilation) for the whole run
    total = 6
    expected = [(k / total, k / 3) for k in range(total)]
    np.testing.assert_allclose(sorted(seen), expected, rtol=1e-6)
    # Epoch means of the metric: ((0 + 1 + 2) / 3) / 6 and ((3 + 4 + 5) / 3) / 6.
    np.testing.assert_allclose(np.ravel(history["train/progress"]), [1 / 6, 4 / 6], rtol=1e-6)
