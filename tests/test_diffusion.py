"""The diffusion math against its formulas, its identities, and diffusers' DDPMScheduler."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion as dm

T = 50
SHAPE = (4, 8, 8, 3)


def make(T=T, **kw):
  """The paper's linear schedule stretched to T steps (beta_end scaled by 1000 / T, at most 0.5)."""
  betas = dm.get_beta_schedule(
    "linear", beta_start=1e-4, beta_end=min(20 / T, 0.5), num_timesteps=T
  )
  return dm.make_diffusion(betas, **kw)


def rand(seed, shape=SHAPE):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ----------------------------------------------------------------------------- schedules


def test_schedules_equal_their_formulas():
  kw = dict(beta_start=1e-4, beta_end=0.02, num_timesteps=1000)
  np.testing.assert_allclose(
    dm.get_beta_schedule("linear", **kw), np.linspace(1e-4, 0.02, 1000), rtol=1e-15
  )
  quad = dm.get_beta_schedule("quad", **kw)
  np.testing.assert_allclose(np.sqrt(quad), np.linspace(0.01, math.sqrt(0.02), 1000), rtol=1e-14)
  assert (dm.get_beta_schedule("const", **kw) == 0.02).all()
  jsd = dm.get_beta_schedule("jsd", **kw)
  assert jsd[0] == pytest.approx(1 / 1000) and jsd[-1] == 1.0 and jsd[1] == pytest.approx(1 / 999)
  for name, n in (("warmup10", 100), ("warmup50", 500)):
    b = dm.get_beta_schedule(name, **kw)
    np.testing.assert_allclose(b[:n], np.linspace(1e-4, 0.02, n))
    assert (b[n:] == 0.02).all()
  cos = dm.get_beta_schedule("cosine", **kw)
  f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
  for t in (0, 1, 500, 998):
    assert cos[t] == pytest.approx(1 - f(t + 1) / f(t), rel=1e-12)
  assert cos.max() <= 0.999 and cos[-1] == 0.999
  for name in dm.BETA_SCHEDULES:
    assert dm.get_beta_schedule(name, **kw).dtype == np.float64


def test_derived_quantities_satisfy_their_identities():
  d = make(T=1000)
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  np.testing.assert_allclose(d.alphas_cumprod, abar, rtol=1e-6)
  np.testing.assert_allclose(d.alphas_cumprod_prev[1:], abar[:-1], rtol=1e-6)
  assert d.alphas_cumprod_prev[0] == 1.0
  pv = betas * (1 - np.append(1, abar[:-1])) / (1 - abar)
  assert d.posterior_variance[0] == 0.0
  np.testing.assert_allclose(d.posterior_log_variance_clipped[0], np.log(pv[1]), rtol=1e-6)
  np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(pv[1:]), rtol=1e-6)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(d))


# ----------------------------------------------------------------------------- forward process


def test_q_sample_matches_q_mean_variance():
  d = make()
  x0, noise = rand(0), rand(1)
  t = jnp.array([0, 7, 30, T - 1])
  mean, var, logvar = dm.q_mean_variance(d, x0, t)
  np.testing.assert_allclose(dm.q_sample(d, x0, t, noise), mean + jnp.sqrt(var) * noise, atol=1e-6)
  np.testing.assert_allclose(jnp.log(var), logvar, rtol=1e-5, atol=1e-7)


