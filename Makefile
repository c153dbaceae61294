# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train train-mask train-seg pretrain-demo prune-demo test bench check-gpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The CPU demo: Faster R-CNN R18-FPN from scratch on the built-in shapes data (configs/shapes_faster_rcnn_r18_fpn.yaml).
train: $(STAMP)
	$(PY) tools/train_det.py --backbone resnet18

# The Mask R-CNN CPU demo: R18-FPN from scratch on the shapes data, bbox and segm AP (configs/shapes_mask_rcnn_r18_fpn.yaml).
train-mask: $(STAMP)
	$(PY) tools/train_det.py --model mask_rcnn

# The semantic segmentation CPU demo: a ResNet-18 trunk pretrained on shapes crops (4 epochs), then semantic FPN
# on the shapes class maps from it, mIoU per epoch (configs/seg_shapes_semantic_fpn_r18_pretrained.yaml).
# `python tools/train_seg.py` alone trains the same head from a random trunk (configs/seg_shapes_semantic_fpn_r18.yaml).
train-seg: $(STAMP)
	$(PY) tools/train_cls.py --epochs 3 --output-dir outputs/seg_shapes_trunk_r18
	$(PY) tools/train_seg.py --config seg_shapes_semantic_fpn_r18_pretrained

# The pretrained-trunk path offline: shapes crops, a trunk pretrained on them, the detector fine-tuned from it,
# against training from scratch at equal total CPU time (tools/pretrain_demo.py; about 15 minutes on 2 cores).
pretrain-demo: $(STAMP)
	$(PY) tools/pretrain_demo.py

# Channel pruning of the `make train` model (docs/pruning.md): ratios 0.25/0.5/0.75 (l1) and the target's candidate
# (0.375, bn_scale, widths multiples of 16), scope all, each fine-tuned 5 epochs of its own recipe at its learning
# rate, against a control (the unpruned model trained the same 5 epochs); bbox AP of each checkpoint and of its int8
# file (convolutions and fully connected layers; in OpenVINO and ONNX Runtime), fp32/int8 files, latency at 800x1216 and 480x640,
# and the picture of AP against speed. About 45 minutes on 2 CPU cores (and make train first if its model is missing).
PRUNE_RATIOS ?= 0.25 0.5 0.75
PRUNE_DIR ?= outputs/prune
PRUNE_MODEL ?= outputs/shapes_faster_rcnn_r18/model_final.pth
PRUNE_FT = --finetune-epochs 5 --finetune-lr-scale 1.0
PRUNE_TARGET = --ratio 0.375 --round-to 16 --importance bn_scale
PRUNED = $(foreach r,$(PRUNE_RATIOS),$(PRUNE_DIR)/r$(r).pth) $(PRUNE_DIR)/target.pth
prune-demo: $(STAMP)
	test -f $(PRUNE_MODEL) || $(MAKE) train
	mkdir -p $(PRUNE_DIR)
	$(PY) tools/train_det.py --config $(dir $(PRUNE_MODEL))config.yaml --init-checkpoint $(PRUNE_MODEL) \
	    --output-dir $(PRUNE_DIR)/control --no-progress
	cp $(PRUNE_DIR)/control/model_final.pth $(PRUNE_DIR)/control.pth
	for r in $(PRUNE_RATIOS); do \
	  $(PY) tools/prune.py --checkpoint $(PRUNE_MODEL) --ratio $$r $(PRUNE_FT) --output $(PRUNE_DIR)/r$$r.pth --no-progress || exit 1; \
	done
	$(PY) tools/prune.py --checkpoint $(PRUNE_MODEL) $(PRUNE_TARGET) $(PRUNE_FT) --output $(PRUNE_DIR)/target.pth --no-progress
	for f in $(PRUNE_MODEL) $(PRUNE_DIR)/control.pth $(PRUNED); do \
	  n=$$(basename $$f .pth); \
	  $(PY) tools/eval_coco.py --checkpoint $$f --no-progress --output-dir $(PRUNE_DIR)/eval_$$n || exit 1; \
	  $(PY) tools/export.py --checkpoint $$f --output $(PRUNE_DIR)/$$n.onnx || exit 1; \
	  $(PY) tools/export.py --checkpoint $$f --output $(PRUNE_DIR)/$${n}_int8.onnx --int8 --int8-linear --calib-images 64 || exit 1; \
	  $(PY) tools/eval_coco.py --checkpoint $(PRUNE_DIR)/$${n}_int8.onnx --runtime openvino --no-progress \
	      --output-dir $(PRUNE_DIR)/eval_$${n}_int8 || exit 1; \
	  $(PY) tools/eval_coco.py --checkpoint $(PRUNE_DIR)/$${n}_int8.onnx --runtime onnxruntime --no-progress \
	      --output-dir $(PRUNE_DIR)/eval_$${n}_int8_ort || exit 1; \
	done
	$(PY) tools/benchmark.py --only detector --archs faster_rcnn --depths 18 --reps 5 --checkpoints-only --int8-linear --output-dir $(PRUNE_DIR)/bench_800 \
	    --checkpoints $(PRUNE_DIR)/control.pth $(PRUNED)
	$(PY) tools/benchmark.py --only detector --archs faster_rcnn --depths 18 --reps 5 --checkpoints-only --int8-linear --image 480 640 --output-dir $(PRUNE_DIR)/bench_480 \
	    --checkpoints $(PRUNE_DIR)/control.pth $(PRUNED)
	$(PY) tools/plot_tradeoff.py --benchmark $(PRUNE_DIR)/bench_800/benchmark.json --reference-ap \
	    $$($(PY) -c "import json; print(json.load(open('$(PRUNE_DIR)/eval_control/metrics.json'))['bbox/AP'])") \
	    --target-speedup 12 --output $(PRUNE_DIR)/ap_speed_800.png \
	    --title "make prune-demo: Faster R-CNN R18 on shapes, pruned (scope all) + 5 epochs, 800x1216, fixed work" --runtimes eager "ONNX Runtime int8+fc" "OpenVINO int8+fc" \
	    $(foreach n,control $(foreach r,$(PRUNE_RATIOS),r$(r)) target,--point "$(n)" $(n) $(foreach e,eval_$(n) eval_$(n)_int8 eval_$(n)_int8_ort,$(PRUNE_DIR)/$(e)/metrics.json))
	ls -l $(PRUNE_MODEL) $(PRUNE_DIR)

bench: $(STAMP)
	$(PY) tools/benchmark.py

# The docs pages first (seconds; --strict fails on a broken link or anchor), then the test suite, one pytest-xdist
# worker per core (at most 4; each takes its share of torch's threads, tests/conftest.py).
test: $(STAMP)
	$(PY) -m mkdocs build --strict --quiet -d site
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist worksteal

# Needs one CUDA GPU: the CUDA tests, a 300-iteration CUDA training + evaluation, latency/memory, the CUDA benchmark;
# under 8 minutes; summary in outputs/check_gpu/summary.md (tools/check_gpu.py). Without a GPU: an error, exit 2.
check-gpu: $(STAMP)
	$(PY) tools/check_gpu.py

clean:
	rm -rf $(VENV) .pytest_cache
