"""fastmoco: fast Momentum Contrast pretraining."""
from fastmoco.model import MoCo
from fastmoco.weights import load_backbone

__all__ = ["MoCo", "load_backbone"]
__version__ = "0.1.0"
