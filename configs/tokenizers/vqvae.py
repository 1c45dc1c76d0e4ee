"""ViT VQ-VAE tokenizers for image-like modalities (4M Table 3, App. B.3).

  python -m tokenizers_jax.train --config=configs/tokenizers/vqvae.py:modality=depth,variant=tiny \
      --workdir=workdir/tok_depth

Arguments: modality (rgb, depth, normals, semantic, edges, sam_mask, features) and variant
('tiny': trains in a minute on CPU at 32 px; 'B16': the paper's ViT-B/16
encoder and decoder at 224 px with the paper's codebook for the modality).
'features' tokenizes feature maps of pseudo-labelled shards (the aim_features
labeller's [K, D] maps, one token per feature vector, smooth L1): pass
--config.data.train/eval=arrayrecord:GLOB. B16 has no default data either: set
--config.data.train (and data.eval, at least one batch, to validate), or it
stops at start naming the key. Multi-resolution fine-tuning as the official
tokenizers (e.g. 224 to 448 px): --config.data.resolutions='(224,448,32)'
(tokenizers_jax.train.resolutions).
"""
import ml_collections

# 4M Table 3 codebook sizes (edges: 4M-21 App. D.7)
NUM_CODES = {"rgb": 16384, "depth": 8192, "normals": 8192, "semantic": 4096, "edges": 8192,
             "sam_mask": 1024, "features": 8192}


def get_config(arg: str = "modality=depth,variant=tiny") -> ml_collections.ConfigDict:
  opts = {"modality": "depth", "variant": "tiny"}
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if not sep or key not in opts:
      raise ValueError(f"config argument {part!r}: use modality=NAME,variant=tiny|B16")
    opts[key] = value
  if opts["modality"] not in NUM_CODES:
    raise ValueError(f"unknown modality {opts['modality']!r}; choose from {sorted(NUM_CODES)}")
  if opts["variant"] not in ("tiny", "B16"):
    raise ValueError(f"unknown variant {opts['variant']!r}; choose tiny or B16")
  tiny = opts["variant"] == "tiny"

  c = ml_collections.ConfigDict()
  c.kind = "vqvae"
  c.modality = opts["modality"]
  c.variant = opts["variant"]
  c.seed = 0
  c.batch_size = 32 if tiny else 256
  c.total_steps = 300 if tiny else 100_000
  c.log_every = 25 if tiny else 100
  c.checkpoint_every = 300 if tiny else 5000
  c.keep_checkpoints = 2
  c.profile_steps = (0, 0)                     # (start, count): jax.profiler trace into WORKDIR/plugins/profile
  c.async_checkpoint = True
  c.eval_every = 300 if tiny else 5000

  c.mesh = ml_collections.ConfigDict(
      {"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1})

  c.data = ml_collections.ConfigDict()
  # scenes:N (rendered) or arrayrecord:GLOB (pseudo-labelled); '' (B16, features): set it
  c.data.train = "scenes:20000" if tiny else ""
  c.data.eval = "scenes:128" if tiny else ""   # '' = no validation
  c.data.eval_batches = 4
  c.data.field = "aim_features" if c.modality == "features" else ""   # arrayrecord field
  if c.modality == "features":         # feature maps come from pseudo-labelled shards
    c.data.train = c.data.eval = ""
  # SAM instance masks are 64 x 64 crops -> 16 tokens at patch 16 (4M-21 App. D.3)
  c.data.resolution = 64 if c.modality == "sam_mask" else (32 if tiny else 224)
  if c.modality == "features":         # the grid side; 0 = read from the data
    c.data.resolution = 0 if tiny else 16
  # multi-resolution fine-tuning (official input_size_min/max, resolution_step): (min, max, step),
  # e.g. (224, 448, 32); each step trains at one of range(min, max + step, step), drawn from
  # (seed, step), its batch resized from the largest (data.resolution becomes max). () = off
  c.data.resolutions = ()
  c.data.scenes_seed = 0
  c.data.threads = 2 if tiny else 16

  c.model = ml_collections.ConfigDict()
  c.model.patch_size = 16 if (c.modality == "sam_mask" or not tiny) else 8
  if c.modality == "features":         # one token per feature vector (DINOv2-B/14: 16 x 16)
    c.model.patch_size = 1
  c.model.feature_dim = 0 if tiny else 768   # features' width (0 = read from the data)
  c.model.width = 64 if tiny else 768
  c.model.enc_depth = 2 if tiny else 12
  c.model.dec_depth = 2 if tiny else 12
  c.model.heads = 2 if tiny else 12
  c.model.num_codes = 256 if tiny else NUM_CODES[c.modality]
  # ViT positions: -1 = the official fixed sin-cos table at the largest data.resolutions grid,
  # bicubic-resized to each step's grid (without data.resolutions: 0); 0 = sin-cos computed at
  # each call's grid; G > 0 = the table at G x G (an official checkpoint's image_size / patch)
  c.model.pos_grid = -1
  c.model.code_dim = 32                # l2-normalised latent size
  c.model.ema_decay = 0.99
  c.model.restart_factor = 32.0        # dead below B * N_tokens / (32 * V)
  c.model.commitment = 1.0             # weight of the commitment MSE (official, 4M Table 3)
  c.model.norm_latents = False         # commitment on raw latents (official); True: l2-normalised
  # segmentation classes (ids 0..N-1): the scenes' 7, or COCO panoptic's 133 + "no class" as the
  # official semseg_coco tokenizer; 0 = the modality's own (SAM masks: 2)
  c.model.num_classes = 0
  if c.modality == "semantic":
    c.model.num_classes = 7 if tiny else 134

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 2e-3 if tiny else 1e-4
  c.optimizer.warmup_steps = 20 if tiny else 5000
  c.optimizer.end_lr = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_norm = 1.0
  c.optimizer.layer_decay = 1.0
  c.optimizer.no_decay = ()
  c.optimizer.grad_accum_steps = 1     # micro-batches per step (gradient accumulation)

  c.debug = ml_collections.ConfigDict({"crash_at_step": 0, "crash_process": -1, "nan_at_step": 0})
  return c
