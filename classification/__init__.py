"""Trunk pretraining: ResNet-18/34 image classification, the classification task of the shared runner.

``train_classifier`` trains (``tools/train_cls.py``), ``evaluate_classifier`` and
``load_classifier_weights`` evaluate (``tools/eval_cls.py``); the files it writes are what
``backbones.load_pretrained`` and ``--weights-backbone PATH`` take unchanged.
"""

from .config import CLASSIFICATION, default_cls_recipe
from .evaluation import accuracy, evaluate_classifier, load_classifier_weights
from .training import ClassificationTask, ClsData, build_ema, preflight_cls, train_classifier

__all__ = [
    "CLASSIFICATION",
    "ClassificationTask",
    "ClsData",
    "accuracy",
    "build_ema",
    "default_cls_recipe",
    "evaluate_classifier",
    "load_classifier_weights",
    "preflight_cls",
    "train_classifier",
]
