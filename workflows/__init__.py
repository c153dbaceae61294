"""Workflows above the tasks: what drives several pieces of one task, or more than one task, end to end.

``workflows.prune``: a detector file pruned and fine-tuned in steps (``tools/prune.py``).
``workflows.transfer``: the pretrained-trunk against scratch demo, a classifier then a
detector (``tools/pretrain_demo.py``, ``make pretrain-demo``).

Each module is imported by name (``from workflows.prune import iterative_prune``); importing
the package imports neither, so one workflow's dependencies never load for another.
"""
