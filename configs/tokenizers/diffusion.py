"""VQ tokenizers with a diffusion decoder (4M App. B.3) for rgb, depth, normals and edges.

  python -m tokenizers_jax.train --config=configs/tokenizers/diffusion.py:modality=rgb,variant=tiny \
      --workdir=workdir/tok_rgb_diffusion

The encoder, quantizer, data and optimizer are those of configs/tokenizers/vqvae.py
(same arguments); the ViT decoder is replaced by a UNet on 4 x 4 pixel patches
that predicts x0 from 1000 linear-schedule DDPM steps rescaled to zero terminal
SNR, trained with the official per-modality loss (smooth L1 for depth and edges,
MSE for RGB and normals; cfgs/default/tokenization/divae), sampled with DDIM
(`diffusion.sample_steps`, 25) for the reconstruction grids and detokenizing.
Multi-resolution fine-tuning as the official DiVAEs (224 to 448 px in steps of 32):
--config.data.resolutions='(224,448,32)'; each resolution must be a multiple of the
UNet's 4-pixel patches times 2^(levels - 1) (32 for the 4 levels of B16).
"""
import importlib.util
import os

import ml_collections

DIFFUSION_MODALITIES = ("rgb", "depth", "normals", "edges")
# the official DiVAE configs' loss_fn per modality (canny_edge: our edges)
DIFFUSION_LOSS = {"rgb": "mse", "normals": "mse", "depth": "smooth_l1", "edges": "smooth_l1"}


def _vqvae_config(arg: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vqvae.py")
  spec = importlib.util.spec_from_file_location("vqvae_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str = "modality=rgb,variant=tiny") -> ml_collections.ConfigDict:
  c = _vqvae_config(arg if "modality=" in (arg or "") else f"modality=rgb,{arg or ''}")
  if c.modality not in DIFFUSION_MODALITIES:
    raise ValueError(f"the diffusion decoder is for {DIFFUSION_MODALITIES}, not {c.modality!r}")
  tiny = c.variant == "tiny"
  c.kind = "diffusion"
  c.model.dec_depth = 0                 # the UNet below decodes
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.base_channels = 32 if tiny else 128
  c.diffusion.channel_mult = (1, 2, 2, 2) if tiny else (1, 2, 3, 4)   # 4 levels
  c.diffusion.num_res_blocks = 1 if tiny else 3
  c.diffusion.attn_levels = 2           # self-attention at the two smallest levels
  c.diffusion.attention_resolutions = ()  # downsampling rates with attention (overrides attn_levels)
  c.diffusion.num_heads = 1             # UNet attention heads
  c.diffusion.patch_size = 4            # UNet pixel patches
  c.diffusion.steps = 1000              # training timesteps
  c.diffusion.beta_schedule = "linear"  # linear (1e-4 .. 0.02) or squaredcos_cap_v2
  c.diffusion.zero_terminal_snr = True  # rescale betas so the last step is pure noise (official)
  c.diffusion.prediction_type = "sample"  # the UNet predicts x0 (4M); or epsilon, v_prediction
  c.diffusion.loss = DIFFUSION_LOSS[c.modality]   # on the prediction target: mse, l1, smooth_l1
  c.diffusion.sample_steps = 25         # DDIM steps when decoding
  return c
