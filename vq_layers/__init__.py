"""vq_layers: vector-quantization layers that are exact under every precision mix."""

from .layers.fsq import FSQ
from .layers.residual_fsq import GroupedResidualFSQ, ResidualFSQ

__all__ = ["FSQ", "ResidualFSQ", "GroupedResidualFSQ"]
__version__ = "0.1.0"
