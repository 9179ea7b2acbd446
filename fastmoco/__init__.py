"""fastmoco: fast Momentum Contrast pretraining."""
from fastmoco.byol import BYOL
from fastmoco.model import MoCo
from fastmoco.simsiam import SimSiam
from fastmoco.weights import load_backbone

__all__ = ["BYOL", "MoCo", "SimSiam", "load_backbone"]
__version__ = "0.1.0"
