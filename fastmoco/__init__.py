"""fastmoco: fast Momentum Contrast pretraining."""
from fastmoco.model import MoCo

__all__ = ["MoCo"]
__version__ = "0.1.0"
