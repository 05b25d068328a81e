"""The diffusion math of Ho et al. 2020 (Sections 2-3, Algorithms 1-2) as pure functions.

A `Diffusion` holds the precomputed schedule arrays (pytree leaves, float32) and the
static choices (mean, variance and loss types). Every function takes it as its first
argument, so it can be passed through `jax.jit` like any other pytree. Timesteps are
0-indexed: t = 0 means one step of noise was applied.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.errors import ConfigError

BETA_SCHEDULES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")
MEAN_TYPES = ("eps", "xstart", "xprev")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")
LEARNED_VAR_TYPES = ("learned", "learned_range")


# ----------------------------------------------------------------------------- schedules


def _warmup_betas(*, beta_start, beta_end, num_timesteps, warmup_frac):
  betas = np.full(num_timesteps, beta_end, dtype=np.float64)
  warmup = int(num_timesteps * warmup_frac)
  betas[:warmup] = np.linspace(beta_start, beta_end, warmup, dtype=np.float64)
  return betas


def _cosine_betas(num_timesteps, s=0.008):
  """Nichol & Dhariwal 2021: betas from alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), capped at
  0.999."""
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  alpha_bar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
  return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)


def get_beta_schedule(name, *, beta_start, beta_end, num_timesteps):
  """The betas of a named schedule, float64 [T]; validated."""
  if name not in BETA_SCHEDULES:
    raise ConfigError(
      f"Unknown beta schedule {name!r}; expected one of {', '.join(BETA_SCHEDULES)}."
    )
  if int(num_timesteps) != num_timesteps or num_timesteps < 1:
    raise ConfigError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}.")
  num_timesteps = int(num_timesteps)
  if name == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif name == "quad":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
  elif name == "const":
    betas = np.full(num_timesteps, beta_end, dtype=np.float64)
  elif name == "jsd":  # 1/T, 1/(T-1), ..., 1
    betas = 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)
  elif name == "warmup10":
    betas = _warmup_betas(
      beta_start=beta_start, beta_end=beta_end, num_timesteps=num_timesteps, warmup_frac=0.1
    )
  elif name == "warmup50":
    betas = _warmup_betas(
      beta_start=beta_start, beta_end=beta_end, num_timesteps=num_timesteps, warmup_frac=0.5
    )
  else:
    betas = _cosine_betas(num_timesteps)
  _check_betas(betas, name)
  return betas


def _check_betas(betas, name):
  bad = ~((betas > 0) & (betas <= 1))
  if bad.any():
    i = int(np.argmax(bad))
    raise ConfigError(
      f"Beta schedule {name!r} gives beta[{i}] = {float(betas[i])!r}; every beta must lie in "
      "(0, 1] (check beta_start and beta_end)."
    )


# ----------------------------------------------------------------------------- the Diffusion pytree


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=[
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "fixedlarge_log_variance",
    "log_betas",
  ],
  meta_fields=["mean_type", "var_type", "loss_type", "hybrid_lambda"],
)
@dataclasses.dataclass(frozen=True)
class Diffusion:
  """Precomputed schedule quantities (float32 [T] arrays) and the static model/loss choices."""

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  fixedlarge_log_variance: jax.Array  # log beta_t, but log posterior_variance[1] at t = 0
  log_betas: jax.Array
  mean_type: str = "eps"
  var_type: str = "fixedlarge"
  loss_type: str = "mse"
  hybrid_lambda: float = 0.001

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @property
  def learned_variance(self) -> bool:
    return self.var_type in LEARNED_VAR_TYPES


def _check_choice(kind, value, allowed):
  if value not in allowed:
    raise ConfigError(f"Unknown {kind} {value!r}; expected one of {', '.join(allowed)}.")


def check_types(*, mean_type: str, var_type: str, loss_type: str) -> None:
  """ConfigError for an unknown mean/variance/loss type or a loss that cannot train the variance
  type."""
  _check_choice("mean type", mean_type, MEAN_TYPES)
  _check_choice("variance type", var_type, VAR_TYPES)
  _check_choice("loss type", loss_type, LOSS_TYPES)
  learned = var_type in LEARNED_VAR_TYPES
  if loss_type == "mse" and learned:
    raise ConfigError(
      f"Loss type 'mse' does not train the variance; variance type {var_type!r} needs "
      "loss type 'kl' or 'hybrid'."
    )
  if loss_type == "hybrid" and not learned:
    raise ConfigError(
      f"Loss type 'hybrid' needs a learned variance ('learned' or 'learned_range'), "
      f"got variance type {var_type!r}."
    )


def make_diffusion(
  betas, *, mean_type="eps", var_type="fixedlarge", loss_type="mse", hybrid_lambda=0.001
):
  """Precomputes every schedule quantity in float64 from `betas` and stores it as float32."""
  check_types(mean_type=mean_type, var_type=var_type, loss_type=loss_type)
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise ConfigError(f"betas must be a 1-D array with T >= 1 entries, got shape {betas.shape}.")
  _check_betas(betas, "given")

  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  # jsd ends with beta = 1, so abar_{T-1} = 0 and some reciprocals are inf, as in the official code.
  with np.errstate(divide="ignore", invalid="ignore"):
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    # posterior_variance[0] is 0: its log is taken from index 1 (from beta_0 when T = 1).
    pv_at_0 = posterior_variance[1] if len(betas) > 1 else betas[0]
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return Diffusion(
      betas=f32(betas),
      alphas_cumprod=f32(abar),
      alphas_cumprod_prev=f32(abar_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(abar)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
      log_one_minus_alphas_cumprod=f32(np.log(np.maximum(1.0 - abar, 1e-20))),
      sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / abar)),
      sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / abar - 1.0)),
      posterior_variance=f32(posterior_variance),
      posterior_log_variance_clipped=f32(np.log(np.append(pv_at_0, posterior_variance[1:]))),
      posterior_mean_coef1=f32(betas * np.sqrt(abar_prev) / (1.0 - abar)),
      posterior_mean_coef2=f32((1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)),
      fixedlarge_log_variance=f32(np.log(np.append(pv_at_0, betas[1:]))),
      log_betas=f32(np.log(betas)),
      mean_type=mean_type,
      var_type=var_type,
      loss_type=loss_type,
      hybrid_lambda=float(hybrid_lambda),
    )


def from_config(diffusion_config):
  """A `Diffusion` from the `config.diffusion` section."""
  c = diffusion_config
  betas = get_beta_schedule(
    c.beta_schedule, beta_start=c.beta_start, beta_end=c.beta_end, num_timesteps=c.num_timesteps
  )
  return make_diffusion(
    betas,
    mean_type=c.mean_type,
    var_type=c.var_type,
    loss_type=c.loss_type,
    hybrid_lambda=c.get("hybrid_lambda", 0.001),
  )


# ----------------------------------------------------------------------------- helpers


def extract(a, t, x_shape):
  """a[t] for a batch of timesteps t [B], shaped to broadcast against x_shape [B, ...]."""
  assert t.shape == (x_shape[0],), (t.shape, x_shape)
  return a[t].reshape((x_shape[0],) + (1,) * (len(x_shape) - 1))


def mean_flat(x):
  """Mean over every axis but the batch axis."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
  return 0.5 * (
    -1.0
    + logvar2
    - logvar1
    + jnp.exp(logvar1 - logvar2)
    + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
  )


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF used by the official code."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
  """log p(x) of images in [-1, 1] (256 levels) under a Gaussian discretised to bins of width 2/255.

  The outermost bins extend to -inf / +inf; `log_scales` is the log standard deviation.
  """
  assert x.shape == means.shape == log_scales.shape
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(
    x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
  )


