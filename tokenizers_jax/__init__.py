"""Tokenizers for 4M: quantizers, VQ-VAEs, diffusion decoders, MLP dVAEs and sequence encoders."""
