"""Fitting the WordPiece vocabulary of every sequence modality on the shards' captions.

  python -m tokenizers_jax.fit_text --config=configs/tokenizers/text.py \\
      --input='data/scenes_4m/*.array_record' --out=data/text_tokenizer.json

Reads the `caption` field of pseudo-labelled shards (at most
`max_records`, in shard order), fits one WordPiece vocabulary of
`vocab_size` entries whose first ids are 4M's layout ([PAD], [UNK], [SOS],
[EOS], the sentinels, the v0..v3 value tokens, the class names and marker
words, added with the official file's flags: whole words only, class names
matched after lowercasing: tokenizers_jax.text), and writes it as a `tokenizers` JSON file
(written to a temporary name, then renamed). tokenizers_jax.tokenize reads
it as `text_tokenizer`.
"""
from __future__ import annotations

import logging

from etils import epath

from pretrain_jax import paths
from pretrain_jax.data import multimodal
from tokenizers_jax import text


def class_names(spec: str) -> tuple[str, ...]:
  """'scenes' | 'coco' | comma-separated names."""
  if spec == "scenes":
    from pretrain_jax.data import scenes
    return tuple(scenes.SEMANTIC_CLASSES)
  if spec == "coco":
    return tuple(text.COCO_CLASSES)
  names = tuple(n.strip() for n in spec.split(",") if n.strip())
  if not names:
    raise ValueError(f"config key 'class_names' names no class: {spec!r}")
  return names


def fit_captions(config, captions):
  """The vocabulary of `config` (vocab_size, class_names, extra_words) fitted on `captions`;
  its added tokens carry the official file's flags (tokenizers_jax.text)."""
  return text.fit_wordpiece(captions, vocab_size=config.vocab_size,
                            class_names=class_names(config.class_names),
                            extra_words=tuple(config.extra_words))


def fit(config, pattern: str, out: str) -> dict:
  ds = multimodal.dataset(pattern, fields=("caption",))
  n = len(ds) if not config.max_records else min(len(ds), config.max_records)
  if n == 0:
    raise ValueError(f"no records in {pattern}")
  tok = fit_captions(config, (ds[i]["caption"] for i in range(n)))
  epath.Path(paths.resolve(out)).parent.mkdir(parents=True, exist_ok=True)   # or gs://...
  tmp = paths.staging_path(out)
  tok.save(tmp)
  paths.publish(tmp, out)
  text.load(out)           # the layout check a reader applies
  logging.info("fitted %d entries on %d captions -> %s", tok.get_vocab_size(), n, out)
  return {"records": n, "vocab_size": tok.get_vocab_size()}


def main(config, workdir):
  del workdir
  from absl import flags
  pattern, out = flags.FLAGS.input or config.input, flags.FLAGS.out or config.out
  if not pattern or not out:
    raise ValueError("pass --input=SHARDS and --out=FILE.json (or config.input / config.out)")
  result = fit(config, pattern, out)
  print(f"wrote {out}: {result['vocab_size']} entries fitted on {result['records']} captions")


if __name__ == "__main__":
  from absl import flags as _flags
  from pretrain_jax import cli
  _flags.DEFINE_string("input", "", "Pseudo-labelled shards (glob or comma-separated paths).")
  _flags.DEFINE_string("out", "", "The tokenizer JSON file to write.")
  cli.run(main, require_workdir=False)
