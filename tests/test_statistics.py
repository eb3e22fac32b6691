"""The comparison's statistics against known answers: synthetic runs and test-set predictions, no training.

Hand computations: the exact McNemar p-value of a 2x2 table with discordant counts b and c is the two-sided
binomial sum 2 * sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c), capped at 1; Holm multiplies the i-th smallest of m
p-values by m - i + 1 and keeps them non-decreasing; the exact paired permutation test over n seeds whose
differences all have one sign gives 2 / 2^n (the observed signs and their mirror image of the 2^n patterns).
"""

import csv
import math

import numpy as np
import pytest
from mlflow import MlflowClient
from scipy import stats as scipy_stats

from experiments.analysis.comparison import CD_DIAGRAM, FILES, summarise
from experiments.analysis.statistics import (
    ALPHA,
    compare_architectures,
    floor_pvalue,
    holm,
    mcnemar_ensembles,
    paired_over_seeds,
    seeds_needed,
)
from experiments.apps.compare import compare
from experiments.store.runs import PREDICTIONS_ARTIFACT, Predictions, RunSummary, predictions_from_file
from experiments.store.tracking import setup_experiment
from tests.test_compare import EXPERIMENT, SWEEP, log_run

CLASSES, N, SEEDS = 10, 2000, 8


def predictions(wrong: np.ndarray) -> Predictions:
    """Test-set predictions of N images (labels 0..9 in turn) wrong exactly where ``wrong``: 0.6 on the predicted
    class (the label, or the next class when wrong), the rest spread evenly."""
    y_true = np.arange(N, dtype=np.int64) % CLASSES
    y_pred = np.where(wrong, (y_true + 1) % CLASSES, y_true)
    probabilities = np.full((N, CLASSES), 0.4 / (CLASSES - 1), dtype=np.float32)
    probabilities[np.arange(N), y_pred] = 0.6
    return Predictions(y_true, y_pred, probabilities)


def mask(indices) -> np.ndarray:
    wrong = np.zeros(N, dtype=bool)
    wrong[list(indices)] = True
    return wrong


def summary(model: str, seed: int, accuracy: float, run_id: str | None = None) -> RunSummary:
    return RunSummary(run_id or f"{model}-{seed}", None, model, "builtin", "mnist", str(seed), 0, 2, 44_426, accuracy,
                      0.05, 1.0, 1000.0, {1: accuracy}, accuracy)


def synthetic_architectures() -> dict[str, list[np.ndarray]]:
    """Per architecture, the wrong-answer mask of each of 8 seeds. ``good`` gets 20 hard images wrong in every
    seed, ``noisy_b`` and ``noisy_c`` 60 each (other images, as many for both); every seed adds 5 to 15 random
    mistakes. good is clearly better than both; noisy_b and noisy_c differ only by noise."""
    rng = np.random.default_rng(21)
    hard = {"good": range(0, 20), "noisy_b": range(100, 160), "noisy_c": range(200, 260)}
    return {model: [mask([*fixed, *rng.choice(np.arange(300, N), rng.integers(5, 16), replace=False)])
                    for _ in range(SEEDS)] for model, fixed in hard.items()}


