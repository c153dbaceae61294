"""Detectors on ResNet-18/34 pyramids: builders, COCO data, training, evaluation, inference."""

from .checkpoint import atomic_save, load_detector, save_detector
from .evaluation import evaluate
from .fast import optimize_for_inference
from .models import ARCHS, BACKBONES, build_detector, count_parameters, rebuild_detector
from .predictor import Prediction, Predictor, load_model

__all__ = [
    "ARCHS",
    "BACKBONES",
    "Prediction",
    "Predictor",
    "atomic_save",
    "build_detector",
    "count_parameters",
    "evaluate",
    "load_detector",
    "load_model",
    "optimize_for_inference",
    "rebuild_detector",
    "save_detector",
]
