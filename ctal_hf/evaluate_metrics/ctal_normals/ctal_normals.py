"""Surface normals metric of ctal_hf as an `evaluate` module: mean / median / RMS angular error in degrees and the
fractions of pixels within 11.25, 22.5 and 30 degrees, over the labelled pixels of all the examples. Wraps
`ctal_hf.metrics.CTALNormalsMetric`."""

import datasets
import evaluate
import numpy as np

from ctal_hf.metrics import CTALNormalsMetric

_DESCRIPTION = """
Surface normals metric of the CTAL paper: the angle in degrees between the normalised prediction and the label at
every pixel whose label is not the zero vector, over all examples: `mean_angle` (the paper's headline), `median_angle`
(from a histogram with `bin_width`-degree bins, within `bin_width` of the exact median), `rmse_angle` and
`within_11.25`, `within_22.5`, `within_30` (fractions in [0, 1]).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of (3, H, W) float arrays): predicted normals, any length (normalised here).
    references (`list` of (3, H, W) float arrays): unit normals, (0, 0, 0) where unknown.
    channels_last (`bool`, defaults to `False`): inputs are (H, W, 3), the layout of the dataset columns.
    bin_width (`float`, defaults to 0.01): histogram resolution of the median, in degrees.
Returns:
    `mean_angle`, `median_angle`, `rmse_angle`, `within_11.25`, `within_22.5`, `within_30` (`float`).
Examples:
    >>> metric = evaluate.load("path/to/ctal_normals")
    >>> metric.compute(predictions=[[[[1.0]], [[0.0]], [[0.0]]]], references=[[[[0.0]], [[0.0]], [[1.0]]]])["mean_angle"]
    90.0
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
class CtalNormals(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32")))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32")))),
                }
            ),
        )

    def _compute(self, predictions, references, channels_last=False, bin_width=0.01):
        metric = CTALNormalsMetric(bin_width=bin_width)
        if channels_last:
            predictions = [np.moveaxis(np.asarray(pred, dtype=np.float32), -1, 0) for pred in predictions]
            references = [np.moveaxis(np.asarray(ref, dtype=np.float32), -1, 0) for ref in references]
        metric.update_examples(predictions, references)
        return metric.compute()
