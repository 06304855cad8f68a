"""The quantized network: the method table, the quantizers and their straight-through
estimators, BitLinear, the integer matrix-product kernels, the timm-style ViT, and the mapping
of Hugging Face and timm ViT weights onto it.

Layer 1. May import `bitvit.files` only; never the data, training, deployment or study layers.
"""
