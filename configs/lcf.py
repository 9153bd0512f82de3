r"""LCF (the paper's Algorithm 4): fine-tune a pretrained LCM on an image-caption folder, no teacher.

    python -m lcm_jax.train --config=configs/lcf.py --workdir=runs/lcf_pokemon \
        --config.init_from=SimianLuo/LCM_Dreamshaper_v7 --config.data.path=data/pokemon

`init_from` is an LCM pipeline folder (or hub id) or a workdir of ours; its VAE, text encoder
and tokenizer are used unless `teacher` names another pipeline. The folder is the Hugging Face
`imagefolder` layout: images plus metadata.jsonl with "file_name" and "text".

Numbers: the paper's LCF experiments: the 768 LCM fine-tuned for 30k iterations at lr 8e-6
(Pokemon and Simpsons captions, 90/10 train/test split). The paper does not state LCF's batch
size or EMA decay; we keep its 768 distillation values (16 and the default 0.999943).
`:runlocal` shrinks the run to a CPU-sized one.
"""

from lcm_jax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False)
  c = config_lib.base_config()
  c.mode = "lcf"
  c.init_from = ""  # required: an LCM folder or workdir
  c.data.format = "imagefolder"
  c.resolution = 768
  c.batch_size = 16
  c.num_train_steps = 30_000
  c.checkpoint_every = 1000
  return config_lib.runlocal(c) if arg.runlocal else c