def mcnemar_p(b: int, c: int) -> float:
    """By hand: the two-sided exact binomial sum."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n)


# --- The tests, one by one --------------------------------------------------------------------------------


@pytest.mark.parametrize("b, c", [(8, 2), (0, 6), (5, 5), (12, 1), (0, 0)])
def test_exact_mcnemar_p_is_the_binomial_sum(b, c):
    only_a, only_b, neither = range(0, b), range(b, b + c), range(b + c, b + c + 7)  # the rest: both right
    result = mcnemar_ensembles([predictions(mask([*only_b, *neither]))], [predictions(mask([*only_a, *neither]))])
    assert (result.only_a, result.only_b) == (b, c)
    assert result.pvalue == pytest.approx(mcnemar_p(b, c), rel=1e-12)
    assert result.direction == (b > c) - (b < c)


def test_known_mcnemar_values():
    assert mcnemar_p(8, 2) == 112 / 1024  # 2 * (1 + 10 + 45) / 2^10
    assert mcnemar_p(0, 6) == 2 / 64
    assert mcnemar_p(12, 1) == 28 / 8192  # 2 * (1 + 13) / 2^13
    assert mcnemar_p(5, 5) == 1.0


def test_holm_matches_the_hand_computation():
    p = [mcnemar_p(0, 6), mcnemar_p(8, 2), mcnemar_p(12, 1)]  # 0.03125, 0.109375, 0.00341796875
    # Sorted: 28/8192 * 3 = 0.01025390625; 0.03125 * 2 = 0.0625; 0.109375 * 1. Non-decreasing already.
    reject, corrected = holm(p)
    assert corrected == pytest.approx([0.0625, 0.109375, 3 * 28 / 8192], rel=1e-12)
    assert reject == [False, False, True]
    # 0.012 * 3 = 0.036, 0.02 * 2 = 0.04, 0.03 * 1 = 0.03 raised to the running maximum 0.04.
    assert holm([0.012, 0.02, 0.03])[1] == pytest.approx([0.036, 0.04, 0.04], rel=1e-12)
    assert holm([]) == ([], [])


def test_the_floor_of_the_test_over_seeds_and_the_seeds_needed():
    for n in range(2, 9):
        assert floor_pvalue(n) == pytest.approx(2 / 2**n, rel=1e-12)
    # The same floor as an exact two-sided Wilcoxon signed-rank test: 0.0625 with 5 seeds.
    assert scipy_stats.wilcoxon([1.0, 2, 3, 4, 5], method="exact").pvalue == pytest.approx(floor_pvalue(5))
    for pairs in (1, 3, 6, 10, 45):
        by_hand = min(n for n in range(2, 64) if pairs * 2 / 2**n <= ALPHA)  # Holm: the best p times the pairs
        assert seeds_needed(pairs) == by_hand
    assert [seeds_needed(pairs) for pairs in (1, 3, 10)] == [6, 7, 9]


def test_too_few_seeds_warns_with_the_seeds_needed():
    runs = [summary(model, seed, accuracy + 0.001 * seed)
            for model, accuracy in [("a", 0.99), ("b", 0.98)] for seed in range(5)]
    stats = compare_architectures(runs, ["a", "b"], {})
    (pair,) = stats.pairs
    assert pair.over_seeds.pvalue == pytest.approx(0.0625)  # all 5 differences positive: the floor
    assert pair.verdict == "no significant difference (p = 0.0625, Holm)"
    few = stats.too_few_seeds
    assert [(f.seeds, f.floor, f.floor_holm) for f in few.floors] == [(5, pytest.approx(0.0625), pytest.approx(0.0625))]
    assert few.needed == 6 and few.untested == []
    three = compare_architectures(runs + [summary("c", seed, 0.97) for seed in range(5)], ["a", "b", "c"], {})
    assert three.too_few_seeds.floors[0].floor_holm == pytest.approx(3 * 0.0625)
    assert three.too_few_seeds.needed == 7
    enough = compare_architectures([summary(m, s, acc) for m, acc in [("a", 0.99), ("b", 0.98)] for s in range(6)],
                                   ["a", "b"], {})
    assert enough.too_few_seeds is None and enough.pairs[0].verdict == "a better than b (p = 0.0312, Holm)"


def test_one_model_clearly_better_is_significant_after_holm_and_noise_is_not():
    masks = synthetic_architectures()
    runs, found = [], {}
    for model, seeds in masks.items():
        for seed, wrong in enumerate(seeds):
            run = summary(model, seed, 1 - wrong.mean())
            runs.append(run)
            found[run.run_id] = predictions(wrong)
    stats = compare_architectures(runs, ["good", "noisy_b", "noisy_c"], found)
    pairs = {(p.model_a, p.model_b): p for p in stats.pairs}

    for other in ("noisy_b", "noisy_c"):
        pair = pairs["good", other]
        assert pair.seeds == SEEDS and pair.difference == pytest.approx(40 / N, abs=10 / N)
        assert pair.ci.low > 0
        assert pair.over_seeds.pvalue == pytest.approx(2 / 2**SEEDS)  # every seed better
        # The ensembles: good wrong on its 20 hard images, the other on its 60 (the random mistakes outvoted).
        assert (pair.mcnemar.members, pair.mcnemar.only_a, pair.mcnemar.only_b) == (SEEDS, 60, 20)
        assert pair.mcnemar.pvalue == pytest.approx(mcnemar_p(60, 20), rel=1e-9)
        # Holm over 3 pairs, the noise pair's p far larger: the two equal smallest both end at 3 x 2/2^8.
        assert pair.over_seeds_holm == pytest.approx(3 * 2 / 2**SEEDS)
        assert pair.mcnemar_holm == pytest.approx(3 * mcnemar_p(60, 20), rel=1e-9)
        assert pair.significant and pair.verdict == f"good better than {other} (p = 0.0234, Holm)"

    noise = pairs["noisy_b", "noisy_c"]
    assert (noise.mcnemar.only_a, noise.mcnemar.only_b) == (60, 60) and noise.mcnemar.pvalue == 1.0
    assert noise.over_seeds.pvalue > 0.2 and noise.ci.low < 0 < noise.ci.high
    assert not noise.significant and noise.verdict.startswith("no significant difference (p = ")
    assert stats.too_few_seeds is None
    assert stats.ranking.seeds == SEEDS and list(stats.ranking.mean_ranks)[0] == "good"
    assert stats.ranking.mean_ranks["good"] == 1.0 and stats.ranking.friedman_p < ALPHA


def test_a_single_run_has_no_interval_and_a_constant_one_a_point():
    rows = {row.model: row for row in summarise([summary("one", 0, 0.99)] +
                                                [summary("same", seed, 0.98) for seed in range(3)])}
    assert (rows["one"].test_accuracy_ci_low, rows["one"].test_accuracy_ci_high) == (None, None)
    assert rows["same"].test_accuracy_ci_low == rows["same"].test_accuracy_ci_high == pytest.approx(0.98)


def test_pairs_are_matched_by_seed_and_test_set():
    runs = [summary("a", 0, 0.99), summary("a", 1, 0.98), summary("a", 2, 0.97), summary("b", 1, 0.95),
            summary("b", 2, 0.96), summary("b", 7, 0.5)]
    short = Predictions(np.zeros(5, np.int64), np.zeros(5, np.int64), np.full((5, CLASSES), 0.1, np.float32))
    found = {run.run_id: predictions(mask([])) for run in runs} | {"b-2": short}
    (pair,) = compare_architectures(runs, ["a", "b"], found).pairs
    assert pair.seeds == 2 and pair.difference == pytest.approx(((0.98 - 0.95) + (0.97 - 0.96)) / 2)
    assert pair.mcnemar is None and pair.mcnemar_skipped == "their test sets differ"
    assert paired_over_seeds([0.98, 0.97], [0.95, 0.96]).pvalue == pair.over_seeds.pvalue == 0.5


def test_a_predictions_file_that_is_not_one_is_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", y_true=np.zeros(3, np.int64), y_pred=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="no array probabilities"):
        predictions_from_file(tmp_path / "bad.npz")
    np.savez(tmp_path / "shape.npz", y_true=np.zeros(3, np.int64), y_pred=np.zeros(4, np.int64),
             probabilities=np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="shapes"):
        predictions_from_file(tmp_path / "shape.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not an .npz archive of arrays"):
        predictions_from_file(tmp_path / "text.npz")


# --- compare() end to end -------------------------------------------------------------------------------


def new_store(tracking_uri):
    client = MlflowClient(tracking_uri)
    experiment_id = setup_experiment(tracking_uri, EXPERIMENT)
    parent = client.create_run(experiment_id, run_name=f"sweep-{SWEEP}",
                               tags={"sweep_id": SWEEP, "sweep_parent": "true"}).info.run_id
    return client, experiment_id, parent


def log_trained(client, experiment_id, parent, model, seed, accuracy) -> str:
    return log_run(client, experiment_id, model, seed, test_accuracy=accuracy, test_loss=0.05,
                   val_accuracy=[accuracy - 0.01, accuracy], epoch_seconds=[1.0, 1.0],
                   images_per_second=[1000, 1000], parent=parent)


def log_predictions(client, run_id, wrong, tmp_path) -> None:
    folder = tmp_path / run_id
    folder.mkdir()
    p = predictions(wrong)
    np.savez(folder / PREDICTIONS_ARTIFACT, y_true=p.y_true, y_pred=p.y_pred, probabilities=p.probabilities)
    client.log_artifact(run_id, str(folder / PREDICTIONS_ARTIFACT))


def test_compare_end_to_end_with_predictions(store_uri, tmp_path):
    client, experiment_id, parent = new_store(store_uri)
    for model, seeds in synthetic_architectures().items():
        for seed, wrong in enumerate(seeds):
            run_id = log_trained(client, experiment_id, parent, model, seed, 1 - wrong.mean())
            log_predictions(client, run_id, wrong, tmp_path)
    log_trained(client, experiment_id, parent, "noisy_c", SEEDS, 0.97)  # an older run: no predictions
    client.set_terminated(parent, "FINISHED")

    comparison = compare(store_uri, EXPERIMENT, SWEEP, None, tmp_path / "report")
    markdown, report = comparison.markdown, tmp_path / "report"
    section = markdown[markdown.index("## Statistics"):markdown.index("## Notes")]
    assert markdown.index("| Architecture |") < markdown.index("## Statistics")  # after the table, before the notes
    assert "good better than noisy_b (p = 0.0234, Holm)" in section
    assert "good better than noisy_c (p = 0.0234, Holm)" in section
    assert "|     8 |" in section and "| no significant difference (p = " in section
    assert "|         60 / 20 |  8.58e-06 | 2.57e-05 |" in section  # only good's / only the other's ensemble right
    assert ("Older runs without test_predictions.npz: 1 (noisy_c seed 8), compared without the paired test over "
            "predictions (McNemar)") in section
    assert "Too few seeds" not in section
    assert f"Critical-difference diagram ({CD_DIAGRAM}): Friedman test over the 8 seeds" in section
    assert "mean ranks (1: best) good 1.00" in section

    with open(report / "pairs.csv", newline="") as f:
        rows = {(row["model_a"], row["model_b"]): row for row in csv.DictReader(f)}
    assert sorted(map(sorted, rows)) == [["good", "noisy_b"], ["good", "noisy_c"], ["noisy_b", "noisy_c"]]
    noise = next(row for pair, row in rows.items() if "good" not in pair)
    good = rows["good", "noisy_b"]
    assert float(good["p_seeds"]) == pytest.approx(2 / 2**SEEDS) and float(good["p_seeds_holm"]) == pytest.approx(
        3 * 2 / 2**SEEDS)
    assert float(good["p_mcnemar"]) == pytest.approx(mcnemar_p(60, 20), rel=1e-9)
    assert (good["only_a"], good["only_b"], good["mcnemar_seeds"], good["significant"]) == ("60", "20", "8", "True")
    assert (noise["significant"], noise["only_a"], noise["only_b"], noise["p_mcnemar"]) == ("False", "60", "60", "1.0")

    assert (report / CD_DIAGRAM).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    logged = {artifact.path for artifact in client.list_artifacts(parent, "comparison")}
    assert logged == {f"comparison/{name}" for name in (*FILES, CD_DIAGRAM)}


def test_compare_without_predictions_skips_mcnemar_and_says_so(store_uri, tmp_path):
    client, experiment_id, parent = new_store(store_uri)
    for seed in range(3):
        log_trained(client, experiment_id, parent, "lenet", seed, 0.99 + 0.001 * seed)
        log_trained(client, experiment_id, parent, "simple_conv", seed, 0.98 + 0.001 * seed)
    client.set_terminated(parent, "FINISHED")

    comparison = compare(store_uri, EXPERIMENT, SWEEP, None, tmp_path / "report")
    section = comparison.markdown[comparison.markdown.index("## Statistics"):comparison.markdown.index("## Notes")]
    assert ("No run logged test_predictions.npz (older runs): the paired test over predictions (McNemar) was "
            "skipped") in section
    assert "| lenet | simple_conv |     3 |      +1.00 |" in section
    assert "no significant difference (p = 0.25, Holm)" in section
    assert ("**Too few seeds**: with 3 seeds in common the paired test over seeds cannot go below p = 0.25: no pair "
            "can come out significant. For a pair to reach significance (5 %) after Holm, 6 seeds of each "
            "architecture would be needed.") in section
    assert "No critical-difference diagram: it needs 3 or more architectures" in section
    with open(tmp_path / "report" / "pairs.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert (row["model_a"], row["model_b"], row["p_seeds"], row["p_mcnemar"]) == ("lenet", "simple_conv", "0.25", "")
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(FILES)  # no diagram
