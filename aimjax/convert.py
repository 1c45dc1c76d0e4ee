"""Official AIM v1 PyTorch checkpoints <-> our params (and back).

  python -m aimjax.convert --input=aim_600m_2bimgs_attnprobe_backbone.pth \\
      --head=aim_600m_2bimgs_attnprobe_head_best_layers.pth --out=DIR
  python -m aimjax.convert --input=aim_600m.safetensors --variant=0.6B --out=DIR   # one file
  python -m aimjax.convert --input=HF_SNAPSHOT_DIR --out=DIR   # model.safetensors + config.json

Key names and layouts are those of apple/ml-aim's `aim-v1` models
(`../shared/reference/aim.md`): PyTorch Linear weights are [out, in], the
patch projection is a Conv2d [D, 3, p, p] with bias, qkv stacks q, k, v on
dim 0, head-major. The released backbones and their attentive-probe heads are
separate files (`--head`); the head reads the mean of a group of block outputs
(the official `AverageLayers`): `--probe_layers=best|last|i,j,...` names the
group (default: the official best blocks of the variant; the last ones for a
`..._head_last_layers` file or a size that was not released). Writes an Orbax
checkpoint of the trunk params (usable as `init_from`), a safetensors export,
and the head as probe.safetensors (read by aimjax.classify); config.json
records the probe layers. `.pth` files are read with
`torch.load(weights_only=True)` (no arbitrary unpickling;
`pip install -e ".[torch]"`); safetensors needs no torch.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from pretrain_jax import scan

Params = dict[str, Any]
# The released variants: width, depth, heads (paper Table 1); 'tiny' is ours, for tests.
VARIANTS = {"tiny": (64, 2, 2), "0.6B": (1536, 24, 12), "1B": (2048, 24, 16),
            "3B": (3072, 24, 24), "7B": (4096, 32, 32)}
_BLOCK = re.compile(r"^trunk\.blocks\.(\d+)\.")
# The blocks (0-indexed) whose mean the released "best layers" heads read (ml-aim's
# aim/v1/constants.py LAYERS_BEST); the "last layers" heads read the last PROBE_GROUP blocks.
LAYERS_BEST = {"0.6B": (14, 15, 16, 17, 18, 19), "1B": (12, 13, 14, 15, 16, 17),
               "3B": (12, 13, 14, 15, 16, 17), "7B": (14, 15, 16, 17, 18, 19)}
PROBE_GROUP = 6   # the official probe_layers default: the mean of the last 6 blocks
# Keys a state dict may lack: a head trained with a biased classifier (ml-l3m's probe) has
# head.linear.bias, released ml-aim heads do not; num_batches_tracked is unused at inference.
OPTIONAL = ("head.linear.bias", "head.bn.num_batches_tracked")


def variant_of(width: int, depth: int) -> str | None:
  """The released variant with this width and depth, or None."""
  return next((v for v, (w, d, _) in VARIANTS.items() if (w, d) == (width, depth)
               and v != "tiny"), None)


def probe_layers(spec: str, width: int, depth: int) -> tuple[int, ...]:
  """'best' | 'last' | 'i,j,...' (0-indexed; negative counts from the last) -> sorted block ids.

  best: the official LAYERS_BEST of the released variant with this width and depth;
  last: the last 6 blocks (the official default `probe_layers=6`), or all of fewer.
  """
  spec = str(spec).strip()
  if spec == "best":
    variant = variant_of(width, depth)
    if variant is None:
      raise ValueError(f"--probe_layers=best: no released AIM has width {width} and depth "
                       f"{depth} (released: {[v for v in LAYERS_BEST]}); pass 'last' or "
                       "block ids, e.g. --probe_layers=2,3")
    return LAYERS_BEST[variant]
  if spec == "last":
    return tuple(range(max(depth - PROBE_GROUP, 0), depth))
  try:
    ids = [int(p) for p in spec.split(",") if p.strip()]
  except ValueError:
    ids = []
  if not ids or any(not -depth <= i < depth for i in ids):
    raise ValueError(f"--probe_layers must be 'best', 'last' or block ids in 0..{depth - 1} "
                     f"separated by commas, got {spec!r}")
  ids = sorted({i % depth for i in ids})
  return tuple(ids)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors or .pth/.pt/.bin file (local or gs://...) into numpy arrays,
  or an HF-hub snapshot directory's model.safetensors."""
  from etils import epath
  from pretrain_jax import paths
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if epath.Path(path).is_dir():
    path = os.path.join(path, "model.safetensors")
    if not epath.Path(path).exists():
      raise FileNotFoundError(f"{path} not found: a directory input must be an HF-hub "
                              "snapshot holding model.safetensors and config.json")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    with paths.local_copy(path) as local:
      return {k: v for k, v in load_file(local).items() if not k.startswith("__")}
  try:
    import torch
  except ImportError:
    raise ValueError(f"{path} is a PyTorch pickle and torch is not installed: "
                     "pip install -e \".[torch]\" (the project's torch extra), or convert the "
                     "file to .safetensors first") from None
  with paths.local_copy(path) as local:
    sd = torch.load(local, map_location="cpu", weights_only=True)
  for wrapper in ("model", "state_dict"):
    if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
      sd = sd[wrapper]
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in sd.items()}


