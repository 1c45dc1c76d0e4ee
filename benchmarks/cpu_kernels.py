"""The kernels issue 16's profiles pointed at, ours against the alternatives, one run.

  python benchmarks/cpu_kernels.py [--json=benchmarks/results/cpu_kernels.json] [--runs=9]

At the shapes of the side-by-side benchmark (`vs_official.py`), medians of `runs` calls:
  attention fwd+bwd  AIM block's attention, [16, 256, 6, 64], prefix-causal mask:
                     pretrain_jax.attention (head-major, backward written out) against
                     autodiff of jax.nn.dot_product_attention (and torch's
                     scaled_dot_product_attention when torch is installed)
  gelu fwd+bwd       [16, 256, 1536]: erf form (pretrain_jax.activations) against
                     jax.nn.gelu(approximate=False) (erfc) (and torch's nn.GELU)
  sampling           [4, 196, 16384] and [4, 25, 16384] logits (a MaskGIT and a ROAR step's
                     draw): fourm_jax.sampler.sample_tokens against
                     jax.random.categorical (and torch softmax + multinomial, the official)
Prints a table and writes JSON {"rows": [{"kernel", "shape", "impl", "ms"}, ...]}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fourm_jax import sampler  # noqa: E402
from pretrain_jax import activations, attention  # noqa: E402


def median_ms(fn, runs: int) -> float:
  fn()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def jax_cases(runs: int):
  b, t, h, d = 16, 256, 6, 64
  x = jax.random.normal(jax.random.key(0), (b, t, h, d))
  i = np.arange(t)
  mask = jnp.asarray(((i[None] <= i[:, None]) | (i[None] < t // 2))[None, None].repeat(b, 0))

  def attn(fn):
    g = jax.jit(jax.grad(lambda q: jnp.sum(fn(q, 0.5 * q, 2.0 * q, mask=mask) ** 2)))
    return lambda: jax.block_until_ready(g(x))
  yield "attention fwd+bwd", (b, t, h, d), "ours (pretrain_jax.attention)", median_ms(
      attn(attention.dot_product_attention), runs)
  yield "attention fwd+bwd", (b, t, h, d), "jax.nn.dot_product_attention", median_ms(
      attn(jax.nn.dot_product_attention), runs)

  hid = jax.random.normal(jax.random.key(1), (16, 256, 1536))
  for name, fn in (("ours (erf)", activations.gelu_exact),
                   ("jax.nn.gelu exact (erfc)", lambda y: jax.nn.gelu(y, approximate=False))):
    g = jax.jit(jax.grad(lambda y, fn=fn: jnp.sum(fn(y) ** 2)))
    yield "gelu fwd+bwd", hid.shape, name, median_ms(lambda g=g: jax.block_until_ready(g(hid)),
                                                      runs)

  for shape in ((4, 196, 16384), (4, 25, 16384)):
    logits = 3 * jax.random.normal(jax.random.key(2), shape)
    ours = jax.jit(lambda k, l: sampler.sample_tokens(k, l, jnp.float32(1.0)))
    theirs = jax.jit(lambda k, l: jax.random.categorical(k, l, axis=-1))
    key = jax.random.key(3)
    yield "sampling", shape, "ours (sample_tokens)", median_ms(
        lambda: jax.block_until_ready(ours(key, logits)), runs)
    yield "sampling", shape, "jax.random.categorical", median_ms(
        lambda: jax.block_until_ready(theirs(key, logits)), runs)


def torch_cases(runs: int, threads: int):
  try:
    import torch
    import torch.nn.functional as F
  except ImportError:
    return
  torch.set_num_threads(threads)
  b, t, h, d = 16, 256, 6, 64
  x = torch.randn(b, h, t, d, requires_grad=True)
  i = torch.arange(t)
  mask = ((i[None] <= i[:, None]) | (i[None] < t // 2))[None, None].expand(b, 1, t, t)

  def attn():
    x.grad = None
    (F.scaled_dot_product_attention(x, 0.5 * x, 2.0 * x, attn_mask=mask) ** 2).sum().backward()
  yield "attention fwd+bwd", (b, t, h, d), "torch scaled_dot_product_attention", median_ms(
      attn, runs)
  hid = torch.randn(16, 256, 1536, requires_grad=True)

  def gelu():
    hid.grad = None
    (F.gelu(hid) ** 2).sum().backward()
  yield "gelu fwd+bwd", tuple(hid.shape), "torch nn.GELU", median_ms(gelu, runs)
  for shape in ((4, 196, 16384), (4, 25, 16384)):
    logits = 3 * torch.randn(*shape)
    yield "sampling", shape, "torch softmax + multinomial (official)", median_ms(
        lambda: torch.multinomial(torch.softmax(logits, -1).reshape(-1, shape[-1]), 1), runs)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks/results/cpu_kernels.json"))
  parser.add_argument("--runs", type=int, default=9)
  parser.add_argument("--threads", type=int, default=2, help="torch threads")
  args = parser.parse_args(argv)
  rows = [dict(kernel=k, shape=list(s), impl=n, ms=ms)
          for k, s, n, ms in [*jax_cases(args.runs), *torch_cases(args.runs, args.threads)]]
  rows.sort(key=lambda r: (r["kernel"], str(r["shape"])))
  print(f"{'kernel':18s} {'shape':18s} {'implementation':38s} {'ms':>8s}")
  for r in rows:
    print(f"{r['kernel']:18s} {str(tuple(r['shape'])):18s} {r['impl']:38s} {r['ms']:8.1f}")
  out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
         "machine": f"{platform.machine()} {os.cpu_count()} cores; jax {jax.__version__} "
                    f"on {jax.default_backend()}",
         "load_average": os.getloadavg(), "runs": args.runs, "rows": rows}
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
