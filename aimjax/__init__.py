"""AIM: autoregressive image models (El-Nouby et al., 2024) in JAX/Flax.

`aimjax.load` and `aimjax.preprocessing` come from `aimjax.inference`,
`aimjax.extract_features` from `aimjax.backbone` (AIM's trunk as a
pretrain_jax backbone, registered as 'aim'); they are imported on first use so
that `python -m aimjax.<module>` entry points do not import each other.
"""
__all__ = ["extract_features", "load", "preprocessing"]


def __getattr__(name):
  if name == "extract_features":
    from aimjax import backbone
    return backbone.extract_features
  if name in __all__:
    from aimjax import inference
    return getattr(inference, name)
  raise AttributeError(f"module 'aimjax' has no attribute {name!r}")