def test_posterior_equals_product_of_gaussians():
  """q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0): precision-weighted mean, summed
  precisions."""
  d = make()
  x0, xt = rand(0), rand(1)
  t = jnp.array([1, 5, 20, T - 1])
  mean, var, logvar = dm.q_posterior_mean_variance(d, x0, xt, t)
  betas = dm.get_beta_schedule("linear", beta_start=1e-4, beta_end=20 / T, num_timesteps=T)
  b = betas[np.asarray(t)][:, None, None, None]
  abar_prev = np.append(1.0, np.cumprod(1 - betas))[np.asarray(t)][:, None, None, None]
  # q(x_t | x_{t-1}) as a Gaussian in x_{t-1}: mean x_t / sqrt(1-b), precision (1-b)/b.
  prec1, mean1 = (1 - b) / b, np.asarray(xt) / np.sqrt(1 - b)
  prec2, mean2 = 1 / (1 - abar_prev), np.sqrt(abar_prev) * np.asarray(x0)
  np.testing.assert_allclose(var, np.broadcast_to(1 / (prec1 + prec2), var.shape), rtol=1e-4)
  np.testing.assert_allclose(
    mean, (prec1 * mean1 + prec2 * mean2) / (prec1 + prec2), rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(logvar, jnp.log(var), rtol=1e-5)


def test_x0_recovered_exactly_from_eps_and_from_xprev():
  d = make()
  x0, noise = rand(0), rand(1)
  t = jnp.array([0, 3, 25, T - 1])
  xt = dm.q_sample(d, x0, t, noise)
  np.testing.assert_allclose(dm.predict_xstart_from_eps(d, xt, t, noise), x0, atol=2e-4)
  xprev, _, _ = dm.q_posterior_mean_variance(d, x0, xt, t)
  np.testing.assert_allclose(dm.predict_xstart_from_xprev(d, xt, t, xprev), x0, atol=2e-4)


# ----------------------------------------------------------------------------- reverse process


@pytest.mark.parametrize("mean_type", dm.MEAN_TYPES)
def test_p_mean_variance_of_a_perfect_model_is_the_posterior(mean_type):
  """A network that outputs the true eps / x0 / posterior mean gives exactly q's posterior mean."""
  d = make(mean_type=mean_type)
  x0, noise = jnp.clip(rand(0), -1, 1), rand(1)
  t = jnp.array([1, 4, 17, T - 1])
  xt = dm.q_sample(d, x0, t, noise)
  target = dm.training_target(d, x_start=x0, x_t=xt, t=t, noise=noise)
  out = dm.p_mean_variance(d, target, xt, t, clip_denoised=False)
  true_mean, _, _ = dm.q_posterior_mean_variance(d, x0, xt, t)
  np.testing.assert_allclose(out.mean, true_mean, atol=3e-4)
  np.testing.assert_allclose(out.pred_xstart, x0, atol=3e-4)


def test_variance_types():
  x = rand(0)
  t = jnp.array([0, 1, 10, T - 1])
  large = dm.p_mean_variance(make(var_type="fixedlarge"), x, x, t, clip_denoised=False)
  small = dm.p_mean_variance(make(var_type="fixedsmall"), x, x, t, clip_denoised=False)
  d = make()
  pv = np.asarray(d.posterior_variance)
  np.testing.assert_allclose(
    large.variance[:, 0, 0, 0], [pv[1], d.betas[1], d.betas[10], d.betas[T - 1]], rtol=1e-5
  )
  np.testing.assert_allclose(
    small.log_variance[:, 0, 0, 0], np.log([pv[1], pv[1], pv[10], pv[T - 1]]), rtol=1e-5
  )
  v = jnp.concatenate([x, jnp.full_like(x, 0.3)], axis=-1)
  learned = dm.p_mean_variance(
    make(var_type="learned", loss_type="kl"), v, x, t, clip_denoised=False
  )
  np.testing.assert_allclose(learned.log_variance, 0.3, rtol=1e-6)
  for value, expect in (
    (-1.0, small.log_variance),
    (1.0, jnp.log(make().betas)[t][:, None, None, None]),
  ):
    v = jnp.concatenate([x, jnp.full_like(x, value)], axis=-1)
    lr = dm.p_mean_variance(
      make(var_type="learned_range", loss_type="hybrid"), v, x, t, clip_denoised=False
    )
    np.testing.assert_allclose(lr.log_variance, jnp.broadcast_to(expect, x.shape), rtol=1e-5)


def test_fixedsmall_reports_the_official_variance_beside_the_clipped_log_variance():
  """Official p_mean_variance for fixedsmall: variance = posterior variance (exactly 0 at t = 0),
  log-variance clipped (log posterior_variance[1] at t = 0); only the log-variance drives sampling
  and the
  bound."""
  betas = dm.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.4, num_timesteps=T)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  official = betas * (1 - abar_prev) / (1 - abar)  # float64, from the formula
  x = rand(0)
  t = jnp.array([0, 1, 10, T - 1])
  small = dm.p_mean_variance(
    dm.make_diffusion(betas, var_type="fixedsmall"), x, x, t, clip_denoised=False
  )
  assert official[0] == 0.0 and float(jnp.abs(small.variance[0]).max()) == 0.0
  np.testing.assert_allclose(small.variance[:, 0, 0, 0], official[t], rtol=1e-5)
  np.testing.assert_allclose(
    small.log_variance[:, 0, 0, 0], np.log(official[[1, 1, 10, T - 1]]), rtol=1e-5
  )
  assert small.variance.shape == small.log_variance.shape == x.shape


