"""`jaxpoison report` and the learning-speed statistics on hand-made workdirs (no training).

The report reads only ``config.json`` and ``results.json``; these tests write both by hand, so
every number the report shows is known in advance.
"""

import json
import math
import re

import numpy as np
import pytest

from jaxpoison import plots, report
from jaxpoison.evaluation import speed, summarize

THRESHOLD = 0.5
NAN = re.compile(r"\bnan\b", re.IGNORECASE)  # a word: tmp_path names hold 'nan'


def history(crossing, peak, *, epochs, seeds=1):
    """A run whose training loss first falls below `THRESHOLD` at epoch `crossing` (None: never)
    and whose clean test accuracy climbs linearly to `peak` at the last epoch."""
    e = np.arange(1, epochs + 1)
    loss = np.where(e >= crossing, 0.4, 1.0) if crossing else np.full(epochs, 1.0)
    acc = 0.1 + (peak - 0.1) * e / epochs
    return {
        "train/loss": [[float(v)] * seeds for v in loss],
        "test/accuracy": [[float(v)] * seeds for v in acc],
    }


def make_workdir(path, runs, *, epochs=6, data=None, results_extra=None, seeds=1):
    """Writes ``config.json`` and ``results.json`` of a finished run of `runs`:
    ``{name: (epoch its loss gets below THRESHOLD or None, peak accuracy)}``."""
    path.mkdir(parents=True)
    config = {
        "name": f"hand-made {path.name}",
        "data": data or {"source": "embedded", "name": "cifar10", "num_train": 200},
        "victim": {"epochs": epochs},
        "loss_threshold": THRESHOLD,
    }
    out = {
        name: {
            "history": history(crossing, peak, epochs=epochs, seeds=seeds),
            "confusion": [np.diag(np.full(10, 5)).tolist()] * seeds,
        }
        for name, (crossing, peak) in runs.items()
    }
    results = {
        "complete": True,
        "config": config,
        "runs": out,
        "summary": {n: summarize.run_summary(r["history"], THRESHOLD) for n, r in out.items()},
        **(results_extra or {}),
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "results.json").write_text(json.dumps(results))
    return path


# Regions and EM get below the threshold; clean and random never do (censored).
RUNS = {"clean": (None, 0.6), "random": (None, 0.5), "regions": (2, 0.2), "em": (3, 0.1)}


