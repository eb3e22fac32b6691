"""How sure the comparison's ranking is: confidence intervals, paired tests with a Holm correction, a verdict
per pair of architectures, and a Friedman + Nemenyi ranking for the critical-difference diagram.

Every test comes from a maintained library: SciPy (bootstrap, permutation test), statsmodels (McNemar), autorank
(Friedman, Nemenyi), statsmodels again for Holm's correction; this module chooses which runs go into which test.

Per architecture: the mean test accuracy over its seeds and a 95 % bootstrap confidence interval of that mean
(``scipy.stats.bootstrap``, BCa; the percentile interval where BCa is undefined, every seed at the same accuracy).
With one run there is no interval. With a handful of seeds a bootstrap interval is rough (it tends to be too
narrow): read it together with the number of seeds.

Per pair of architectures, A above B in the table:

- The difference A − B in test accuracy: the mean of the per-seed differences over the seeds both ran (matched by
  dataset and seed), with its 95 % bootstrap interval.
- The paired test over seeds (``paired_over_seeds``): an exact permutation test of that mean difference,
  ``scipy.stats.permutation_test`` with ``permutation_type='samples'`` (all 2^n ways of swapping A's and B's
  accuracy within a seed; 2^n beyond 16 seeds are sampled). A seed is the unit of replication of an
  architecture: it asks whether A beats B over training randomness. Chosen over an exact Wilcoxon signed-rank
  test because (1) with the few seeds a sweep has, both enumerate the same 2^n sign patterns, so neither
  reaches a lower p-value (two-sided 2/2^n: 0.0625 with 5 seeds); (2) accuracy differences between seeds are
  counts over one test set, so equal and zero differences are common: the permutation test takes them as they
  are, where Wilcoxon drops zeros and ranks ties; (3) it tests the mean difference the report shows, with the
  differences' sizes rather than only their ranks.
- The exact McNemar test (``mcnemar_ensembles``: statsmodels ``mcnemar(exact=True)``) on the test-set predictions
  of each architecture's seed ensemble: the mean of the class probabilities over the seeds both ran (and both
  logged predictions for), its most probable class per test image. One 2x2 table per pair, each test image
  counted once, so McNemar's assumption of independent examples holds; pooling the per-seed tables would count
  every image once per seed and overstate the evidence, and one test per seed would leave as many p-values to
  combine. Both ensembles have the same members' seeds and size, so neither gains from being the larger
  ensemble. Mean probabilities rather than a majority vote: no ties with an even number of seeds. It asks
  whether A's models classify this test set better than B's, the test-set sampling the test over seeds ignores.
- Each family of p-values (over seeds; McNemar) is Holm-corrected over the pairs it tested (``holm``).
- The verdict: "A better than B (p = …, Holm)" only when both tests reject at 5 % after Holm and agree on the
  direction, else "no significant difference (p = …, Holm)". Requiring both is an intersection-union test: its
  p-value is the larger of the two Holm p-values (the one shown), with no further correction. Pairs whose runs
  logged no predictions (older runs) are judged by the test over seeds alone; pairs with fewer than 2 seeds in
  common get no verdict ("not tested": their McNemar test, when there is one, is shown but judges single models).

Too few seeds (``too_few_seeds``): an exact test over n seeds cannot go below a floor p-value, whatever the
accuracies (``floor_pvalue``); after Holm over m pairs the best pair's p is multiplied by m. When the floor after
Holm is not significant, those pairs cannot be called different whatever the runs say: the report warns, with
the number of seeds per architecture that would let a pair reach significance with every pair tested
(``seeds_needed``). Both are computed by the same library calls as the tests, on the most extreme data.

The critical-difference diagram (``rank_architectures``): ``autorank`` with ``force_mode='nonparametric'``
(Friedman's test, then Nemenyi's critical difference of the mean ranks), over the seeds every architecture
ran. autorank needs 3 or more architectures (with 2 there is no diagram to draw) and 5 or more seeds in common.
"""

