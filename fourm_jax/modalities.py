"""The modality registry of 4M (7 modalities) and 4M-21: one row per modality.

A row says how a modality enters and leaves the model:

  kind 'image'   a token grid from an image tokenizer (grid h x w, vocabulary V),
                 2D sine-cosine positions
  kind 'global'  a few tokens of a global embedding (no spatial layout):
                 learned positions
  kind 'seq'     WordPiece ids of a text-like sequence (captions, boxes,
                 metadata, ...), at most `length` tokens, 1D sine-cosine positions
  kind 'pixels'  an image given as patches (input only), `channels` x patch^2 per token
  kind 'seq_emb' a sequence of precomputed embeddings of width `emb_dim` (input
                 only, e.g. T5-XXL caption embeddings), 1D positions

Names, vocabularies and lengths follow the official modality table, so
configs and checkpoints name modalities the same way (e.g. 'tok_rgb@224').
Add a modality by adding a row (`register`); the model builds its
embeddings and heads from the rows it is given.
"""
from __future__ import annotations

import dataclasses

KINDS = ("image", "global", "seq", "pixels", "seq_emb")
TEXT_VOCAB = 30_000


@dataclasses.dataclass(frozen=True)
class Modality:
  name: str
  kind: str
  vocab_size: int = 0          # token vocabulary (image, global, seq)
  grid: tuple[int, int] = (0, 0)   # token grid (image, pixels)
  length: int = 0              # tokens: max sequence length (seq, seq_emb), count (global)
  patch_size: int = 16         # pixels per patch side (pixels)
  channels: int = 3            # image channels (pixels)
  emb_dim: int = 0             # input embedding width (seq_emb)
  tokenizer: str = ""          # what makes the tokens (documentation and tooling)
  input: bool = True           # may be given to the encoder
  target: bool = True          # may be predicted by the decoder

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"modality {self.name!r}: unknown kind {self.kind!r}; known: {KINDS}")
    if self.kind in ("pixels", "seq_emb") and self.target:
      raise ValueError(f"modality {self.name!r}: {self.kind} modalities are input only")
    if self.kind in ("image", "global", "seq") and self.vocab_size <= 0:
      raise ValueError(f"modality {self.name!r} needs a vocab_size")

  @property
  def num_tokens(self) -> int:
    """Positions of the modality in the model: grid cells, or the sequence length."""
    if self.kind in ("image", "pixels"):
      return self.grid[0] * self.grid[1]
    return self.length

  @property
  def is_sequence(self) -> bool:
    return self.kind in ("seq", "seq_emb")


def _image(name, vocab, size=224, patch=16, tokenizer=""):
  g = size // patch
  return Modality(name, "image", vocab_size=vocab, grid=(g, g), patch_size=patch,
                  tokenizer=tokenizer)


def _seq(name, length, tokenizer="wordpiece"):
  return Modality(name, "seq", vocab_size=TEXT_VOCAB, length=length, tokenizer=tokenizer)


# 4M-7 (4M Table 3)
FOURM7 = {m.name: m for m in (
    Modality("rgb@224", "pixels", grid=(14, 14), patch_size=16, channels=3, target=False),
    _image("tok_rgb@224", 16384, tokenizer="vqvae_rgb_diffusion"),
    _image("tok_depth@224", 8192, tokenizer="vqvae_depth_diffusion"),
    _image("tok_normal@224", 8192, tokenizer="vqvae_normal_diffusion"),
    _image("tok_semseg@224", 4096, tokenizer="vqvae_semseg"),
    _image("tok_clip@224", 8192, tokenizer="vqvae_clip"),
    _seq("caption", 256),
    _seq("det", 256),
)}

# 4M-21 adds (4M-21 Sec. 2, App. D)
FOURM21 = {**FOURM7, **{m.name: m for m in (
    Modality("t5_caption", "seq_emb", length=77, emb_dim=4096, tokenizer="t5_xxl",
             target=False),
    _seq("metadata", 40),
    _seq("human_poses", 263),
    _seq("color_palette", 23),
    _seq("sam_instance", 290),
    _image("tok_canny_edge@224", 8192, tokenizer="vqvae_edges"),
    _image("tok_sam_edge@224", 8192, tokenizer="vqvae_edges"),
    _image("tok_dinov2@224", 8192, patch=14, tokenizer="vqvae_dinov2"),
    _image("tok_imagebind@224", 8192, patch=14, tokenizer="vqvae_imagebind"),
    Modality("tok_dinov2_global", "global", vocab_size=8192, length=16, tokenizer="mlp_dinov2"),
    Modality("tok_imagebind_global", "global", vocab_size=8192, length=16,
             tokenizer="mlp_imagebind"),
)}}

# token super-resolution inputs/targets (4M App. A.4): 28 x 28 grids
SUPER_RESOLUTION = {m.name: m for m in (
    Modality("rgb@448", "pixels", grid=(28, 28), patch_size=16, channels=3, target=False),
    _image("tok_rgb@448", 16384, size=448),
    _image("tok_depth@448", 8192, size=448),
    _image("tok_normal@448", 8192, size=448),
    _image("tok_semseg@448", 4096, size=448),
    _image("tok_clip@448", 8192, size=448),
)}

REGISTRY: dict[str, Modality] = {**FOURM21, **SUPER_RESOLUTION}


def register(modality: Modality, replace: bool = False) -> Modality:
  """Adds a row to the registry (a name already there needs replace=True)."""
  if modality.name in REGISTRY and not replace and REGISTRY[modality.name] != modality:
    raise ValueError(f"modality {modality.name!r} is already registered differently; "
                     "pass replace=True to change it")
  REGISTRY[modality.name] = modality
  return modality


def get(names, registry: dict[str, Modality] | None = None) -> tuple[Modality, ...]:
  """The rows of `names` (a sequence or comma-separated string), in that order."""
  registry = REGISTRY if registry is None else registry
  if isinstance(names, str):
    names = [n for n in names.split(",") if n]
  unknown = [n for n in names if n not in registry]
  if unknown:
    raise ValueError(f"unknown modalities {unknown}; registered: {sorted(registry)}")
  return tuple(registry[n] for n in names)
