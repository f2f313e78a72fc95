"""GPU kernels (Triton) for the custom ops, plus their ahead-of-time PTX for the TensorRT plugins.

Nothing here needs a GPU to import; kernels are checked on CPU with ``TRITON_INTERPRET=1`` and their
PTX is produced with ``triton.compile`` for an explicit ``GPUTarget``.
"""