import contextlib
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from experiments.store.runs import Predictions, RunSummary

ALPHA = 0.05  # significance level, after Holm
CONFIDENCE = 0.95  # of every interval
EXACT_UP_TO = 16  # seeds: 2^16 sign patterns enumerated; more are sampled
RESAMPLES = 9_999  # bootstrap resamples, and permutations when sampled
RNG_SEED = 0  # the same report from the same runs
MIN_RANKING_MODELS, MIN_RANKING_SEEDS = 3, 5  # autorank's minimum for Friedman + Nemenyi

Key = tuple[str, str]  # (dataset, seed): the runs a pair matches


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class PairedTest:
    """One two-sided test: its p-value, and the sign of the effect it saw (A − B: +1, -1 or 0)."""

    pvalue: float
    direction: int


@dataclass(frozen=True)
class McNemar(PairedTest):
    """The exact McNemar test of two seed ensembles on one test set."""

    members: int  # seeds in each ensemble
    only_a: int  # test images A's ensemble gets right and B's wrong
    only_b: int  # and the other way round
    accuracy_a: float  # of the ensembles
    accuracy_b: float


@dataclass(frozen=True)
class Pair:
    """Two architectures, A above B in the table, compared over the seeds both ran."""

    model_a: str
    model_b: str
    seeds: int  # matched by dataset and seed
    difference: float | None  # mean over those seeds of A − B, test accuracy; None without a seed in common
    ci: Interval | None  # of the difference; None with fewer than 2 seeds
    over_seeds: PairedTest | None  # None with fewer than 2 seeds
    over_seeds_holm: float | None = None
    over_seeds_rejected: bool = False  # by Holm at ALPHA
    mcnemar: McNemar | None = None  # None without predictions of both on the same test set
    mcnemar_holm: float | None = None
    mcnemar_rejected: bool = False
    mcnemar_skipped: str | None = None  # why there is no McNemar test, when there are seeds to test
    significant: bool = False
    verdict_p: float | None = None  # the larger Holm p-value of the tests made
    verdict: str = ""


@dataclass(frozen=True)
class SeedsFloor:
    """The pairs over ``seeds`` seeds, which cannot reach significance after Holm over ``pairs`` pairs."""

    seeds: int
    pairs: int  # the size of the Holm family: the pairs tested over seeds
    floor: float  # the smallest p-value the test over seeds can give with that many seeds
    floor_holm: float  # after Holm, for the best of the pairs
    models: list[tuple[str, str]]  # the pairs concerned


@dataclass(frozen=True)
class TooFewSeeds:
    """The pairs that cannot come out significant for want of seeds, and the seeds that would be needed."""

    floors: list[SeedsFloor]  # pairs tested over too few seeds, by number of seeds
    untested: list[tuple[str, str]]  # pairs with fewer than 2 seeds in common
    pairs: int  # every pair of architectures
    needed: int | None  # seeds per architecture for a pair to reach significance with every pair tested


@dataclass(frozen=True)
class Ranking:
    """Friedman + Nemenyi over the seeds every architecture ran (autorank's ``RankResult`` for the plot)."""

    seeds: int
    friedman_p: float
    critical_difference: float
    mean_ranks: dict[str, float]  # best (lowest) first
    result: object


@dataclass(frozen=True)
class Statistics:
    """The pairs' tests and what the report says about them (the architectures' intervals are in the table's
    rows: ``experiments.analysis.comparison.summarise``)."""

    pairs: list[Pair]
    too_few_seeds: TooFewSeeds | None  # None: every pair has enough seeds to reach significance
    without_predictions: list[RunSummary]  # older runs: no test_predictions.npz
    unreadable: dict[str, str]  # run id -> why its test_predictions.npz could not be read
    ranking: Ranking | None
    no_ranking: str | None  # why there is no ranking, when there is none
    runs_with_predictions: int


