"""cnnc's runtime: loads compiled networks and trains them, with numpy and llvmlite only."""

__version__ = "0.1.0"
