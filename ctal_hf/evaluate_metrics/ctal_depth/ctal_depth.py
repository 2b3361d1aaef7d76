"""Depth (or disparity) metric of ctal_hf as an `evaluate` module: absolute error, relative error, squared relative
error, RMSE and log-RMSE over the valid pixels of all the examples (label 0 = no measurement). Wraps `ctal_hf.metrics.CTALDepthMetric`."""

import datasets
import evaluate

from ctal_hf.metrics import CTALDepthMetric

_DESCRIPTION = """
Depth metric of the CTAL paper: over every pixel with a label (label != 0) of all examples, `abs_err` = mean
|p - g|, `rel_err` = mean |p - g| / g (the paper's headline depth metric), `sq_rel` = mean (p - g)^2 / g,
`rmse` = sqrt(mean (p - g)^2) and `log_rmse` = sqrt(mean (log p - log g)^2). Predictions <= 0 count as 1e-9, as
in the authors' evaluation.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of (H, W) float arrays): predicted depth (or disparity), one map per example.
    references (`list` of (H, W) float arrays): labels, 0 where there is no measurement.
Returns:
    `abs_err`, `rel_err`, `sq_rel`, `rmse`, `log_rmse` (`float`).
Examples:
    >>> metric = evaluate.load("path/to/ctal_depth")
    >>> metric.compute(predictions=[[[1.1, 5.0]]], references=[[[1.0, 0.0]]])["rel_err"]
    0.10000002384185791
"""

_CITATION = """
@article{sinodinos2024ctal,
  title={Cross-Task Affinity Learning for Multitask Dense Scene Predictions},
  author={Sinodinos, Dimitrios and Armanfard, Narges},
  journal={arXiv preprint arXiv:2401.11124},
  year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CtalDepth(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                }
            ),
        )

    def _compute(self, predictions, references):
        metric = CTALDepthMetric()
        metric.update_examples(predictions, references)
        return metric.compute()
