"""4M / 4M-21 pretraining (fourm_jax.train).

  python -m fourm_jax.train --config=configs/fourm/pretrain.py:variant=tiny --workdir=/tmp/4m \
      --config.data.datasets.scenes.train='data/scenes_4m_tokens/*.array_record'

Variants:
  tiny       scenes token shards (4 x 4 grids of the tiny rgb and depth tokenizers,
             32 px RGB pixels, 16 tokens of the AIM global embedding, captions);
             trains in about a minute on CPU
  tiny21     the tiny 4M-21: tiny's modalities plus the AIM feature map (4 x 4 tokens of
             the tiny feature-map VQ-VAE, field tok_aim), boxes (det), colour palettes
             and metadata (drawn afresh per sample from the shards' raw values)
  4m7_B/L/XL 4M Table 5: the 7 modalities, 128 input / 128 target tokens, RGB->All
             and All->All (alpha 0.5), batch 8192, AdamW 0.9/0.95, wd 0.05,
             lr 1e-4 per 256 (XL 2e-5, clip 3.0), warmup 10B of 500B tokens,
             repeated sampling 4, bf16
  ref_B      4M Table 14, the ablation reference: B, GELU feed-forward (with
             biases), All->All alpha 0.2, batch 4096, 100B tokens
  4m21_B/L/XL 4M-21 Table 6: 21 modalities, 256 / 256 tokens, co-training on
             cc12m (all modalities, 0.6), coyo (the 7 of 4M, 0.2) and c4 (text
             only, 0.2) with the official mixture of masking strategies
             (all->all alpha 0.01/0.1/1/10, RGB->all, caption- and T5-biased);
             start from a 4M-7 run with --config.init_from=WORKDIR
  sr_L       token super-resolution 14x14 -> 28x28 (4M App. A.1): inputs all 224
             and 448 modalities, targets the 448 tokens, 64..1024 input and
             1024 target tokens, 100B tokens; --config.init_from a 4M-7 L run

Each dataset (config.data.datasets.NAME) has its token shards (`train`,
`eval`), a sampling `weight`, `fields` (modality -> record field: the
modalities it has), `repeats` (repeated sampling) and optionally its own
masking `strategies` (default: config.masking.strategies). A strategy is
a table of Dirichlet concentrations: `input_alpha` / `target_alpha` for
every modality, `inputs` / `targets` for exceptions, `keep` for the span
masking of sequences ('random', 'all', 'binary').
"""
import ml_collections

FOURM7 = ("rgb@224", "tok_rgb@224", "tok_depth@224", "tok_normal@224", "tok_semseg@224",
          "tok_clip@224", "caption", "det")
FOURM21 = FOURM7 + ("t5_caption", "metadata", "human_poses", "color_palette", "sam_instance",
                    "tok_canny_edge@224", "tok_sam_edge@224", "tok_dinov2@224",
                    "tok_imagebind@224", "tok_dinov2_global", "tok_imagebind_global")
SR = ("rgb@448", "tok_rgb@448", "tok_depth@448", "tok_normal@448", "tok_semseg@448",
      "tok_clip@448")
# modality -> record field of tokenizers_jax.tokenize's token shards
FIELDS = {"rgb@224": "image", "tok_rgb@224": "tok_rgb", "tok_depth@224": "tok_depth",
          "tok_normal@224": "tok_normals", "tok_semseg@224": "tok_semantic",
          "tok_clip@224": "tok_clip", "caption": "caption", "det": "det",
          "t5_caption": "t5_caption", "metadata": "metadata", "human_poses": "human_poses",
          "color_palette": "color_palette", "sam_instance": "sam_instance",
          "tok_canny_edge@224": "tok_edges", "tok_sam_edge@224": "tok_sam_edges",
          "tok_dinov2@224": "tok_dinov2", "tok_imagebind@224": "tok_imagebind",
          "tok_dinov2_global": "tok_dinov2_global",
          "tok_imagebind_global": "tok_imagebind_global",
          "rgb@448": "image_448", "tok_rgb@448": "tok_rgb_448", "tok_depth@448": "tok_depth_448",
          "tok_normal@448": "tok_normals_448", "tok_semseg@448": "tok_semantic_448",
          "tok_clip@448": "tok_clip_448"}
