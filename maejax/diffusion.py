"""Diffusion maths for DiffMAE: schedules, q_sample, posteriors and scan samplers.

Schedules are built in float64 NumPy and cast to float32 once. Timesteps are
integer indices 0..T-1 (T-1 the noisiest); abar_t = prod_{i<=t} (1 - beta_i).

Samplers walk a descending sub-sequence of timesteps t_0 > t_1 > ... > t_K-1
in one `jax.lax.scan`, with a fresh key per step (`fold_in(key, i)`), calling a
given `denoise(x_t, t) -> x0_prediction` that runs only the decoder (the
encoder runs once, before). After the last step they return its x0
prediction: no noise is added at the end.

- 'ddpm': ancestral sampling from q(x_s | x_t, x0) for any pair s < t, so it
  is exact for any sub-sequence of timesteps, not only all T.
- 'ddim': Song et al.'s update with stochasticity eta (0 = deterministic).
- 'renoise': the seed note's literal procedure: predict x0, then noise it
  afresh to the next smaller t with q(x_s | x0).

Any sampler can divide the noise its step infers by `eps_scale` (lambda >= 1,
Ning et al. 2024, "Elucidating the Exposure Bias in Diffusion Models"): a
model trained on true x_t but run on its own, smoother, chain removes too much
at each step; x0' = x0 / lambda + (1 - 1/lambda) x_t / sqrt(abar_t) is the x0
whose implied noise (x_t - sqrt(abar_t) x0') / sqrt(1 - abar_t) is the
predicted noise over lambda. It is folded into the step coefficients.

What the decoder's output stands for is `x0_estimate`'s business: the clean
patches themselves (DiffMAE's x0-prediction) or v (Salimans & Ho), from which
x0 follows given x_t; either way the loss and the samplers see an x0 estimate.
Which error the loss squares is `loss_weights`' business: the x0 estimate's
(DiffMAE's) or the v it implies, which weighs small t far more.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The one list of each choice: config validation (validate.py, models/model_config.py) imports these.
SCHEDULES = ("linear", "cosine", "linear_pow")
SAMPLERS = ("ddpm", "ddim", "renoise")
PREDICTIONS = ("x0", "v")
LOSSES = ("x0", "v")
COSINE_OFFSET = 0.008
EPS_SCALE_RANGE = (1.0, 2.0)  # sample.eps_scale: 1 = the model's own noise estimate


def betas_for(name: str, timesteps: int, beta_start=1e-4, beta_end=0.02, rho=0.8) -> np.ndarray:
    """(T,) float64 betas.

    linear:     beta_t = beta_start + (beta_end - beta_start) * t / (T - 1)
    linear_pow: beta_t = beta_start + (beta_end - beta_start) * (t / (T - 1)) ** rho;
                rho < 1 raises the noise early (a noisier schedule), rho = 1 is linear.
    cosine:     abar(t) = cos^2(((t + 1) / T + s) / (1 + s) * pi / 2) / cos^2(s / (1 + s) * pi / 2),
                s = 0.008, betas from consecutive ratios, clipped at 0.999 (Nichol & Dhariwal).
    """
    steps = np.arange(timesteps, dtype=np.float64)
    frac = steps / max(timesteps - 1, 1)
    if name == "linear":
        return beta_start + (beta_end - beta_start) * frac
    if name == "linear_pow":
        return beta_start + (beta_end - beta_start) * frac**rho
    if name == "cosine":

        def abar(x):
            return np.cos((x / timesteps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * np.pi / 2) ** 2

        grid = np.arange(timesteps + 1, dtype=np.float64)
        return np.minimum(1.0 - abar(grid[1:]) / abar(grid[:-1]), 0.999)
    raise ValueError(f"unknown schedule {name!r}; valid: {SCHEDULES}")


class Schedule(NamedTuple):
    """A noise schedule: float64 NumPy tables, cast to float32 only where used.

    Every coefficient a sampler needs is computed from these in float64 (for
    the static timestep pairs of a sampling run), so no float32 cancellation
    such as 1 - abar near t = 0 degrades them.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]

    def abar(self, t) -> np.ndarray:
        """float64 abar_t for integer t (NumPy), with abar_{-1} = 1 (the clean data)."""
        t = np.asarray(t)
        return np.where(t >= 0, self.alphas_cumprod[np.maximum(t, 0)], 1.0)


def make_schedule(name: str, timesteps: int, beta_start=1e-4, beta_end=0.02, rho=0.8) -> Schedule:
    betas = betas_for(name, timesteps, beta_start, beta_end, rho)
    return Schedule(betas, np.cumprod(1.0 - betas))


