"""Trunk pretraining: ResNet-18/34 image classification, the classification task of the shared runner.

The task contract every task package shares (``docs/architecture.md``): ``TASK``,
``train`` (``tools/train_cls.py``), ``preflight``, ``evaluate`` (with
``load_classifier_weights``: ``tools/eval_cls.py``), ``format_metrics``, ``save_model`` /
``load_model``; the task's own names for them (``train_classifier``,
``evaluate_classifier``, ...) stay. The files it writes are what
``backbones.load_pretrained`` and ``--weights-backbone PATH`` take unchanged.
"""

from .checkpoint import load_classifier, save_classifier
from .config import CLASSIFICATION, default_cls_recipe
from .evaluation import accuracy, evaluate_classifier, format_accuracy, load_classifier_weights
from .training import TASK, ClassificationTask, ClsData, build_ema, preflight_cls, train_classifier

train = train_classifier
preflight = preflight_cls
evaluate = evaluate_classifier
format_metrics = format_accuracy
save_model = save_classifier
load_model = load_classifier

__all__ = [
    "CLASSIFICATION",
    "TASK",
    "ClassificationTask",
    "ClsData",
    "accuracy",
    "build_ema",
    "default_cls_recipe",
    "evaluate",
    "evaluate_classifier",
    "format_accuracy",
    "format_metrics",
    "load_classifier",
    "load_classifier_weights",
    "load_model",
    "preflight",
    "preflight_cls",
    "save_classifier",
    "save_model",
    "train",
    "train_classifier",
]
