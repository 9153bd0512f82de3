"""Defaults shared by every training config: `get_base_config()`.

Each config file starts from these and changes what differs. Where a number comes from:
"paper" is Luo et al. 2023 (arXiv 2310.04378), Sec. 5.1 and Appendix; "diffusers" is the
defaults of diffusers' `examples/consistency_distillation/train_lcm_distill_sd_wds.py`.
Every key can be overridden on the command line: `--config.optimizer.lr=1e-5`.
"""

import ml_collections

from lcm_jax.data import default_data_config

# Fixed prompts of the sample grids written during training (rows of workdir/samples/*.png).
SAMPLE_PROMPTS = (
    "a photo of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse at dawn",
    "a close-up portrait of an old man with a grey beard, studio lighting",
    "a bowl of ramen on a wooden table, 35mm photograph",
)


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # What to train, from what, on what.
  c.teacher = ""            # diffusers pipeline folder or hub id (LCD: the teacher; LCF: optional
                            # source of the VAE/text encoder, else init_from's)
  c.teacher_variant = ""    # weights variant of the teacher folder, e.g. "fp16"
  c.init_from = ""          # optional: an LCM pipeline folder or a workdir to start the student from
  c.init_params = "ema"     # which parameters of an init_from workdir: "ema" or "online"
  c.mode = "lcd"            # "lcd" (distillation, Algorithm 1) or "lcf" (fine-tuning, Algorithm 4)
  c.data = default_data_config()  # path, format, center_crop, random_flip, ... (lcm_jax.data)
  c.resolution = 512        # pixels; must be a multiple of VAE factor x 2^(UNet down blocks - 1)
  c.batch_size = 72         # global; paper: 72 at 512, 16 at 768
  c.num_train_steps = 100_000  # paper: 100k iterations
  c.seed = 0

  # The consistency loss (lcm_jax.losses.ConsistencyLossConfig).
  c.loss = ml_collections.ConfigDict()
  c.loss.solver = "ddim"          # paper: DDIM is the augmented PF-ODE solver of its main results
  c.loss.skipping_step = 20       # paper: k = 20 (50 solver points on 1000 timesteps)
  c.loss.omega_min = 2.0          # paper: omega ~ U[2, 14] (diffusers samples [5, 15])
  c.loss.omega_max = 14.0
  c.loss.distance = "l2"          # "l2" or "huber" (pseudo-Huber); diffusers' default is l2
  c.loss.huber_c = 0.001          # diffusers
  c.loss.caption_dropout = 0.0    # diffusers parses --proportion_empty_prompts but applies 0
  c.loss.uncond = "empty_prompt"  # unconditional context: the empty prompt's embedding, or "zeros"
  c.loss.cond_proj_init = "zeros" # the student's new guidance input: "zeros" or "torch_default"
  c.loss.guidance_embedding_dim = 256  # time_cond_proj_dim of the student (LCM checkpoints: 256)
  c.loss.timestep_scaling = 10.0  # boundary scalings c_skip/c_out at s = 10 t (diffusers, LCMScheduler)

  # AdamW after global-norm clipping (lcm_jax.train_step.make_optimizer).
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 8e-6           # paper
  c.optimizer.b1 = 0.9            # diffusers (torch AdamW defaults)
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 1e-2  # diffusers --adam_weight_decay
  c.optimizer.max_grad_norm = 1.0  # diffusers
  c.optimizer.schedule = "constant"  # "constant", "warmup_constant" or "warmup_cosine"
  c.optimizer.warmup_steps = 0

  c.ema_decay = 0.999943          # paper (diffusers: 0.95)

  # Dtypes: "float32", "bfloat16" or "float16".
  c.precision = ml_collections.ConfigDict()
  c.precision.teacher_dtype = "bfloat16"  # frozen teacher UNet, VAE and text encoder (params and compute)
  c.precision.compute_dtype = "bfloat16"  # student activations (its master weights stay float32)
  c.precision.target_dtype = "float32"    # EMA target; bf16 cannot resolve a 0.999943 update

  # Device mesh (lcm_jax.sharding): batch over data x fsdp; parameters split over fsdp.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                # -1: all devices left after fsdp
  c.mesh.fsdp = 1
  c.remat = True                  # recompute the student's block activations in the backward pass

  # Checkpoints, logs, samples.
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.log_every = 50
  c.sample_every = 1000           # 0: never
  c.sample_prompts = SAMPLE_PROMPTS
  c.sample_steps = (1, 2, 4)      # LCM steps, one column each
  c.sample_guidance_scale = 8.5   # diffusers' LatentConsistencyModelPipeline default (omega = 7.5)
  c.compilation_cache_dir = "~/.cache/lcm_jax/jax_cache"  # "" disables the persistent cache
  return c
