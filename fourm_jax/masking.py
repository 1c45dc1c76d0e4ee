"""4M's multimodal masking (4M Sec. 2.2, App. C; 4M-21 Sec. 2), per sample in the data pipeline.

For each sample: pick a masking strategy of the mixture (by weight); draw the
input budget split over modalities from the strategy's input Dirichlet
(floor of Dirichlet x budget, the remainder given one token at a time to the
argmax of further draws, clamped to each modality's size), then the target
split likewise, limited for image-like modalities to the tokens not used as
input. Then per modality:

  image-like  one random permutation: the first `input` positions are
              inputs, the next `target` ones targets (never both)
  sequence    T5 span masking: tokens dropped with probability 1 - keep
              (keep ~ U(0, 1), or 1, or 0/1 by strategy), each dropped run
              replaced by a sentinel in the input and listed after it in the
              target, which ends with one more sentinel; keep is lowered by
              x0.9 until the input fits its budget; a target over budget is cut
              to start at a sentinel. With `chunk` > 0 whole chunks of that many
              tokens are dropped together (4M-21's metadata (type, value) pairs).
  seq_emb     the span masking of the sequence, inputs only (sentinels are zeros)

Output per modality (the model's input, fourm_jax.model): tensor, input_mask
and target_mask (True = not used), decoder_attention_mask; sequences are laid
out in 2 (L + 1) slots, the input from slot 0 and the target from slot
`input budget`, as the official pipeline does. Everything is numpy on the
sample, vectorised within it; it runs in Grain workers, not in the step.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from fourm_jax.modalities import Modality
from tokenizers_jax.text import EOS_ID, NUM_SENTINELS, PAD_ID

SENTINEL_BASE = 4          # [S_k] has id 4 + k; spans are numbered from 1 as in the official code
KEEP_SCHEMES = ("random", "all", "binary")
KEEP_DECAY = 0.9


@dataclasses.dataclass(frozen=True)
class Strategy:
  """One masking strategy: Dirichlet concentrations per modality (0 = never chosen),
  the keep scheme of sequences, and its sampling weight in the mixture."""
  name: str
  input_alphas: Mapping[str, float]
  target_alphas: Mapping[str, float]
  keep: Mapping[str, str] = dataclasses.field(default_factory=dict)
  weight: float = 1.0


def all_to_all(names: Sequence[str], alpha: float, inputs_only: Sequence[str] = (),
               name: str = "") -> Strategy:
  """Every modality as input and target with the same concentration (input-only ones as input)."""
  return Strategy(name or f"all2all_{alpha:g}", {n: alpha for n in names},
                  {n: (0.0 if n in inputs_only else alpha) for n in names})


def one_to_all(source: str, names: Sequence[str], alpha: float, inputs_only: Sequence[str] = (),
               name: str = "") -> Strategy:
  """Only `source` as input (all of it: keep 'all' for a sequence), every other modality as
  target (4M's RGB->All, 4M-21's caption-biased strategies)."""
  return Strategy(name or f"{source}2all_{alpha:g}", {n: float(n == source) for n in names},
                  {n: (0.0 if n in inputs_only or n == source else alpha) for n in names},
                  keep={source: "all"})


def strategy(name: str, names: Sequence[str], *, input_alpha: float = 0.0,
             target_alpha: float = 0.0, inputs: Mapping[str, float] | None = None,
             targets: Mapping[str, float] | None = None, keep: Mapping[str, str] | None = None,
             weight: float = 1.0, inputs_only: Sequence[str] = (),
             targets_only: Sequence[str] = ()) -> Strategy:
  """A strategy over `names` in the form of the official alphas tables: a default input and
  target concentration, per-modality exceptions (`inputs`, `targets`), and keep schemes.
  Modalities that cannot be targets (`inputs_only`) get target alpha 0, and ones that
  cannot be inputs (`targets_only`) input alpha 0. Exceptions naming modalities not in
  `names` are ignored, so one mixture serves datasets with fewer modalities."""
  inputs, targets, keep = dict(inputs or {}), dict(targets or {}), dict(keep or {})
  for what, table in (("inputs", inputs), ("targets", targets)):
    bad = {k: v for k, v in table.items() if not v >= 0}
    if bad:
      raise ValueError(f"strategy {name!r}: {what} alphas must be >= 0, got {bad}")
  for k, v in keep.items():
    if v not in KEEP_SCHEMES:
      raise ValueError(f"strategy {name!r}: keep[{k!r}] = {v!r}; known: {KEEP_SCHEMES}")
  ins = {n: (0.0 if n in targets_only else float(inputs.get(n, input_alpha))) for n in names}
  tgts = {n: (0.0 if n in inputs_only else float(targets.get(n, target_alpha))) for n in names}
  return Strategy(name, ins, tgts, {k: v for k, v in keep.items() if k in names}, weight)


def slots(m: Modality) -> int:
  """Positions a modality takes in a masked sample: a sequence's input and target layouts
  (2 (L + 1)), else its token count."""
  return 2 * (m.length + 1) if m.kind == "seq" else m.num_tokens


def empty(m: Modality) -> dict:
  """A modality a sample does not have (a dataset without it): nothing given, nothing
  predicted, with the shapes the masking gives it (zeros; PAD for token ids)."""
  n = slots(m)
  if m.kind == "pixels":
    tensor = np.zeros((m.grid[0] * m.patch_size, m.grid[1] * m.patch_size, m.channels), np.uint8)
  elif m.kind == "seq_emb":
    tensor = np.zeros((n, m.emb_dim), np.float32)
  else:
    tensor = np.full(n, PAD_ID, np.int32)
  return {"tensor": tensor, "input_mask": np.ones(n, bool), "target_mask": np.ones(n, bool),
          "decoder_attention_mask": np.zeros(n, np.int32)}


def split_budget(rng: np.random.Generator, alphas: np.ndarray, total: int,
                 max_tokens: np.ndarray) -> np.ndarray:
  """Dirichlet(alphas) x total, floored; the remainder one token at a time to the argmax of
  further draws; clamped to max_tokens. int64 [num_modalities]."""
  a = np.maximum(alphas, 1e-9)
  budget = np.floor(_dirichlet(rng, a) * total).astype(np.int64)
  rest = total - budget.sum()
  if rest > 0:
    budget += np.bincount(np.argmax(_dirichlet(rng, a, rest), axis=-1), minlength=len(a))
  return np.minimum(budget, max_tokens)


def _dirichlet(rng, alphas, n=None):
  """Dirichlet draws through Gamma variates; tiny concentrations give (almost) one-hot draws
  instead of NaNs."""
  shape = (len(alphas),) if n is None else (n, len(alphas))
  g = rng.standard_gamma(np.broadcast_to(alphas, shape))
  s = g.sum(-1, keepdims=True)
  onehot = np.eye(len(alphas))[np.argmax(alphas)]
  return np.where(s > 0, g / np.where(s > 0, s, 1.0), onehot)


def span_mask(rng: np.random.Generator, ids: np.ndarray, keep_prob: float,
              chunk: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """T5 span masking of int ids [L] -> (input ids, target ids), both int64.

  With `chunk` > 0 the sequence but its last token (EOS) is masked in chunks of that length.
  """
  ids = np.asarray(ids, np.int64)
  n = len(ids)
  if chunk:
    body, idx = max(n - 1, 0), np.arange(n)
    unit = np.where(idx < body, idx // chunk, (body + chunk - 1) // chunk)
  else:
    unit = np.arange(n)
  dropped = (rng.random(int(unit[-1]) + 1 if n else 0) > keep_prob)[unit] if n else \
      np.zeros(0, bool)
  start = dropped & ~np.concatenate([[False], dropped[:-1]])
  span = np.cumsum(start)                               # span number (from 1) at dropped tokens
  n_spans = int(span[-1]) if n else 0
  if n_spans + 1 > NUM_SENTINELS:
    raise ValueError(f"{n_spans + 1} sentinels needed, the vocabulary has {NUM_SENTINELS}")
  inputs = np.where(start, SENTINEL_BASE + span, ids)[~dropped | start]
  reps = np.where(start, 2, 1) * dropped                # a span's first token follows its sentinel
  target = np.repeat(ids, reps)
  first = (np.cumsum(reps) - reps)[start]
  target[first] = SENTINEL_BASE + span[start]
  return inputs, np.concatenate([target, [SENTINEL_BASE + n_spans + 1]])


def unmask(inputs: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Inverse of span_mask: the sequence from its input and (whole) target. An empty input (a
  zero input budget) stands for the first sentinel alone."""
  if not len(inputs):
    inputs = np.array([SENTINEL_BASE + 1])
  spans, cur = {}, None
  for t in np.asarray(target).tolist():
    if SENTINEL_BASE <= t < SENTINEL_BASE + NUM_SENTINELS:
      cur = t
      spans[cur] = []
    else:
      spans[cur].append(t)
  out = []
  for t in np.asarray(inputs).tolist():
    out.extend(spans.get(t, []) if SENTINEL_BASE <= t < SENTINEL_BASE + NUM_SENTINELS else [t])
  return np.array(out, np.int64)


