"""dse: design-space exploration sweeps for compact CNNs (Shallow SqueezeNext and its baselines)."""

__version__ = "0.1.0"