def hub_config(path: str) -> dict:
  """The constructor arguments in an HF-hub snapshot's config.json ({} for a file):
  img_size, patch_size, embed_dim, num_blocks, num_heads, probe_layers, num_classes."""
  import json
  from etils import epath
  cfg_path = epath.Path(path) / "config.json"
  if not epath.Path(path).is_dir() or not cfg_path.exists():
    return {}
  cfg = json.loads(cfg_path.read_text())
  return cfg.get("config", cfg) if isinstance(cfg.get("config"), dict) else cfg


def _is_head(key: str) -> bool:
  return key.startswith("head.")


def merge_head(backbone: dict[str, np.ndarray], head: dict[str, np.ndarray], backbone_path: str,
               head_path: str) -> dict[str, np.ndarray]:
  """A backbone state dict plus a separately released head (keys `head.*`, or the head's
  own keys `cls_token`, `k.weight`, ...), as the official `merge_state_dicts`."""
  head = {k if _is_head(k) else "head." + k: v for k, v in head.items()}
  overlap = sorted(set(backbone) & set(head))
  if overlap:
    raise ValueError(f"{backbone_path} and the head {head_path} both hold {overlap[:5]}: "
                     "pass a backbone-only file as --input")
  stray = sorted(k for k in head if not _is_head(k) or k.startswith("head.head."))
  if stray:
    raise ValueError(f"{head_path} is not a classifier head: it holds {stray[:5]}")
  return {**backbone, **head}


def check_is_backbone(sd: dict[str, np.ndarray], path: str) -> None:
  """Raises a clear ValueError for a head-only file given where a backbone is needed."""
  if any(k.startswith(("preprocessor.", "trunk.")) for k in sd):
    return
  if sd and all(_is_head(k) or k in ("cls_token", "k.weight", "v.weight", "linear.weight",
                                        "linear.bias") or k.startswith("bn.") for k in sd):
    raise ValueError(f"{path} holds only a classifier head ({len(sd)} head.* keys), no trunk: "
                     "pass the backbone file (..._attnprobe_backbone.pth) as --input and this "
                     "file as --head")
  raise ValueError(f"{path} has no AIM trunk (no preprocessor.* / trunk.* keys; it has "
                   f"{sorted(sd)[:5]}...)")


