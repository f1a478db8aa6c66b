"""defungi: classify microscope images of fungi (DeFungi) with deep neural networks."""

__version__ = "0.1.0"