# the tiny 4M-21: a feature map, a global embedding, boxes, palettes and metadata besides
# the tiny config's RGB, depth and captions (all from pseudo-labelled scenes)
TINY21 = ("rgb@32", "tok_rgb@32", "tok_depth@32", "tok_aim@32", "tok_aim_global", "caption",
          "det", "color_palette", "metadata")
VARIANTS = ("tiny", "tiny21", "4m7_B", "4m7_L", "4m7_XL", "ref_B", "4m21_B", "4m21_L", "4m21_XL", "sr_L")


def strategy(name, weight=1.0, input_alpha=0.0, target_alpha=0.0, inputs=None, targets=None,
             keep=None) -> ml_collections.ConfigDict:
  """One masking strategy (fourm_jax.masking.strategy's arguments)."""
  return ml_collections.ConfigDict({
      "name": name, "weight": float(weight), "input_alpha": float(input_alpha),
      "target_alpha": float(target_alpha), "inputs": dict(inputs or {}),
      "targets": dict(targets or {}), "keep": dict(keep or {})})


def all2all(alpha, weight=1.0, keep=None):
  return strategy(f"all2all_{alpha:g}", weight, alpha, alpha, keep=keep)


def one2all(source, alpha, weight=1.0, source_alpha=1.0, keep=None):
  """Only `source` (whole, for a sequence) as input; every other modality as target."""
  return strategy(f"{source}2all_{alpha:g}", weight, 0.0, alpha, {source: source_alpha},
                  {source: 0.0}, {source: "all", **(keep or {})})


def dataset(train="", fields=None, weight=1.0, repeats=1, strategies=(), eval_=""):
  return ml_collections.ConfigDict({"train": train, "eval": eval_, "weight": float(weight),
                                    "repeats": repeats, "fields": dict(fields or {}),
                                    "strategies": list(strategies)})


def _mixture_4m21():
  """The official 4M-21 alphas mixture (all2all x4, RGB->all, caption- and T5-biased)."""
  palette = {"color_palette": "binary"}
  out = [all2all(a, keep=palette) for a in (0.01, 0.1, 1.0, 10.0)]
  out.append(one2all("rgb@224", 0.5, source_alpha=1000.0, keep=palette))
  out.append(strategy("caption_biased", 0.5, 0.05, 0.5, {"caption": 5.0, "t5_caption": 0.0},
                      {"caption": 0.0}, {"caption": "all", **palette}))
  out.append(strategy("t5_biased", 0.5, 0.05, 0.5, {"t5_caption": 5.0, "caption": 0.0},
                      {}, {"t5_caption": "all", **palette}))
  return out


def _mixture_sr():
  """The official super-resolution mixture: tok_rgb- and caption-biased, alpha 0.2 and 1."""
  lo = {n: 0.0 for n in FOURM7 if n != "rgb@224"}
  return [
      strategy("tok_rgb_biased", 1.0, 0.05, 0.05, {"tok_rgb@224": 5.0, "tok_rgb@448": 5.0},
               {**lo, "tok_rgb@448": 5.0}),
      strategy("caption_biased", 1.0, 0.05, 1.0, {"caption": 5.0}, lo, {"caption": "all"}),
      strategy("all_0.2", 1.0, 0.2, 1.0, targets=lo),
      strategy("all_1", 1.0, 1.0, 1.0, targets=lo),
  ]


