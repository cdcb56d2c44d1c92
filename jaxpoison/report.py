"""``jaxpoison report WORKDIR [WORKDIR ...] [--out DIR]``: workdirs to ``report.md`` + figures.

Reads only what a run leaves in its workdir (``config.json``, ``results.json``, ``poison/*/``)
and writes, into the first workdir or ``--out``:

* ``report.md``: per workdir the summary table (final / peak accuracy, epoch to the loss
  threshold), any evaluator results found in ``results.json`` (``runs[name]['evals']``), the
  poison artifacts; across all runs the learning-speed table and correlations
  (`evaluation.speed`: runs that never reach the loss threshold are marked and left out of ρ, and
  a ρ over fewer than 3 runs is "undefined", never a number);
* ``curves_<k>.png``: clean test accuracy per epoch of every run of workdir k;
* ``learning_speed_*.png``: epoch-to-threshold vs peak and peak vs final accuracy (≥ 3 trained
  runs; untrained ``naive`` runs are left out);
* ``confusion_<k>.png``: the confusion matrices of every run's final victims on the clean test
  set (``runs[run]['confusion']``), the classes named by ``results['dataset']['class_names']``
  when the run recorded them, else by the dataset's known names;
* ``transfer_<k>.png`` / ``attack_transfer_<k>.png``: the heat maps of a run with
  ``config.victims`` (training set × victim architecture, ``results['transfer']``), and its tables;
* ``lambda_sweep_<k>.png``: the THRM / TRADES sweep (``results['lambda_sweep']``);
* the evaluator table (``acc/D``, ``acc/A``, ``acc/F`` mean ± std) of runs with ``config.evals``;
* ``perturbations_<k>_<run>.png``: a few clean training images, their poisoned versions and the
  rescaled δ, recomputed from the artifact with `jaxpoison.poisons` and the config's data (skipped
  with a note when the data or the artifact cannot be loaded).

Workdirs are pooled into one learning-speed analysis only when they agree in their data
(``config.data`` but its ``data_dir``, and ``results['dataset']['fingerprint']`` where recorded),
their victims' epochs and their loss threshold; otherwise the report is refused (`ReportError`)
with the fields that differ.

References:
  Sandoval-Segura et al. 2022, "Poisons that are learned faster are more effective" (the
  learning-speed figures); Tao et al. 2021/2022 (the perturbation grids).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from jaxpoison import plots
from jaxpoison.data.sources import CLASS_NAMES
from jaxpoison.evaluation import speed, summarize, tradeoff, transfer

NUM_IMAGES = 6


class ReportError(ValueError):
    """Workdirs that cannot be pooled into one report (different data, epochs or threshold)."""


def _load_json(path):
    """The JSON in `path`, None if there is no such file; a damaged file is a ReportError."""
    if not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_bytes().decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise ReportError(
            f"{path} is damaged ({type(e).__name__}); rerun that workdir's command to write it "
            "again."
        ) from None


def _fmt(value):
    if isinstance(value, (int, float)):
        return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _per_seed(epochs):
    """Per-seed epochs as ``'3, never'`` (None: the loss never got below the threshold)."""
    return ", ".join("never" if e is None else str(e) for e in epochs)


def _summary_rows(summary):
    headers, cells = summarize.accuracy_columns(summary)
    thresholds = sorted({s["loss_threshold"] for s in summary.values()})
    below = f"< {thresholds[0]:g}" if len(thresholds) == 1 else "< threshold"
    columns = [
        "run",
        *(f"{h} acc (%)" for h in headers),
        "peak epoch",
        f"first epoch train loss {below}",
        "seeds",
    ]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, s in summary.items():
        extra = [
            _per_seed(s["peak_epoch"]),
            _per_seed(s["epoch_loss_below_threshold"]),
            str(s["seeds"]),
        ]
        rows.append(f"| {name} | {' | '.join(cells[name] + extra)} |")
    if any(s["seeds"] > 1 for s in summary.values()):
        rows += ["", "The epoch columns list one value per seed."]
    return rows


def _pooled_fields(config, results):
    """What workdirs pooled into one analysis must agree on: ``data.<key>`` of the config but
    its location, the dataset's fingerprint where recorded, the victims' epochs and the loss
    threshold of the trained runs."""
    data = ((config or results.get("config") or {}).get("data")) or {}
    fields = {f"data.{k}": v for k, v in data.items() if k != "data_dir"}
    fingerprint = (results.get("dataset") or {}).get("fingerprint")
    if fingerprint is not None:
        fields["dataset fingerprint"] = fingerprint[:12]
    trained = [s for s in results.get("summary", {}).values() if s.get("epochs")]
    for name, key in (("victim epochs", "epochs"), ("loss threshold", "loss_threshold")):
        values = sorted({s[key] for s in trained})
        fields[name] = values[0] if len(values) == 1 else values
    return fields


def check_poolable(fields):
    """Refuses to pool workdirs that differ in a `_pooled_fields` entry.

    Args:
      fields: ``{workdir label: _pooled_fields(...)}``. A dataset fingerprint is compared only
        among the workdirs that recorded one (older runs did not).

    Raises:
      ReportError: naming every field that differs and each workdir's value.
    """
    names = dict.fromkeys(k for f in fields.values() for k in f)
    differ = []
    for name in names:
        values = {label: f.get(name, "unset") for label, f in fields.items()}
        if name == "dataset fingerprint":
            values = {label: v for label, v in values.items() if v != "unset"}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            shown = "; ".join(f"{label}: {_fmt(v)}" for label, v in values.items())
            differ.append(f"{name} ({shown})")
    if differ:
        raise ReportError(
            f"cannot pool these {len(fields)} workdirs into one analysis, they differ in "
            f"{', '.join(differ)}; report each workdir on its own (jaxpoison report WORKDIR)."
        )


def _class_names(config, results):
    """The dataset's class names: as the run recorded them, else the known names of
    ``config.data.name``; None when neither exists (the plots then number the classes)."""
    recorded = (results.get("dataset") or {}).get("class_names")
    if recorded:
        return list(recorded)
    name = (((config or results.get("config") or {}).get("data")) or {}).get("name")
    return list(CLASS_NAMES[name]) if name in CLASS_NAMES else None


def _eval_rows(runs):
    """Markdown rows of ``runs[name]['evals'][label][metric]`` (mean over seeds)."""
    rows = []
    for name, run in runs.items():
        for label, metrics in run.get("evals", {}).items():
            rows.append(
                f"- **{name} / {label}**: "
                + ", ".join(
                    f"{k} = {_fmt(float(np.nanmean(v)) if np.size(v) else v)}"
                    for k, v in metrics.items()
                    if np.ndim(v) <= 1
                )
            )
    return rows


def perturbation_grid(config, run, workdir, path, *, num_images=NUM_IMAGES):
    """Clean images (top), poisoned (middle), δ rescaled to [0, 1] (bottom) for one run.

    Recomputes the poisoned images from the run's artifact (`trainers.poisoning.load_poison`)
    on the first `num_images` training examples of ``data.load(config.data)``.
    """
    import ml_collections

    from jaxpoison import data, specs
    from jaxpoison.trainers import poisoning

    config = ml_collections.ConfigDict(config)
    dataset = data.load(config.data)
    poison, state = poisoning.load_poison(config, run, dataset, workdir)
    name, tm = config.poisons[run].name, specs.threat(config, config.poisons[run])
    x_clean = data.as_float_images(dataset.x_train)
    k = min(num_images, len(dataset.y_train))
    idx = np.arange(k)
    batch = {"image": x_clean[idx], "label": dataset.y_train[idx], "index": idx}
    poisoned = np.asarray(poison.apply(state, batch)["image"])
    delta = poisoned - x_clean[idx]
    scale = np.abs(delta).reshape(k, -1).max(1).reshape(k, 1, 1, 1)
    shown = 0.5 + 0.5 * delta / np.maximum(scale, 1e-12)  # each δ stretched to fill [0, 1]

    class_names = dataset.class_names or [str(i) for i in range(dataset.num_classes)]
    plt = plots.plt
    fig, axes = plt.subplots(3, k, figsize=(1.3 * k, 4.2), squeeze=False)
    rows = (("clean", x_clean[idx]), ("poisoned", poisoned), ("δ (rescaled)", shown))
    for r, (label, images) in enumerate(rows):
        for c in range(k):
            ax = axes[r, c]
            img = np.clip(images[c], 0.0, 1.0)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0:
                ax.set_title(class_names[int(dataset.y_train[c])], fontsize=8)
    fig.suptitle(f"{run} ({name}, {tm.norm} ε={tm.epsilon:.4g})", fontsize=9)
    plots.save_figure(fig, path)
    return path


def report(workdirs, *, out=None):
    """Writes ``report.md`` and its figures for `workdirs` into `out` (default: the first one).

    Returns:
      The path of ``report.md``.

    Raises:
      ReportError: when the workdirs differ in data, victim epochs or loss threshold
        (`check_poolable`); nothing is written then.
    """
    workdirs = [Path(w) for w in workdirs]
    out = Path(out) if out else workdirs[0]
    unique = len({w.name for w in workdirs}) == len(workdirs)
    labels = [w.name if unique else str(w) for w in workdirs]
    loaded = [(_load_json(w / "config.json"), _load_json(w / "results.json")) for w in workdirs]
    if len(workdirs) > 1:
        check_poolable(
            {
                label: _pooled_fields(config, results)
                for label, (config, results) in zip(labels, loaded, strict=True)
                if results is not None
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# jaxpoison report", ""]
    all_summaries = {}
    for k, (workdir, (config, results)) in enumerate(zip(workdirs, loaded, strict=True)):
        title = (config or {}).get("name") or workdir.name
        lines += [f"## {k}: {title}", "", f"Workdir: `{workdir}`", ""]
        if results is None:
            lines += ["No `results.json` here (the run has not finished); skipped.", ""]
            continue
        if not results.get("complete"):
            lines += ["`results.json` is not marked complete.", ""]
        runs, summary = results.get("runs", {}), results.get("summary", {})
        if runs:
            curves = out / f"curves_{k}.png"
            plots.curves(runs, curves, title=title)
            lines += _summary_rows(summary) + ["", f"![curves]({curves.name})", ""]
        lines += _eval_section(runs, summary)
        lines += _figures_section(k, config, results, title, out)
        prefix = f"{labels[k]}/" if len(workdirs) > 1 else ""
        all_summaries.update({prefix + n: s for n, s in summary.items() if s.get("epochs", 1)})
        lines += _poison_section(k, workdir, config, out)
    lines += _learning_speed_section(all_summaries, out)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _learning_speed_section(summaries, out):
    """Per trained run the epoch to the loss threshold, peak and final accuracy; both Spearman
    correlations or why they are undefined; the scatters from `speed.MIN_POINTS` runs on."""
    lines = ["## Learning speed", ""]
    if not summaries:
        return lines + ["No trained runs.", ""]
    diag = speed.diagnostics(summaries)
    threshold = next(iter(diag["runs"].values()))["loss_threshold"]
    lines += [
        f"| run | first epoch train loss < {threshold:g} (mean over seeds) | peak acc (%) "
        "| final acc (%) |",
        "|---|---|---|---|",
    ]
    for name, p in diag["runs"].items():
        epoch = f"never (> {p['epochs']})" if p["censored"] else f"{p['epoch_to_threshold']:.3g}"
        lines.append(
            f"| {name} | {epoch} | {100 * p['peak_acc']:.2f} | {100 * p['final_acc']:.2f} |"
        )
    lines += ["", speed.describe(diag), ""]
    if diag["num_runs"] >= speed.MIN_POINTS:
        figures = speed.save_plots(diag["runs"], out)
        lines += [*[f"![{p.stem}]({p.name})" for p in figures], ""]
    return lines


def _eval_section(runs, summary):
    """The evaluator table (mean ± std over seeds) and every per-seed metric."""
    rows = _eval_rows(runs)
    if not rows:
        return []
    lines = ["### Evaluators", ""]
    eval_summary = {n: s for n, s in summary.items() if "evals" in s}
    if eval_summary:
        lines += ["```", summarize.eval_table(eval_summary), "```", ""]
    return lines + rows + [""]


def _figures_section(k, config, results, title, out):
    """Confusion matrices, the attacks × defenses grid, the transfer heat maps and the λ sweep of
    one workdir's results."""
    lines = []
    runs = results.get("runs", {})
    confusions = {n: r["confusion"] for n, r in runs.items() if "confusion" in r}
    if confusions:
        path = plots.confusion_matrices(
            confusions,
            out / f"confusion_{k}.png",
            class_names=_class_names(config, results),
            title=f"{title}: clean test set (rows: true class, % of the class)",
        )
        lines += ["### Confusion matrices (clean test set, final victims)", ""]
        lines += [f"![confusion]({path.name})", ""]
    if results.get("defense_grid"):
        grid = results["defense_grid"]
        path = plots.defense_heatmap(grid, out / f"defense_grid_{k}.png", title=title)
        lines += ["### Attacks × defenses", "", summarize.defense_grid_markdown(grid), ""]
        lines += [f"![defense grid]({path.name})", ""]
    if results.get("transfer"):
        paths = transfer.save_plots(results["transfer"], out, suffix=f"_{k}")
        lines += ["### Transfer across architectures", "", "```"]
        lines += [transfer.table(results["transfer"]), "```", ""]
        lines += [f"![{p.stem}]({p.name})" for p in paths] + [""]
    if results.get("lambda_sweep"):
        path = tradeoff.plot(results["lambda_sweep"], out / f"lambda_sweep_{k}.png", title=title)
        lines += ["### λ sweep: natural risk vs hypocritical risk on D-", ""]
        for family, pts in results["lambda_sweep"].items():
            lines.append(
                f"- **{family}**: "
                + "; ".join(
                    f"λ={p['lambda']:g}: R_nat {100 * p['R_nat']['mean']:.1f}%, "
                    f"R_hyp/D- {100 * p['R_hyp/D-']['mean']:.1f}%"
                    for p in pts
                )
            )
        lines += ["", f"![lambda sweep]({path.name})", ""]
    return lines


