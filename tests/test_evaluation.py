"""Risk evaluators (Tao et al. 2022 identities, the ball, one trace), Spearman, and the report."""

import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxpoison import main, models, report, threat, trainers
from jaxpoison.evaluation import EVALUATORS, risk, speed
from jaxpoison.train_state import TrainState

pytestmark = pytest.mark.usefixtures("fast_compiles")

N, SHAPE, SEEDS = 40, (4, 4, 1), 2


class Linear(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def linear_states(num_classes, key):
    module = Linear(num_classes)
    keys = jax.random.split(key, SEEDS)
    params = jax.vmap(lambda k: models.init(module, k, SHAPE)["params"])(keys)
    state = TrainState(jnp.zeros((SEEDS,), jnp.int32), params, {}, ())
    return models.make_apply_fn(module), state


def data(seed, num_classes):
    rng = np.random.default_rng(seed)
    x = rng.random((N, *SHAPE), dtype=np.float32)
    x[:4] = np.round(x[:4])  # pixels on the box's faces
    return jnp.asarray(x), jnp.asarray(rng.integers(0, num_classes, N), jnp.int32)


@pytest.fixture(scope="module")
def three_class():
    """Two seeds of a random linear 3-class model on 4x4 images; evaluator traced at most once."""
    apply_fn, states = linear_states(3, jax.random.key(0))
    ev = risk.make_risk(
        apply_fn=apply_fn, num_classes=3, epsilon=0.3, num_steps=10, targeted=True, batch_size=16
    )
    return apply_fn, states, risk.Evaluator(chex.assert_max_traces(ev.fn, n=1), name=ev.name)


def check_identities(m, s):
    close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6)  # noqa: E731
    r_nat = m["R_nat"][s]
    close(m["R_adv"][s], r_nat + (1 - r_nat) * m["R_adv/D+"][s])
    close(m["R_adv/D+"][s], m["R_sta/D+"][s])
    close(m["R_sta"][s], (1 - r_nat) * m["R_sta/D+"][s] + r_nat * m["R_sta/D-"][s])
    close(m["R_adv"][s], r_nat + m["R_sta"][s] - r_nat * m["R_sta/D-"][s])
    assert m["R_hyp/D-"][s] <= m["R_sta/D-"][s] + 1e-6
    close(m["R_hyp"][s], r_nat * m["R_hyp/D-"][s])
    close(m["acc/A"][s], 1 - m["R_adv"][s])
    close(m["acc/F"][s], m["acc/D"][s] + r_nat * m["R_hyp/D-"][s])
    close(m["R_hyp/D-"][s], (m["acc/F"][s] - m["acc/D"][s]) / (1 - m["acc/D"][s]))
    close(m["R_adv/D+"][s], (m["acc/D"][s] - m["acc/A"][s]) / m["acc/D"][s])
    close(m["n/D+"][s] + m["n/D-"][s], N)


def test_risk_identities_hold_on_computed_quantities(three_class):
    apply_fn, states, ev = three_class
    x, y = data(1, 3)
    m = jax.device_get(ev(states, x, y, key=jax.random.key(1)))
    for s in range(SEEDS):
        # Independent value: clean accuracy straight from the logits, no batching.
        variables = risk.variables_of(jax.tree.map(lambda a, s=s: a[s], states))
        pred = np.argmax(apply_fn(variables, x, train=False)[0], -1)
        np.testing.assert_allclose(m["acc/D"][s], np.mean(pred == np.asarray(y)), atol=1e-6)
        assert 0 < m["R_nat"][s] < 1, "need both D+ and D- for the identities to bite"
        check_identities(m, s)
        assert m["R_hyp/D-"][s] > 0 and m["acc/F"][s] > m["acc/D"][s]
        assert m["asr/targeted"][s].shape == (3,)
        assert 0 <= m["asr/hypocritical"][s] <= m["R_hyp/D-"][s] + 1e-6


def test_evaluator_is_traced_once_across_datasets_and_keys(three_class):
    _, states, ev = three_class
    for seed in (2, 3):  # same shapes, new values and keys: no new trace (assert_max_traces)
        x, y = data(seed, 3)
        m = ev(states, x, y, key=jax.random.key(seed))
        assert np.isfinite(np.asarray(m["R_adv"])).all()


def test_binary_hypocritical_risk_equals_stability_risk_on_misclassified():
    apply_fn, states = linear_states(2, jax.random.key(4))
    ev = EVALUATORS["risk"](apply_fn=apply_fn, num_classes=2, epsilon=0.3, num_steps=10)
    x, y = data(5, 2)
    m = jax.device_get(ev(states, x, y, key=jax.random.key(0)))
    for s in range(SEEDS):
        check_identities(m, s)
        np.testing.assert_allclose(m["R_hyp/D-"][s], m["R_sta/D-"][s], atol=1e-6)


