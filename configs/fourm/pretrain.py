"""4M / 4M-21 pretraining (fourm_jax.train).

  python -m fourm_jax.train --config=configs/fourm/pretrain.py:variant=tiny --workdir=/tmp/4m \
      --config.data.train='data/scenes_4m_tokens/*.array_record'

Variants: 'tiny' (scenes tokens: 4 x 4 grids of the tiny tokenizers and
captions; trains in a minute on CPU), '4m7_B', '4m7_L', '4m7_XL' (4M Table 5:
the 7 modalities, 128 input / 128 target tokens, batch 8192, AdamW 0.9/0.95,
wd 0.05, lr 1e-4 per 256 (XL 2e-5), warmup 10B tokens of 500B, bf16).
"""
import ml_collections

FOURM7_INPUTS = ("rgb@224", "tok_rgb@224", "tok_depth@224", "tok_normal@224", "tok_semseg@224",
                 "tok_clip@224", "caption", "det")
FOURM7_TARGETS = FOURM7_INPUTS[1:]
VARIANTS = ("tiny", "4m7_B", "4m7_L", "4m7_XL")


def get_config(arg: str = "variant=tiny") -> ml_collections.ConfigDict:
  variant = (arg or "variant=tiny").split("=")[-1]
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
  tiny = variant == "tiny"
  size = "tiny" if tiny else variant.split("_")[1]

  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  c.batch_size = 32 if tiny else 8192
  # 500B tokens of 256 (128 in + 128 out) per sample
  c.total_steps = 300 if tiny else 500_000_000_000 // (256 * 8192)
  c.log_every = 25 if tiny else 100
  c.checkpoint_every = 300 if tiny else 5000
  c.keep_checkpoints = 2
  c.async_checkpoint = True
  c.eval_every = 300 if tiny else 5000
  c.loss_type = "mod"                  # 'mod': per modality then mean; 'token'

  c.mesh = ml_collections.ConfigDict(
      {"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1})

  c.model = ml_collections.ConfigDict()
  c.model.size = size                  # tiny, Ti, S, B, L, XL (fourm_jax.model.SIZES)
  c.model.dim = 0                      # 0: the size's; set to override
  c.model.encoder_depth = 0
  c.model.decoder_depth = 0
  c.model.num_heads = 0
  c.model.qk_norm = False
  c.model.tie_embeddings = True
  c.model.dtype = "float32" if tiny else "bfloat16"
  c.model.remat = not tiny
  if tiny:
    c.model.inputs = ("tok_rgb@32", "tok_depth@32", "caption")
    c.model.targets = ("tok_rgb@32", "tok_depth@32", "caption")
    c.model.num_encoder_tokens = 24
    c.model.num_decoder_tokens = 24
  else:
    c.model.inputs = FOURM7_INPUTS
    c.model.targets = FOURM7_TARGETS
    c.model.num_encoder_tokens = 128
    c.model.num_decoder_tokens = 128

  # rows added to the registry: the tiny scenes tokenizers (32 px, patch 8, 256 codes)
  c.modalities = ml_collections.ConfigDict()
  if tiny:
    for name in ("tok_rgb@32", "tok_depth@32"):
      c.modalities[name] = {"kind": "image", "vocab_size": 256, "grid": (4, 4)}
    c.modalities.caption = {"kind": "seq", "vocab_size": 4500, "length": 32}

  c.masking = ml_collections.ConfigDict()
  c.masking.input_tokens = 24 if tiny else 128
  c.masking.target_tokens = 24 if tiny else 128
  c.masking.strategies = [   # 4M-7's final mixture: all->all and rgb->all, alpha 0.5
      ml_collections.ConfigDict({"kind": "all2all", "alpha": 0.5, "weight": 1.0,
                                 "source": ""}),
      ml_collections.ConfigDict({"kind": "one2all", "alpha": 0.5, "weight": 1.0,
                                 "source": "tok_rgb@32" if tiny else "rgb@224"}),
  ]
  c.masking.chunks = ml_collections.ConfigDict()      # e.g. {"metadata": 2}

  c.data = ml_collections.ConfigDict()
  c.data.train = ""                    # token shards (glob), from tokenizers_jax.tokenize
  c.data.eval = ""
  c.data.eval_batches = 2
  c.data.skip_corrupt = False
  c.data.threads = 2 if tiny else 16
  c.data.fields = ml_collections.ConfigDict(
      {"tok_rgb@32": "tok_rgb", "tok_depth@32": "tok_depth", "caption": "caption"} if tiny else
      {"rgb@224": "image", "tok_rgb@224": "tok_rgb", "tok_depth@224": "tok_depth",
       "tok_normal@224": "tok_normals", "tok_semseg@224": "tok_semantic",
       "tok_clip@224": "tok_clip", "caption": "caption", "det": "det"})

  c.optimizer = ml_collections.ConfigDict()
  base_lr = 2e-5 if size == "XL" else 1e-4
  c.optimizer.lr = 2e-3 if tiny else base_lr * c.batch_size / 256
  c.optimizer.warmup_steps = 20 if tiny else 10_000_000_000 // (256 * 8192)
  c.optimizer.end_lr = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_norm = 3.0 if size == "XL" else 1.0
  c.optimizer.layer_decay = 1.0
  c.optimizer.no_decay = ()

  c.debug = ml_collections.ConfigDict({"crash_at_step": 0, "nan_at_step": 0})
  return c