def _expand(values, like):
    """(B,) -> broadcastable against `like` (B, ...)."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def _one_minus_abar(schedule: Schedule) -> np.ndarray:
    """1 - abar_t for every t, float64, without cancellation near t = 0."""
    return -np.expm1(np.log(schedule.alphas_cumprod))


def _signal_and_noise(schedule: Schedule, t, like):
    """sqrt(abar_t) and sqrt(1 - abar_t) per example t (B,) (traced is fine), broadcastable to `like`."""
    signal = jnp.asarray(np.sqrt(schedule.alphas_cumprod), jnp.float32)[t]
    noise = jnp.asarray(np.sqrt(_one_minus_abar(schedule)), jnp.float32)[t]
    return _expand(signal, like), _expand(noise, like)


def q_sample(schedule: Schedule, x0, t, eps):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per example t (B,) (traced is fine)."""
    signal, noise = _signal_and_noise(schedule, t, x0)
    return signal * x0 + noise * eps


def x0_estimate(schedule: Schedule, output, x_t, t, prediction: str):
    """The x0 estimate a decoder's `output` stands for, at timesteps t (B,).

    - x0: the output is the estimate (DiffMAE's x0-prediction).
    - v:  the output is v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, so
          x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v. At small t the estimate
          is x_t plus a small correction, so a nearly clean input keeps its
          detail without the decoder having to learn the identity; at t = T-1
          it is -v, the x0-prediction again.
    """
    if prediction == "x0":
        return output
    if prediction == "v":
        signal, noise = _signal_and_noise(schedule, t, x_t)
        return signal * x_t - noise * output
    raise ValueError(f"unknown prediction {prediction!r}; valid: {PREDICTIONS}")


def loss_weights(schedule: Schedule, t, loss: str):
    """Per-example weights (B,) on the x0 estimate's squared error, at timesteps t (B,).

    - x0: 1, the MSE of the x0 estimate (DiffMAE's loss).
    - v:  1 / (1 - abar_t), the MSE of the v the x0 estimate implies: for a
          fixed x_t, v - v_hat = (x0_hat - x0) / sqrt(1 - abar_t). This is
          SNR_t + 1, so small t, where the detail of a sample is decided, weighs
          up to 1 / beta_start (1e4) times more than under x0, as in the
          v-prediction models of Salimans & Ho.
    """
    if loss == "x0":
        return jnp.ones(jnp.shape(t), jnp.float32)
    if loss == "v":
        return jnp.asarray(1.0 / _one_minus_abar(schedule), jnp.float32)[t]
    raise ValueError(f"unknown loss {loss!r}; valid: {LOSSES}")


def posterior_coefficients(schedule: Schedule, t, s):
    """q(x_s | x_t, x0) = N(c_x0 x0 + c_xt x_t, var) for integer s < t (s = -1: the data).

    With a_ts = abar_t / abar_s and b_ts = 1 - a_ts:
      c_x0 = sqrt(abar_s) b_ts / (1 - abar_t),  c_xt = sqrt(a_ts) (1 - abar_s) / (1 - abar_t),
      var = (1 - abar_s) / (1 - abar_t) b_ts.
    For s = t - 1 this is the usual DDPM posterior. float64 NumPy.
    """
    abar_t, abar_s = schedule.abar(t), schedule.abar(s)
    one_minus_t = -np.expm1(np.log(abar_t))
    one_minus_s = -np.expm1(np.log(abar_s))
    b_ts = -np.expm1(np.log(abar_t) - np.log(abar_s))  # 1 - abar_t / abar_s without cancellation
    c_x0 = np.sqrt(abar_s) * b_ts / one_minus_t
    c_xt = np.sqrt(abar_t / abar_s) * one_minus_s / one_minus_t
    return c_x0, c_xt, one_minus_s / one_minus_t * b_ts


def posterior(schedule: Schedule, x0, x_t, t: int, s: int):
    """Mean and variance of q(x_s | x_t, x0) for integer timesteps s < t."""
    c_x0, c_xt, var = posterior_coefficients(schedule, t, s)
    return float(c_x0) * x0 + float(c_xt) * x_t, float(var)


