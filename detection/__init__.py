"""Detectors on ResNet-18/34 pyramids: builders, COCO data, training, evaluation, checkpoints, pictures.

The task contract every task package shares (``docs/architecture.md``): ``TASK`` (the
runner's task), ``train``, ``preflight``, ``evaluate``, ``format_metrics``,
``save_model`` / ``load_model``. Export, runtimes and ``Predictor`` are the deployment
layer's (``deploy``).
"""

from .checkpoint import load_detector, save_detector
from .evaluation import evaluate, format_metrics
from .models import ARCHS, BACKBONES, build_detector, count_parameters, rebuild_detector
from .training import TASK, preflight, train

save_model = save_detector
load_model = load_detector

__all__ = [
    "ARCHS",
    "BACKBONES",
    "TASK",
    "build_detector",
    "count_parameters",
    "evaluate",
    "format_metrics",
    "load_detector",
    "load_model",
    "preflight",
    "rebuild_detector",
    "save_detector",
    "save_model",
    "train",
]
