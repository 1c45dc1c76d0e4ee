"""The WordPiece vocabulary of captions and every other sequence (tokenizers_jax.fit_text).

  python -m tokenizers_jax.fit_text --config=configs/tokenizers/text.py \
      --input='data/scenes_4m/*.array_record' --out=data/text_tokenizer.json

The official 4M vocabulary has 30000 entries fitted on CC12M captions; the
scenes captions need far fewer (`--config.vocab_size=4500`).
"""
import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.input = ""
  c.out = ""
  c.vocab_size = 30_000
  c.class_names = "scenes"      # 'scenes' | 'coco' | comma-separated: added as whole words
  c.extra_words = ("human", "pose", "global", "camera", "shape", "point", "polygon", "none")
  c.max_records = 0             # 0: every record
  return c
