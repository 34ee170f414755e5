"""layermerge: make CNNs faster by making them shallower (LayerMerge, ICML 2024)."""

__version__ = "0.1.0"
