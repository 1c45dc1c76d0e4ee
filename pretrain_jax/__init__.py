"""The shared pretraining core: mesh, sharding, optimizers, loop, checkpoints, data."""