def get_config(arg: str = "variant=tiny") -> ml_collections.ConfigDict:
  variant = (arg or "variant=tiny").split("=")[-1]
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
  family, size = (variant, "tiny") if variant.startswith("tiny") else variant.split("_")
  tiny = family.startswith("tiny")

  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  c.batch_size = {"tiny": 32, "tiny21": 32, "ref": 4096, "sr": 4096}.get(family, 8192)
  budget_in, budget_out = {"tiny": (24, 24), "tiny21": (48, 48), "4m21": (256, 256),
                           "sr": ((64, 1024), 1024)}.get(family, (128, 128))
  tokens_per_sample = {"4m21": 512, "sr": 2048}.get(family, 256)
  total_tokens = {"ref": 100e9, "sr": 100e9}.get(family, 500e9)
  c.total_steps = 300 if tiny else int(total_tokens // (tokens_per_sample * c.batch_size))
  c.log_every = 25 if tiny else 100
  c.checkpoint_every = 300 if tiny else 5000
  c.keep_checkpoints = 2
  c.profile_steps = (0, 0)                     # (start, count): jax.profiler trace into WORKDIR/plugins/profile
  c.async_checkpoint = True
  c.eval_every = 300 if tiny else 5000
  c.loss_type = "mod"                  # 'mod': per modality then mean; 'token'
  c.init_from = ""                     # a workdir whose params start this run (matching names)

  c.mesh = ml_collections.ConfigDict(
      {"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1})

  c.model = ml_collections.ConfigDict()
  c.model.size = size                  # tiny, Ti, S, B, L, XL (fourm_jax.model.SIZES)
  c.model.dim = 0                      # 0: the size's; set to override
  c.model.encoder_depth = 0
  c.model.decoder_depth = 0
  c.model.num_heads = 0
  c.model.ffn = "gelu" if family == "ref" else "swiglu"     # 'swiglu' | 'gelu' (4M Table 26)
  c.model.use_bias = family == "ref"   # biases in attention and feed-forward layers
  c.model.qk_norm = False
  c.model.tie_embeddings = True
  c.model.dtype = "float32" if tiny else "bfloat16"
  c.model.remat = "none" if tiny else "block"   # 'none' | 'block' | 'dots' (pretrain_jax.remat)
  c.model.attention_impl = ""                  # '' or 'xla' | 'cudnn' (GPU flash attention) | 'auto'
  c.model.scan_layers = False                  # blocks as one lax.scan: compile time flat in depth
  if family == "tiny":
    mods = ("rgb@32", "tok_rgb@32", "tok_depth@32", "tok_aim_global", "caption")
    c.model.inputs, c.model.targets = mods, mods[1:]
  elif family == "tiny21":
    c.model.inputs, c.model.targets = TINY21, TINY21[1:]
  elif family == "4m21":
    c.model.inputs = FOURM21
    c.model.targets = tuple(n for n in FOURM21 if n not in ("rgb@224", "t5_caption"))
  elif family == "sr":
    c.model.inputs = FOURM7 + SR
    c.model.targets = SR[1:]
  else:
    c.model.inputs, c.model.targets = FOURM7, FOURM7[1:]
  c.model.num_encoder_tokens = budget_in if isinstance(budget_in, int) else budget_in[1]
  c.model.num_decoder_tokens = budget_out

  # rows added to the registry: the tiny scenes tokenizers (32 px, patch 8, 256 codes)
  c.modalities = ml_collections.ConfigDict()
  if tiny:
    c.modalities["rgb@32"] = {"kind": "pixels", "grid": (4, 4), "patch_size": 8,
                              "target": False}
    for name in ("tok_rgb@32", "tok_depth@32"):
      c.modalities[name] = {"kind": "image", "vocab_size": 256, "grid": (4, 4)}
    # the global embedding of the aim_features labeller through the tiny MLP dVAE
    # (configs/tokenizers/mlp_vae.py:target=global): what retrieval ranks by
    c.modalities.tok_aim_global = {"kind": "global", "vocab_size": 256, "length": 16}
    c.modalities.caption = {"kind": "seq", "vocab_size": 4500, "length": 32}
  if family == "tiny21":
    # the AIM feature map (the aim_features labeller at 56 px: 4 x 4 vectors) through the
    # tiny feature-map VQ-VAE, standing in for CLIP/DINOv2/ImageBind maps
    c.modalities["tok_aim@32"] = {"kind": "image", "vocab_size": 256, "grid": (4, 4)}
    for name, length in (("det", 64), ("color_palette", 32), ("metadata", 64)):
      c.modalities[name] = {"kind": "seq", "vocab_size": 4500, "length": length}

  c.masking = ml_collections.ConfigDict()
  c.masking.input_tokens = budget_in   # an int, or an inclusive (low, high) range per sample
  c.masking.target_tokens = budget_out
  if family == "ref":
    c.masking.strategies = [all2all(0.2)]
  elif family == "4m21":
    c.masking.strategies = _mixture_4m21()
  elif family == "sr":
    c.masking.strategies = _mixture_sr()
  else:                                # 4M-7's final mixture: all->all and rgb->all, alpha 0.5
    c.masking.strategies = [all2all(0.5), one2all("rgb@32" if tiny else "rgb@224", 0.5)]
  c.masking.chunks = ml_collections.ConfigDict({"metadata": 2} if family in ("4m21", "tiny21")
                                               else {})

  c.data = ml_collections.ConfigDict()
  c.data.eval_batches = 2
  c.data.skip_corrupt = False
  c.data.threads = 2 if tiny else 16
  c.data.repeat_window = 256           # records whose repeated copies are shuffled together
  # color_palette / metadata re-drawn per sample (1..7 colours, shuffled metadata) from the raw
  # values token shards keep (fourm_jax.sequence_augment), as the official loader does
  c.data.augment_sequences = True
  repeats = 1 if tiny else 4
  if family == "tiny":
    c.data.datasets = ml_collections.ConfigDict({"scenes": dataset(fields={
        "rgb@32": "image", "tok_rgb@32": "tok_rgb", "tok_depth@32": "tok_depth",
        "tok_aim_global": "tok_aim_global", "caption": "caption"})})
  elif family == "tiny21":
    c.data.datasets = ml_collections.ConfigDict({"scenes": dataset(fields={
        "rgb@32": "image", "tok_rgb@32": "tok_rgb", "tok_depth@32": "tok_depth",
        "tok_aim@32": "tok_aim", "tok_aim_global": "tok_aim_global", "caption": "caption",
        "det": "det", "color_palette": "color_palette", "metadata": "metadata"})})
  elif family == "4m21":
    c.data.datasets = ml_collections.ConfigDict({
        "cc12m": dataset(fields={n: FIELDS[n] for n in FOURM21}, weight=0.6, repeats=repeats),
        # no T5 embeddings: the mixture without its T5-biased strategy
        "coyo": dataset(fields={n: FIELDS[n] for n in FOURM7}, weight=0.2, repeats=1,
                        strategies=_mixture_4m21()[:-1]),
        # text only: span masking of the caption alone (language modelling)
        "c4": dataset(fields={"caption": "caption"}, weight=0.2, strategies=[all2all(1.0)]),
    })
  else:
    mods = FOURM7 + SR if family == "sr" else FOURM7
    c.data.datasets = ml_collections.ConfigDict({
        "cc12m": dataset(fields={n: FIELDS[n] for n in mods}, repeats=repeats)})

  c.optimizer = ml_collections.ConfigDict()
  base_lr = 2e-5 if size == "XL" else 1e-4
  c.optimizer.lr = 2e-3 if tiny else base_lr * c.batch_size / 256
  warmup_tokens = 5e9 if family == "sr" else 10e9
  c.optimizer.warmup_steps = 20 if tiny else int(warmup_tokens // (tokens_per_sample *
                                                                   c.batch_size))
  c.optimizer.end_lr = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_norm = 3.0 if size == "XL" or family == "sr" else (1.0 if tiny else 0.0)
  c.optimizer.layer_decay = 1.0
  c.optimizer.no_decay = ()
  c.optimizer.grad_accum_steps = 1     # micro-batches per step (gradient accumulation)

  c.debug = ml_collections.ConfigDict({"crash_at_step": 0, "crash_process": -1, "nan_at_step": 0})
  return c
