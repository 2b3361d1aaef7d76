"""Evaluation metrics of the paper (docs/design.md, "Tasks, losses and metrics"), exact over a whole set and
mergeable across processes: one import path for all of them.

This module only gathers names; each concept lives in its own module: the streaming base class (`metric_base`),
the per-pixel metrics of segmentation, regression, depth and normals (`metrics_dense`), saliency and edges
(`metrics_binary`, with the BSDS boundary matching in `boundaries`), and `MultiTaskEvaluator` / `delta_m`
(`multitask_evaluation`). It sits at the top of the layer order (it re-exports the evaluator, which is above the
tasks), so package modules below the tasks import the concept modules, never this one."""

from .boundaries import match_boundaries, thin_boundaries
from .metric_base import CTALMetric, Reducer, threshold_grid
from .metrics_binary import CTALEdgeMetric, CTALSaliencyMetric
from .metrics_dense import (
    NORMALS_ANGLE_THRESHOLDS,
    CTALDepthMetric,
    CTALNormalsMetric,
    CTALRegressionMetric,
    CTALSegmentationMetric,
)
from .multitask_evaluation import MultiTaskEvaluator, delta_m

__all__ = [
    "CTALMetric",
    "CTALSegmentationMetric",
    "CTALRegressionMetric",
    "CTALDepthMetric",
    "CTALNormalsMetric",
    "CTALSaliencyMetric",
    "CTALEdgeMetric",
    "MultiTaskEvaluator",
    "delta_m",
    "thin_boundaries",
    "match_boundaries",
    "threshold_grid",
    "NORMALS_ANGLE_THRESHOLDS",
    "Reducer",
]
