"""Every configuration key, at the paper's CIFAR10 value (Ho et al. 2020, Appendix B).

Dataset files in this folder start from `get_config()` here and override what differs.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = data = ml_collections.ConfigDict()
  data.dataset = "cifar10"  # cifar10 | celeb_a_hq | lsun/<category> | image_folder | digits
  data.split = "train"
  data.image_size = 32
  data.num_channels = 3
  data.random_flip = True
  data.tfds_data_dir = ""  # TFDS data_dir; "" means TFDS's default (~/tensorflow_datasets)
  data.image_folder = ""  # a directory of PNG/JPEG images, for dataset = image_folder
  data.num_workers = 0  # Grain worker processes; 0 reads in the main process

  config.model = model = ml_collections.ConfigDict()
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.resamp_with_conv = True
  model.dtype = "float32"  # compute dtype: float32 | bfloat16; parameters stay float32
  # Recompute each ResNet/attention block's activations in the backward pass instead of storing
  # them: less device memory (the 256x256 model at large batches) for about one more forward pass of
  # compute.
  model.remat = False
  # > 0: a class-conditional model over labels 0 .. num_classes - 1 (Ho & Salimans 2022); the label
  # num_classes is the null label ("no class"). 0: unconditional, the paper's model.
  model.num_classes = 0

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.beta_schedule = "linear"  # linear | quad | const | jsd | warmup10 | warmup50 | cosine
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.num_timesteps = 1000
  diffusion.mean_type = "eps"  # eps | xstart | xprev
  diffusion.var_type = "fixedlarge"  # fixedlarge | fixedsmall | learned | learned_range
  diffusion.loss_type = "mse"  # mse | kl | hybrid
  diffusion.hybrid_lambda = 0.001

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # global, over all devices and hosts
  training.num_steps = 800_000
  training.learning_rate = 2e-4
  training.warmup_steps = 5000
  training.adam_b1 = 0.9
  training.adam_b2 = 0.999
  training.adam_eps = 1e-8
  training.grad_clip = 1.0
  training.ema_decay = 0.9999
  # conditional models: each example's label is replaced by the null label with this probability,
  # so one network learns the conditional and the unconditional model (classifier-free guidance)
  training.label_dropout = 0.0
  # >1 runs that many steps in one lax.scan per dispatch (for TPUs/GPUs with a slow host; not on
  # CPU, where XLA runs the backward pass of a loop body far slower than the same step dispatched
  # alone)
  training.steps_per_dispatch = 1
  training.log_every = 100
  training.sample_every = 10_000
  training.num_grid_samples = 64
  training.checkpoint_every = 10_000
  training.keep_checkpoints = 3
  # fine-tuning: the first weights of a new run (a workdir of this project, a diffusers model
  # directory or an official TF checkpoint); "": the paper's random initialisation. Read once, when
  # the run has no checkpoint yet.
  training.init_from = ""

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.batch_size = 256  # global
  sampling.num_samples = 64
  sampling.clip_denoised = True
  # record x0 predictions every this many steps; 0: T // 10 (about 10 frames)
  sampling.progressive_every = 0
  # samples (rows) in the progressive picture; 0: no progressive picture
  sampling.num_progressive = 8
  sampling.checkpoint_step = -1  # -1: newest checkpoint
  sampling.method = "ancestral"  # ancestral (Algorithm 2) | ddim (Song et al. 2021)
  sampling.num_steps = -1  # reverse steps taken, in [1, T]; -1: all T
  # which num_steps of the T steps: uniform (improved-diffusion's even spacing, keeps 0 and T-1) |
  # ddim (improved-diffusion's "ddimN": 0, s, 2s, ...) | leading (diffusers' DDIMScheduler:
  # stride T // N) | "ddimN" | section counts "10,15,20" (improved-diffusion's timestep_respacing;
  # num_steps -1 or their sum)
  sampling.spacing = "uniform"
  sampling.eta = 0.0  # DDIM only: 0 deterministic, 1 ancestral-like noise
  # conditional models: the label of each sample. "all": sample i has label i % num_classes (an
  # equal share of each class); "grid": one row per class (row k = class k); or class ids "3" or
  # "1,7,7" or a list [1, 7, 7] (sample i has the (i mod n)-th); any type, so a config file may
  # assign a list and --config.sampling.labels=3 or =1,7,7 parse as an int or a tuple
  sampling.labels = config_dict.FieldReference("all", field_type=object)
  # classifier-free guidance w (Ho & Salimans 2022): eps = (1 + w) eps(x, y) - w eps(x, null);
  # 0: plain conditional sampling
  sampling.guidance_scale = 0.0

  # The paper's interpolations (Section 4.4), --mode=interpolate.
  config.interpolation = interpolation = ml_collections.ConfigDict()
  # the dataset split whose images (0, 1), (2, 3), ... are the source pairs
  interpolation.split = "train"
  interpolation.num_pairs = 8  # rows of each picture
  # noising steps t in [1, T] (the paper's numbering: 1000 = T); one picture per t
  # (t = 500: Figure 8)
  interpolation.timesteps = (250, 500, 750, 1000)
  interpolation.lambdas = tuple(
    i / 10 for i in range(11)
  )  # mixing weights: the columns of each picture
  # the pair shown at every t in the coarse-to-fine picture (Figure 9)
  interpolation.figure9_pair = 0
  interpolation.image1 = ""  # two image files to interpolate between instead of dataset pairs
  interpolation.image2 = ""

  # Inpainting with any checkpoint, --mode=inpaint: RePaint (Lugmayr et al. 2022). A conditional
  # model's sample s of each image has label s of sampling.labels, guided by its guidance_scale.
  config.inpaint = inpaint = ml_collections.ConfigDict()
  # an image file or a folder of them (PNG/JPEG, cropped and resized like config.data.image_folder);
  # "": the first num_images images of the split inpaint.split of config.data.dataset
  inpaint.image = ""
  inpaint.split = "train"
  inpaint.num_images = 8
  # a PNG, white = keep, black = fill in (grey levels thresholded at 128; of the model's size, or of
  # the images' size and then cropped and resized as they are), or the region to fill in by name:
  # bottom_half | top_half | left_half | right_half | center (the central square, half the side)
  inpaint.mask = ""
  inpaint.num_samples = 4  # inpaintings of each image
  # RePaint's resampling: after every jump_length reverse steps, go forward jump_length steps again,
  # so that each stretch is traversed num_resamplings times (1: no resampling)
  inpaint.jump_length = 10
  inpaint.num_resamplings = 10

  config.evaluation = evaluation = ml_collections.ConfigDict()
  evaluation.checkpoint_step = -1  # which checkpoint --mode=bpd / fid evaluate; -1: newest
  # --mode=bpd: the NLL bound (Table 2) over the first num_examples images of this split, EMA params
  evaluation.split = "test"
  evaluation.num_examples = 10_000  # CIFAR10 test: the whole split
  evaluation.batch_size = 128  # global; also the Inception network's batch
  # clip the predicted x0 to [-1, 1] inside the bound (the official eval does)
  evaluation.clip_denoised = True
  # --mode=fid: samples (drawn with config.sampling's batch size and clip_denoised) vs reference
  # statistics
  evaluation.num_fid_samples = 50_000
  evaluation.sample_chunk_size = 1000  # samples per resumable .npz chunk under WORKDIR/eval
  # this project's Inception .npz (python -m ddpm_jax.metrics.convert_inception)
  evaluation.inception_weights = ""
  # tf: the TF graph's bilinear resize (the paper's FIDs); pytorch: pytorch-fid's
  evaluation.fid_resize = "tf"
  # what the Inception network sees of the samples: "uint8", rounded as image files hold them (what
  # pytorch-fid and torch-fidelity see from files), or "float", unrounded (the paper's TF code)
  evaluation.fid_input = "uint8"
  # Inception Score splits: 10 is torch-fidelity's convention; 1 the paper's (TF-GAN, all at once)
  evaluation.is_splits = 10
  # FID vs each (paper: 3.17 vs train, 5.24 vs test)
  evaluation.fid_reference_splits = ("train", "test")
  # first N images of each reference split; 0: the whole split (paper)
  evaluation.num_fid_reference = 0
  evaluation.stats_dir = ""  # cache of reference statistics; "": fid_stats/ beside WORKDIR
  # --mode=evaluate_watch: evaluate every new checkpoint of a training workdir once
  evaluation.watch_modes = ("bpd", "fid")
  evaluation.watch_poll_secs = 60
  # stop after this long without a new checkpoint; 0: at training.num_steps
  evaluation.watch_timeout_secs = 0

  config.distributed = distributed = ml_collections.ConfigDict()
  # "auto": initialise jax.distributed when the environment is a TPU pod or a SLURM job.
  # "on": always (reads coordinator_address etc. below or from the environment); "off": never.
  distributed.initialize = "auto"
  distributed.coordinator_address = ""
  distributed.num_processes = 0
  distributed.process_id = -1

  return config


def set_256_model(config):
  """The paper's settings shared by all 256x256 datasets (CelebA-HQ, LSUN): 114M U-Net,
  fixedsmall."""
  config.data.image_size = 256
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.dropout = 0.0
  config.diffusion.var_type = "fixedsmall"
  config.training.batch_size = 64
  config.training.learning_rate = 2e-5
  config.sampling.batch_size = 128
  config.evaluation.batch_size = 64
  config.evaluation.split = "train"  # TFDS has no test split for CelebA-HQ and the LSUN categories
  # the paper reports no 256x256 bits/dim; 1000 images is an estimate
  config.evaluation.num_examples = 1000
  config.evaluation.sample_chunk_size = 250  # 49 MB per chunk
  config.evaluation.fid_reference_splits = ("train",)
  config.evaluation.num_fid_reference = 50_000  # LSUN splits have 126k-3M images
  return config
