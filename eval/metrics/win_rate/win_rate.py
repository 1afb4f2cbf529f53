"""Judged win rate as a Hugging Face `evaluate` metric, computed by align_kit.evaluation.stats.

Load it offline from this file or its folder:  evaluate.load("/abs/path/eval/metrics/win_rate").
"""

import datasets
import evaluate

from align_kit.evaluation.stats import (
    agreement,
    bootstrap_ci,
    verdict_counts,
    verdict_scores,
    win_rate,
    win_rate_se,
)

_DESCRIPTION = """Win rate of a system against a baseline from per-prompt judge verdicts ('win', 'tie' or 'loss'
from the system's point of view), a tie counting half a win, with its standard error (sample standard
deviation of the per-prompt scores over sqrt(n)) and a seeded percentile bootstrap interval over prompts."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one verdict per prompt: 'win', 'tie' or 'loss'.
    references: optional list of str, reference verdicts for the same prompts (e.g. human labels), passed
        to compute() (not add_batch); the result then also holds `accuracy` and Cohen's `kappa` of the
        predictions against them.
    seed: int, bootstrap seed (default 0).
    n_boot: int, bootstrap resamples (default 2000).
    level: float, interval level (default 0.95).
Returns:
    win_rate, se, ci_low, ci_high, n, wins, ties, losses (and accuracy, kappa with references).
Example:
    >>> metric = evaluate.load("eval/metrics/win_rate")
    >>> metric.compute(predictions=["win", "win", "tie", "loss", "win"])["win_rate"]
    0.7
"""

_CITATION = """@book{efron1993bootstrap,
  title={An Introduction to the Bootstrap}, author={Efron, Bradley and Tibshirani, Robert J.},
  publisher={Chapman and Hall/CRC}, year={1993}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WinRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Win rate of the verdicts in `predictions`, and agreement with `references` when given."""
        # references are optional, so they are not a feature (features are all required) and evaluate would
        # drop them: hand them to _compute as an ordinary keyword instead
        return super().compute(predictions=predictions, reference_verdicts=references, **kwargs)

    def _compute(self, predictions, reference_verdicts=None, seed=0, n_boot=2000, level=0.95):
        ci_low, ci_high = bootstrap_ci(verdict_scores(predictions), seed=seed, n_boot=n_boot, level=level)
        counts = verdict_counts(predictions)
        result = {
            "win_rate": win_rate(predictions),
            "se": win_rate_se(predictions),
            "ci_low": ci_low,
            "ci_high": ci_high,
            "n": len(predictions),
            "wins": counts["win"],
            "ties": counts["tie"],
            "losses": counts["loss"],
        }
        if reference_verdicts is not None:
            labels = agreement(list(predictions), list(reference_verdicts))
            result.update(accuracy=labels["accuracy"], kappa=labels["kappa"])
        return result
