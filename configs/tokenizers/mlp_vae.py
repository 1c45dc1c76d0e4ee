"""MLP discrete VAEs for vectors (4M-21 App. D.2, D.4): global embeddings and human poses.

  python -m tokenizers_jax.train --config=configs/tokenizers/mlp_vae.py:target=pose,variant=tiny \
      --workdir=workdir/tok_pose
  python -m tokenizers_jax.train --config=configs/tokenizers/mlp_vae.py:target=global,variant=tiny \
      --config.data.train='arrayrecord:data/scenes_4m/*.array_record' --workdir=workdir/tok_aim_global

target 'global': a global embedding field (default `aim_global`, written by the
aim_features labeller) -> 16 tokens of vocab 8192, cosine loss; 'pose': SMPL
body pose [207] -> 8 tokens of vocab 1024, smooth L1 (data: synthetic poses by
default for 'tiny', tokenizers_jax.poses, since none can be downloaded here).
variant 'paper': 6 blocks of width 1024, no default data (set data.train, and
data.eval to validate); 'tiny': trains in seconds on CPU.
"""
import ml_collections

TARGETS = {  # target -> (tokens, vocab, default data of the tiny variant, record field)
    "global": (16, 8192, "", "aim_global"),
    "pose": (8, 1024, "synthetic_poses:100000", "body_pose"),
}


def get_config(arg: str = "target=pose,variant=tiny") -> ml_collections.ConfigDict:
  opts = {"target": "pose", "variant": "tiny"}
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if not sep or key not in opts:
      raise ValueError(f"config argument {part!r}: use target=global|pose,variant=tiny|paper")
    opts[key] = value
  if opts["target"] not in TARGETS:
    raise ValueError(f"unknown target {opts['target']!r}; choose from {sorted(TARGETS)}")
  if opts["variant"] not in ("tiny", "paper"):
    raise ValueError(f"unknown variant {opts['variant']!r}; choose tiny or paper")
  tiny = opts["variant"] == "tiny"
  tokens, vocab, data, field = TARGETS[opts["target"]]

  c = ml_collections.ConfigDict()
  c.kind = "mlp_vae"
  c.modality = opts["target"]
  c.variant = opts["variant"]
  c.seed = 0
  c.batch_size = 64 if tiny else 1024
  c.total_steps = 400 if tiny else 100_000
  c.log_every = 50 if tiny else 100
  c.checkpoint_every = 400 if tiny else 5000
  c.keep_checkpoints = 2
  c.profile_steps = (0, 0)                     # (start, count): jax.profiler trace into WORKDIR/plugins/profile
  c.async_checkpoint = True
  c.eval_every = 400 if tiny else 5000

  c.mesh = ml_collections.ConfigDict(
      {"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1})

  c.data = ml_collections.ConfigDict()
  c.data.train = data if tiny else ""   # arrayrecord:GLOB, or synthetic_poses:N for poses
  c.data.eval = "synthetic_poses:512" if tiny and opts["target"] == "pose" else ""   # '' = none
  c.data.eval_batches = 4
  c.data.field = field                  # record field for arrayrecord data
  c.data.resolution = 0                 # unused (vectors)
  c.data.scenes_seed = 0                # seeds synthetic poses (eval: another stream)
  c.data.threads = 2 if tiny else 16

  c.model = ml_collections.ConfigDict()
  c.model.in_dim = 207 if opts["target"] == "pose" else 0   # 0: taken from the data
  c.model.num_tokens = tokens
  c.model.num_codes = 256 if tiny else vocab
  c.model.width = 128 if tiny else 1024
  c.model.blocks = 2 if tiny else 6
  c.model.code_dim = 32
  c.model.expansion = 4                # MLP hidden width = expansion * width
  # True: the official fourm.vq layout (quant_proj, one Memcodes codebook per token, LN eps 1e-5,
  # exact GELU), as tokenizers_jax.convert builds from official checkpoints
  c.model.official = False

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-3 if tiny else 1e-4
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
