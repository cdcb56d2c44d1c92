"""Transfer of poisons across architectures: the victim-accuracy matrix and attack transfer.

A config with ``config.victims`` (named victim specs, see `jaxpoison.trainers.grid`) trains every
victim architecture on every training set. Two matrices follow, rows the training sets (the
clean one and each poison, labelled with the architecture that crafted it), columns the victims:

* ``accuracy``: the victim's final clean test accuracy (mean ± std over seeds): does a poison
  crafted on one architecture still hurt the others?
* ``attack_transfer``: the fraction of the *poisoned training examples* (true labels) that the
  victim trained on *clean* data misclassifies, beside its error on the clean training examples
  (``clean_error``): how well the perturbations of error-maximizing (adversarial) poisons
  transfer as adversarial examples to other architectures.

References:
  Fowl et al. 2021, "Adversarial Examples Make Strong Poisons" (error-maximizing poisons and their
  transfer across architectures); Sandoval-Segura et al. 2022 (poisons across victim models).
"""

from __future__ import annotations

import numpy as np

from jaxpoison import plots, poisons


def crafting_architecture(config, run):
    """The model name that crafted poison run `run` of `config` (plain dicts), or None.

    Poisons of `poisons.REQUIRES_MODEL` are crafted with the surrogate (``config.surrogate``,
    updated by the spec's ``surrogate``); poisons that train their own model (error-minimizing)
    name it in the spec's ``model``, Learning to Confuse its crafting ``victim``; the others
    (class-wise noise, ...) use no model.
    """
    spec = config.get("poisons", {}).get(run)
    if spec is None:
        return None
    if spec["name"] in poisons.REQUIRES_MODEL:
        model = dict(config.get("surrogate", {}).get("model", {}))
        model.update(spec.get("surrogate", {}).get("model", {}))
        return model.get("name")
    return spec.get("model", spec.get("victim", {})).get("name")


def accuracy_matrix(runs, summary):
    """``{training set: {victim: final_test_acc mean/std}}`` of the runs that name a victim."""
    out = {}
    for name, run in runs.items():
        if "victim" in run:
            out.setdefault(run["poison"], {})[run["victim"]] = summary[name]["final_test_acc"]
    return out


def heatmap(matrix, path, *, rows=None, row_labels=None, title="", value_label=""):
    """A heat map of ``{row: {column: {'mean', 'std'} or number}}`` in %, cells annotated.

    Args:
      matrix: the values (fractions in [0, 1]); a missing cell is drawn blank.
      path: the PNG (written atomically).
      rows: row order (default: the matrix's); row_labels: ``{row: label}`` for the axis.
      title, value_label: figure title and colour-bar label.
    """
    rows = list(rows or matrix)
    cols = []
    for r in rows:
        cols += [c for c in matrix.get(r, {}) if c not in cols]
    values = np.full((len(rows), len(cols)), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            v = matrix.get(r, {}).get(c)
            if v is not None:
                values[i, j] = 100 * (v["mean"] if isinstance(v, dict) else v)
    plt = plots.plt
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2.5, 0.55 * len(rows) + 1.6))
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(values[i, j]):
                color = "black" if values[i, j] > 60 else "white"
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", color=color)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [(row_labels or {}).get(r, r) for r in rows])
    ax.set_xlabel("victim architecture")
    ax.set_ylabel("training set (crafting architecture)")
    fig.colorbar(im, ax=ax, label=value_label)
    if title:
        ax.set_title(title)
    plots.save_figure(fig, path)
    return path


def row_labels(crafted_with):
    """``{run: 'run (crafted with arch)'}`` for the heat maps' rows."""
    return {r: f"{r} ({a})" if a else r for r, a in crafted_with.items()}


def save_plots(transfer, directory, *, suffix=""):
    """Writes ``transfer<suffix>.png`` (victim accuracy) and, when present,
    ``attack_transfer<suffix>.png`` (error of the clean-trained victims on the poisoned training
    examples); returns the paths."""
    from pathlib import Path

    directory = Path(directory)
    labels = row_labels(transfer.get("crafted_with", {}))
    paths = [
        heatmap(
            transfer["accuracy"],
            directory / f"transfer{suffix}.png",
            row_labels=labels,
            title="victim clean test accuracy (%)",
            value_label="clean test accuracy (%)",
        )
    ]
    attack = {
        p: {v: cell["error_poisoned"] for v, cell in victims.items()}
        for p, victims in transfer.get("attack_transfer", {}).items()
    }
    if attack:
        paths.append(
            heatmap(
                attack,
                directory / f"attack_transfer{suffix}.png",
                row_labels=labels,
                title="error of clean-trained victims on poisoned training examples (%)",
                value_label="misclassified (%)",
            )
        )
    return paths


def table(transfer):
    """Plain-text tables of ``results['transfer']``: victim accuracy and attack transfer, in %."""
    from jaxpoison.evaluation.summarize import _format

    labels = row_labels(transfer.get("crafted_with", {}))
    victims = list(transfer["victims"])

    def cell(v):
        return "-" if v is None else f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}"

    out = ["victim clean test accuracy (%): rows training set (crafting model), columns victim"]
    rows = [("training set", *victims)]
    for r, cols in transfer["accuracy"].items():
        rows.append((labels.get(r, r), *[cell(cols.get(v)) for v in victims]))
    out.append(_format(rows))
    if transfer.get("attack_transfer"):
        out.append(
            "attack transfer: % of poisoned training examples misclassified by clean-trained "
            "victims (their error on the clean training examples in brackets)"
        )
        rows = [("poison", *victims)]
        for r, cols in transfer["attack_transfer"].items():
            cells = []
            for v in victims:
                if v not in cols:
                    cells.append("-")
                    continue
                clean = 100 * cols[v]["error_clean"]["mean"]
                cells.append(f"{cell(cols[v]['error_poisoned'])} ({clean:.1f})")
            rows.append((labels.get(r, r), *cells))
        out.append(_format(rows))
    return "\n".join(out)


__all__ = [
    "accuracy_matrix",
    "crafting_architecture",
    "heatmap",
    "row_labels",
    "save_plots",
    "table",
]
