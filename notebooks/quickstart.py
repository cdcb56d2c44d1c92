# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # jaxpoison quickstart
#
# Craft a class-wise **Regions-4** poison (Sandoval-Segura et al. 2022) on the CIFAR-10 subset
# that ships with the package, train victims on clean and on poisoned data, and compare their
# clean test accuracy. This notebook runs the `:tiny` size so it finishes in about a minute on
# a laptop CPU; drop `"tiny"` for the real quickstart (the README's first command).

# %%
import json
import tempfile
from pathlib import Path

import jax
from IPython.display import Image, display

from jaxpoison import trainers
from jaxpoison.evaluation import summarize

print("jax", jax.__version__, "on", jax.default_backend())

# %%
import importlib.util

spec = importlib.util.spec_from_file_location("quickstart", Path("..") / "configs" / "quickstart.py")
if not Path(spec.origin).exists():  # run from the repository root instead of notebooks/
    spec = importlib.util.spec_from_file_location("quickstart", Path("configs") / "quickstart.py")
quickstart = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quickstart)
config = quickstart.get_config("tiny")
print(config.poisons, config.victim.epochs, "epochs,", config.victim.num_seeds, "seeds")

# %%
workdir = Path(tempfile.mkdtemp(prefix="jaxpoison-quickstart-"))
results = trainers.train_and_evaluate(config, workdir, progress=False)
print(summarize.table(results["summary"]))

# %%
display(Image(filename=str(workdir / "curves.png")))
print(json.dumps(results["summary"]["poisoned"]["final_test_acc"]))
