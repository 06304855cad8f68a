"""The quantized network: the method table, the quantizers and their straight-through
estimators, BitLinear, the integer matrix-product kernels, and the timm-style ViT.

Layer 1. May import `bitvit.files` only; never the data, training, deployment or study layers.
"""
