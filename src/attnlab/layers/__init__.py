"""Building blocks shared by every family: norms, FFNs, positions and the residual block."""
