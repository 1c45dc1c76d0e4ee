"""Official AIM v1 PyTorch checkpoints <-> our params (and back).

  python -m aimjax.convert --input=aim_600m.safetensors --variant=0.6B --out=DIR

Key names and layouts are those of apple/ml-aim's `aim-v1` models
(`../shared/reference/aim.md`): PyTorch Linear weights are [out, in], the
patch projection is a Conv2d [D, 3, p, p] with bias, qkv stacks q, k, v on
dim 0, head-major. Writes an Orbax checkpoint of the trunk params (usable as
`init_from`) plus a safetensors export, and the attentive classifier head when
the state dict has one. `.pth` files are read with `torch.load(weights_only=True)`
(no arbitrary unpickling); safetensors needs no torch.
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


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors or .pth/.pt/.bin file (local or gs://...) into numpy arrays."""
  from etils import epath
  from pretrain_jax import paths
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    with paths.local_copy(path) as local:
      return dict(load_file(local))
  try:
    import torch
  except ImportError:
    raise ValueError(f"{path} is a PyTorch pickle: install torch to read it, or convert it to "
                     ".safetensors first") from None
  with paths.local_copy(path) as local:
    sd = torch.load(local, map_location="cpu", weights_only=True)
  if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
    sd = sd["model"]
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in sd.items()}


def expected_shapes(width: int, depth: int, patch: int, num_classes: int | None):
  """{official key: shape} of a trunk (and classifier head when num_classes)."""
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
                   "head.linear.weight": (num_classes, d), "head.bn.running_mean": (d,),
                   "head.bn.running_var": (d,), "head.bn.num_batches_tracked": ()})
  return shapes


def check_state_dict(sd: dict[str, np.ndarray], width: int, depth: int, patch: int = 14):
  """Raises ValueError listing missing, unexpected and mis-shaped keys.

  Returns the number of classes of the classifier head, or None without one.
  """
  num_classes = sd["head.linear.weight"].shape[0] if "head.linear.weight" in sd else None
  want = expected_shapes(width, depth, patch, num_classes)
  missing = sorted(set(want) - set(sd))
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
                        "linear": {"kernel": sd["head.linear.weight"].T}},
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
               "head.bn.running_mean": np.asarray(bs["mean"]),
               "head.bn.running_var": np.asarray(bs["var"]),
               "head.bn.num_batches_tracked": np.asarray(0, np.int64)})
  return sd


def write_converted(sd: dict[str, np.ndarray], out: str, width: int, depth: int, num_heads: int,
                    patch: int = 14, image_size: int = 224) -> str:
  """Writes `out/` as a loadable workdir: config.json, checkpoints/0/state
  (Orbax, `{"params": ...}`), params.safetensors and, when the state dict has
  the classifier, probe.safetensors. Returns `out`."""
  import json
  import orbax.checkpoint as ocp
  from etils import epath
  from pretrain_jax import export, paths
  params, probe = official_to_params(sd, width, depth, num_heads, patch)
  model_cfg = {"image_size": image_size, "patch_size": patch, "width": width, "depth": depth,
               "num_heads": num_heads, "mlp_ratio": 4, "head": "none"}
  root = paths.resolve(out)   # local (absolute, for Orbax) or gs://...
  epath.Path(root).mkdir(parents=True, exist_ok=True)
  (epath.Path(root) / "config.json").write_text(json.dumps(
      {"model": model_cfg, "converted_from": "apple/ml-aim aim-v1"}, indent=2))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(root, "checkpoints", "0", "state"), {"params": params}, force=True)
  ckpt.wait_until_finished()
  export.save_safetensors(params, os.path.join(root, "params.safetensors"), {"model": model_cfg})
  if probe is not None:
    export.save_safetensors(probe, os.path.join(root, "probe.safetensors"), {"model": model_cfg})
  return out


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  sd = load_state_dict(f.input)
  width = sd["preprocessor.patchifier.proj.weight"].shape[0] if (
      "preprocessor.patchifier.proj.weight" in sd) else None
  if f.variant:
    if f.variant not in VARIANTS:
      raise SystemExit(f"error: unknown --variant {f.variant!r}; choose from {list(VARIANTS)}")
    width, depth, heads = VARIANTS[f.variant]
  else:
    if width is None:
      raise SystemExit(f"error: {f.input} has no preprocessor.patchifier.proj.weight; pass "
                       "--variant")
    depth = len({k.split(".")[2] for k in sd if k.startswith("trunk.blocks.")})
    heads = f.num_heads or width // 128   # every released AIM uses 128-wide heads
    if heads <= 0 or width % heads:
      raise SystemExit(f"error: cannot infer the number of heads for width {width}; pass "
                       "--num_heads")
  try:
    write_converted(sd, f.out, width, depth, heads, image_size=f.image_size)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {f.out} (AIM width={width} depth={depth} heads={heads})")


if __name__ == "__main__":
  from absl import app, flags
  from pretrain_jax import cli
  flags.DEFINE_string("input", None, "Official AIM v1 checkpoint (.safetensors or .pth).")
  flags.DEFINE_string("variant", "", "0.6B, 1B, 3B or 7B (default: inferred from shapes).")
  flags.DEFINE_string("out", None, "Output directory (a workdir aimjax.load can read).")
  flags.DEFINE_integer("image_size", 224, "Input resolution the model is built for.")
  flags.DEFINE_integer("num_heads", 0, "Attention heads (default: width / 128, as released).")
  flags.mark_flags_as_required(["input", "out"])
  app.run(main, flags_parser=cli.parse_flags)