def test_clipping_applies_to_pred_xstart():
  d = make(mean_type="xstart")
  x = 3.0 * rand(0)
  t = jnp.array([1, 2, 3, 4])
  assert float(jnp.abs(dm.p_mean_variance(d, x, x, t, clip_denoised=True).pred_xstart).max()) <= 1.0
  assert float(jnp.abs(dm.p_mean_variance(d, x, x, t, clip_denoised=False).pred_xstart).max()) > 1.0


def test_p_sample_adds_no_noise_at_t0_and_fresh_noise_otherwise():
  d = make()
  x, eps = rand(0), rand(1)
  t = jnp.array([0, 0, 5, 5])
  a, _ = dm.p_sample(d, eps, x, t, key=jax.random.key(0))
  b, _ = dm.p_sample(d, eps, x, t, key=jax.random.key(1))
  np.testing.assert_array_equal(a[:2], b[:2])
  assert not np.allclose(a[2:], b[2:])
  mean = dm.p_mean_variance(d, eps, x, t, clip_denoised=True).mean
  np.testing.assert_array_equal(a[:2], mean[:2])


# ----------------------------------------------------------------------------- likelihood terms


@pytest.mark.parametrize(
  "mean,log_scale", [(0.0, -3.0), (0.5, -5.0), (-0.98, -2.0), (1.0, -6.0), (0.2, 0.5)]
)
def test_decoder_likelihood_sums_to_one_over_the_256_bins(mean, log_scale):
  x = jnp.linspace(-1.0, 1.0, 256)
  logp = dm.discretized_gaussian_log_likelihood(
    x, means=jnp.full_like(x, mean), log_scales=jnp.full_like(x, log_scale)
  )
  assert float(jnp.exp(logp).sum()) == pytest.approx(1.0, abs=1e-4)


