"""Turning pseudo-labelled shards into token shards (tokenizers_jax.tokenize).

  python -m tokenizers_jax.tokenize --config=configs/tokenizers/tokenize.py \
      --input='data/scenes_4m/*.array_record' --out=data/scenes_4m_tokens \
      --config.image_tokenizers.depth=workdir/tok_depth --config.text_tokenizer=tok.json
"""
import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.input = ""
  c.out = ""
  # modality -> tokenizers_jax.train workdir ('' = not tokenised)
  c.image_tokenizers = ml_collections.ConfigDict(
      {"rgb": "", "depth": "", "normals": "", "semantic": "", "edges": "", "features": ""})
  # vector field -> mlp_vae workdir (configs/tokenizers/mlp_vae.py), written as tok_<field>
  c.vector_tokenizers = ml_collections.ConfigDict({"aim_global": ""})
  # any other token field: 'OUT=SOURCE:WORKDIR,...', the tokenizer of WORKDIR on the record
  # field SOURCE written as OUT (several feature maps, SAM edges through the edge tokenizer, ...),
  # e.g. 'tok_dinov2=dinov2_features:workdir/tok_features,tok_sam_edges=sam_edges:workdir/tok_edges'
  c.outputs = ""
  c.sam_instance_tokenizer = ""   # a sam_mask tokenizer workdir: adds the sam_instance sequence
  c.sam_points = 7             # query points per record (4M-21: 7, drawn at random)
  c.sam_max_len = 290          # 4M-21's longest sam_instance sequence, [EOS] included
  c.seed = 0                   # seeds the query points (with each record's index)
  c.pose_tokenizer = ""        # an mlp_vae of SMPL body poses (mlp_vae.py:target=pose): adds
                               # human_poses from the shards' human_* fields
  c.pose_max_len = 263         # 4M-21's human_poses length, [EOS] included
  c.text_encoder = ""          # 'NAME[:ARG]' registered in tokenizers_jax.text_encoders: adds the
                               # caption's embeddings (4M-21's t5_caption)
  c.text_encoder_import = ""   # modules to import first (where the encoder registers itself)
  c.text_encoder_field = "t5_caption"
  c.text_encoder_max_len = 77  # embeddings kept per caption (4M-21: 77)
  c.text_encoder_dtype = "float16"
  c.text_tokenizer = ""        # WordPiece file (tokenizers_jax.text); '' = no sequence modalities
  c.class_names = "scenes"     # box class ids -> names: 'scenes' or comma-separated names
  c.palette_size = 3           # which of the 1..7-colour palettes to tokenise
  c.max_len = 256              # longest sequence, [EOS] included
  c.batch_size = 32
  c.copy_fields = ("image",)   # input fields copied unchanged (where present): 4M's RGB pixels
  c.debug = ml_collections.ConfigDict({"stop_after_records": 0})   # fault injection (tests)
  return c
