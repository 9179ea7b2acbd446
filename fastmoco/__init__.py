"""fastmoco: fast Momentum Contrast pretraining."""
from fastmoco.methods.byol import BYOL
from fastmoco.methods.moco import MoCo
from fastmoco.methods.simsiam import SimSiam
from fastmoco.weights.load import load_backbone

__all__ = ["BYOL", "MoCo", "SimSiam", "load_backbone"]
__version__ = "0.1.0"
