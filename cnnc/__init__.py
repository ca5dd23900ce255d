"""cnnc: a compiler for convolutional neural networks."""

__version__ = "0.1.0"
