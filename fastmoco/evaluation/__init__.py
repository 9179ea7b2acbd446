"""Judging a pretrained backbone: `fastmoco eval linear|knn` (commands.py), the weighted kNN
(knn.py) and the cached linear probe (probe.py)."""
