"""Pseudo-labelling images into aligned multimodal shards (4M-21 App. D.1).

  python -m fourm_jax.pseudo_label --config=configs/fourm/pseudo_label.py \
      --input=scenes:1000 --out=data/scenes_4m
  python -m fourm_jax.pseudo_label --config=configs/fourm/pseudo_label.py:images \
      --input=folder:/data/my_images --out=data/my_images_4m

Variants: 'scenes' (default; exact labels plus every computed labeller) and
'images' (real images: the labellers that need only the image; register
depth/normals/segmentation models with fourm_jax.labellers.register_model and
append them, then semantic_metadata / geometric_metadata / sam_edges after them).
"""
import ml_collections

SCENES_LABELLERS = ("canny_edges", "sam_edges", "color_palette", "image_metadata",
                    "semantic_metadata", "geometric_metadata", "caption_length", "aim_features")
IMAGE_LABELLERS = ("canny_edges", "color_palette", "image_metadata", "aim_features")


def get_config(arg: str = "scenes") -> ml_collections.ConfigDict:
  variant = (arg or "scenes").split("=")[-1]
  if variant not in ("scenes", "images"):
    raise ValueError(f"unknown pseudo_label variant {variant!r}; use scenes or images")
  c = ml_collections.ConfigDict()
  c.input = "scenes:1000" if variant == "scenes" else ""   # --input overrides
  c.out = ""                                             # --out overrides
  c.resolution = 224                   # images are resized and centre-cropped to this
  c.labellers = SCENES_LABELLERS if variant == "scenes" else IMAGE_LABELLERS
  c.labeller_options = ml_collections.ConfigDict({
      "canny_edges": {"low": 100.0, "high": 200.0},
      "color_palette": {"max_colors": 7, "space": "lab", "seed": 0},
      "semantic_metadata": {"classes": "scenes" if variant == "scenes" else "coco_4m21"},
      "geometric_metadata": {"threshold": 0.3, "normalize_depth": True},
      # init_from: an AIM workdir or checkpoint (the quickstart's workdir/aim_tiny), required;
      # 'random:VARIANT' labels with random weights on purpose (tests); image_size 0: the
      # checkpoint's training size (224 for a variant)
      "aim_features": {"init_from": "", "layer": -1, "image_size": 0},
  })
  c.batch_size = 32                    # images per labeller call
  c.workers = 0                        # processes labelling shards in parallel (0: this one)
  c.records_per_shard = 1000           # used when shards = 0
  c.shards = 0
  c.limit = 0                          # label only the first N images (0: all)
  c.captions = False                   # require a caption per image (webdataset/arrayrecord)
  c.scenes_seed = 0
  # keys of the input sources (as in the training data configs)
  c.image_key = "image"
  c.label_key = "label"
  c.tfds_data_dir = ""
  c.webdataset_image_modality = "rgb"
  c.debug = ml_collections.ConfigDict()
  c.debug.stop_after_records = 0       # fault injection for tests: stop mid-shard
  return c
