"""SMPL body-pose vectors: the input of the pose MLP tokenizer, and a synthetic source of them.

4M-21 tokenizes 4D-Humans' SMPL body pose, 23 joint rotations as 3 x 3
matrices flattened to 207 values, into 8 tokens. No human-pose data can be
downloaded here, so `synthetic_body_pose` draws poses with the structure a
tokenizer can exploit: joint axis-angles are a fixed random linear map of 8
latent factors (correlated joints, as in real motion) plus small per-joint
noise, each joint within a plausible angle. Replace it with real fits
through `arrayrecord:GLOB` data (a float [207] field) for real use.
"""
from __future__ import annotations

import numpy as np

JOINTS = 23
POSE_DIM = JOINTS * 9
LATENTS = 8


def rotation_matrices(axis_angle: np.ndarray) -> np.ndarray:
  """float [..., 3] axis-angle vectors -> [..., 3, 3] rotation matrices (Rodrigues)."""
  aa = np.asarray(axis_angle, np.float64)
  angle = np.linalg.norm(aa, axis=-1, keepdims=True)
  axis = aa / np.maximum(angle, 1e-12)
  x, y, z = axis[..., 0], axis[..., 1], axis[..., 2]
  zero = np.zeros_like(x)
  k = np.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(aa.shape[:-1] + (3, 3))
  s, c = np.sin(angle)[..., None], np.cos(angle)[..., None]
  return np.eye(3) + s * k + (1 - c) * (k @ k)


_MIX = np.random.default_rng(20240521).normal(0, 1 / np.sqrt(LATENTS), (JOINTS * 3, LATENTS))
_SCALE = np.random.default_rng(20240522).uniform(0.1, 0.6, JOINTS * 3)   # radians per joint axis


def synthetic_body_pose(seed: int, index: int) -> np.ndarray:
  """float32 [207]: pose `index` of the stream `seed` (deterministic)."""
  rng = np.random.default_rng([seed, index])
  aa = _SCALE * (_MIX @ rng.normal(size=LATENTS)) + rng.normal(0, 0.02, JOINTS * 3)
  return rotation_matrices(aa.reshape(JOINTS, 3)).reshape(POSE_DIM).astype(np.float32)