# ----------------------------------------------------------------------------- forward process


def q_mean_variance(d: Diffusion, x_start, t):
  """Mean, variance and log-variance of q(x_t | x_0)."""
  mean = extract(d.sqrt_alphas_cumprod, t, x_start.shape) * x_start
  variance = extract(jnp.square(d.sqrt_one_minus_alphas_cumprod), t, x_start.shape)
  log_variance = extract(d.log_one_minus_alphas_cumprod, t, x_start.shape)
  return mean, variance, log_variance


def q_sample(d: Diffusion, x_start, t, noise):
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
  assert noise.shape == x_start.shape
  return (
    extract(d.sqrt_alphas_cumprod, t, x_start.shape) * x_start
    + extract(d.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
  )


def q_posterior_mean_variance(d: Diffusion, x_start, x_t, t):
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
  assert x_start.shape == x_t.shape
  mean = (
    extract(d.posterior_mean_coef1, t, x_t.shape) * x_start
    + extract(d.posterior_mean_coef2, t, x_t.shape) * x_t
  )
  variance = extract(d.posterior_variance, t, x_t.shape)
  log_variance = extract(d.posterior_log_variance_clipped, t, x_t.shape)
  return mean, variance, log_variance


def predict_xstart_from_eps(d: Diffusion, x_t, t, eps):
  """x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps."""
  assert x_t.shape == eps.shape
  return (
    extract(d.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
    - extract(d.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
  )


def predict_xstart_from_xprev(d: Diffusion, x_t, t, xprev):
  """Inverts the posterior mean: x_0 = (x_{t-1} - coef2_t x_t) / coef1_t."""
  assert x_t.shape == xprev.shape
  return (xprev - extract(d.posterior_mean_coef2, t, x_t.shape) * x_t) / extract(
    d.posterior_mean_coef1, t, x_t.shape
  )


# ----------------------------------------------------------------------------- reverse process


class PMeanVariance(NamedTuple):
  mean: jax.Array
  variance: jax.Array
  log_variance: jax.Array
  pred_xstart: jax.Array


def split_model_output(d: Diffusion, model_output, x_shape):
  """(mean part, variance part or None) of the network output; learned variances use 2C channels."""
  channels = x_shape[-1]
  if d.learned_variance:
    assert model_output.shape == x_shape[:-1] + (2 * channels,), (model_output.shape, x_shape)
    return model_output[..., :channels], model_output[..., channels:]
  assert model_output.shape == tuple(x_shape), (model_output.shape, x_shape)
  return model_output, None


def _model_variance(d: Diffusion, log_variance, t, x_shape):
  """The variance reported beside the log-variance. For fixedsmall it is the posterior variance
  itself, 0 at t = 0 where the log-variance is clipped (the official values); elsewhere
  exp(log-variance)."""
  if d.var_type == "fixedsmall":
    return jnp.broadcast_to(extract(d.posterior_variance, t, x_shape), x_shape)
  return jnp.exp(log_variance)


def _model_log_variance(d: Diffusion, var_output, t, x_shape):
  if d.var_type == "learned":
    return var_output
  if d.var_type == "learned_range":  # v in [-1, 1] between the clipped posterior and beta_t
    frac = (var_output + 1.0) / 2.0
    min_log = extract(d.posterior_log_variance_clipped, t, x_shape)
    max_log = extract(d.log_betas, t, x_shape)
    return frac * max_log + (1.0 - frac) * min_log
  if d.var_type == "fixedlarge":  # beta_t, with posterior_variance[1] at t = 0 for a better decoder
    return jnp.broadcast_to(extract(d.fixedlarge_log_variance, t, x_shape), x_shape)
  return jnp.broadcast_to(extract(d.posterior_log_variance_clipped, t, x_shape), x_shape)


def p_mean_variance(d: Diffusion, model_output, x_t, t, *, clip_denoised: bool) -> PMeanVariance:
  """Mean and variance of p(x_{t-1} | x_t) from the network output, and the implied x_0."""
  mean_output, var_output = split_model_output(d, model_output, x_t.shape)
  log_variance = _model_log_variance(d, var_output, t, x_t.shape)
  maybe_clip = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip_denoised else (lambda x: x)
  if d.mean_type == "xprev":
    pred_xstart = maybe_clip(predict_xstart_from_xprev(d, x_t, t, mean_output))
    mean = mean_output
  else:
    if d.mean_type == "xstart":
      pred_xstart = maybe_clip(mean_output)
    else:
      pred_xstart = maybe_clip(predict_xstart_from_eps(d, x_t, t, mean_output))
    mean, _, _ = q_posterior_mean_variance(d, pred_xstart, x_t, t)
  return PMeanVariance(
    mean, _model_variance(d, log_variance, t, x_t.shape), log_variance, pred_xstart
  )


def p_sample(
  d: Diffusion, model_output, x_t, t, *, key=None, noise=None, clip_denoised: bool = True
):
  """One reverse step x_{t-1} ~ p(x_{t-1} | x_t); no noise at t = 0.

  Noise is drawn from `key`, or taken from `noise` when given (for comparisons with other code).
  Returns (x_{t-1}, predicted x_0).
  """
  out = p_mean_variance(d, model_output, x_t, t, clip_denoised=clip_denoised)
  if noise is None:
    noise = jax.random.normal(key, x_t.shape, x_t.dtype)
  nonzero = (t != 0).astype(x_t.dtype).reshape((x_t.shape[0],) + (1,) * (x_t.ndim - 1))
  return out.mean + nonzero * jnp.exp(0.5 * out.log_variance) * noise, out.pred_xstart


def predict_eps_from_xstart(d: Diffusion, x_t, t, pred_xstart):
  """The eps that x_0 implies: (sqrt(1/abar_t) x_t - x_0) / sqrt(1/abar_t - 1)."""
  return (extract(d.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart) / extract(
    d.sqrt_recipm1_alphas_cumprod, t, x_t.shape
  )


def ddim_sample(
  d: Diffusion, model_output, x_t, t, *, eta: float, noise=None, clip_denoised: bool = True
):
  """One DDIM step (Song et al. 2021) from step t to step t - 1 of `d` (abar_prev = 1 after t = 0).

  eps is re-derived from the (clipped) x_0; sigma = eta sqrt((1 - abar_prev) / (1 - abar_t))
  sqrt(1 - abar_t / abar_prev). `noise` is needed when eta > 0. Returns (x_{t-1}, predicted x_0).
  On a respaced `Diffusion`, step t - 1 is the previous kept step.
  """
  pred_xstart = p_mean_variance(d, model_output, x_t, t, clip_denoised=clip_denoised).pred_xstart
  eps = predict_eps_from_xstart(d, x_t, t, pred_xstart)
  abar = extract(d.alphas_cumprod, t, x_t.shape)
  abar_prev = extract(d.alphas_cumprod_prev, t, x_t.shape)
  sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
  x_prev = (
    jnp.sqrt(abar_prev) * pred_xstart
    + jnp.sqrt(jnp.maximum(1.0 - abar_prev - jnp.square(sigma), 0.0)) * eps
  )
  if eta > 0:
    assert noise is not None and noise.shape == x_t.shape
    x_prev = x_prev + sigma * noise
  return x_prev, pred_xstart


# ----------------------------------------------------------------------------- bounds and losses


def vb_terms_bpd(d: Diffusion, model_output, *, x_start, x_t, t, clip_denoised: bool):
  """The VLB term of timestep t in bits/dim: the decoder NLL at t = 0, KL(q || p) for t > 0.

  Returns (per-example term [B], predicted x_0).
  """
  true_mean, _, true_log_variance = q_posterior_mean_variance(d, x_start, x_t, t)
  out = p_mean_variance(d, model_output, x_t, t, clip_denoised=clip_denoised)
  kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / math.log(
    2.0
  )
  decoder_nll = -mean_flat(
    discretized_gaussian_log_likelihood(x_start, means=out.mean, log_scales=0.5 * out.log_variance)
  ) / math.log(2.0)
  return jnp.where(t == 0, decoder_nll, kl), out.pred_xstart


def prior_bpd(d: Diffusion, x_start):
  """KL(q(x_{T-1} | x_0) || N(0, I)) in bits/dim, per example."""
  t = jnp.full((x_start.shape[0],), d.num_timesteps - 1, dtype=jnp.int32)
  mean, _, log_variance = q_mean_variance(d, x_start, t)
  kl = normal_kl(mean, log_variance, 0.0, 0.0)
  return mean_flat(kl) / math.log(2.0)


def training_target(d: Diffusion, *, x_start, x_t, t, noise):
  """What the mean part of the network regresses onto under L_simple: eps, x_0 or the posterior
  mean."""
  if d.mean_type == "eps":
    return noise
  if d.mean_type == "xstart":
    return x_start
  return q_posterior_mean_variance(d, x_start, x_t, t)[0]


def training_losses(d: Diffusion, model_fn: Callable, *, x_start, t, noise):
  """Per-example training loss [B] of the configured loss type.

  `model_fn(x_t, t)` returns the network output. `mse` is L_simple; `kl` is the true
  bound's term for t (bits/dim); `hybrid` is L_simple + lambda * T * L_t with the mean's
  gradient stopped in the bound part (Nichol & Dhariwal 2021; lambda * T is the weight
  of one sampled term of L_vlb = sum_t L_t).
  """
  x_t = q_sample(d, x_start, t, noise)
  model_output = model_fn(x_t, t)
  if d.loss_type == "kl":
    return vb_terms_bpd(d, model_output, x_start=x_start, x_t=x_t, t=t, clip_denoised=False)[0]
  mean_output, var_output = split_model_output(d, model_output, x_t.shape)
  target = training_target(d, x_start=x_start, x_t=x_t, t=t, noise=noise)
  mse = mean_flat(jnp.square(target - mean_output))
  if d.loss_type == "mse":
    return mse
  frozen = jnp.concatenate([jax.lax.stop_gradient(mean_output), var_output], axis=-1)
  vb = vb_terms_bpd(d, frozen, x_start=x_start, x_t=x_t, t=t, clip_denoised=False)[0]
  return mse + d.hybrid_lambda * d.num_timesteps * vb


class BpdResult(NamedTuple):
  total_bpd: jax.Array  # [B]: sum of the T terms and the prior term
  terms_bpd: jax.Array  # [B, T]: the VLB term of every timestep
  prior_bpd: jax.Array  # [B]
  mse: jax.Array  # [B, T]: MSE of the predicted x_0 at every timestep


def calc_bpd_loop(
  d: Diffusion, model_fn: Callable, *, x_start, key, clip_denoised: bool = True
) -> BpdResult:
  """The full NLL bound of a batch in bits/dim, as one `lax.scan` over t (compile time independent
  of T).

  Every timestep draws its own x_t from fresh noise (`fold_in(key, t)`), as the official evaluation
  does.
  """
  batch = x_start.shape[0]

  def term(_, t_scalar):
    t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x_start.shape, x_start.dtype)
    x_t = q_sample(d, x_start, t, noise)
    vb, pred_xstart = vb_terms_bpd(
      d, model_fn(x_t, t), x_start=x_start, x_t=x_t, t=t, clip_denoised=clip_denoised
    )
    return None, (vb, mean_flat(jnp.square(pred_xstart - x_start)))

  _, (terms, mse) = jax.lax.scan(term, None, jnp.arange(d.num_timesteps, dtype=jnp.int32))
  terms, mse = terms.T, mse.T  # [B, T]
  prior = prior_bpd(d, x_start)
  return BpdResult(total_bpd=terms.sum(axis=1) + prior, terms_bpd=terms, prior_bpd=prior, mse=mse)