def test_normal_kl_against_closed_form_and_zero():
  assert float(dm.normal_kl(0.3, -1.0, 0.3, -1.0)) == pytest.approx(0.0, abs=1e-7)
  m1, v1, m2, v2 = 0.5, 0.2, -0.1, 1.5
  expect = math.log(math.sqrt(v2) / math.sqrt(v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
  assert float(dm.normal_kl(m1, math.log(v1), m2, math.log(v2))) == pytest.approx(expect, rel=1e-5)


def test_prior_bpd_is_small_for_the_paper_schedule():
  d = make(T=1000)
  x0 = jnp.clip(rand(0), -1, 1)
  prior = dm.prior_bpd(d, x0)
  assert prior.shape == (4,) and float(prior.max()) < 1e-4


def test_training_losses():
  x0, noise = jnp.clip(rand(0), -1, 1), rand(1)
  t = jnp.array([0, 1, 10, T - 1])
  d = make()
  exact = dm.training_losses(d, lambda xt, tt: noise, x_start=x0, t=t, noise=noise)
  np.testing.assert_allclose(exact, 0.0, atol=1e-12)
  zero = dm.training_losses(d, lambda xt, tt: jnp.zeros_like(xt), x_start=x0, t=t, noise=noise)
  np.testing.assert_allclose(zero, jnp.mean(noise**2, axis=(1, 2, 3)), rtol=1e-6)
  # kl: the bound term with the model's variance; hybrid: mse + lambda * T * that term.
  dk = make(var_type="learned_range", loss_type="kl")
  dh = make(var_type="learned_range", loss_type="hybrid")
  model = lambda xt, tt: jnp.concatenate([0.9 * noise, jnp.full_like(xt, 0.2)], -1)
  kl = dm.training_losses(dk, model, x_start=x0, t=t, noise=noise)
  hybrid = dm.training_losses(dh, model, x_start=x0, t=t, noise=noise)
  mse = jnp.mean((0.1 * noise) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(hybrid, mse + 0.001 * T * kl, rtol=1e-5)


def test_hybrid_loss_stops_the_mean_gradient_in_the_bound_part():
  x0, noise = jnp.clip(rand(0), -1, 1), rand(1)
  t = jnp.array([0, 1, 10, T - 1])
  dh = make(var_type="learned", loss_type="hybrid")
  dmse = make()

  def grad_mean(d, split):
    def loss(m):
      f = (
        (lambda xt, tt: jnp.concatenate([m, jnp.zeros_like(m)], -1))
        if split
        else (lambda xt, tt: m)
      )
      return dm.training_losses(d, f, x_start=x0, t=t, noise=noise).sum()

    return jax.grad(loss)(0.5 * noise)

  np.testing.assert_allclose(grad_mean(dh, True), grad_mean(dmse, False), rtol=1e-6)


# ----------------------------------------------------------------------------- the full bound


def test_calc_bpd_loop_is_the_sum_of_its_parts_and_one_compiled_loop():
  d = make(T=10)
  x0 = jnp.round(jnp.clip(rand(0, (2, 4, 4, 3)), -1, 1) * 127.5) / 127.5
  model_fn = lambda xt, t: 0.1 * xt * (1 + t[:, None, None, None] / 10)
  key = jax.random.key(3)
  res = jax.jit(lambda x: dm.calc_bpd_loop(d, model_fn, x_start=x, key=key))(x0)
  assert res.terms_bpd.shape == (2, 10) and res.mse.shape == (2, 10)
  np.testing.assert_allclose(res.total_bpd, res.terms_bpd.sum(1) + res.prior_bpd, rtol=1e-6)
  # Each term equals a direct evaluation with the same noise.
  for t_s in (0, 4, 9):
    t = jnp.full((2,), t_s)
    noise = jax.random.normal(jax.random.fold_in(key, t_s), x0.shape)
    xt = dm.q_sample(d, x0, t, noise)
    vb, pred = dm.vb_terms_bpd(d, model_fn(xt, t), x_start=x0, x_t=xt, t=t, clip_denoised=True)
    np.testing.assert_allclose(res.terms_bpd[:, t_s], vb, rtol=1e-5)
    np.testing.assert_allclose(
      res.mse[:, t_s], jnp.mean((pred - x0) ** 2, axis=(1, 2, 3)), rtol=1e-5
    )
  # One loop: the jaxpr holds a single scan and no unrolled per-t model calls.
  jaxpr = jax.make_jaxpr(lambda x: dm.calc_bpd_loop(d, model_fn, x_start=x, key=key))(x0)
  assert str(jaxpr).count("scan[") == 1


def test_bpd_at_t0_is_the_decoder_nll():
  d = make(T=10)
  x0 = jnp.round(jnp.clip(rand(0, (2, 4, 4, 3)), -1, 1) * 127.5) / 127.5
  t = jnp.zeros((2,), jnp.int32)
  xt = dm.q_sample(d, x0, t, rand(1, x0.shape))
  eps = rand(2, x0.shape)
  vb, _ = dm.vb_terms_bpd(d, eps, x_start=x0, x_t=xt, t=t, clip_denoised=True)
  out = dm.p_mean_variance(d, eps, xt, t, clip_denoised=True)
  # fixedlarge at t = 0 uses posterior_variance[1], not beta_0.
  np.testing.assert_allclose(out.log_variance, jnp.log(d.posterior_variance[1]), rtol=1e-6)
  nll = -dm.discretized_gaussian_log_likelihood(
    x0, means=out.mean, log_scales=0.5 * out.log_variance
  )
  np.testing.assert_allclose(vb, nll.mean(axis=(1, 2, 3)) / math.log(2), rtol=1e-6)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(name="cosin"), "cosin"),
    (dict(num_timesteps=0), "num_timesteps"),
    (dict(beta_end=1.5, name="const"), "1.5"),
    (dict(beta_start=-0.1), "-0.1"),
  ],
)
def test_bad_schedules_raise_clear_errors(kwargs, match):
  args = dict(name="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=100) | kwargs
  with pytest.raises(ValueError, match=match):
    dm.get_beta_schedule(args.pop("name"), **args)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(mean_type="noise"), "noise"),
    (dict(var_type="fixed"), "fixed"),
    (dict(loss_type="l1"), "l1"),
    (dict(var_type="learned"), "mse"),
    (dict(loss_type="hybrid"), "hybrid"),
  ],
)
def test_bad_types_raise_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    make(**kwargs)


