"""Generation schedules for 4M (4M App. A.3): what each decoding step does.

A schedule is a list of `Step`s: the target modality, the scheme ('maskgit':
decode the most confident of all sampled tokens; 'roar': decode random
positions; 'autoregressive': left to right, for sequences), how many tokens
the step decodes, its temperature, top-k, top-p and guidance scale.
`chained` builds one for several targets in turn; each finished target then
conditions the next ones (the sampler adds it to the encoder's input).

Token schedules split a target's tokens over its steps ('cosine': few tokens
first, as MaskGIT; 'linear': equal parts, the larger first). Temperature
schedules: 'constant', 'linear' (decays as the tokens get decoded) and
'onex:MIN:POWER' (one over x). Guidance schedules: 'constant', or 'cosine'
(the scale decays towards 1, the unguided logits, over the steps).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

SCHEMES = ("maskgit", "roar", "autoregressive")


@dataclasses.dataclass(frozen=True)
class Step:
  target: str
  scheme: str
  num_tokens: int           # tokens this step decodes (autoregressive: the whole sequence)
  temperature: float = 1.0
  top_k: int = 0            # 0: off
  top_p: float = 0.0        # 0: off
  guidance: float = 1.0     # classifier-free guidance scale (1: conditional logits)

  def __post_init__(self):
    if self.scheme not in SCHEMES:
      raise ValueError(f"unknown decoding scheme {self.scheme!r}; known: {SCHEMES}")
    if self.num_tokens < 1:
      raise ValueError(f"a step must decode at least one token, got {self.num_tokens}")
    if self.temperature < 0 or self.top_k < 0 or not 0 <= self.top_p <= 1:
      raise ValueError(f"bad sampling values in {self}")


def token_schedule(kind: str, steps: int, total: int) -> np.ndarray:
  """Tokens decoded at each of `steps` steps, summing to `total` (int [steps'])."""
  if steps < 1 or total < 1:
    raise ValueError(f"need steps >= 1 and tokens >= 1, got {steps}, {total}")
  steps = min(steps, total)
  if kind == "cosine":
    # the share still masked after step i is (1 + cos(pi i / steps)) / 2, rounded cumulatively
    done = [round(total * (1 - 0.5 * (1 + math.cos(math.pi * i / steps))))
            for i in range(steps + 1)]
    out = np.diff(np.array(done, np.int64))
  elif kind == "linear":
    out = np.sort(np.diff(np.linspace(0, total, steps + 1).astype(np.int64)))[::-1]
  else:
    raise ValueError(f"unknown token schedule {kind!r}; use 'cosine' or 'linear'")
  out = out[out > 0]
  if out.sum() != total:
    raise AssertionError(f"token schedule {out} does not sum to {total}")
  return out


def temperature_schedule(kind: str, temperature: float, tokens: np.ndarray) -> np.ndarray:
  """Temperature of each step of a token schedule."""
  tokens = np.asarray(tokens)
  if kind == "constant":
    return np.full(len(tokens), float(temperature))
  if kind == "linear":      # decays with the share of tokens still to decode
    left = (tokens.sum() - np.cumsum(tokens)) / tokens.sum()
    return np.concatenate([[temperature], temperature * left[:-1]]).clip(min=1e-9)
  if kind.startswith("onex"):
    _, lo, power = (kind.split(":") + ["0", "0.5"])[:3]
    x = np.linspace(1, 100, tokens.sum())
    y = 1 / x ** float(power)
    y = (y - y.min()) / (y.max() - y.min())
    share = np.cumsum(tokens) / tokens.sum()
    return np.array([float(lo) + (temperature - float(lo)) * (1 - c) * u
                     for u, c in zip(y, share)]).clip(min=1e-9)
  raise ValueError(f"unknown temperature schedule {kind!r}; use constant, linear, onex:MIN:POW")


def guidance_schedule(kind: str, scale: float, steps: int) -> np.ndarray:
  if kind == "constant":
    return np.full(steps, float(scale))
  if kind == "cosine":     # from `scale` down towards 1 (the plain conditional logits)
    return np.array([1 + (scale - 1) * 0.5 * (1 + math.cos(math.pi * i / steps))
                     for i in range(steps)])
  raise ValueError(f"unknown guidance schedule {kind!r}; use 'constant' or 'cosine'")


def chained(targets: Sequence[str], num_tokens: Sequence[int], schemes: Sequence[str],
            steps: Sequence[int], token_schedules: Sequence[str] = (),
            temperatures: Sequence[float] = (), temperature_schedules: Sequence[str] = (),
            top_k: Sequence[int] = (), top_p: Sequence[float] = (),
            guidance: Sequence[float] = (), guidance_schedules: Sequence[str] = ()) -> list[Step]:
  """One flat schedule decoding `targets` in turn (per-target lists; defaults: cosine tokens,
  temperature 1 constant, no top-k/top-p, guidance 1 constant)."""
  n = len(targets)
  pick = lambda seq, i, default: seq[i] if len(seq) > i else default
  for name, seq in (("num_tokens", num_tokens), ("schemes", schemes), ("steps", steps)):
    if len(seq) != n:
      raise ValueError(f"{name} has {len(seq)} entries for {n} targets")
  out = []
  for i, target in enumerate(targets):
    scheme = schemes[i]
    if scheme == "autoregressive":
      toks = np.array([num_tokens[i]])
    else:
      toks = token_schedule(pick(token_schedules, i, "cosine"), steps[i], num_tokens[i])
    temps = temperature_schedule(pick(temperature_schedules, i, "constant"),
                                 pick(temperatures, i, 1.0), toks)
    cfg = guidance_schedule(pick(guidance_schedules, i, "constant"), pick(guidance, i, 1.0),
                            len(toks))
    out.extend(Step(target, scheme, int(t), float(temp), int(pick(top_k, i, 0)),
                    float(pick(top_p, i, 0.0)), float(g))
               for t, temp, g in zip(toks, temps, cfg))
  return out
