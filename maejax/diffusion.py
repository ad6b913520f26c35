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
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine", "linear_pow")
SAMPLERS = ("ddpm", "ddim", "renoise")
COSINE_OFFSET = 0.008


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
    """float32 (T,) tables derived from the betas."""

    betas: jax.Array
    alphas_cumprod: jax.Array

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]


def make_schedule(name: str, timesteps: int, beta_start=1e-4, beta_end=0.02, rho=0.8) -> Schedule:
    betas = betas_for(name, timesteps, beta_start, beta_end, rho)
    abar = np.cumprod(1.0 - betas)
    return Schedule(jnp.asarray(betas, jnp.float32), jnp.asarray(abar, jnp.float32))


def schedule_from_config(diffusion_config) -> Schedule:
    d = diffusion_config
    return make_schedule(d.schedule, d.timesteps, d.beta_start, d.beta_end, d.rho)


def _expand(values, like):
    """(B,) -> broadcastable against `like` (B, ...)."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def abar_at(schedule: Schedule, t):
    """abar_t, with abar_{-1} = 1 (t = -1 stands for the clean data)."""
    return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def q_sample(schedule: Schedule, x0, t, eps):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per example t (B,)."""
    abar = _expand(abar_at(schedule, t), x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps


def posterior(schedule: Schedule, x0, x_t, t, s):
    """Mean and variance of q(x_s | x_t, x0) for s < t (s = -1: the data itself).

    With a_ts = abar_t / abar_s and b_ts = 1 - a_ts:
      mean = sqrt(abar_s) b_ts / (1 - abar_t) x0 + sqrt(a_ts) (1 - abar_s) / (1 - abar_t) x_t
      var  = (1 - abar_s) / (1 - abar_t) b_ts
    For s = t - 1 this is the usual DDPM posterior.
    """
    abar_t = _expand(abar_at(schedule, t), x0)
    abar_s = _expand(abar_at(schedule, s), x0)
    a_ts = abar_t / abar_s
    b_ts = 1.0 - a_ts
    mean = (
        jnp.sqrt(abar_s) * b_ts / (1.0 - abar_t) * x0 + jnp.sqrt(a_ts) * (1.0 - abar_s) / (1.0 - abar_t) * x_t
    )
    var = (1.0 - abar_s) / (1.0 - abar_t) * b_ts
    return mean, var


def timestep_sequence(timesteps: int, steps: int) -> np.ndarray:
    """`steps` distinct timesteps from T-1 down to 0, evenly spaced (int32)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"sampling steps must be in [1, {timesteps}], got {steps}")
    return np.unique(np.round(np.linspace(0, timesteps - 1, steps)).astype(np.int32))[::-1].copy()


def _step(sampler: str, schedule: Schedule, x_t, x0, t, s, key, eta: float):
    """One move from timestep t to s < t (s = -1 at the end) given the x0 prediction."""
    noise = jax.random.normal(key, x_t.shape, x_t.dtype)
    last = s < 0
    if sampler == "ddpm":
        mean, var = posterior(schedule, x0, x_t, t, s)
        nxt = mean + jnp.sqrt(var) * noise
    elif sampler == "ddim":
        abar_t = _expand(abar_at(schedule, t), x0)
        abar_s = _expand(abar_at(schedule, s), x0)
        eps = (x_t - jnp.sqrt(abar_t) * x0) / jnp.sqrt(1.0 - abar_t)
        sigma = eta * jnp.sqrt((1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s))
        direction = jnp.sqrt(jnp.maximum(1.0 - abar_s - sigma**2, 0.0)) * eps
        nxt = jnp.sqrt(abar_s) * x0 + direction + sigma * noise
    elif sampler == "renoise":
        nxt = q_sample(schedule, x0, s, noise)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {SAMPLERS}")
    # The end: return the x0 prediction itself, with no noise.
    return jnp.where(_expand(last, x0), x0, nxt)


def sample(
    denoise, schedule: Schedule, shape, key, *, sampler="ddpm", steps=50, eta=0.0, return_trajectory=False
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
      return_trajectory: also return the x0 prediction of every step, (steps, *shape).

    Returns:
      x0 (shape,), or (x0, trajectory).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {SAMPLERS}")
    ts = timestep_sequence(schedule.timesteps, steps)
    nexts = np.concatenate([ts[1:], [-1]]).astype(np.int32)
    batch = shape[0]
    x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)

    def body(x_t, xs):
        index, t, s = xs
        t_b, s_b = jnp.full((batch,), t, jnp.int32), jnp.full((batch,), s, jnp.int32)
        x0 = denoise(x_t, t_b)
        x_next = _step(sampler, schedule, x_t, x0, t_b, s_b, jax.random.fold_in(key, index + 1), eta)
        return x_next, (x0 if return_trajectory else None)

    xs = (jnp.arange(len(ts), dtype=jnp.int32), jnp.asarray(ts), jnp.asarray(nexts))
    x0, trajectory = jax.lax.scan(body, x_T, xs)
    return (x0, trajectory) if return_trajectory else x0
