"""Training: the data-parallel train step (Algorithm 1) and the training loop.

The step follows Algorithm 1 with the official recipe: Adam after global-norm clipping,
linear learning-rate warmup, and an EMA of the weights that sampling and evaluation use.
"""

import functools
import math
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from ddpm_jax import checkpoint
from ddpm_jax import data
from ddpm_jax import diffusion as dm
from ddpm_jax import finetune
from ddpm_jax import images
from ddpm_jax import labels as labels_lib
from ddpm_jax import parallel
from ddpm_jax import sampling
from ddpm_jax import state as state_lib
from ddpm_jax import storage
from ddpm_jax import streams
from ddpm_jax import summaries
from ddpm_jax import validation
from ddpm_jax import xla_cpu
from ddpm_jax.models import unet


class NonFiniteError(RuntimeError):
  """The loss or the gradient norm became NaN or infinite."""


# ----------------------------------------------------------------------------- pieces


def per_example_randomness(step_key, ids, *, num_timesteps: int, shape):
  """t, noise and a dropout key for each global example id: the same whatever the device count."""
  keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, ids)
  t = jax.vmap(
    lambda k: jax.random.randint(
      jax.random.fold_in(k, streams.EXAMPLE_TIMESTEP), (), 0, num_timesteps
    )
  )(keys)
  noise = jax.vmap(
    lambda k: jax.random.normal(jax.random.fold_in(k, streams.EXAMPLE_NOISE), shape)
  )(keys)
  dropout_keys = jax.vmap(lambda k: jax.random.fold_in(k, streams.EXAMPLE_DROPOUT))(keys)
  return t, noise, dropout_keys


