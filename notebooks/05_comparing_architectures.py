# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. Comparing architectures
#
# Train two architectures once each and one will come out ahead. Train them again with other seeds (other
# initial weights, another order of the batches) and the order may flip. A comparison is only worth something
# with the answer to: **is the difference bigger than the noise?**
#
# Here: a small sweep (LeNet and the one-conv-layer `simple_conv`, three seeds each, short `debug=tiny` runs),
# then the report `python compare.py` writes for it, and a look at where its verdict comes from
# (`experiments/analysis/statistics.py`; docs/comparing.md says more).

# %%
import lesson  # first: TensorFlow then starts quietly

# isort: split
import csv
import itertools
import math

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image as Picture
from IPython.display import Markdown, display
from mlflow import MlflowClient

from experiments.analysis import statistics
from experiments.apps.compare import compare
from experiments.run.sweep import new_sweep
from experiments.run.training import train
from experiments.store.runs import load_runs
from experiments.store.tracking import setup_experiment

uri = lesson.store_uri()
EXPERIMENT = "lenet-lab"
MODELS, SEEDS = ["lenet", "simple_conv"], [0, 1, 2]
SHORT = ["debug=tiny", "data.train_size=1024", "trainer.batch_size=32", f"tracking.uri={uri}"]
print("tracking store:", uri)

# %% [markdown]
# ## The sweep
#
# On the command line this is one command,
#
#     python train.py -m model=lenet,simple_conv seed=0,1,2 debug=tiny data.train_size=1024 trainer.batch_size=32
#
# which opens a parent run for the sweep in MLflow and trains every combination as a child run tagged with the
# sweep's id. The cell does the same with the same functions, in this kernel (6 runs, a few seconds each).

# %%
client = MlflowClient(uri)
sweep = new_sweep(client, setup_experiment(uri, EXPERIMENT), ["model=" + ",".join(MODELS),
                                                              "seed=" + ",".join(map(str, SEEDS)), *SHORT])
for model in MODELS:
    for seed in SEEDS:
        overrides = [f"model={model}", f"seed={seed}", *SHORT]
        train(lesson.train_config(*overrides), overrides, sweep=sweep)
client.set_terminated(sweep.parent_run_id, "FINISHED")
print("sweep", sweep.sweep_id)

# %% [markdown]
# ## compare.py's report
#
# `python compare.py sweep_id=<id>` reads the sweep's finished runs and writes the table, the statistics, the
# plots (validation accuracy per epoch, accuracy against size, speed) and a verdict per pair of architectures:

# %%
report = compare(uri, EXPERIMENT, sweep.sweep_id, None, lesson.work_dir("report"))
display(Markdown(report.markdown))
print("files:", sorted(path.name for path in report.output_dir.iterdir()))
for plot in ("val_accuracy.png", "accuracy_vs_parameters.png", "throughput.png"):  # bars: ± one sd over seeds
    display(Picture(filename=report.output_dir / plot))
assert report.parent_run_id == sweep.parent_run_id  # the report is also logged to the sweep's parent run

# %% [markdown]
# ## Where the verdict comes from
#
# The same numbers, taken apart. compare.py also wrote them at full precision to `comparison.csv` (one row per
# architecture) and `pairs.csv` (one row per pair). First the raw material: each run's test accuracy, paired by
# seed.

# %%
with open(report.output_dir / "comparison.csv") as f:
    rows = {row["model"]: row for row in csv.DictReader(f)}
with open(report.output_dir / "pairs.csv") as f:
    [pair] = csv.DictReader(f)
a, b = pair["model_a"], pair["model_b"]  # A: the better mean, first in the table
runs = load_runs(client, EXPERIMENT, sweep.sweep_id).runs
accuracy = {model: np.array([next(r.test_accuracy for r in runs if r.model == model and r.seed == str(seed))
                             for seed in SEEDS]) for model in (a, b)}
assert len(runs) == len(MODELS) * len(SEEDS) and {a, b} == set(MODELS)

fig, ax = plt.subplots(figsize=(5, 3.5))
for i, seed in enumerate(SEEDS):
    ax.plot([0, 1], [accuracy[a][i], accuracy[b][i]], "o-", label=f"seed {seed}")
ax.set(xticks=[0, 1], xticklabels=[a, b], xlim=(-0.4, 1.4), ylabel="test accuracy",
       title="one line per seed: the pairs the test compares")
ax.legend()
fig.tight_layout()

