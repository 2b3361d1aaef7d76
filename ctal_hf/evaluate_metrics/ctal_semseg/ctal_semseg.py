"""Semantic / human-parts segmentation metric of ctal_hf as an `evaluate` module: mIoU and pixel accuracy from one
confusion matrix over all the examples (not a mean of per-image scores). Wraps
`ctal_hf.metrics.CTALSegmentationMetric`."""

import datasets
import evaluate

from ctal_hf.metrics import CTALSegmentationMetric

_DESCRIPTION = """
Segmentation metric of the CTAL paper (semantic segmentation and human parts): a confusion matrix accumulated over
all examples, mIoU = mean over classes of TP / (TP + FP + FN), skipping classes absent from both labels and
predictions, and pixel accuracy. Pixels labelled `ignore_index` are skipped. Values are fractions in [0, 1].
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of (H, W) integer arrays): predicted class ids, one map per example.
    references (`list` of (H, W) integer arrays): label maps, `ignore_index` where unlabelled.
    num_classes (`int`): number of classes.
    ignore_index (`int`, defaults to 255): label value to skip.
Returns:
    `mIoU` (`float`), `pixel_acc` (`float`).
Examples:
    >>> metric = evaluate.load("path/to/ctal_semseg")
    >>> metric.compute(predictions=[[[0, 1]]], references=[[[0, 0]]], num_classes=2)
    {'mIoU': 0.25, 'pixel_acc': 0.5}
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
class CtalSemseg(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                }
            ),
        )

    def _compute(self, predictions, references, num_classes, ignore_index=255):
        metric = CTALSegmentationMetric(num_classes=num_classes, ignore_index=ignore_index)
        metric.update_examples(predictions, references)
        return metric.compute()
