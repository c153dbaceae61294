"""Detectors on ResNet-18/34 pyramids: builders, COCO data, training, evaluation, checkpoints, pictures.

Export, runtimes and ``Predictor`` are the deployment layer's (``deploy``).
"""

from .checkpoint import load_detector, save_detector
from .evaluation import evaluate
from .models import ARCHS, BACKBONES, build_detector, count_parameters, rebuild_detector

__all__ = [
    "ARCHS",
    "BACKBONES",
    "build_detector",
    "count_parameters",
    "evaluate",
    "load_detector",
    "rebuild_detector",
    "save_detector",
]
