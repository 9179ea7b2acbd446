"""Weights in and out: checkpoints written atomically and read with weights_only=True
(checkpoint.py), a pretrained backbone loaded from a run, a checkpoint, an export or a timm
name (load.py), and exports for timm, torchvision and detectron2 (export.py)."""
