"""Triton kernels for the GPU path (they also run in Triton's interpreter on the CPU).

They work on plain tensors and import no layer: the layers (engine.layers) choose and launch
them. Importing a module here imports triton; the package itself does not.
"""
