"""Hand-written kernels (Pallas) for the steps where XLA's own output is far from the hardware limit."""