def expected_shapes(width: int, depth: int, patch: int, num_classes: int | None):
  """{official key: shape} of a trunk (and classifier head when num_classes), the OPTIONAL
  keys included."""
  d = width
  shapes = {"preprocessor.patchifier.proj.weight": (d, 3, patch, patch),
            "preprocessor.patchifier.proj.bias": (d,),
            "preprocessor.patchifier.norm.weight": (d,), "preprocessor.patchifier.norm.bias": (d,),
            "trunk.post_trunk_norm.weight": (d,), "trunk.post_trunk_norm.bias": (d,)}
  for i in range(depth):
    p = f"trunk.blocks.{i}."
    shapes.update({p + "attn.qkv.weight": (3 * d, d), p + "attn.proj.weight": (d, d),
                   p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc2.weight": (d, 4 * d)})
    for n in ("norm_1", "norm_2"):
      shapes.update({p + f"{n}.weight": (d,), p + f"{n}.bias": (d,)})
  if num_classes:
    shapes.update({"head.cls_token": (1, 1, d), "head.k.weight": (d, d), "head.v.weight": (d, d),
                   "head.linear.weight": (num_classes, d), "head.linear.bias": (num_classes,),
                   "head.bn.running_mean": (d,), "head.bn.running_var": (d,),
                   "head.bn.num_batches_tracked": ()})
  return shapes


def check_state_dict(sd: dict[str, np.ndarray], width: int, depth: int, patch: int = 14):
  """Raises ValueError listing missing, unexpected and mis-shaped keys.

  Returns the number of classes of the classifier head, or None without one.
  """
  num_classes = sd["head.linear.weight"].shape[0] if "head.linear.weight" in sd else None
  want = expected_shapes(width, depth, patch, num_classes)
  missing = sorted(set(want) - set(sd) - set(OPTIONAL))
  extra = sorted(set(sd) - set(want))
  bad = sorted(f"{k}: {tuple(np.shape(sd[k]))} (expected {want[k]})" for k in set(want) & set(sd)
               if tuple(np.shape(sd[k])) != tuple(want[k]))
  if missing or extra or bad:
    lines = [f"state dict does not match AIM width={width} depth={depth} patch={patch}:"]
    for title, items in (("missing keys", missing), ("unexpected keys", extra),
                         ("wrong shapes", bad)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                     + (" ..." if len(items) > 20 else ""))
    raise ValueError("\n".join(lines))
  return num_classes


def _ln(sd, prefix):
  return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}


def official_to_params(sd: dict[str, np.ndarray], width: int, depth: int, num_heads: int,
                       patch: int = 14):
  """Returns (trunk params, probe variables or None) in our layout (numpy, float32)."""
  num_classes = check_state_dict(sd, width, depth, patch)
  sd = {k: np.asarray(v, np.float32) if k != "head.bn.num_batches_tracked" else v
        for k, v in sd.items()}
  d, h = width, num_heads
  conv = sd["preprocessor.patchifier.proj.weight"]          # [D, C, p, p]
  params: Params = {
      # our patches flatten as (row, col, channel)
      "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(patch * patch * 3, d),
                      "bias": sd["preprocessor.patchifier.proj.bias"]},
      "patch_norm": _ln(sd, "preprocessor.patchifier.norm"),
      "post_trunk_norm": _ln(sd, "trunk.post_trunk_norm"),
  }
  for i in range(depth):
    p = f"trunk.blocks.{i}."
    params[f"blocks_{i}"] = {
        "norm_1": _ln(sd, p + "norm_1"), "norm_2": _ln(sd, p + "norm_2"),
        "attn": {"qkv": sd[p + "attn.qkv.weight"].reshape(3, h, d // h, d).transpose(3, 0, 1, 2),
                 "proj": sd[p + "attn.proj.weight"].T.reshape(h, d // h, d)},
        "mlp": {"fc1": {"kernel": sd[p + "mlp.fc1.weight"].T},
                "fc2": {"kernel": sd[p + "mlp.fc2.weight"].T}},
    }
  probe = None
  if num_classes:
    probe = {"params": {"cls_token": sd["head.cls_token"],
                        "k": {"kernel": sd["head.k.weight"].T},
                        "v": {"kernel": sd["head.v.weight"].T},
                        "linear": {"kernel": sd["head.linear.weight"].T,
                                   **({"bias": sd["head.linear.bias"]}
                                      if "head.linear.bias" in sd else {})}},
             "batch_stats": {"bn": {"mean": sd["head.bn.running_mean"],
                                    "var": sd["head.bn.running_var"]}}}
  return params, probe


def params_to_official(params: Params, probe=None, patch: int = 14) -> dict[str, np.ndarray]:
  """Inverse of `official_to_params` (the trunk; and the probe when given). Scanned params
  (model.scan_layers) are unrolled first."""
  params = scan.unstack(dict(params))
  pe = np.asarray(params["patch_embed"]["kernel"])
  d = pe.shape[1]
  sd = {"preprocessor.patchifier.proj.weight": pe.reshape(patch, patch, 3, d).transpose(3, 2, 0, 1),
        "preprocessor.patchifier.proj.bias": np.asarray(params["patch_embed"]["bias"])}
  for ours, theirs in (("patch_norm", "preprocessor.patchifier.norm"),
                       ("post_trunk_norm", "trunk.post_trunk_norm")):
    sd[theirs + ".weight"] = np.asarray(params[ours]["scale"])
    sd[theirs + ".bias"] = np.asarray(params[ours]["bias"])
  depth = sum(1 for k in params if k.startswith("blocks_"))
  for i in range(depth):
    b, p = params[f"blocks_{i}"], f"trunk.blocks.{i}."
    for n in ("norm_1", "norm_2"):
      sd[p + n + ".weight"] = np.asarray(b[n]["scale"])
      sd[p + n + ".bias"] = np.asarray(b[n]["bias"])
    sd[p + "attn.qkv.weight"] = np.asarray(b["attn"]["qkv"]).transpose(1, 2, 3, 0).reshape(3 * d, d)
    sd[p + "attn.proj.weight"] = np.asarray(b["attn"]["proj"]).reshape(d, d).T
    sd[p + "mlp.fc1.weight"] = np.asarray(b["mlp"]["fc1"]["kernel"]).T
    sd[p + "mlp.fc2.weight"] = np.asarray(b["mlp"]["fc2"]["kernel"]).T
  if probe is not None:
    pp, bs = probe["params"], probe["batch_stats"]["bn"]
    sd.update({"head.cls_token": np.asarray(pp["cls_token"]),
               "head.k.weight": np.asarray(pp["k"]["kernel"]).T,
               "head.v.weight": np.asarray(pp["v"]["kernel"]).T,
               "head.linear.weight": np.asarray(pp["linear"]["kernel"]).T,
               **({"head.linear.bias": np.asarray(pp["linear"]["bias"])}
                  if "bias" in pp["linear"] else {}),
               "head.bn.running_mean": np.asarray(bs["mean"]),
               "head.bn.running_var": np.asarray(bs["var"]),
               "head.bn.num_batches_tracked": np.asarray(0, np.int64)})
  return sd


def parse_image_size(value) -> int | tuple[int, int]:
  """'224' | '224,168' (H,W) | an int | a pair -> an int (square) or an (H, W) tuple."""
  if isinstance(value, str):
    parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
    try:
      value = [int(p) for p in parts]
    except ValueError:
      value = []
  elif np.ndim(value) == 0:
    value = [int(value)]
  value = [int(v) for v in value]
  if len(value) not in (1, 2) or min(value) <= 0:
    raise ValueError(f"image size must be a positive int or H,W, got {value!r}")
  return value[0] if len(value) == 1 or value[0] == value[1] else (value[0], value[1])


def write_converted(sd: dict[str, np.ndarray], out: str, width: int, depth: int, num_heads: int,
                    patch: int = 14, image_size: int | tuple[int, int] = 224,
                    layers: tuple[int, ...] | None = None) -> str:
  """Writes `out/` as a loadable workdir: config.json, checkpoints/0/state
  (Orbax, `{"params": ...}`), params.safetensors and, when the state dict has
  the classifier, probe.safetensors, whose input is the mean of the blocks
  `layers` (recorded in config.json's "probe" and in the file's metadata).
  Returns `out`."""
  import json
  import orbax.checkpoint as ocp
  from etils import epath
  from pretrain_jax import export, paths
  params, probe = official_to_params(sd, width, depth, num_heads, patch)
  image_size = parse_image_size(image_size)
  model_cfg = {"image_size": image_size, "patch_size": patch, "width": width, "depth": depth,
               "num_heads": num_heads, "mlp_ratio": 4, "head": "none"}
  info = {"model": model_cfg, "converted_from": "apple/ml-aim aim-v1"}
  if probe is not None:
    if not layers:
      raise ValueError("the state dict has a classifier head: name the blocks it reads "
                       "(--probe_layers)")
    info["probe"] = {"kind": "attentive", "layers": [int(l) for l in layers],
                     "num_heads": num_heads,
                     "num_classes": int(probe["params"]["linear"]["kernel"].shape[1]),
                     "linear_bias": "bias" in probe["params"]["linear"]}
  root = paths.resolve(out)   # local (absolute, for Orbax) or gs://...
  epath.Path(root).mkdir(parents=True, exist_ok=True)
  (epath.Path(root) / "config.json").write_text(json.dumps(info, indent=2))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(root, "checkpoints", "0", "state"), {"params": params}, force=True)
  ckpt.wait_until_finished()
  export.save_safetensors(params, os.path.join(root, "params.safetensors"), {"model": model_cfg})
  if probe is not None:
    export.save_safetensors(probe, os.path.join(root, "probe.safetensors"),
                            {"model": model_cfg, "probe": info["probe"]})
  return out


def convert(input_path: str, out: str, head: str = "", variant: str = "", num_heads: int = 0,
            image_size: str | int = "", layers_spec: str = "") -> dict:
  """Reads the official file(s) and writes the workdir `out` (write_converted).

  input_path: a backbone (with `head`, a separately released head file), a combined file,
  or an HF-hub snapshot directory (model.safetensors + config.json, whose constructor
  arguments set the size, heads, resolution and probe layers unless given here).
  Returns a summary {"width", "depth", "num_heads", "image_size", "probe_layers"}.
  """
  hub = hub_config(input_path)
  sd = load_state_dict(input_path)
  check_is_backbone(sd, input_path)
  if head:
    sd = merge_head(sd, load_state_dict(head), input_path, head)
  width = sd["preprocessor.patchifier.proj.weight"].shape[0] if (
      "preprocessor.patchifier.proj.weight" in sd) else None
  patch = int(hub.get("patch_size", 14))
  if variant:
    if variant not in VARIANTS:
      raise ValueError(f"unknown --variant {variant!r}; choose from {list(VARIANTS)}")
    width, depth, heads = VARIANTS[variant]
  else:
    if width is None:
      raise ValueError(f"{input_path} has no preprocessor.patchifier.proj.weight; pass "
                       "--variant")
    depth = len({k.split(".")[2] for k in sd if k.startswith("trunk.blocks.")})
    # every released AIM uses 128-wide heads
    heads = num_heads or int(hub.get("num_heads", 0)) or width // 128
    if heads <= 0 or width % heads:
      raise ValueError(f"cannot infer the number of heads for width {width}; pass --num_heads")
  size = parse_image_size(image_size or hub.get("img_size", 224))
  layers = None
  if any(_is_head(k) for k in sd):
    if not layers_spec and "probe_layers" in hub:   # the official int (last N) or block ids
      n = hub["probe_layers"]
      layers_spec = (",".join(str(i) for i in range(depth - n, depth)) if isinstance(n, int)
                     else ",".join(str(int(i)) for i in n))
    if not layers_spec and hub:   # the official constructor's default: the last 6 blocks
      layers_spec = "last"
    if not layers_spec:   # best for a released size; other sizes: the constructor's default
      last = ("last_layers" in os.path.basename(head or input_path)
              or variant_of(width, depth) is None)
      layers_spec = "last" if last else "best"
    layers = probe_layers(layers_spec, width, depth)
  write_converted(sd, out, width, depth, heads, patch, size, layers)
  return {"width": width, "depth": depth, "num_heads": heads, "image_size": size,
          "probe_layers": layers}


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  try:
    info = convert(f.input, f.out, f.head, f.variant, f.num_heads, f.image_size,
                   f.probe_layers)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  probe = (f"; head reads the mean of blocks {list(info['probe_layers'])}"
           if info["probe_layers"] else "; no classifier head")
  print(f"wrote {f.out} (AIM width={info['width']} depth={info['depth']} "
        f"heads={info['num_heads']} image_size={info['image_size']}{probe})")


if __name__ == "__main__":
  from absl import app, flags
  from pretrain_jax import cli
  flags.DEFINE_string("input", None, "Official AIM v1 backbone or combined checkpoint "
                      "(.safetensors or .pth), or an HF-hub snapshot directory.")
  flags.DEFINE_string("head", "", "A separately released head (..._attnprobe_head_best_layers.pth"
                      " or ..._head_last_layers.pth), merged with --input.")
  flags.DEFINE_string("variant", "", "0.6B, 1B, 3B or 7B (default: inferred from shapes).")
  flags.DEFINE_string("out", None, "Output directory (a workdir aimjax.load can read).")
  flags.DEFINE_string("image_size", "", "Input resolution the model is built for: S or H,W "
                      "(default: the HF config's img_size, else 224).")
  flags.DEFINE_integer("num_heads", 0, "Attention heads (default: width / 128, as released).")
  flags.DEFINE_string("probe_layers", "", "Blocks whose mean the head reads: best | last | "
                      "i,j,... (default: best, or last for a ..._head_last_layers file or "
                      "an unreleased size).")
  flags.mark_flags_as_required(["input", "out"])
  app.run(main, flags_parser=cli.parse_flags)