for model in (a, b):
    row = rows[model]
    print(f"{model:12} mean {float(row['test_accuracy_mean']):.4f}, spread over seeds (std) "
          f"{float(row['test_accuracy_std']):.4f}, 95 % bootstrap interval of the mean "
          f"[{float(row['test_accuracy_ci_low']):.4f}, {float(row['test_accuracy_ci_high']):.4f}]")
    assert math.isclose(float(row["test_accuracy_mean"]), accuracy[model].mean())
    assert math.isclose(float(row["test_accuracy_std"]), accuracy[model].std(ddof=1))

# %% [markdown]
# ### Over seeds: the permutation test, and how low its p can go
#
# The test over seeds asks whether the per-seed differences $a_i - b_i$ lean one way more than chance would
# allow. If the two architectures were equally good, each pair could as well have come out the other way round:
# so try all $2^n$ ways of swapping $a_i$ and $b_i$ (flipping the sign of each difference), and count how often
# the mean difference lands at least as far from 0 as the one observed. That fraction is the p-value.

# %%
differences = accuracy[a] - accuracy[b]
flips = np.array(list(itertools.product([1, -1], repeat=len(differences))))  # all 2^n sign patterns
means = (flips * differences).mean(axis=1)
by_hand = np.mean(np.abs(means) >= abs(differences.mean()) - 1e-12)
print(f"differences per seed: {differences}; mean {differences.mean():+.4f}")
print(f"sign patterns with a mean at least as far from 0: {int(by_hand * len(flips))} of {len(flips)} "
      f"-> p = {by_hand:.3g}   (compare.py: {float(pair['p_seeds']):.3g})")
assert math.isclose(by_hand, float(pair["p_seeds"]))

# %% [markdown]
# The observed pattern is one of $2^n$, and its mirror image gives the same distance from 0, so even the most
# lopsided result has $p \geq 2 / 2^n$: 0.25 with 3 seeds. **Three seeds can never show a significant difference,
# whatever the accuracies.** Six are the fewest that can get below 0.05.

# %%
seeds = np.arange(2, 9)
assert statistics.floor_pvalue(3) == 0.25 and statistics.floor_pvalue(6) == 2 / 2**6
assert statistics.seeds_needed(pairs=1) == 6

fig, ax = plt.subplots(figsize=(5, 3))
ax.bar(seeds, 2 / 2.0**seeds)
ax.axhline(statistics.ALPHA, color="red", ls="--", label="0.05")
ax.set(xlabel="seeds", ylabel="smallest possible p", yscale="log", title="the test over seeds: its floor")
ax.legend()
fig.tight_layout()

# %% [markdown]
# ### On the test set: McNemar
#
# The test over seeds ignores that the test set is itself a sample: 256 images here. McNemar's test looks at
# the images instead, with each architecture's seeds averaged into one ensemble: only the images exactly one of
# the two gets right say anything about which is better. If they were equally good, each such image would be a
# coin toss, so A's count among the $d$ disagreements is binomial($d$, ½), and the exact two-sided p-value is
# twice the tail at or beyond the smaller count.

# %%
only_a, only_b = int(pair["only_a"]), int(pair["only_b"])
d, k = only_a + only_b, min(only_a, only_b)
by_hand = min(1.0, 2 * sum(math.comb(d, i) for i in range(k + 1)) / 2**d)
print(f"images only {a} gets right: {only_a}, only {b}: {only_b}")
print(f"p = 2 · P(Binomial({d}, ½) ≤ {k}) = {by_hand:.4g}   (compare.py, through statsmodels: "
      f"{float(pair['p_mcnemar']):.4g})")
assert math.isclose(by_hand, float(pair["p_mcnemar"]), rel_tol=1e-9)

# %% [markdown]
# ### The verdict
#
# compare.py calls A better than B only when **both** tests say so at 5 % (after Holm's correction for testing
# several pairs: one pair here, so nothing changes) and agree on the direction. With three seeds the test over
# seeds cannot, so the verdict is "no significant difference", and the report says how many seeds it would take.
# A difference you can see in the table is not yet one you can claim.

# %%
print(pair["verdict"])
assert pair["verdict"].startswith("no significant difference") and pair["significant"] == "False"
assert "6 seeds of each architecture would be needed" in report.markdown

# %% [markdown]
# To settle it: run the sweep with `seed=0,1,2,3,4,5` (and longer training, without `debug=tiny`), then
# `python compare.py sweep_id=<its id>`. With three or more architectures and five or more seeds the report also
# draws a critical-difference diagram (Friedman and Nemenyi tests over the mean ranks).