# --- The tests -------------------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float]) -> Interval | None:
    """The 95 % bootstrap confidence interval of the mean: BCa, or the percentile interval where BCa is
    undefined (every value equal); None for fewer than 2 values."""
    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        return None
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa's "cannot be calculated" for a constant sample: the fallback
            result = stats.bootstrap((data,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES,
                                     method=method, vectorized=True, rng=np.random.default_rng(RNG_SEED))
        ci = result.confidence_interval
        if math.isfinite(ci.low) and math.isfinite(ci.high):
            return Interval(float(ci.low), float(ci.high))
    return None


def mean_difference(x, y, axis):
    return np.mean(x - y, axis=axis)


def paired_over_seeds(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """The exact two-sided permutation test of the mean of a − b over paired samples (2 or more)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    exact = len(x) <= EXACT_UP_TO
    result = stats.permutation_test((x, y), mean_difference, permutation_type="samples", vectorized=True,
                                    n_resamples=np.inf if exact else RESAMPLES, alternative="two-sided",
                                    rng=np.random.default_rng(RNG_SEED))
    return PairedTest(float(result.pvalue), int(np.sign(result.statistic)))


def ensemble_correct(members: list[Predictions]) -> np.ndarray:
    """Per test image, whether the seed ensemble's most probable class (mean probabilities) is the label."""
    mean = np.mean([member.probabilities for member in members], axis=0)
    return np.argmax(mean, axis=1) == members[0].y_true


def mcnemar_ensembles(a: list[Predictions], b: list[Predictions]) -> McNemar:
    """The exact McNemar test of A's and B's seed ensembles on the same test set (the labels of every member
    equal, in the same order)."""
    right_a, right_b = ensemble_correct(a), ensemble_correct(b)
    table = [[int(np.sum(right_a & right_b)), int(np.sum(right_a & ~right_b))],
             [int(np.sum(~right_a & right_b)), int(np.sum(~right_a & ~right_b))]]
    only_a, only_b = table[0][1], table[1][0]
    return McNemar(float(mcnemar(table, exact=True).pvalue), int(np.sign(only_a - only_b)), len(a), only_a, only_b,
                   float(np.mean(right_a)), float(np.mean(right_b)))


def holm(pvalues: Sequence[float]) -> tuple[list[bool], list[float]]:
    """Holm's step-down correction at ALPHA (statsmodels ``multipletests``): which hypotheses are rejected, and
    the corrected p-values. With the m p-values sorted, p(1) <= ... <= p(m), the corrected p(i) is
    min(1, max over j <= i of (m - j + 1) p(j)).

    statsmodels runs a full garbage collection on every call: cheap once a command's start-up heap is frozen
    (``experiments.start_up_done``), a tenth of a second where the heap of TensorFlow and MLflow is not."""
    reject, corrected, _, _ = multipletests(pvalues, alpha=ALPHA, method="holm")
    return [bool(r) for r in reject], [float(c) for c in corrected]


def floor_pvalue(seeds: int) -> float:
    """The smallest p-value the test over seeds can give with ``seeds`` seeds: the test on the most extreme
    data (every seed's difference of one sign, all different)."""
    return paired_over_seeds(np.arange(1.0, seeds + 1), np.zeros(seeds)).pvalue


def best_after_holm(seeds: int, pairs: int) -> tuple[float, bool]:
    """The floor p-value of ``seeds`` seeds after Holm over ``pairs`` pairs (the others at p = 1), and whether
    it is significant."""
    reject, corrected = holm([floor_pvalue(seeds)] + [1.0] * (pairs - 1))
    return corrected[0], reject[0]


def seeds_needed(pairs: int, limit: int = 64) -> int | None:
    """The fewest seeds with which the best of ``pairs`` pairs can reach significance after Holm (None: more
    than ``limit``)."""
    return next((n for n in range(2, limit + 1) if best_after_holm(n, pairs)[1]), None)


# --- Putting it together -------------------------------------------------------------------------------------


def seed_label(key: Key) -> int | str:
    return int(key[1]) if key[1].isdigit() else key[1]


def by_key(runs: list[RunSummary]) -> dict[Key, RunSummary]:
    return {(run.dataset, run.seed): run for run in runs}


def ensemble_members(keys: list[Key], a: dict[Key, RunSummary], b: dict[Key, RunSummary],
                     predictions: dict[str, Predictions]) -> tuple[list[Predictions], list[Predictions], str | None]:
    """The predictions of A's and B's runs of the seeds both logged them for, or why there is no McNemar test."""
    keys = [key for key in keys if a[key].run_id in predictions and b[key].run_id in predictions]
    if not keys:
        return [], [], "no seed with predictions of both"
    members_a = [predictions[a[key].run_id] for key in keys]
    members_b = [predictions[b[key].run_id] for key in keys]
    labels = members_a[0].y_true
    classes = members_a[0].probabilities.shape[1]
    if any(m.y_true.shape != labels.shape or not np.array_equal(m.y_true, labels) or m.probabilities.shape[1] != classes
           for m in members_a + members_b):
        return [], [], "their test sets differ"
    return members_a, members_b, None


def compare_pair(model_a: str, model_b: str, a: dict[Key, RunSummary], b: dict[Key, RunSummary],
                 predictions: dict[str, Predictions]) -> Pair:
    """The pair's difference over the seeds both ran, its interval and the raw p-values (Holm comes after)."""
    keys = sorted(set(a) & set(b), key=lambda key: (key[0], len(key[1]), key[1]))
    if not keys:
        return Pair(model_a, model_b, 0, None, None, None)
    differences = [a[key].test_accuracy - b[key].test_accuracy for key in keys]
    over_seeds = None
    if len(keys) >= 2:
        over_seeds = paired_over_seeds([a[key].test_accuracy for key in keys], [b[key].test_accuracy for key in keys])
    members_a, members_b, skipped = ensemble_members(keys, a, b, predictions)
    return Pair(model_a, model_b, len(keys), float(np.mean(differences)), bootstrap_ci(differences), over_seeds,
                mcnemar=mcnemar_ensembles(members_a, members_b) if members_a else None, mcnemar_skipped=skipped)


def p_text(p: float) -> str:
    return f"{p:.3g}"


def judged(pair: Pair) -> Pair:
    """The pair with its verdict, from the Holm-corrected p-values already on it."""
    if pair.over_seeds is None:
        common = "no seed" if pair.seeds == 0 else "1 seed"
        return replace(pair, verdict=f"not tested: {common} in common")
    tests = [(pair.over_seeds, pair.over_seeds_holm, pair.over_seeds_rejected)]
    if pair.mcnemar is not None:
        tests.append((pair.mcnemar, pair.mcnemar_holm, pair.mcnemar_rejected))
    verdict_p = max(p for _, p, _ in tests)
    rejected = all(reject for _, _, reject in tests)
    directions = {test.direction for test, _, _ in tests}
    significant = rejected and len(directions) == 1 and 0 not in directions
    if significant:
        better, worse = (pair.model_a, pair.model_b) if directions == {1} else (pair.model_b, pair.model_a)
        verdict = f"{better} better than {worse} (p = {p_text(verdict_p)}, Holm)"
    else:
        disagree = "; the tests disagree on the direction" if rejected else ""
        verdict = f"no significant difference (p = {p_text(verdict_p)}, Holm{disagree})"
    return replace(pair, significant=significant, verdict_p=verdict_p, verdict=verdict)


def with_holm(pairs: list[Pair]) -> list[Pair]:
    """The pairs with both families of p-values Holm-corrected over the pairs each tested, and their verdicts."""
    seeds_tested = [i for i, pair in enumerate(pairs) if pair.over_seeds is not None]
    mcnemar_tested = [i for i, pair in enumerate(pairs) if pair.mcnemar is not None]
    pairs = list(pairs)
    for i, reject, p in zip(seeds_tested, *holm([pairs[i].over_seeds.pvalue for i in seeds_tested]), strict=True):
        pairs[i] = replace(pairs[i], over_seeds_holm=p, over_seeds_rejected=reject)
    for i, reject, p in zip(mcnemar_tested, *holm([pairs[i].mcnemar.pvalue for i in mcnemar_tested]), strict=True):
        pairs[i] = replace(pairs[i], mcnemar_holm=p, mcnemar_rejected=reject)
    return [judged(pair) for pair in pairs]


def too_few_seeds(pairs: list[Pair]) -> TooFewSeeds | None:
    """The pairs whose test over seeds cannot reach significance after Holm (by number of seeds: the floor
    p-value, raw and after Holm) and those not tested, with the seeds needed; None when there are none."""
    tested = [pair for pair in pairs if pair.over_seeds is not None]
    floors = []
    for seeds in sorted({pair.seeds for pair in tested}):
        floor_holm, reachable = best_after_holm(seeds, len(tested))
        if not reachable:
            floors.append(SeedsFloor(seeds, len(tested), floor_pvalue(seeds), floor_holm,
                                     [(pair.model_a, pair.model_b) for pair in tested if pair.seeds == seeds]))
    untested = [(pair.model_a, pair.model_b) for pair in pairs if pair.over_seeds is None]
    if not floors and not untested:
        return None
    return TooFewSeeds(floors, untested, len(pairs), seeds_needed(len(pairs)))


def rank_architectures(groups: dict[str, dict[Key, RunSummary]]) -> tuple[Ranking | None, str | None]:
    """Friedman + Nemenyi (autorank) over the seeds every architecture ran, or why not."""
    common = sorted(set.intersection(*(set(runs) for runs in groups.values())), key=lambda k: (k[0], len(k[1]), k[1]))
    if len(groups) < MIN_RANKING_MODELS or len(common) < MIN_RANKING_SEEDS:
        return None, (f"it needs {MIN_RANKING_MODELS} or more architectures with {MIN_RANKING_SEEDS} or more seeds "
                      f"in common (autorank's minimum); here {len(groups)} architecture"
                      f"{'s' * (len(groups) != 1)} share {len(common)} seed{'s' * (len(common) != 1)}")
    import pandas as pd
    from autorank import autorank  # imports pyplot: only when there is a diagram to draw

    data = pd.DataFrame({model: [runs[key].test_accuracy for key in common] for model, runs in groups.items()})
    # Quiet: autorank warns about its normality and variance checks (which the forced mode does not use), and
    # 1.3.0 prints its forced mode and its rank table to stdout.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        result = autorank(data, alpha=ALPHA, order="descending", force_mode="nonparametric")
    ranks = result.rankdf["meanrank"].sort_values()
    return Ranking(len(common), float(result.pvalue), float(result.cd),
                   {str(model): float(rank) for model, rank in ranks.items()}, result), None


def compare_architectures(runs: list[RunSummary], models: list[str], predictions: dict[str, Predictions],
                          unreadable: dict[str, str] | None = None) -> Statistics:
    """The statistics of the runs (one per model, dataset and seed), ``models`` in table order (best first):
    ``predictions`` by run id, ``unreadable`` the runs whose predictions file could not be read."""
    groups = {model: by_key([run for run in runs if run.model == model]) for model in models}
    pairs = with_holm([compare_pair(a, b, groups[a], groups[b], predictions)
                       for i, a in enumerate(models) for b in models[i + 1:]])
    unreadable = unreadable or {}
    without = [run for run in runs if run.run_id not in predictions and run.run_id not in unreadable]
    ranking, no_ranking = rank_architectures(groups)
    return Statistics(pairs, too_few_seeds(pairs), without, unreadable, ranking, no_ranking,
                      sum(run.run_id in predictions for run in runs))
