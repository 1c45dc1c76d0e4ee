"""4M and 4M-21 in JAX: multimodal data (pseudo-labelling), model, masking, training, generation."""
