"""Attentive (or linear) probing of frozen AIM features, optionally with LoRA.

  python -m aimjax.probe --config=configs/aim/probe.py:variant=tiny \
      --config.init_from=workdir/aim_tiny --workdir=workdir/aim_tiny_probe

Trains one probe per entry of `layers` in the same pass over the data (one
trunk forward per batch serves them all): an int probes one block, a tuple the
mean of those blocks' outputs, as the released AIM heads do (ml-aim's
AverageLayers). The released variants default to the official groups: "best"
(LAYERS_BEST) and "last" (the last 6 blocks); override with e.g.
--config.layers='((14, 15, 16, 17, 18, 19), -1)'. Reports validation top-1 per
group every epoch, and writes probe_results.json, probe_layers.png and the best
group's head (probe.safetensors, which aimjax.classify applies).
"""
import ml_collections

from aimjax.convert import LAYERS_BEST, PROBE_GROUP, VARIANTS


def official_groups(variant: str) -> tuple:
  """The released heads' groups of a variant: (best blocks, last 6 blocks)."""
  if variant not in LAYERS_BEST:
    raise ValueError(f"unknown AIM variant {variant!r}; choose from {['tiny', *LAYERS_BEST]}")
  depth = VARIANTS[variant][1]
  return (LAYERS_BEST[variant], tuple(range(depth - PROBE_GROUP, depth)))


def get_config(arg: str = "variant=tiny") -> ml_collections.ConfigDict:
  opts = dict(p.partition("=")[::2] for p in filter(None, (arg or "").split(",")))
  variant = opts.get("variant", "tiny")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  c.backbone = "aim"                     # a registered backbone: 'aim', 'fourm' (4M encoder on RGB), ...
  c.init_from = ""                       # training workdir, converted checkpoint, safetensors, or a variant (random)
  c.init_step = 0                        # workdir checkpoint step to probe (0: the latest)
  # groups to probe: an int is one block, a tuple the mean of those blocks (negative: from
  # the last); tiny probes each block alone, released variants the official best and last
  c.layers = (0, 1) if tiny else official_groups(variant)
  c.probe = "attentive"                  # 'attentive' (paper Eq. 4) | 'linear' (average pooling)
  c.causal = False                       # True: probe causal features (paper Table 3d)
  c.num_classes = 8                      # scenes: colour of the largest visible object
  c.epochs = 8 if tiny else 90
  c.batch_size = 64 if tiny else 1024    # global, in images
  c.log_every = 20                       # steps between training-metric lines

  c.data = ml_collections.ConfigDict()
  c.data.train = "scenes:2048"           # same spec strings as pretraining (labels from label_key)
  c.data.eval = "scenes:512"
  c.data.eval_batches = 0                # 0: the whole validation split
  c.data.image_size = 56 if tiny else 224
  c.data.crop_scale = (0.6, 1.0)         # light augmentation for probe training
  c.data.flip = True
  c.data.skip_corrupt = False
  c.data.workers = 0
  c.data.threads = 2 if tiny else 16
  c.data.scenes_num = 100_000
  c.data.scenes_seed = 0
  c.data.scenes_resolution = 64 if tiny else 256
  c.data.tfds_data_dir = ""
  c.data.image_key = "image"
  c.data.label_key = "label"

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0                        # 0: frozen trunk; >0: LoRA adapters trained with the probe
  c.lora.alpha = 16.0
  c.lora.targets = ("qkv", "proj", "mlp")

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-3 if tiny else 1e-3
  c.optimizer.warmup_steps = 20 if tiny else 5000
  c.optimizer.end_lr = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_norm = 3.0
  c.optimizer.layer_decay = 1.0
  c.optimizer.no_decay = ("cls_token",)
  return c
