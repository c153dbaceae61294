"""ConfusionMatrix: hand-computed counts, accuracy and IoU, the ignore index, torchvision's print-out, two ranks."""

import math

import pytest
import torch

from helpers import REPO

from segmentation.metrics import ConfusionMatrix

# Ground truth and prediction of 10 pixels (255: ignored).
TARGET = torch.tensor([[0, 0, 0, 1, 1], [1, 2, 2, 255, 255]])
PRED = torch.tensor([[0, 0, 1, 1, 2], [1, 2, 0, 2, 0]])
# Rows: ground truth, columns: prediction; the two ignored pixels are not counted.
MATRIX = [[2, 1, 0],
          [0, 2, 1],
          [1, 0, 1]]


def test_counts_by_hand():
    cm = ConfusionMatrix(3)
    cm.update(TARGET, PRED)
    assert cm.mat.tolist() == MATRIX
    acc_global, acc, iu = cm.compute()
    assert acc_global.item() == pytest.approx(5 / 8)
    assert acc.tolist() == pytest.approx([2 / 3, 2 / 3, 1 / 2])
    # IoU = diag / (row + column - diag): 2/(3+3-2), 2/(3+3-2), 1/(2+2-1).
    assert iu.tolist() == pytest.approx([0.5, 0.5, 1 / 3])
    summary = cm.summary(["bg", "a", "b"])
    assert summary["pixel_acc"] == pytest.approx(62.5)
    assert summary["mIoU"] == pytest.approx(100 * (0.5 + 0.5 + 1 / 3) / 3, abs=1e-3)
    assert summary["IoU"] == pytest.approx({"bg": 50.0, "a": 50.0, "b": 33.3333}, abs=1e-3)
    # Counts accumulate over updates, reset clears them.
    cm.update(TARGET, PRED)
    assert cm.mat.tolist() == [[2 * v for v in row] for row in MATRIX]
    cm.reset()
    assert cm.mat.sum() == 0


def test_prints_like_torchvisions_reference():
    cm = ConfusionMatrix(3)
    cm.update(TARGET, PRED)
    assert str(cm) == (
        "global correct: 62.5\n"
        "average row correct: ['66.7', '66.7', '50.0']\n"
        "IoU: ['50.0', '50.0', '33.3']\n"
        "mean IoU: 44.4"
    )
    table = cm.table(["bg", "a", "b"]).splitlines()
    assert table[0].split() == ["label", "class", "IoU", "acc", "pixels"]
    assert table[3].split() == ["2", "b", "33.3", "50.0", "2"]
    assert table[-1] == "mean IoU: 44.4"


def test_logits_are_reduced_with_argmax():
    logits = torch.nn.functional.one_hot(PRED, 3).permute(2, 0, 1)[None].float()
    cm = ConfusionMatrix(3)
    cm.update(TARGET[None], logits)
    assert cm.mat.tolist() == MATRIX


def test_a_class_nobody_sees_is_left_out_of_the_mean():
    cm = ConfusionMatrix(4)
    cm.update(TARGET, PRED)
    _, acc, iu = cm.compute()
    assert math.isnan(iu[3].item()) and math.isnan(acc[3].item())
    summary = cm.summary()
    assert summary["IoU"]["3"] is None
    assert summary["mIoU"] == pytest.approx(100 * (0.5 + 0.5 + 1 / 3) / 3, abs=1e-3)
    assert "'nan'" in str(cm) and str(cm).endswith("mean IoU: 44.4")
    assert ConfusionMatrix(2).summary()["mIoU"] is None  # nothing counted yet


def test_bad_input_is_refused():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"ground truth holds labels \[3, 7\], outside 0..2 and not the ignore index 255"):
        cm.update(torch.tensor([0, 3, 7, 255]), torch.tensor([0, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"prediction shape \(3,\) differs from target shape \(4,\)"):
        cm.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="predictions hold labels outside 0..2"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"ignore_index 1 is one of the labels 0..2"):
        ConfusionMatrix(3, ignore_index=1)
    with pytest.raises(ValueError, match="3 class names for 2 classes"):
        ConfusionMatrix(2).summary(["a", "b", "c"])
    assert cm.mat.sum() == 0  # refused batches count nothing


_TWO_RANKS = """
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from segmentation.metrics import ConfusionMatrix

TARGET = torch.tensor({target})
PRED = torch.tensor({pred})


def rank_main(rank, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{{init_file}}", rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix(3)
        if rank == 0:  # rank 1 sees no image at all and must still take part
            cm.update(TARGET, PRED)
        cm.update(TARGET[:1], PRED[:1])
        cm.reduce_from_all_processes()
        torch.save(cm.mat, f"{{out}}.{{rank}}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.start_processes(rank_main, args=(sys.argv[1], sys.argv[2]), nprocs=2, start_method="spawn")
"""


def test_two_ranks_sum_their_matrices(tmp_path):
    # Two gloo ranks in a process of their own: started from the pytest process (forked or
    # spawned), they crashed the whole run with SIGSEGV in a fresh-clone CI run.
    import subprocess
    import sys

    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS.format(target=TARGET.tolist(), pred=PRED.tolist()))
    out = str(tmp_path / "mat")
    repo = REPO
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "init"), out], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    single = ConfusionMatrix(3)
    single.update(TARGET, PRED)
    single.update(TARGET[:1], PRED[:1])
    single.update(TARGET[:1], PRED[:1])
    for rank in range(2):
        assert torch.load(f"{out}.{rank}", weights_only=True).tolist() == single.mat.tolist()


def test_per_class_accuracy_is_recall_not_precision():
    # Rows (ground truth) and columns (prediction) with different sums: class 0 is 4 pixels, all found, while
    # 2 pixels of class 1 are called 0. Accuracy per class divides by the row (recall), which torchvision's
    # reference prints as "average row correct"; dividing by the column would give precision instead.
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    pred = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    cm = ConfusionMatrix(2)
    cm.update(target, pred)
    assert cm.mat.sum(1).tolist() != cm.mat.sum(0).tolist()
    _, acc, iu = cm.compute()
    assert acc.tolist() == pytest.approx([4 / 4, 4 / 6]), "per-class accuracy must be correct / ground-truth pixels (the row)"
    assert iu.tolist() == pytest.approx([4 / 6, 4 / 6])
    summary = cm.summary(["bg", "fg"])
    assert summary["acc"] == pytest.approx({"bg": 100.0, "fg": 66.6667}, abs=1e-3)
    assert summary["mean_acc"] == pytest.approx(100 * (1 + 4 / 6) / 2, abs=1e-3)