def test_bad_betas_array():
  with pytest.raises(ValueError, match="T >= 1"):
    dm.make_diffusion(np.array([]))
  with pytest.raises(ValueError, match="beta"):
    dm.make_diffusion(np.array([0.1, 0.0]))


# ------------------------------------------------------------------------- diffusers' DDPMScheduler


torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _scheduler(*, variance_type, clip, prediction_type):
  sched = diffusers.DDPMScheduler(
    num_train_timesteps=T,
    beta_start=1e-4,
    beta_end=20 / T,
    beta_schedule="linear",
    variance_type=variance_type,
    clip_sample=clip,
    prediction_type=prediction_type,
  )
  sched.set_timesteps(T)
  return sched


def test_add_noise_equals_q_sample():
  d = make()
  sched = _scheduler(variance_type="fixed_small", clip=False, prediction_type="epsilon")
  x0, noise = rand(0), rand(1)
  t = jnp.array([0, 9, 31, T - 1])
  ref = sched.add_noise(
    torch.from_numpy(np.array(x0)), torch.from_numpy(np.array(noise)), torch.from_numpy(np.array(t))
  )
  np.testing.assert_allclose(dm.q_sample(d, x0, t, noise), ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("mean_type", ["eps", "xstart"])
def test_one_step_equals_diffusers(var_type, clip, mean_type):
  d = make(var_type=var_type, mean_type=mean_type)
  sched = _scheduler(
    variance_type={"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}[var_type],
    clip=clip,
    prediction_type={"eps": "epsilon", "xstart": "sample"}[mean_type],
  )
  for step, t_s in enumerate((T - 1, 25, 1, 0)):
    x = rand(10 + step) * (1.0 if t_s > T // 2 else 0.5)
    out = rand(20 + step) * (1.0 if mean_type == "eps" else 1.3)
    gen = torch.Generator().manual_seed(step)
    ref = sched.step(
      torch.from_numpy(np.array(out)), t_s, torch.from_numpy(np.array(x)), generator=gen
    ).prev_sample.numpy()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(step)).numpy()
    t = jnp.full((SHAPE[0],), t_s)
    got, _ = dm.p_sample(d, out, x, t, noise=jnp.asarray(noise), clip_denoised=clip)
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4, err_msg=f"t={t_s}")