def _poison_section(k, workdir, config, out):
    from jaxpoison.trainers import poisoning

    runs = sorted(p.name for p in (workdir / "poison").glob("*") if p.is_dir())
    lines = []
    for run in runs:
        try:
            artifact = poisoning.artifact_dir(workdir, run)
        except ValueError as e:
            lines.append(f"- **{run}**: {e}")
            continue
        meta = _load_json(artifact / "metadata.json")
        t = meta.get("threat", {})
        lines.append(
            f"- **{run}**: {meta.get('poison')} ({t.get('norm')}, ε = {_fmt(t.get('epsilon'))}), "
            f"dataset {meta.get('dataset')}"
        )
        if config is None or run not in config.get("poisons", {}):
            lines.append("  (no config.json entry for it: no perturbation grid)")
            continue
        path = out / f"perturbations_{k}_{run}.png"
        try:
            perturbation_grid(config, run, workdir, path)
            lines.append(f"\n  ![{run}]({path.name})")
        except Exception as e:  # noqa: BLE001 — a missing dataset must not stop the report
            lines.append(f"  (perturbation grid skipped: {type(e).__name__}: {e})")
    if not lines:
        return []
    lines = ["### Poisons", "", *lines]
    return lines + [""]


def main(argv):
    """Entry point of ``jaxpoison report``: `argv` are the arguments after ``report``."""
    parser = argparse.ArgumentParser(prog="jaxpoison report", description=__doc__.split("\n")[0])
    parser.add_argument("workdirs", nargs="+", help="run directories (config.json, results.json)")
    parser.add_argument("--out", default=None, help="output directory (default: first workdir)")
    args = parser.parse_args(argv)
    missing = [w for w in args.workdirs if not Path(w).is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    try:
        print(report(args.workdirs, out=args.out))
    except ReportError as e:
        parser.error(str(e))  # one line on stderr, exit status 2
    return 0


__all__ = ["ReportError", "check_poolable", "main", "perturbation_grid", "report"]
