"""vq_layers: vector-quantization layers that are exact under every precision mix."""

from .layers.fsq import FSQ
from .layers.lfq import LFQ
from .layers.residual_fsq import GroupedResidualFSQ, ResidualFSQ
from .layers.residual_lfq import GroupedResidualLFQ, ResidualLFQ

__all__ = ["FSQ", "ResidualFSQ", "GroupedResidualFSQ", "LFQ", "ResidualLFQ", "GroupedResidualLFQ"]
__version__ = "0.1.0"