def _keep_prob(rng, scheme: str) -> float:
  if scheme == "random":
    return float(rng.random())
  if scheme == "all":
    return 1.0
  if scheme == "binary":
    return float(rng.integers(0, 2))
  raise ValueError(f"unknown keep scheme {scheme!r}; known: {KEEP_SCHEMES}")


def _truncate_target(rng, target: np.ndarray, budget: int) -> np.ndarray:
  """A target over budget, cut to start at a sentinel (the official rule)."""
  is_sent = (target >= SENTINEL_BASE) & (target < SENTINEL_BASE + NUM_SENTINELS)
  sents = np.flatnonzero(is_sent)
  chosen = sents[rng.integers(max(1, len(sents) - 1))]
  if len(target) - chosen >= budget:
    return target[chosen:chosen + budget]
  fits = sents[len(target) - sents <= budget]
  return target[fits[0]:]


class UnifiedMasking:
  """Masks one sample {modality: tokens / pixels / embeddings} with a strategy mixture.

  modalities: registry rows in a fixed order; input_tokens / target_tokens: the
  budgets (an int, or an inclusive (low, high) range drawn per sample);
  chunks: {modality: chunk length} for chunk-wise span masking (e.g. metadata 2).
  """

  def __init__(self, modalities: Sequence[Modality], strategies: Sequence[Strategy],
               input_tokens, target_tokens, chunks: Mapping[str, int] | None = None):
    self.modalities = tuple(modalities)
    self.names = [m.name for m in self.modalities]
    if not strategies:
      raise ValueError("at least one masking strategy is needed")
    for s in strategies:
      unknown = sorted((set(s.input_alphas) | set(s.target_alphas)) - set(self.names))
      if unknown:
        raise ValueError(f"strategy {s.name!r} names modalities {unknown} that are not "
                         f"being masked ({self.names})")
      for m in self.modalities:
        if s.target_alphas.get(m.name, 0) > 0 and not m.target:
          raise ValueError(f"strategy {s.name!r}: {m.name!r} cannot be a target")
    self.strategies = tuple(strategies)
    w = np.array([s.weight for s in strategies], np.float64)
    if np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f"strategy weights must be >= 0 with a positive sum, got {w.tolist()}")
    self.weights = w / w.sum()
    self.input_range = _range(input_tokens, "input_tokens")
    self.target_range = _range(target_tokens, "target_tokens")
    self.chunks = dict(chunks or {})
    self.max_tokens = np.array([m.num_tokens for m in self.modalities], np.int64)
    self.is_image = np.array([not m.is_sequence for m in self.modalities])
    self._alphas = [(np.array([s.input_alphas.get(n, 0.0) for n in self.names]),
                     np.array([s.target_alphas.get(n, 0.0) for n in self.names]))
                    for s in self.strategies]

  def budgets(self, rng) -> tuple[int, np.ndarray, np.ndarray]:
    """(strategy index, input budget [M], target budget [M])."""
    k = int(rng.choice(len(self.strategies), p=self.weights))
    a_in, a_tgt = self._alphas[k]
    n_in = int(rng.integers(self.input_range[0], self.input_range[1] + 1))
    n_tgt = int(rng.integers(self.target_range[0], self.target_range[1] + 1))
    b_in = split_budget(rng, a_in, n_in, self.max_tokens)
    room = np.where(self.is_image, self.max_tokens - b_in, self.max_tokens)
    b_tgt = split_budget(rng, a_tgt, n_tgt, room) if a_tgt.sum() > 0 else np.zeros_like(b_in)
    return k, b_in, b_tgt

  def __call__(self, sample: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict:
    missing = [n for n in self.names if n not in sample]
    if missing:
      raise KeyError(f"sample lacks modalities {missing} (has {sorted(sample)})")
    k, b_in, b_tgt = self.budgets(rng)
    out = {}
    for i, m in enumerate(self.modalities):
      keep = self.strategies[k].keep.get(m.name, "random")
      value = np.asarray(sample[m.name])
      if m.kind == "seq_emb":
        out[m.name] = self._seq_emb(rng, m, value, int(b_in[i]), keep)
      elif m.is_sequence:
        out[m.name] = self._sequence(rng, m, value, int(b_in[i]), int(b_tgt[i]), keep)
      else:
        out[m.name] = self._image(rng, m, value, int(b_in[i]), int(b_tgt[i]))
    out["strategy"] = np.int32(k)
    return out

  @staticmethod
  def _image(rng, m: Modality, value, n_in: int, n_tgt: int) -> dict:
    n = m.num_tokens
    order = rng.permutation(n)
    input_mask = np.ones(n, bool)
    input_mask[order[:n_in]] = False
    target_mask = np.ones(n, bool)
    target_mask[order[n_in:n_in + n_tgt]] = False
    att = np.zeros(n, np.int32)
    if n_tgt:
      att[np.flatnonzero(~target_mask)[0]] = n_tgt      # the targets see each other
    tensor = value if m.kind == "pixels" else value.reshape(n).astype(np.int32)
    return {"tensor": tensor, "input_mask": input_mask, "target_mask": target_mask,
            "decoder_attention_mask": att}

  def _span(self, rng, m, ids, n_in, keep, chunk):
    if n_in == 0:
      return np.zeros(0, np.int64), span_mask(rng, ids, 0.0, chunk)[1]
    p = _keep_prob(rng, keep)
    inputs, target = span_mask(rng, ids, p, chunk)
    while len(inputs) > n_in:
      p *= KEEP_DECAY
      inputs, target = span_mask(rng, ids, p, chunk)
    return inputs, target

  def _sequence(self, rng, m: Modality, ids, n_in: int, n_tgt: int, keep: str) -> dict:
    ids = ids[ids != PAD_ID].astype(np.int64)
    if not len(ids) or ids[-1] != EOS_ID:
      ids = np.concatenate([ids, [EOS_ID]])
    ids = np.concatenate([ids[:m.length - 1], [EOS_ID]]) if len(ids) > m.length else ids
    inputs, target = self._span(rng, m, ids, n_in, keep, self.chunks.get(m.name, 0))
    if len(target) > n_tgt:
      target = _truncate_target(rng, target, n_tgt) if n_tgt else target[:0]
    size = slots(m)
    tensor = np.full(size, PAD_ID, np.int32)
    input_mask, target_mask = np.ones(size, bool), np.ones(size, bool)
    att = np.zeros(size, np.int32)
    tensor[:len(inputs)] = inputs
    input_mask[:len(inputs)] = False
    tensor[n_in:n_in + len(target)] = target
    target_mask[n_in:n_in + len(target)] = False
    att[n_in:n_in + len(target)] = 1                       # causal
    return {"tensor": tensor, "input_mask": input_mask, "target_mask": target_mask,
            "decoder_attention_mask": att}

  def _seq_emb(self, rng, m: Modality, emb, n_in: int, keep: str) -> dict:
    n = min(len(emb), m.length)
    inputs, _ = self._span(rng, m, np.arange(n) + SENTINEL_BASE + NUM_SENTINELS, n_in, keep, 0)
    rows = inputs - SENTINEL_BASE - NUM_SENTINELS        # < 0: a sentinel, embedded as zeros
    tensor = np.zeros((m.length, emb.shape[-1]), np.float32)
    tensor[:len(rows)] = np.where((rows >= 0)[:, None], emb[np.maximum(rows, 0)], 0.0)
    input_mask = np.ones(m.length, bool)
    input_mask[:len(rows)] = False
    return {"tensor": tensor, "input_mask": input_mask, "target_mask": np.ones(m.length, bool),
            "decoder_attention_mask": np.zeros(m.length, np.int32)}


def _range(value, what: str) -> tuple[int, int]:
  lo, hi = (value, value) if np.isscalar(value) else tuple(value)
  if not 0 <= lo <= hi:
    raise ValueError(f"{what}: need 0 <= low <= high, got {value}")
  return int(lo), int(hi)
