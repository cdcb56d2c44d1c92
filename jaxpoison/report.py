"""``jaxpoison report WORKDIR [WORKDIR ...] [--out DIR]``: workdirs to ``report.md`` + figures.

Reads only what a run leaves in its workdir (``config.json``, ``results.json``, ``poison/*/``)
and writes, into the first workdir or ``--out``:

* ``report.md``: per workdir the summary table (final / peak accuracy, epoch to the loss
  threshold), any evaluator results found in ``results.json`` (``runs[name]['evals']``), the
  poison artifacts; across all runs the learning-speed correlations;
* ``curves_<k>.png``: clean test accuracy per epoch of every run of workdir k;
* ``learning_speed_*.png``: epoch-to-threshold vs peak and peak vs final accuracy (≥ 3 trained
  runs; untrained ``naive`` runs are left out);
* ``confusion_<k>.png``: the confusion matrices of every run's final victims on the clean test
  set (``runs[run]['confusion']``);
* ``transfer_<k>.png`` / ``attack_transfer_<k>.png``: the heat maps of a run with
  ``config.victims`` (training set × victim architecture, ``results['transfer']``), and its tables;
* ``lambda_sweep_<k>.png``: the THRM / TRADES sweep (``results['lambda_sweep']``);
* the evaluator table (``acc/D``, ``acc/A``, ``acc/F`` mean ± std) of runs with ``config.evals``;
* ``perturbations_<k>_<run>.png``: a few clean training images, their poisoned versions and the
  rescaled δ, recomputed from the artifact with `jaxpoison.poisons` and the config's data (skipped
  with a note when the data or the artifact cannot be loaded).

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
from jaxpoison.evaluation import speed, summarize, tradeoff, transfer

NUM_IMAGES = 6


def _load_json(path):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def _fmt(value):
    if isinstance(value, (int, float)):
        return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _summary_rows(summary):
    headers, cells = summarize.accuracy_columns(summary)
    columns = ["run", *(f"{h} acc (%)" for h in headers), "peak epoch", "epoch loss < thr", "seeds"]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, s in summary.items():
        extra = [_fmt(s["peak_epoch"]), _fmt(s["epoch_loss_below_threshold"]), str(s["seeds"])]
        rows.append(f"| {name} | {' | '.join(cells[name] + extra)} |")
    return rows


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


def perturbation_grid(config, run, artifact, path, *, num_images=NUM_IMAGES):
    """Clean images (top), poisoned (middle), δ rescaled to [0, 1] (bottom) for one artifact.

    Recomputes the poisoned images from the artifact with `jaxpoison.poisons` on the first
    `num_images` training examples of ``data.load(config.data)``.
    """
    import jax
    import ml_collections

    from jaxpoison import data, experiment, poisons
    from jaxpoison.poisons import storage

    config = ml_collections.ConfigDict(config)
    dataset = data.load(config.data)
    spec = dict(experiment.plain(config.poisons[run]))
    name = spec.pop("name")
    for k in ("batch_size", "clean_extra", "surrogate"):
        spec.pop(k, None)
    tm = experiment.make_threat(spec.pop("threat", config.threat))
    kwargs = dict(threat=tm, num_classes=dataset.num_classes, image_shape=dataset.image_shape)
    if name in poisons.REQUIRES_MODEL:
        kwargs.update(apply_fn=None, variables=None)  # applying a stored δ needs no model
    poison = poisons.make(name, **kwargs, **spec)
    x_clean = data.to_float(dataset.x_train)
    template = jax.eval_shape(
        poison.init,
        jax.random.key(0),
        {
            "image": jax.ShapeDtypeStruct(x_clean.shape, np.float32),
            "label": jax.ShapeDtypeStruct(dataset.y_train.shape, np.int32),
        },
    )
    state, _ = storage.load(artifact, template, fingerprint=dataset.fingerprint())
    k = min(num_images, len(dataset.y_train))
    idx = np.arange(k)
    batch = {"image": x_clean[idx], "label": dataset.y_train[idx], "index": idx}
    poisoned = np.asarray(poison.apply(state, batch)["image"])
    delta = poisoned - x_clean[idx]
    scale = np.abs(delta).reshape(k, -1).max(1).reshape(k, 1, 1, 1)
    shown = 0.5 + 0.5 * delta / np.maximum(scale, 1e-12)  # each δ stretched to fill [0, 1]

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
                ax.set_title(f"y={int(dataset.y_train[c])}", fontsize=8)
    fig.suptitle(f"{run} ({name}, {tm.norm} ε={tm.epsilon:.4g})", fontsize=9)
    plots.save_figure(fig, path)
    return path


def report(workdirs, *, out=None):
    """Writes ``report.md`` and its figures for `workdirs` into `out` (default: the first one).

    Returns:
      The path of ``report.md``.
    """
    workdirs = [Path(w) for w in workdirs]
    out = Path(out) if out else workdirs[0]
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# jaxpoison report", ""]
    all_summaries = {}
    for k, workdir in enumerate(workdirs):
        config = _load_json(workdir / "config.json")
        results = _load_json(workdir / "results.json")
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
        lines += _figures_section(k, results, title, out)
        prefix = f"{workdir.name}/" if len(workdirs) > 1 else ""
        all_summaries.update({prefix + n: s for n, s in summary.items() if s.get("epochs", 1)})
        lines += _poison_section(k, workdir, config, out)

    lines += ["## Learning speed", ""]
    if len(all_summaries) >= 3:
        diag = speed.diagnostics(all_summaries)
        figures = speed.save_plots(diag["runs"], out)
        lines += [
            f"Spearman ρ (epoch to loss threshold vs peak accuracy): "
            f"{_fmt(diag['spearman/epoch_to_threshold_vs_peak_acc'])}; "
            f"(peak vs final accuracy): {_fmt(diag['spearman/peak_acc_vs_final_acc'])}; "
            f"{diag['num_runs']} runs (censored runs count as epochs + 1).",
            "",
            *[f"![{p.stem}]({p.name})" for p in figures],
            "",
        ]
    else:
        lines += [f"{len(all_summaries)} run(s): the scatter needs at least 3.", ""]
    if all_summaries:
        lines += ["```", summarize.table(all_summaries), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


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


def _figures_section(k, results, title, out):
    """Confusion matrices, the transfer heat maps and the λ sweep of one workdir's results."""
    lines = []
    runs = results.get("runs", {})
    confusions = {n: r["confusion"] for n, r in runs.items() if "confusion" in r}
    if confusions:
        path = plots.confusion_matrices(
            confusions, out / f"confusion_{k}.png", title=f"{title}: clean test set"
        )
        lines += ["### Confusion matrices (clean test set, final victims)", ""]
        lines += [f"![confusion]({path.name})", ""]
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
    poison_dir = workdir / "poison"
    artifacts = sorted(p for p in poison_dir.glob("*") if (p / "metadata.json").is_file())
    if not artifacts:
        return []
    lines = ["### Poisons", ""]
    for artifact in artifacts:
        meta = _load_json(artifact / "metadata.json")
        run = artifact.name
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
            perturbation_grid(config, run, artifact, path)
            lines.append(f"\n  ![{run}]({path.name})")
        except Exception as e:  # noqa: BLE001 — a missing dataset must not stop the report
            lines.append(f"  (perturbation grid skipped: {type(e).__name__}: {e})")
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
    print(report(args.workdirs, out=args.out))
    return 0


__all__ = ["main", "perturbation_grid", "report"]
