"""Generation schedules for 4M (4M App. A.3): what each decoding step does.

A schedule is a list of `Step`s: the target modality, the scheme ('maskgit':
decode the most confident of all sampled tokens; 'roar': decode random
positions; 'autoregressive': left to right, for sequences), how many tokens
the step decodes, its temperature, top-k, top-p and guidance scale.
`chained` builds one for several targets in turn; each finished target then
conditions the next ones (the sampler adds it to the encoder's input).

Token schedules split a target's tokens over its steps ('cosine': few tokens
first, as MaskGIT; 'linear': equal parts, the larger first), rounded as the
official ml-4m code rounds them (see `token_schedule`); ROAR always takes the
linear one, as there. Temperature schedules: 'constant', 'linear' (decays as
the tokens get decoded) and 'onex:MIN:POWER' (one over x). Guidance schedules:
'constant', or 'cosine' (the scale decays towards 1, the unguided logits, over
the steps; the official code has no cosine guidance schedule).
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
  """Tokens decoded at each of `steps` steps, summing to `total` (int [steps'], as ml-4m's
  fourm/utils/generation.py computes them).

  'cosine': the share still masked before step i is c_i = (1 + cos(pi i / steps)) / 2; steps
  0 .. steps - 2 each decode round(total (c_i - c_{i+1})) (each step rounded on its own, half
  to even), the last one the rest (8 steps over 196 tokens: 7 21 32 38 38 32 21 7).
  'linear': the differences of linspace(0, total, steps + 1) truncated to integers, the
  larger first, trailing zeros dropped.

  The official cosine rounding can overshoot when there are few tokens per step, its last
  step then decoding a negative count (8 steps over 16 tokens: 1 2 3 3 3 3 2 -1); here the
  excess is taken off the last steps instead. Steps of zero tokens are kept (they decode
  nothing; `chained` drops them once the temperatures are computed).
  """
  if steps < 1 or total < 1:
    raise ValueError(f"need steps >= 1 and tokens >= 1, got {steps}, {total}")
  if kind == "cosine":
    masked = [0.5 * (1 + math.cos(math.pi * i / steps)) for i in range(steps)]
    out = [round(total * (a - b)) for a, b in zip(masked[:-1], masked[1:])]
    out.append(total - sum(out))
    excess, i = -min(out[-1], 0), len(out) - 1
    out[-1] = max(out[-1], 0)
    while excess:                 # the official last step would be negative
      i -= 1
      cut = min(excess, out[i])
      out[i] -= cut
      excess -= cut
    out = np.array(out, np.int64)
  elif kind == "linear":
    out = np.sort(np.diff(np.linspace(0, total, steps + 1).astype(np.int64)))[::-1]
    out = out[:int(np.flatnonzero(out)[-1]) + 1]
  else:
    raise ValueError(f"unknown token schedule {kind!r}; use 'cosine' or 'linear'")
  if out.sum() != total or (out < 0).any():
    raise AssertionError(f"token schedule {out} does not split {total} tokens")
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
    # as official, one point per token, step i taking point i; with more steps than tokens
    # (zero-token steps) one point per step, where the official schedule runs out
    x = np.linspace(1, 100, max(tokens.sum(), len(tokens)))
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
  """One flat schedule decoding `targets` in turn (per-target lists; defaults: cosine tokens
  (ROAR: linear), temperature 1 constant, no top-k/top-p, guidance 1 constant)."""
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
      kind = pick(token_schedules, i, "linear" if scheme == "roar" else "cosine")
      if scheme == "roar" and kind != "linear":   # ml-4m decodes ROAR on the linear one only
        raise ValueError(f"{target}: ROAR takes the linear token schedule, not {kind!r}")
      toks = token_schedule(kind, steps[i], num_tokens[i])
    temps = temperature_schedule(pick(temperature_schedules, i, "constant"),
                                 pick(temperatures, i, 1.0), toks)
    cfg = guidance_schedule(pick(guidance_schedules, i, "constant"), pick(guidance, i, 1.0),
                            len(toks))
    # steps of no tokens (the cosine split of few tokens) are left out; the others keep the
    # temperature and guidance of their place in the official schedule
    out.extend(Step(target, scheme, int(t), float(temp), int(pick(top_k, i, 0)),
                    float(pick(top_p, i, 0.0)), float(g))
               for t, temp, g in zip(toks, temps, cfg) if t > 0)
  return out
