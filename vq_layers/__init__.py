"""vq_layers: vector-quantization layers that are exact under every precision mix."""

from .layers.binary_mapper import BinaryMapper
from .layers.fsp import FSP
from .layers.fsq import FSQ
from .layers.hierarchical_vq import HierarchicalVQ
from .layers.latent_quantize import LatentQuantize
from .layers.lfq import LFQ
from .layers.random_projection import RandomProjectionQuantizer
from .layers.residual_fsq import GroupedResidualFSQ, ResidualFSQ
from .layers.residual_lfq import GroupedResidualLFQ, ResidualLFQ
from .layers.residual_sim_vq import ResidualSimVQ
from .layers.residual_vq import GroupedResidualVQ, ResidualVQ
from .layers.sim_vq import SimVQ
from .layers.vq import VectorQuantize

__all__ = [
    "FSQ", "ResidualFSQ", "GroupedResidualFSQ",
    "LFQ", "ResidualLFQ", "GroupedResidualLFQ",
    "VectorQuantize", "ResidualVQ", "GroupedResidualVQ",
    "HierarchicalVQ", "RandomProjectionQuantizer", "SimVQ", "ResidualSimVQ",
    "LatentQuantize", "FSP", "BinaryMapper",
]
__version__ = "0.1.0"
