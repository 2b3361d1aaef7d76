"""Edge metric of ctal_hf as an `evaluate` module: the balanced cross-entropy validation loss the paper reports
and the BSDS-style ODS / OIS F-measures with one-to-one boundary matching, in Python (no MATLAB). Wraps
`ctal_hf.metrics.CTALEdgeMetric`."""

import datasets
import evaluate

from ctal_hf.metrics import CTALEdgeMetric

_DESCRIPTION = """
Edge metric of the CTAL paper: `loss` is the balanced binary cross-entropy (edge pixels weigh `pos_weight` = 0.95,
others 0.05) summed over all labelled pixels and divided by their number (the paper's headline edge metric).
`odsF` / `oisF`: at each threshold the map sigmoid(logit) >= t is thinned to one-pixel curves and its pixels are
matched one-to-one to ground-truth boundary pixels within `max_dist` x the image diagonal (as the BSDS benchmark
does); counts are summed over the examples and odsF is the best F over thresholds (oisF: per-image best threshold).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of (H, W) float arrays): logits (or probabilities with `from_logits=False`, then no loss).
    references (`list` of (H, W) integer arrays): 1 edge, 0 not, `ignore_index` unlabelled.
    pos_weight (`float`, defaults to 0.95), compute_ods (`bool`, defaults to `True`),
    max_dist (`float`, defaults to 0.0075), thresholds (`int` or `list`, defaults to 99), thin (`bool`, defaults
    to `True`), from_logits (`bool`, defaults to `True`), ignore_index (`int`, defaults to 255).
Returns:
    `loss`, and with `compute_ods` also `odsF`, `ods_threshold`, `oisF` (`float`).
Examples:
    >>> metric = evaluate.load("path/to/ctal_edge")
    >>> metric.compute(predictions=[[[9.0, -9.0]]], references=[[[1, 0]]], thresholds=9)["odsF"]
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
class CtalEdge(evaluate.Metric):
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
        pos_weight=0.95,
        compute_ods=True,
        max_dist=0.0075,
        thresholds=99,
        thin=True,
        from_logits=True,
        ignore_index=255,
    ):
        metric = CTALEdgeMetric(
            pos_weight=pos_weight,
            compute_ods=compute_ods,
            max_dist=max_dist,
            thresholds=thresholds,
            thin=thin,
            from_logits=from_logits,
            ignore_index=ignore_index,
        )
        metric.update_examples(predictions, references)
        return metric.compute()
