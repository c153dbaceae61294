"""R-CNN box post-processing with a per-image cap on the candidates before NMS, and test-time proposal counts.

torchvision's ``RoIHeads.postprocess_detections`` makes one candidate of every proposal
and class (1000 proposals x 90 classes = 90,000 with COCO's 91), keeps those above
``score_thresh`` that are not tiny, runs one ``batched_nms`` over all of them and then
keeps ``detections_per_img``. At a low score threshold that NMS is quadratic in up to
90,000 boxes: seconds in eager PyTorch, more in an exported ONNX file. ``CappedRoIHeads``
adds one step before the NMS, as torchvision's own RetinaNet and FCOS
(``topk_candidates``) and MMDetection's dense heads (``nms_pre``) do: only the
``topk_candidates`` highest-scoring candidates of each image enter it. Everything else is
torchvision's code unchanged, and the step is traceable (``_topk_min``, as torchvision's
RPN and RetinaNet take their top-k), so an exported file caps exactly as eager does.

Why a cap >= ``detections_per_img`` rarely changes a result: greedy NMS decides each box
from the higher-scoring boxes only, so NMS over the top K candidates keeps exactly the
boxes of the full NMS that are among the top K. The output differs only when fewer than
``detections_per_img`` of the top K survive NMS while more candidates were left out (never
at NMS 1.0, which suppresses nothing; never when at most K candidates pass the score
threshold, e.g. at most 19 classes a proposal can score above 0.05, so 19,000 for 1000
proposals is the most there can be).

``set_test_options`` changes the test-time proposal counts of the RPN
(``rpn_pre_nms_top_n_test`` per pyramid level, ``rpn_post_nms_top_n_test`` per image) and the
cap on a built model, without retraining; an exported file has them baked in.
"""

import argparse
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops

__all__ = [
    "DEFAULT_TOPK_CANDIDATES",
    "TEST_OPTIONS",
    "CappedRoIHeads",
    "add_test_option_args",
    "cap_box_candidates",
    "check_test_options",
    "check_topk_candidates",
    "fix_detector_work",
    "parse_test_options",
    "read_test_options",
    "set_fixed_thresholds",
    "set_heavy_load",
    "set_test_options",
]

log = logging.getLogger(__name__)

# 50 x torchvision's 100 detections per image. Above what a trained detector's candidates usually number at the
# default score threshold 0.05 (a few per proposal), so normal results do not change (see the module docstring),
# while the 90,000 candidates of a score threshold of 0 become 5,000: an NMS of 1/324 the box pairs.
DEFAULT_TOPK_CANDIDATES = 5000
# Options set_test_options changes, named as build_detector's keyword arguments.
TEST_OPTIONS = ("rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test", "box_topk_candidates")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_topk_candidates(value: Any, detections_per_img: int | None = None) -> int:
    """Return ``value`` if it is a valid ``box_topk_candidates``, else raise ``ValueError`` naming it.

    Args:
        value: the cap on candidates entering NMS, per image.
        detections_per_img: the detections kept per image; a cap below it would cut them.
    """
    _positive_int("box_topk_candidates", value)
    if detections_per_img is not None and value < detections_per_img:
        raise ValueError(
            f"box_topk_candidates must be >= box_detections_per_img ({detections_per_img}), got {value}: fewer candidates "
            f"than detections would cut the detections (the default is {DEFAULT_TOPK_CANDIDATES})"
        )
    return value


class CappedRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` whose box post-processing lets only the ``topk_candidates`` best candidates of an image into NMS.

    Made from a built ``RoIHeads`` by ``cap_box_candidates``; its weights, state-dict keys,
    training and mask branch are torchvision's.
    """

    topk_candidates: int

    def postprocess_detections(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        # torchvision 0.29's RoIHeads.postprocess_detections, with the cap marked below.
        device = class_logits.device
        num_classes = class_logits.shape[-1]

        boxes_per_image = [boxes_in_image.shape[0] for boxes_in_image in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)

        pred_scores = F.softmax(class_logits, -1)

        pred_boxes_list = pred_boxes.split(boxes_per_image, 0)
        pred_scores_list = pred_scores.split(boxes_per_image, 0)

        all_boxes = []
        all_scores = []
        all_labels = []
        for boxes, scores, image_shape in zip(pred_boxes_list, pred_scores_list, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)

            labels = torch.arange(num_classes, device=device)
            labels = labels.view(1, -1).expand_as(scores)

            # remove predictions with the background label
            boxes = boxes[:, 1:]
            scores = scores[:, 1:]
            labels = labels[:, 1:]

            # every class prediction a separate candidate
            boxes = boxes.reshape(-1, 4)
            scores = scores.reshape(-1)
            labels = labels.reshape(-1)

            inds = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[inds], scores[inds], labels[inds]

            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]

            # The cap: the best topk_candidates enter NMS, in their original order, so that below the cap NMS sees
            # exactly what torchvision's does (ties included). _topk_min keeps k a graph value when traced.
            num = det_utils._topk_min(scores, self.topk_candidates, 0)
            top = scores.topk(num).indices.sort().values
            boxes, scores, labels = boxes[top], scores[top], labels[top]

            # Looked up at call time, as torchvision does, so the export's branchless batched_nms applies here too.
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)
            keep = keep[: self.detections_per_img]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]

            all_boxes.append(boxes)
            all_scores.append(scores)
            all_labels.append(labels)

        return all_boxes, all_scores, all_labels


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _two_stage_parts(model: Any, what: str) -> tuple[RegionProposalNetwork, RoIHeads]:
    model = _unwrap(model)
    rpn, heads = getattr(model, "rpn", None), getattr(model, "roi_heads", None)
    if not isinstance(rpn, RegionProposalNetwork) or not isinstance(heads, RoIHeads):
        if hasattr(model, "runtime") or isinstance(model, torch.jit.ScriptModule):
            raise ValueError(f"{what} cannot be changed on an exported file ({type(model).__name__}): it is baked in at export; "
                             f"export again with tools/export.py and the option (e.g. --proposals N)")
        arch = (getattr(model, "build_args", None) or {}).get("arch", type(model).__name__)
        raise ValueError(f"{what} applies to Faster R-CNN and Mask R-CNN (an RPN and RoI heads), not to {arch}")
    return rpn, heads


def cap_box_candidates(model: nn.Module, topk_candidates: int = DEFAULT_TOPK_CANDIDATES) -> nn.Module:
    """Give a Faster/Mask R-CNN's box post-processing a per-image cap on the candidates entering NMS, in place.

    ``build_detector`` does this for every R-CNN it builds (``box_topk_candidates``); this
    also works on torchvision's own detectors. Weights and state-dict keys do not change.

    Args:
        model: a torchvision ``FasterRCNN`` / ``MaskRCNN`` (possibly DDP-wrapped).
        topk_candidates: candidates per image that enter NMS, >= the detections kept.

    Returns:
        ``model``.
    """
    _, heads = _two_stage_parts(model, "box_topk_candidates")
    check_topk_candidates(topk_candidates, heads.detections_per_img)
    if not isinstance(heads, CappedRoIHeads):
        # The subclass adds a method and an integer, no module or buffer: the instance becomes one as it is.
        heads.__class__ = CappedRoIHeads
    heads.topk_candidates = topk_candidates
    return model


def check_test_options(options: Mapping[str, Any]) -> dict[str, int]:
    """Return ``options`` as a dict if every name is one of ``TEST_OPTIONS`` and every value a positive integer, else raise ``ValueError``.

    Args:
        options: ``{name: value}`` meant for ``set_test_options``.
    """
    unknown = sorted(set(options) - set(TEST_OPTIONS))
    if unknown:
        raise ValueError(f"unknown test-time option(s) {unknown}: valid are {list(TEST_OPTIONS)}")
    return {name: _positive_int(name, value) for name, value in options.items()}


def set_test_options(model: nn.Module, options: Mapping[str, Any]) -> nn.Module:
    """Set test-time proposal counts and the candidate cap of a built Faster/Mask R-CNN, in place, without retraining.

    Only inference (eval mode) reads them; training keeps its own counts. They are not
    written to ``model.build_args``: a checkpoint saved afterwards rebuilds with the
    values it was built with. An exported file has the values of the model it was
    exported from baked in (``deploy.export`` records them in its metadata).

    Args:
        model: a detector from ``build_detector`` / ``load_detector`` (or its
            ``optimize_for_inference`` copy, or a torchvision R-CNN).
        options: any of ``TEST_OPTIONS``: ``rpn_pre_nms_top_n_test`` (proposals per
            pyramid level before the RPN's NMS), ``rpn_post_nms_top_n_test`` (proposals
            per image after it: the RoIs the box head runs on), ``box_topk_candidates``;
            positive integers.

    Returns:
        ``model``.

    Raises:
        ValueError: an unknown name, a value that is not a positive integer, a cap
            below ``box_detections_per_img``, or a model without an RPN (RetinaNet, FCOS,
            an exported file).
    """
    options = check_test_options(options)
    if not options:
        return model
    rpn, _ = _two_stage_parts(model, ", ".join(options))
    if "box_topk_candidates" in options:
        cap_box_candidates(model, options["box_topk_candidates"])
    if "rpn_pre_nms_top_n_test" in options:
        rpn._pre_nms_top_n = {**rpn._pre_nms_top_n, "testing": int(options["rpn_pre_nms_top_n_test"])}
    if "rpn_post_nms_top_n_test" in options:
        rpn._post_nms_top_n = {**rpn._post_nms_top_n, "testing": int(options["rpn_post_nms_top_n_test"])}
    log.info("test-time options: %s", ", ".join(f"{k}={v}" for k, v in options.items()))
    return model


def read_test_options(model: nn.Module) -> dict[str, Any] | None:
    """The test-time proposal counts, candidate cap and box thresholds a Faster/Mask R-CNN runs with; ``None`` for other models.

    Args:
        model: a detector (possibly DDP-wrapped).
    """
    try:
        rpn, heads = _two_stage_parts(model, "")
    except ValueError:
        return None
    return {
        "rpn_pre_nms_top_n_test": int(rpn._pre_nms_top_n["testing"]),
        "rpn_post_nms_top_n_test": int(rpn._post_nms_top_n["testing"]),
        "rpn_nms_thresh": float(rpn.nms_thresh),
        "box_topk_candidates": int(heads.topk_candidates) if isinstance(heads, CappedRoIHeads) else None,
        "box_score_thresh": float(heads.score_thresh),
        "box_nms_thresh": float(heads.nms_thresh),
        "box_detections_per_img": int(heads.detections_per_img),
    }


# The tools' flags for TEST_OPTIONS (eval_coco.py, export.py): shared here so that they read and check alike.
_FLAGS = {"proposals": "rpn_post_nms_top_n_test", "pre_nms_proposals": "rpn_pre_nms_top_n_test", "box_topk_candidates": "box_topk_candidates"}


def add_test_option_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--proposals``, ``--pre-nms-proposals`` and ``--box-topk-candidates`` to a tool's parser.

    Args:
        parser: the tool's argument parser.
    """
    parser.add_argument("--proposals", type=int, metavar="N",
                        help="Faster/Mask R-CNN: proposals per image the box head runs on (rpn_post_nms_top_n_test; trained default 1000)")
    parser.add_argument("--pre-nms-proposals", type=int, metavar="N",
                        help="Faster/Mask R-CNN: proposals per pyramid level before the RPN's NMS (rpn_pre_nms_top_n_test; default 1000)")
    parser.add_argument("--box-topk-candidates", type=int, metavar="K",
                        help="Faster/Mask R-CNN: candidates per image entering the box NMS (default: the model's, 5000)")


def parse_test_options(args: argparse.Namespace) -> dict[str, int]:
    """The ``TEST_OPTIONS`` given by ``add_test_option_args``'s flags, checked (``ValueError`` names the flag and value).

    Args:
        args: the parsed arguments.
    """
    options = {}
    for flag, name in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value!r}")
            options[name] = value
    return options


# The loads the benchmarks, the GPU check and the tests time R-CNNs under: fixed work (same proposals and detections
# whatever the weights) and the worst post-processing load.


def fix_detector_work(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Make a random-weight R-CNN do a fixed amount of work on any image, whatever its trunk.

    Random heads make post-processing depend on the weights (how many proposals survive
    NMS, how many boxes are small or above the score threshold), so detectors of
    different depths would do different work. Here every forward keeps exactly
    ``post_nms_top_n`` proposals (RPN NMS at IoU 1.0 suppresses nothing), scores every
    proposal about 0.97 for class 1 and below 0.001 for the others (a box predictor with
    class-1 bias and regression deltas of zero), and keeps ``detections_per_img`` of them
    (box NMS at 1.0): 1000 RoIs through the box head and 100 detections (and masks) for
    every candidate and every depth, with a 1,000-box NMS rather than a 90,000-box one.
    """
    g = torch.Generator().manual_seed(seed)
    predictor = model.roi_heads.box_predictor
    with torch.no_grad():
        predictor.cls_score.weight.zero_()
        predictor.cls_score.weight[1].copy_(torch.randn(predictor.cls_score.weight.shape[1], generator=g) * 1e-3)
        predictor.cls_score.bias.zero_()
        predictor.cls_score.bias[1] = 8.0
        predictor.bbox_pred.weight.zero_()
        predictor.bbox_pred.bias.zero_()
    set_fixed_thresholds(model)
    return model


def set_fixed_thresholds(model: nn.Module) -> nn.Module:
    """The thresholds of ``fix_detector_work`` (attributes, not weights: set them on every copy)."""
    model.rpn.nms_thresh = 1.0
    model.roi_heads.nms_thresh = 1.0
    model.roi_heads.score_thresh = 0.05
    return model


def set_heavy_load(model: nn.Module) -> nn.Module:
    """The heavy load: post-processing at its worst, on a random-weight R-CNN (torchvision's or ours).

    RPN NMS at IoU 1.0 keeps ``post_nms_top_n`` proposals (1000), a box score threshold of
    0 lets every (proposal, class) pair through (90,000 candidates with 91 classes) and box
    NMS at 1.0 suppresses none of them, so torchvision's post-processing sorts and
    compares all 90,000 before keeping 100 detections. A capped model
    (``box_topk_candidates``) keeps exactly the same 100: at NMS 1.0 they are the 100
    best-scoring candidates, which any cap >= 100 lets through.
    """
    model.rpn.nms_thresh = 1.0
    model.roi_heads.nms_thresh = 1.0
    model.roi_heads.score_thresh = 0.0
    return model
