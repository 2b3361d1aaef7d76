"""Saliency metric of ctal_hf as an `evaluate` module: maximum F-measure (beta^2 = 0.3) over probability thresholds,
with counts accumulated over all the examples. Wraps `ctal_hf.metrics.CTALSaliencyMetric`."""

import datasets
import evaluate

from ctal_hf.metrics import CTALSaliencyMetric

_DESCRIPTION = """
Saliency metric of the CTAL paper: at every threshold t, pixels with probability >= t are predicted salient;
precision and recall are counted over all examples and `maxF` is the best F = (1 + b2) P R / (b2 P + R), b2 = 0.3.
`double_sigmoid=True` reproduces the published InvPT-lineage numbers, whose evaluation applies a sigmoid to the
probabilities a second time (see the ctal_hf docs, docs/tasks.md); the default is the correct metric.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of (H, W) float arrays): logits (or probabilities with `from_logits=False`).
    references (`list` of (H, W) integer arrays): 1 salient, 0 not, `ignore_index` unlabelled.
    thresholds (`int` or `list` of `float`, optional): n thresholds k / (n + 1) or explicit thresholds; default 99
        (0.05-step grid with `double_sigmoid=True`).
    beta_squared (`float`, defaults to 0.3), double_sigmoid (`bool`, defaults to `False`),
    from_logits (`bool`, defaults to `True`), ignore_index (`int`, defaults to 255).
Returns:
    `maxF` (`float`), `maxF_threshold` (`float`).
Examples:
    >>> metric = evaluate.load("path/to/ctal_saliency")
    >>> metric.compute(predictions=[[[4.0, -4.0]]], references=[[[1, 0]]])["maxF"]
    1.0
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
class CtalSaliency(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                }
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        thresholds=None,
        beta_squared=0.3,
        double_sigmoid=False,
        from_logits=True,
        ignore_index=255,
    ):
        metric = CTALSaliencyMetric(
            thresholds=thresholds,
            beta_squared=beta_squared,
            double_sigmoid=double_sigmoid,
            from_logits=from_logits,
            ignore_index=ignore_index,
        )
        metric.update_examples(predictions, references)
        return metric.compute()
