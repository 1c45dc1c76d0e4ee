"""AIM: autoregressive image models (El-Nouby et al., 2024) in JAX/Flax."""
