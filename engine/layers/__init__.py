"""The model layers: paged attention, tensor-parallel linear layers and embeddings, norms,
rotary embedding, the gated activation, int8 weight-only matmul.

Each layer picks its implementation when it is built: plain PyTorch (any device, CPU CI) or,
with `triton`, the kernels of engine.kernels (imported only then).
"""
