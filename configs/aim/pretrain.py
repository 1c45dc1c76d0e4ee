"""AIM pretraining (paper Table 1). Variants: tiny, 0.6B, 1B, 3B, 7B.

  python -m aimjax.train --config=configs/aim/pretrain.py:variant=tiny --workdir=/tmp/aim_tiny
  python -m aimjax.train --config=configs/aim/pretrain.py:variant=0.6B --workdir=gs://... \
      --config.data.train='arrayrecord:/data/dfn/*.array_record@0.8,tfds:imagenet2012/train@0.2'

Continued pretraining from released weights: convert them (aimjax.convert), then
--config.init_from=THAT_DIR with the matching variant; the trunk is copied, the
pixel head (not released) starts fresh.

The full-size variants have no default data: without --config.data.train they
stop at start saying so, and they validate only when --config.data.eval names a
source of at least one global batch (4096 images).

The tiny variant trains on the embedded procedural scenes in about a minute
on a 2-core CPU; its loss falls from about 1.3 to about 0.6 in 300 steps
(validation loss about 0.57).
"""
import ml_collections

VARIANTS = {  # width, depth, heads
    "tiny": (64, 2, 2), "0.6B": (1536, 24, 12), "1B": (2048, 24, 16),
    "3B": (3072, 24, 24), "7B": (4096, 32, 32),
}


def parse_arg(arg: str) -> dict[str, str]:
  """'variant=tiny' or 'tiny' -> {'variant': 'tiny'}; other keys are an error."""
  out = {}
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    out.update({key: value} if sep else {"variant": key})
  unknown = set(out) - {"variant"}
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; only variant=... is accepted")
  return out


def get_config(arg: str = "variant=tiny") -> ml_collections.ConfigDict:
  variant = parse_arg(arg).get("variant", "tiny")
  if variant not in VARIANTS:
    raise ValueError(f"unknown AIM variant {variant!r}; choose from {list(VARIANTS)}")
  width, depth, heads = VARIANTS[variant]
  tiny = variant == "tiny"

  c = ml_collections.ConfigDict()
  c.variant = variant                          # informational: set it with :variant=..., not an override
  c.seed = 0                                   # seeds init, data order, augmentation, prefixes
  c.batch_size = 32 if tiny else 4096          # global, in images
  c.total_steps = 300 if tiny else (500_000 if variant == "0.6B" else 1_200_000)
  c.log_every = 10 if tiny else 100            # steps between metric lines
  c.checkpoint_every = 100 if tiny else 5000   # steps between checkpoints
  c.keep_checkpoints = 3                       # most recent checkpoints kept
  c.profile_steps = (0, 0)                     # (start, count): jax.profiler trace into WORKDIR/plugins/profile
  c.async_checkpoint = True                    # write checkpoints in the background
  c.eval_every = 100 if tiny else 10_000       # steps between validation losses (0 = never)
  c.init_from = ""                             # a workdir (training run or aimjax.convert output) whose trunk starts this run

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1                              # data-parallel degree per slice
  c.mesh.fsdp = -1                             # FSDP degree per slice (-1: all remaining)
  c.mesh.tensor = 1                            # tensor-parallel degree per slice
  c.mesh.dcn_data = 1                          # data-parallel degree across slices/hosts
  c.mesh.dcn_fsdp = 1                          # FSDP degree across slices/hosts
  c.mesh.dcn_tensor = 1                        # tensor-parallel degree across slices/hosts

  c.data = ml_collections.ConfigDict()
  # Full-size variants have no default data: set data.train (and data.eval to validate).
  c.data.train = "scenes" if tiny else ""      # spec: kind:arg@weight,... (pretrain_jax/data/pipeline.py)
  c.data.eval = "scenes:256" if tiny else ""   # one source for validation loss ('' = none)
  c.data.eval_batches = 4                      # batches per evaluation (0 = all)
  c.data.image_size = 56 if tiny else 224      # crop size in pixels
  c.data.crop_scale = (0.4, 1.0)               # random resized crop area range (paper Table 3c)
  c.data.flip = True                           # random horizontal flips
  c.data.skip_corrupt = False                  # True: skip undecodable records (counted) instead of failing
  c.data.workers = 0                           # Grain worker processes (0: in the main process)
  c.data.threads = 2 if tiny else 16           # Grain read threads per process
  c.data.scenes_num = 100_000                  # scenes in the 'scenes' source when no count is given
  c.data.scenes_seed = 0                       # seed of the procedural scenes (eval uses another)
  c.data.scenes_resolution = 64 if tiny else 256   # rendered size before cropping
  c.data.tfds_data_dir = ""                    # data_dir for tfds:NAME/SPLIT sources
  c.data.image_key = "image"                   # record/feature holding the image
  c.data.label_key = "label"                   # record/feature holding the class label

  c.model = ml_collections.ConfigDict()
  c.model.image_size = c.data.get_ref("image_size")
  c.model.patch_size = 14                      # pixels per patch side
  c.model.width = width                        # embedding dimension d
  c.model.depth = depth                        # transformer blocks in the trunk
  c.model.num_heads = heads                    # attention heads (d / 128 at full size)
  c.model.mlp_ratio = 4                        # MLP hidden width / d, trunk and head
  c.model.head = "mlp"                         # 'mlp' | 'transformer' | 'none' (Table 3e)
  c.model.head_depth = 2 if tiny else 12       # blocks in the pixel head
  c.model.head_width = 128 if tiny else 2048
  c.model.head_num_heads = 2 if tiny else 16   # transformer head only
  c.model.dtype = "float32" if tiny else "bfloat16"   # compute dtype
  c.model.param_dtype = "float32"              # parameter / optimizer-state dtype
  c.model.remat = "none"                       # 'none' | 'block' | 'dots' activation rematerialisation
  c.model.attention_impl = ""                  # '' or 'xla' | 'cudnn' (GPU flash attention) | 'auto'
  c.model.scan_layers = False                  # blocks as one lax.scan: compile time flat in depth

  c.objective = ml_collections.ConfigDict()
  c.objective.prefix = True                    # prefix-causal (False: causal-only ablation)
  c.objective.norm_targets = True              # per-patch normalised pixel targets
  c.objective.order = "raster"                 # 'raster' | 'spiral' | 'checkerboard' | 'random'
  c.objective.order_seed = 0                   # for the fixed random order

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 2e-3 if tiny else 1e-3      # peak learning rate
  c.optimizer.warmup_steps = 30 if tiny else 5000   # linear warmup from 0, in steps
  c.optimizer.end_lr = 0.0                     # learning rate at the end of the cosine
  c.optimizer.b1 = 0.9                         # Adam first-moment decay
  c.optimizer.b2 = 0.95                        # Adam second-moment decay
  c.optimizer.eps = 1e-8                       # Adam epsilon
  c.optimizer.weight_decay = 0.05              # decoupled (AdamW) decay of matrices
  c.optimizer.clip_norm = 1.0                  # global-norm clipping (0 = off)
  c.optimizer.layer_decay = 1.0                # layer-wise lr decay factor (1.0 = off)
  c.optimizer.no_decay = ("pos_embed", "modality_embed")   # path substrings never decayed (plus all vectors)
  c.optimizer.grad_accum_steps = 1             # micro-batches per step (gradient accumulation)

  c.debug = ml_collections.ConfigDict()
  c.debug.crash_at_step = 0                    # fault injection: SIGKILL self after this step (tests)
  c.debug.crash_process = -1                   # ...in this process only (-1: every process)
  c.debug.nan_at_step = 0                      # fault injection: NaN gradients (finite loss) at this step (tests)
  return c
