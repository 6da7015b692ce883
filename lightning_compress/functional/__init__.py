"""Pure tensor kernels (no Lightning import): scores, mask selection."""
