"""vq_layers: vector-quantization layers that are exact under every precision mix."""

__all__ = []
__version__ = "0.1.0"
