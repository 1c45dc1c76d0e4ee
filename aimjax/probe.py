"""AIM's probing entry point: attentive or linear probes on frozen AIM features (paper
Sec. 4.2, 5.4), optionally with LoRA adapters on the trunk. It is the core's probe
(pretrain_jax.probe) with configs/aim/probe.py, whose `backbone` is 'aim'; any
registered backbone works too (`--config.backbone=fourm --config.init_from=` a
fourm_jax.train workdir probes a 4M encoder).

  python -m aimjax.probe --config=configs/aim/probe.py:variant=tiny \\
      --config.init_from=WORKDIR_OR_CHECKPOINT --workdir=DIR
"""
from pretrain_jax import cli, probe

train_probes = probe.train_probes
main = probe.main

if __name__ == "__main__":
  cli.run(main)