def test_threat_ball_and_its_fields_give_bit_identical_risks():
    """`threat=LpBall(...)` (the poisons' ball) is the same evaluator as the equivalent fields."""
    apply_fn, states = linear_states(2, jax.random.key(4))
    x, y = data(5, 2)
    kw = dict(apply_fn=apply_fn, num_classes=2, num_steps=3)
    ev = risk.make("targeted", threat=threat.make(norm="l2", epsilon=0.5), **kw)
    ref = risk.make("targeted", norm="l2", epsilon=0.5, **kw)
    assert ev.name == ref.name == "risk_l2_targeted"
    m, m_ref = (jax.device_get(e(states, x, y, key=jax.random.key(0))) for e in (ev, ref))
    assert m.keys() == m_ref.keys()
    for k in m:
        np.testing.assert_array_equal(m[k], m_ref[k], err_msg=k)


@pytest.mark.parametrize("name", ["risk", "targeted"])
def test_attacking_evaluators_need_a_radius(name):
    kw = dict(apply_fn=None, num_classes=2)
    with pytest.raises(ValueError, match=f"^{name} needs a radius: pass threat=.*config.threat"):
        risk.make(name, norm="l2", **kw)
    with pytest.raises(ValueError, match="got threat= and epsilon=.*not both"):
        risk.make(name, threat=threat.make(epsilon=0.1), epsilon=0.1, **kw)
    with pytest.raises(ValueError, match=f"{name}' does not take argument.*'epsilon'"):
        risk.make(name, eps=0.1, **kw)  # a typo is caught by the registry, not deep inside


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_hypocritical_pgd_never_leaves_the_ball(three_class, norm):
    apply_fn, states, _ = three_class
    variables = risk.variables_of(jax.tree.map(lambda a: a[0], states))
    x, y = data(6, 3)
    tm = threat.make(norm=norm, epsilon={"linf": 8 / 255, "l2": 0.5}[norm])  # the paper's radii
    for random_start in (False, True):
        x_hyp = risk.hypocritical_examples(
            apply_fn, variables, x, y, key=jax.random.key(7), threat=tm, random_start=random_start
        )
        assert float(jnp.max(tm.norm_of(x_hyp - x))) <= tm.epsilon + 1e-5
        assert float(x_hyp.min()) >= 0.0 and float(x_hyp.max()) <= 1.0
    loss = lambda z: risk.model_loss(apply_fn, variables)(z, y).mean()  # noqa: E731
    assert loss(x_hyp) < loss(x)  # it helps the true label
    big = threat.LpBall(epsilon=1.0, norm=norm)
    x_t = risk.targeted_examples(
        apply_fn, variables, x, jnp.zeros_like(y), key=jax.random.key(8), threat=big
    )
    assert float(jnp.max(big.norm_of(x_t - x))) <= 1.0 + 1e-5


def test_spearman_against_hand_computed_values():
    # b's ranks with the tie at 7: [1, 2, 3.5, 5, 3.5]; centred: a [-2,-1,0,1,2], b
    # [-2,-1,.5,2,.5]: sum of products 8, sums of squares 10 and 9.5 -> 8 / sqrt(95).
    assert speed.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / np.sqrt(95))
    np.testing.assert_allclose(speed.rankdata([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])
    assert speed.spearman([1, 2, 3], [10, 200, 3000]) == pytest.approx(1.0)
    assert speed.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(speed.spearman([1, 1, 1], [1, 2, 3]))


def tiny_config():
    config = ml_collections.ConfigDict()
    config.name = "tiny report test"
    config.seed = 0
    config.data = dict(source="digits", name="digits", num_train=200, num_test=100, val_size=0)
    config.threat = dict(norm="linf", epsilon=8 / 255)
    config.include_clean = True
    config.poisons = {
        "random": dict(name="random"),
        "regions": dict(name="regions", num_patches=4),
    }
    config.objectives = {"erm": dict(name="erm")}
    config.loss_threshold = 2.0
    config.victim = dict(
        model=dict(name="mlp", width=0.05),
        epochs=2,
        batch_size=50,
        num_seeds=1,
        checkpoint_every=0,
        optimizer=dict(learning_rate=0.1, momentum=0.9, weight_decay=0.0, schedule="constant"),
    )
    return config


def test_report_on_a_finished_workdir(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    results = trainers.train_and_evaluate(tiny_config(), workdir, progress=False)
    assert set(results["summary"]) == {"clean", "random", "regions"}
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["jaxpoison", "report", str(workdir), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main.run()
    assert exit_info.value.code == 0
    text = (out / "report.md").read_text()
    assert "Spearman" in text and "tiny report test" in text and "skipped" not in text
    for name in (
        "curves_0.png",
        "learning_speed_epochs_vs_peak.png",
        "learning_speed_peak_vs_final.png",
        "perturbations_0_random.png",
        "perturbations_0_regions.png",
    ):
        assert (out / name).stat().st_size > 0, name
    diag = speed.diagnostics(results["summary"])
    assert diag["num_runs"] == 3 and set(diag["runs"]) == {"clean", "random", "regions"}
    # Without data, the grid is skipped with a note and the rest of the report still appears.
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "results.json"):
        (broken / f).write_text((workdir / f).read_text().replace('"digits"', '"nodata"'))
    (broken / "poison").symlink_to(workdir / "poison")
    text = report.report([broken]).read_text()
    assert "perturbation grid skipped" in text and "Spearman" in text
