"""The network: backbones, the top-down path, level names and geometry, weights, the zoo."""
