"""The benchmark behind ``tools/benchmark.py``: our models beside torchvision's own, measured in one run; a module per kind.

==============  ============================================================
``backbones``    trunk + pyramid forwards
``detectors``    detector inference (fixed work, heavy load, exported files)
``segmenters``   segmenter inference (eager and exported)
``video``        frames per second end to end on a clip, per stage
``training``     one training iteration
``roi_align``    our CPU RoIAlign against torchvision's
``coco_eval``    pycocotools against faster-coco-eval
``report``       the rows as a table and a picture
``tradeoff``     AP against speed-up over torchvision eager (``tools/plot_tradeoff.py``)
==============  ============================================================


Method. Trunk + pyramid, training and COCO-evaluation rows: every candidate is warmed
up, then timed ``--reps`` times with the candidates of a row interleaved (so drift of
the machine hits all of them alike); the median is reported, with the ratio to the
reference of its row. Detector inference rows on the CPU: each candidate runs in a
process of its own (so one candidate's memory and thread pools do not slow another),
with the same number of threads, and reports the median of ``--reps`` forwards after
``--warmup``; every detector does the same work (``fix_detector_work``: 1000
proposals, 100 detections and masks, whatever the weights), so rows of different
depths compare. The exported rows run the file ``deploy.export`` writes for the
row's own model (fp32, and int8 by ONNX Runtime's static quantizer) through
``deploy.runtime.load_exported``, each labelled with the precision that ran.
The heavy-load rows (``--only heavy``, ``set_heavy_load``) time the same candidates where
post-processing is the work: random weights, score threshold 0 and NMS at 1.0 in the RPN and
the box head, so every one of 1000 proposals x 90 classes (90,000 candidates) passes the
threshold and nothing is suppressed; ours caps the candidates entering NMS
(``box_topk_candidates``, ``detection.postprocess``) and the row shows ours without the cap
too. ``--proposals N`` times every detector row at N proposals per image instead of 1000.
Segmenter inference rows (``bench_segmenters``) on the CPU likewise: each candidate in a
process of its own with the same threads, one 520x520 image, 21 classes (VOC), random
weights: our DeepLabV3 R18/R34 at output stride 8 and 16 and Semantic FPN R18 against
torchvision's ``deeplabv3_resnet50(weights=None, weights_backbone=None)`` (what a user
takes today, the ratios' reference), plus the exported files (fp32, int8) of DeepLabV3
R18 OS8 and Semantic FPN R18 in ONNX Runtime and OpenVINO. A segmenter's work does not
depend on its weights (no thresholds, no NMS), so nothing needs fixing.
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU, detector and
segmenter rows report the timing process's peak RSS during its first forward over its
RSS before it (activations and workspace on top of the weights; Linux ``clear_refs``;
``engine.timing.measure_peak_rss``), measured inside that process, never in a forked
child. CUDA timings are synchronised. Writes ``benchmark.json`` and ``benchmark.png``
to ``--output-dir``.
"""

from .backbones import bench_backbones, randomise_bn, torchvision_backbone
from .detectors import LOADS, bench_detectors, checkpoint_candidate, detector_pairs, detector_sizes, time_candidate
from .segmenters import SEG_CLASSES, SEG_REFERENCE, SEG_SIZE, bench_segmenters, time_segmenter
from .training import bench_training
from .coco_eval import bench_coco_eval
from .roi_align import bench_roi_align, random_boxes, roi_align_cases
from .report import format_table, plot

__all__ = ["LOADS", "SEG_CLASSES", "SEG_REFERENCE", "SEG_SIZE", "bench_backbones", "bench_coco_eval", "bench_detectors", "bench_roi_align", "bench_segmenters", "bench_training", "checkpoint_candidate", "detector_pairs", "detector_sizes", "format_table", "plot", "random_boxes", "randomise_bn", "roi_align_cases", "time_candidate", "time_segmenter", "torchvision_backbone"]