def drop_labels(step_key, ids, labels, *, rate: float, null_label: int):
  """Each example's label, replaced by the null label with probability `rate` (Ho & Salimans 2022,
  Algorithm 1), drawn from the example's own sub-stream: independent of the device count."""
  if rate == 0:
    return labels
  keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, ids)
  drop = jax.vmap(
    lambda k: jax.random.bernoulli(jax.random.fold_in(k, streams.EXAMPLE_LABEL_DROPOUT), rate)
  )(keys)
  return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def make_train_step(
  model,
  d: dm.Diffusion,
  tx,
  mesh,
  *,
  ema_decay: float,
  lr_fn,
  cpu_options: bool = True,
  label_dropout: float = 0.0,
):
  """Returns `train_step(state, batches) -> (state, metrics)`; batches are uint8 [k, B, H, W, C],
  or for a conditional model {"image": that, "label": int32 [k, B]} (labels dropped to the null
  label with probability `label_dropout`).

  The k steps run in one `lax.scan` (one dispatch); metrics are arrays [k]. The old state's
  buffers are donated. On CPU it is compiled with `xla_cpu.train_step_options` unless
  `cpu_options` is False (the same results to float32 rounding, faster).
  """

  def one_step(state: state_lib.TrainState, batch):
    images_uint8 = batch["image"] if model.num_classes else batch
    local_batch = images_uint8.shape[0]
    x_start = images.to_model_input(images_uint8)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    ids = parallel.example_ids(local_batch)
    t, noise, dropout_keys = per_example_randomness(
      step_key, ids, num_timesteps=d.num_timesteps, shape=x_start.shape[1:]
    )
    y = None
    if model.num_classes:
      y = drop_labels(
        step_key, ids, batch["label"], rate=label_dropout, null_label=model.num_classes
      )

    def loss_fn(params):
      def model_fn(x_t, t):
        # each example's dropout masks come from its own key: they depend on its id, not on the
        # device count
        return model.apply(params, x_t, t, y, train=True, dropout_keys=dropout_keys)

      return jnp.mean(dm.training_losses(d, model_fn, x_start=x_start, t=t, noise=noise))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    loss, grads = jax.lax.pmean((loss, grads), parallel.AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state_lib.TrainState(
      step=state.step + 1,
      params=params,
      ema_params=state_lib.ema_update(state.ema_params, params, ema_decay),
      opt_state=opt_state,
      key=state.key,
    )
    metrics = dict(
      loss=loss,
      grad_norm=optax.tree.norm(grads),
      learning_rate=jnp.asarray(lr_fn(state.step), jnp.float32),
    )
    return new_state, metrics

  def per_device(state, batches):
    if (
      jax.tree.leaves(batches)[0].shape[0] == 1
    ):  # no loop: XLA:CPU runs a convolution's gradient ~30x slower inside one
      state, metrics = one_step(state, jax.tree.map(lambda b: b[0], batches))
      return state, jax.tree.map(lambda m: m[None], metrics)
    return jax.lax.scan(one_step, state, batches)

  return parallel.data_parallel(
    per_device,
    mesh,
    in_specs=(P(), P(None, parallel.AXIS)),
    out_specs=(P(), P()),
    donate_argnums=(0,),
    compiler_options=xla_cpu.train_step_options(mesh) if cpu_options else None,
  )


# ----------------------------------------------------------------------------- the loop


class _Preemption:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps (a second SIGINT still
  kills)."""

  def __init__(self, install: bool = True):
    self.signal = None
    self._install = install
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT) if self._install else ():
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class _Logger:
  """Collects per-step metrics on device and reports them every log_every steps (stdout +
  TensorBoard)."""

  def __init__(
    self, writer, *, num_steps: int, batch_size: int, start_step: int, newest_checkpoint=lambda: ""
  ):
    self.writer, self.num_steps, self.batch_size = writer, num_steps, batch_size
    # () -> a sentence naming the newest checkpoint on disk
    self.newest_checkpoint = newest_checkpoint
    self.pending = []  # (first step, metrics dict of device arrays [k])
    self.last_time, self.last_step = time.time(), start_step
    self.last_loss = None

  def add(self, first_step: int, metrics):
    self.pending.append((first_step, metrics))

  def check_finite(self):
    """Fetches pending metrics; raises NonFiniteError naming the first bad step. Returns them."""
    fetched = self.pending = [(s, jax.device_get(m)) for s, m in self.pending]
    for first, m in fetched:
      bad = ~(np.isfinite(m["loss"]) & np.isfinite(m["grad_norm"]))
      if bad.any():
        i = int(np.argmax(bad))
        raise NonFiniteError(
          f"Non-finite loss ({m['loss'][i]}) or gradient norm ({m['grad_norm'][i]}) at step "
          f"{first + i + 1}; "
          f"stopped without writing a checkpoint. {self.newest_checkpoint()}".strip()
        )
    return fetched

  def report(self, step: int):
    fetched = self.check_finite()
    self.pending = []
    if not fetched:
      return
    loss = float(np.mean(np.concatenate([m["loss"] for _, m in fetched])))
    grad_norm = float(np.mean(np.concatenate([m["grad_norm"] for _, m in fetched])))
    lr = float(fetched[-1][1]["learning_rate"][-1])
    now = time.time()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    eta = (self.num_steps - step) / max(steps_per_sec, 1e-9)
    self.last_time, self.last_step, self.last_loss = now, step, loss
    logging.info(
      "step %d/%d  loss %.5f  grad_norm %.3f  lr %.3g  %.2f steps/s  %.1f images/s  ETA %s",
      step,
      self.num_steps,
      loss,
      grad_norm,
      lr,
      steps_per_sec,
      steps_per_sec * self.batch_size,
      _format_duration(eta),
    )
    if self.writer is not None:
      for name, value in (
        ("loss", loss),
        ("grad_norm", grad_norm),
        ("learning_rate", lr),
        ("steps_per_sec", steps_per_sec),
        ("images_per_sec", steps_per_sec * self.batch_size),
      ):
        self.writer.scalar(f"train/{name}", value, step)
      self.writer.flush()


def write_sample_grid(
  workdir,
  *,
  sample_fn,
  params,
  key,
  num: int,
  batch_size: int,
  mesh,
  step: int,
  writer=None,
  ncols: int | None = None,
):
  """Samples `num` images with the EMA params and writes WORKDIR/samples/step_<step>.png (process
  0), `ncols` images a row (None: a square grid)."""
  imgs = sampling.generate(
    sample_fn, params, key=key, num_samples=num, batch_size=batch_size, mesh=mesh
  )
  if jax.process_index() != 0:
    return None
  grid = images.make_grid(imgs, ncols=ncols)
  path = images.save_png(storage.join(workdir, "samples", f"step_{step}.png"), grid)
  if writer is not None:
    writer.image("samples", grid, step)
    writer.flush()
  logging.info("Wrote a grid of %d samples: %s", num, path)
  return path


def warn_if_ema_too_slow(c):
  """The EMA starts at the initial weights and is not bias-corrected (the paper's recipe): a run
  shorter than a few 1 / (1 - decay) steps samples from mostly random weights, i.e. noise."""
  left = c.ema_decay**c.num_steps  # the initial weights' share of the EMA at the end
  if c.num_steps and left > 0.05 and not c.get("init_from"):  # fine-tuning starts from trained ones
    suggested = 0.01 ** (1.0 / c.num_steps)
    logging.warning(
      "config.training.ema_decay = %s keeps %.0f%% of the initial random weights in the EMA after "
      "training.num_steps = %d steps, so samples (drawn with the EMA) will look like noise; for a "
      "run this short use --config.training.ema_decay=%.4f (1%% left) or train longer.",
      c.ema_decay,
      100 * left,
      c.num_steps,
      math.floor(suggested * 1e4) / 1e4,
    )


def warn_if_null_label_untrained(config):
  """Classifier-free guidance needs the unconditional model too, which only label dropout trains:
  without it the null label's embedding stays at its random initialization."""
  if unet.num_classes(config.model) and not config.training.get("label_dropout", 0.0):
    logging.warning(
      "config.training.label_dropout = 0 never trains the null label, so this model cannot be "
      "sampled with classifier-free guidance (sampling.guidance_scale != 0); Ho & Salimans (2022) "
      "drop 10-20%% of the labels (--config.training.label_dropout=0.1)."
    )


def _write_classes(config, workdir: str) -> None:
  """WORKDIR/classes.json: the class names of a conditional model's image folder, by label."""
  if not unet.num_classes(config.model) or config.data.dataset != "image_folder":
    return
  names, _ = data.folder_classes(
    config.data.image_folder, data.image_paths_under(config.data.image_folder)
  )
  if jax.process_index() == 0:
    storage.write_json(
      storage.join(storage.resolve(workdir), "classes.json"), {"class_names": names}
    )


def _grid_sampler(config, built, mesh) -> dict:
  """The sampler of the training grids and its columns: for a conditional model a class grid (row k
  = class k, config.sampling.guidance_scale), else a square grid."""
  num_classes, num = built.model.num_classes, config.training.num_grid_samples
  if not num_classes:
    return dict(sample_fn=sampling.from_config(config, built, mesh), ncols=None)
  table = sampling.config_label_table(config, num_samples=num, spec="grid")
  return dict(
    sample_fn=sampling.from_config(config, built, mesh, label_table=table),
    ncols=labels_lib.grid_columns(num_classes, num),
  )


def _start_or_resume(config, workdir: str, *, built, manager, mesh):
  """The newest intact checkpoint's state, or a fresh one when the run has none."""
  shape = state_lib.image_shape(config)
  if manager.latest_step() is not None:
    state = checkpoint.restore(
      manager,
      abstract_state=state_lib.abstract_state(built.model, built.tx, shape=shape, mesh=mesh),
      set_aside_corrupt=True,
    )
    logging.info(
      "Resumed from the checkpoint of step %d in %s.",
      int(state.step),
      checkpoint.checkpoint_dir(workdir),
    )
    return state
  if config.training.get("init_from"):  # read once: a resumed run has a checkpoint
    return finetune.initial_state(config, built=built, mesh=mesh)
  state = jax.jit(
    functools.partial(state_lib.init_state, built.model, built.tx, seed=config.seed, shape=shape),
    out_shardings=parallel.replicated(mesh),
  )()
  logging.info("Starting from scratch: %s parameters.", f"{unet.count_params(state.params):,}")
  return state


def train(config, workdir: str):
  """Trains the run in `workdir` (or resumes it, on any topology) to config.training.num_steps,
  writing checkpoints, sample grids and TensorBoard scalars. Returns the final state."""
  c = config.training
  validation.check(config, mode="train")
  validation.check_init_from(config, workdir)
  warn_if_ema_too_slow(c)
  warn_if_null_label_untrained(config)
  built = state_lib.build(config)
  mesh = parallel.make_mesh()
  saved = checkpoint.read_config(workdir)
  if saved is not None:
    checkpoint.check_compatible(saved, config, source=f"the run in {workdir}")
  manager = checkpoint.make_manager(workdir, keep=c.keep_checkpoints)
  state = _start_or_resume(config, workdir, built=built, manager=manager, mesh=mesh)
  step = int(state.step)
  # Global batch s is a function of the seed and s: the data resumes at the step, on any topology.
  data_iterator = data.train_iterator(
    config.data,
    global_batch_size=c.batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    start_batch=step,
    num_classes=built.model.num_classes,
  )
  checkpoint.write_config(workdir, config)
  _write_classes(config, workdir)
  train_step = make_train_step(
    built.model,
    built.diffusion,
    built.tx,
    mesh,
    ema_decay=c.ema_decay,
    lr_fn=built.lr_fn,
    label_dropout=float(c.get("label_dropout", 0.0)),
  )
  grid = dict(
    key=streams.key(config.seed, streams.TRAIN_GRID),
    num=c.num_grid_samples,
    batch_size=parallel.round_up_to_devices(c.num_grid_samples),
    mesh=mesh,
    **_grid_sampler(config, built, mesh),
  )
  writer = summaries.writer(workdir)
  logger = _Logger(
    writer,
    num_steps=c.num_steps,
    batch_size=c.batch_size,
    start_step=step,
    newest_checkpoint=lambda: checkpoint.newest_on_disk(manager),
  )
  k = c.steps_per_dispatch
  crossed = lambda every, before, after: bool(every) and after // every > before // every
  batches = parallel.DevicePrefetcher(data_iterator, mesh)
  with _Preemption(install=jax.process_count() == 1) as preemption:
    while step < c.num_steps:
      n = min(k, c.num_steps - step)
      state, metrics = train_step(state, batches.take(n))
      # read the next batches while the step just dispatched runs (async dispatch)
      batches.prefetch(min(k, c.num_steps - step - n))
      logger.add(step, metrics)
      manager.seal_finished()  # digests of a checkpoint whose background write has just committed
      step, before = step + n, step
      done = step >= c.num_steps
      # One process alone never decides to stop: multi-host runs use JAX's synchronised preemption
      # notice.
      preempted = preemption.signal is not None or manager.reached_preemption(step)
      if crossed(c.log_every, before, step) or done:
        logger.report(step)
      if crossed(c.checkpoint_every, before, step) or done or preempted:
        logger.check_finite()
        checkpoint.save(manager, state=state, config=config, force=True)
      if preempted:
        manager.wait_until_finished()
        logging.info(
          "Stopped by %s at step %d; checkpoint written. Run the same command to resume.",
          preemption.signal or "preemption",
          step,
        )
        return state
      if crossed(c.sample_every, before, step) and c.num_grid_samples and not done:
        write_sample_grid(workdir, params=state.ema_params, step=step, writer=writer, **grid)
  manager.wait_until_finished()
  if c.num_steps > 0 and c.num_grid_samples > 0:
    write_sample_grid(workdir, params=state.ema_params, step=step, writer=writer, **grid)
  if writer is not None:
    writer.close()
  return state