def step_coefficients(
    sampler: str, schedule: Schedule, t, s, eta: float = 0.0, eps_scale: float = 1.0
) -> np.ndarray:
    """(..., 3) float64 [A, B, C] of one move x_s = A x0_pred + B x_t + C z, z ~ N(0, I).

    - ddpm:    the posterior q(x_s | x_t, x0_pred);
    - ddim:    sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps_pred + sigma z, with
               eps_pred = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) and
               sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s);
    - renoise: q(x_s | x0_pred), fresh noise;
    and at the end (s = -1) every sampler returns x0_pred: [1, 0, 0].
    With eps_scale = lambda, x0_pred is replaced by x0 / lambda + (1 - 1/lambda) x_t / sqrt(abar_t)
    (the predicted noise over lambda): A -> A / lambda, B -> B + A (1 - 1/lambda) / sqrt(abar_t),
    the last step included.
    """
    t, s = np.asarray(t), np.asarray(s)
    abar_t, abar_s = schedule.abar(t), schedule.abar(s)
    one_minus_t, one_minus_s = -np.expm1(np.log(abar_t)), -np.expm1(np.log(abar_s))
    if sampler == "ddpm":
        c_x0, c_xt, var = posterior_coefficients(schedule, t, s)
        coef = np.stack([c_x0, c_xt, np.sqrt(var)], axis=-1)
    elif sampler == "ddim":
        b_ts = -np.expm1(np.log(abar_t) - np.log(abar_s))
        sigma = eta * np.sqrt(one_minus_s / one_minus_t * b_ts)
        direction = np.sqrt(np.maximum(one_minus_s - sigma**2, 0.0))
        eps_xt, eps_x0 = 1.0 / np.sqrt(one_minus_t), -np.sqrt(abar_t / one_minus_t)
        coef = np.stack([np.sqrt(abar_s) + direction * eps_x0, direction * eps_xt, sigma], axis=-1)
    elif sampler == "renoise":
        coef = np.stack([np.sqrt(abar_s), np.zeros_like(abar_s), np.sqrt(one_minus_s)], axis=-1)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {SAMPLERS}")
    coef = np.where((s < 0)[..., None], np.array([1.0, 0.0, 0.0]), coef)
    return scale_noise_estimate(coef, abar_t, eps_scale)


def scale_noise_estimate(coef, abar_t, eps_scale: float) -> np.ndarray:
    """[A, B, C] of a step that sees the x0 whose implied noise is the predicted noise / eps_scale."""
    if eps_scale <= 0:
        raise ValueError(f"eps_scale must be positive, got {eps_scale}")
    a, b, c = np.moveaxis(np.asarray(coef, np.float64), -1, 0)
    shrink = 1.0 - 1.0 / eps_scale
    return np.stack([a / eps_scale, b + a * shrink / np.sqrt(abar_t), c], axis=-1)


def apply_step(coef, x_t, x0, key):
    """x_s = A x0 + B x_t + C z for one step's (3,) float32 coefficients."""
    noise = jax.random.normal(key, x_t.shape, x_t.dtype)
    return coef[0] * x0 + coef[1] * x_t + coef[2] * noise


def timestep_sequence(timesteps: int, steps: int) -> np.ndarray:
    """`steps` distinct timesteps from T-1 down to 0, evenly spaced (int32)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"sampling steps must be in [1, {timesteps}], got {steps}")
    # Spaced from T-1 down, so that even a single step starts from the noisiest t.
    return np.unique(np.round(np.linspace(timesteps - 1, 0, steps)).astype(np.int32))[::-1].copy()


def sample(
    denoise,
    schedule: Schedule,
    shape,
    key,
    *,
    sampler="ddpm",
    steps=50,
    eta=0.0,
    eps_scale=1.0,
    return_trajectory=False,
):
    """Draw x0 of `shape` (B, ...) by iterating `denoise` from pure noise.

    Args:
      denoise: (x_t (B, ...), t (B,) int32) -> x0 prediction (B, ...); close
        over everything that does not change with t (the encoder's output).
      schedule: the noise schedule.
      shape: shape of x (e.g. (B, L_masked, p*p*C)).
      key: a jax random key; step i uses fold_in(key, i + 1), x_T uses fold_in(key, 0).
      sampler: 'ddpm' | 'ddim' | 'renoise'.
      steps: number of denoiser calls (a sub-sequence of the T timesteps).
      eta: DDIM stochasticity (ignored by the others).
      eps_scale: divide each step's inferred noise by this (1 = the model's own estimate).
      return_trajectory: also return the denoiser's x0 prediction of every step, (steps, *shape).

    Returns:
      x0 (shape,), or (x0, trajectory).
    """
    ts = timestep_sequence(schedule.timesteps, steps)
    nexts = np.concatenate([ts[1:], [-1]]).astype(np.int32)
    coefs = jnp.asarray(step_coefficients(sampler, schedule, ts, nexts, eta, eps_scale), jnp.float32)
    batch = shape[0]
    x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)

    def body(x_t, xs):
        index, t, coef = xs
        x0 = denoise(x_t, jnp.full((batch,), t, jnp.int32))
        x_next = apply_step(coef, x_t, x0, jax.random.fold_in(key, index + 1))
        return x_next, (x0 if return_trajectory else None)

    xs = (jnp.arange(len(ts), dtype=jnp.int32), jnp.asarray(ts), coefs)
    x0, trajectory = jax.lax.scan(body, x_T, xs)
    return (x0, trajectory) if return_trajectory else x0
