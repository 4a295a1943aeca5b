"""FARMER: Flow AutoRegressive Transformer over Pixels — exact-likelihood pixel-space image generation."""

from farmer.config import FarmerConfig
from farmer.model import Farmer

__all__ = ["Farmer", "FarmerConfig"]
__version__ = "0.1.0"