@pytest.fixture
def figures(monkeypatch):
    """The figures the code under test saves, kept open for inspection instead of written."""
    saved, every = {}, []

    def keep(fig, path):
        saved[path.name] = fig
        every.append(fig)

    monkeypatch.setattr(plots, "save_figure", keep)
    yield saved
    for fig in every:
        plots.plt.close(fig)


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_workdirs_of_different_epochs_are_refused(tmp_path, capsys):
    a = make_workdir(tmp_path / "a", RUNS, epochs=6)
    b = make_workdir(tmp_path / "b", RUNS, epochs=10)
    code, err = run_main([str(a), str(b), "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert "victim epochs (a: 6; b: 10)" in err and "jaxpoison report WORKDIR" in err
    assert not (tmp_path / "out").exists()  # nothing written, not even a partial report


@pytest.mark.parametrize(
    "data_b, field",
    [
        ({"source": "embedded", "name": "cifar10", "num_train": 500}, "data.num_train"),
        ({"source": "npz", "name": "mnist", "num_train": 200}, "data.name"),
    ],
)
def test_workdirs_of_different_data_are_refused(tmp_path, data_b, field):
    a = make_workdir(tmp_path / "a", RUNS)
    b = make_workdir(tmp_path / "b", RUNS, data=data_b)
    with pytest.raises(report.ReportError, match=f"differ in .*{field}"):
        report.report([a, b], out=tmp_path / "out")


def test_different_recorded_fingerprints_are_refused_and_data_dir_is_no_difference(tmp_path):
    data = {"source": "npz", "name": "cifar10", "num_train": 200}
    a = make_workdir(tmp_path / "a", RUNS, data={**data, "data_dir": "/x"})
    b = make_workdir(tmp_path / "b", RUNS, data={**data, "data_dir": "/y"})
    text = report.report([a, b], out=tmp_path / "out").read_text()
    assert "| a/regions | 2 |" in text and "| b/regions | 2 |" in text  # pooled
    c = make_workdir(
        tmp_path / "c", RUNS, data=data, results_extra={"dataset": {"fingerprint": "1" * 64}}
    )
    d = make_workdir(
        tmp_path / "d", RUNS, data=data, results_extra={"dataset": {"fingerprint": "2" * 64}}
    )
    with pytest.raises(report.ReportError, match="dataset fingerprint"):
        report.report([c, d], out=tmp_path / "out2")


def test_workdirs_of_one_name_keep_their_runs_apart(tmp_path):
    a = make_workdir(tmp_path / "x" / "run", RUNS)
    b = make_workdir(tmp_path / "y" / "run", RUNS)
    text = report.report([a, b], out=tmp_path / "out").read_text()
    assert "learning speed of 8 runs" in text


def test_censored_runs_are_flagged_and_left_out_of_rho():
    summaries = {
        n: summarize.run_summary(history(c, p, epochs=6), THRESHOLD) for n, (c, p) in RUNS.items()
    }
    summaries["ar"] = summarize.run_summary(history(4, 0.3, epochs=6), THRESHOLD)
    diag = speed.diagnostics(summaries)
    assert diag["runs"]["clean"]["epoch_to_threshold"] is None and diag["runs"]["clean"]["censored"]
    assert diag["runs"]["regions"]["epoch_to_threshold"] == 2.0
    assert diag["num_censored"] == 2
    assert diag["num_points/epoch_to_threshold_vs_peak_acc"] == 3
    # Over regions (2, 20%), em (3, 10%), ar (4, 30%) only: ranks [1,2,3] vs [2,1,3] -> 0.5.
    # Counting the censored runs as epoch 7, as the report once did, would invent
    # 8.5 / sqrt(95) = 0.87.
    assert diag["spearman/epoch_to_threshold_vs_peak_acc"] == pytest.approx(0.5)
    assert diag["num_points/peak_acc_vs_final_acc"] == 5


def test_a_seed_that_never_crosses_censors_its_run():
    crossed = history(2, 0.3, epochs=4)
    never = history(None, 0.3, epochs=4)
    both = {k: [a + b for a, b in zip(crossed[k], never[k], strict=True)] for k in crossed}
    point = speed.run_points({"mixed": summarize.run_summary(both, THRESHOLD)})["mixed"]
    assert point["censored"] and point["epoch_to_threshold"] is None


def test_censored_points_are_hollow_in_a_never_column(tmp_path, figures):
    points = speed.run_points(
        {n: summarize.run_summary(history(c, p, epochs=6), THRESHOLD) for n, (c, p) in RUNS.items()}
    )
    speed.save_plots(points, tmp_path)
    ax = figures["learning_speed_epochs_vs_peak.png"].axes[0]
    measured, hollow = ax.collections
    np.testing.assert_allclose(measured.get_offsets(), [[2, 20], [3, 10]])
    np.testing.assert_allclose(hollow.get_offsets(), [[7, 60], [7, 50]])
    assert hollow.get_facecolors().size == 0  # no fill: not a measured epoch
    ticks = {t.get_text(): t.get_position()[0] for t in ax.get_xticklabels()}
    assert ticks["never"] == 7 and all(k.isdigit() for k in ticks if k != "never")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "never below threshold (2)" in legend
    assert "ρ undefined (2 runs" in ax.get_title()


def test_one_workdir_prints_no_nan_and_no_rho_below_three_points(tmp_path):
    two = make_workdir(tmp_path / "two", {"clean": (None, 0.6), "regions": (2, 0.2)})
    text = report.report([two]).read_text()
    assert not NAN.search(text)
    assert "ρ undefined (1 run; it needs 3)" in text  # regions alone: clean is censored
    assert "ρ undefined (2 runs; it needs 3)" in text  # peak vs final
    assert "| clean | never (> 6) |" in text
    assert not (two / "learning_speed_epochs_vs_peak.png").exists()
    censored = make_workdir(tmp_path / "censored", {n: (None, p) for n, (_, p) in RUNS.items()})
    text = report.report([censored]).read_text()
    assert not NAN.search(text) and "ρ undefined (0 runs; it needs 3)" in text


def test_rho_is_undefined_for_few_or_constant_points():
    assert math.isnan(
        speed.correlation({"a": {"x": 1, "y": 2}, "b": {"x": 2, "y": 1}}, "x", "y")[0]
    )
    assert speed.rho_text(float("nan"), 2) == "ρ undefined (2 runs; it needs 3)"
    flat = {k: {"x": float(k), "y": 0.5} for k in range(4)}
    rho, n = speed.correlation(flat, "x", "y")
    assert n == 4 and speed.rho_text(rho, n) == "ρ undefined (4 runs, a variable is constant)"
    assert speed.rho_text(0.5, 3) == "ρ = 0.50 (3 runs)"


def test_describe_states_the_threshold_and_the_censored_runs():
    summaries = {
        n: summarize.run_summary(history(c, p, epochs=6), THRESHOLD) for n, (c, p) in RUNS.items()
    }
    line = speed.describe(speed.diagnostics(summaries))
    assert "training loss < 0.5" in line and "2 runs never got below 0.5: left out" in line
    assert not NAN.search(line)
    assert speed.describe(speed.diagnostics({})) == "learning speed: no trained runs."


def test_mixed_loss_thresholds_do_not_correlate():
    low = summarize.run_summary(history(2, 0.2, epochs=4), 0.5)
    high = summarize.run_summary(history(2, 0.2, epochs=4), 2.0)
    with pytest.raises(ValueError, match="different loss thresholds"):
        speed.diagnostics({"low": low, "high": high})


def test_curves_have_whole_epoch_ticks_and_an_untrained_run_at_epoch_zero(tmp_path, figures):
    runs = {
        "naive": {"history": history(None, 0.1, epochs=1), "untrained": True},
        "clean": {"history": history(2, 0.6, epochs=13, seeds=2)},
    }
    plots.curves(runs, tmp_path / "curves.png")
    ax = figures["curves.png"].axes[0]
    ticks = ax.get_xticks()
    np.testing.assert_array_equal(ticks, np.round(ticks))
    assert 0 <= ticks.min() and ticks.max() <= 13 and ax.get_xlim() == (-0.5, 13.5)
    naive, clean = ax.get_lines()
    assert list(naive.get_xdata()) == [0] and list(clean.get_xdata()) == list(range(1, 14))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "naive (1 seed)",
        "clean (2 seeds, ±1 std)",
    ]


def test_confusion_matrices_name_the_classes(tmp_path, figures):
    cifar = make_workdir(tmp_path / "cifar", {"clean": (None, 0.6)})
    report.report([cifar])
    ax = figures["confusion_0.png"].axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "airplane" and labels[-1] == "truck"
    named = make_workdir(
        tmp_path / "named",
        {"clean": (None, 0.6)},
        data={"source": "npz", "name": "mine"},
        results_extra={"dataset": {"class_names": [f"c{i}" for i in range(10)]}},
    )
    report.report([named], out=tmp_path / "named_out")
    ax = figures["confusion_0.png"].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["c0", "c1"]
