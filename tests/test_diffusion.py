"""Diffusion maths: schedules, q_sample, posteriors, and the scan samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maejax import diffusion

T = 1000


def test_linear_schedule_matches_its_closed_form():
    betas = diffusion.betas_for("linear", T, 1e-4, 0.02)
    assert betas.dtype == np.float64
    np.testing.assert_allclose(
        betas[[0, 499, 999]], [1e-4, 1e-4 + (0.02 - 1e-4) * 499 / 999, 0.02], rtol=1e-12
    )
    schedule = diffusion.make_schedule("linear", T)
    np.testing.assert_allclose(schedule.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)
    assert schedule.alphas_cumprod.dtype == np.float64  # cast to float32 only where used


def test_linear_pow_is_noisier_than_linear_and_reduces_to_it_at_rho_1():
    lin = diffusion.betas_for("linear", T)
    np.testing.assert_allclose(diffusion.betas_for("linear_pow", T, rho=1.0), lin, rtol=1e-12)
    noisier = diffusion.betas_for("linear_pow", T, rho=0.8)
    t = np.arange(T) / (T - 1)
    np.testing.assert_allclose(noisier, 1e-4 + (0.02 - 1e-4) * t**0.8, rtol=1e-12)
    assert np.all(np.cumprod(1 - noisier)[1:-1] < np.cumprod(1 - lin)[1:-1])


def test_cosine_schedule_matches_its_closed_form():
    s = diffusion.COSINE_OFFSET
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    abar = np.cumprod(1 - diffusion.betas_for("cosine", T))
    t = np.array([0, 10, 500, 900])
    np.testing.assert_allclose(abar[t], f(t + 1) / f(0), rtol=1e-9)
    assert diffusion.betas_for("cosine", T).max() <= 0.999


def test_q_sample_has_the_right_moments():
    schedule = diffusion.make_schedule("linear", T)
    x0 = jnp.full((20000, 4), 2.0)
    t = jnp.full((20000,), 300, jnp.int32)
    xt = diffusion.q_sample(schedule, x0, t, jax.random.normal(jax.random.key(0), x0.shape))
    abar = float(schedule.alphas_cumprod[300])
    assert float(xt.mean()) == pytest.approx(2.0 * np.sqrt(abar), abs=0.01)
    assert float(xt.var()) == pytest.approx(1.0 - abar, rel=0.02)


@pytest.mark.parametrize("t, s", [(500, 499), (500, 300), (10, -1), (999, 0)])
def test_posterior_matches_the_bayes_formulas(t, s):
    schedule = diffusion.make_schedule("cosine", T)
    abar = np.cumprod(1 - diffusion.betas_for("cosine", T))
    a_t, a_s = abar[t], (abar[s] if s >= 0 else 1.0)
    x0, xt = jnp.asarray([[0.5, -1.0]]), jnp.asarray([[0.2, 0.3]])
    mean, var = diffusion.posterior(schedule, x0, xt, t, s)
    if s < 0:  # the data itself: a point mass at x0
        np.testing.assert_allclose(mean, x0, atol=1e-6)
        assert var == 0.0
        return
    # q(x_s | x_t, x0) by completing the square: x_t | x_s ~ N(sqrt(a_t/a_s) x_s, 1 - a_t/a_s),
    # x_s | x0 ~ N(sqrt(a_s) x0, 1 - a_s).
    a_ts = a_t / a_s
    precision = 1 / (1 - a_s) + a_ts / (1 - a_ts)
    expected_var = 1 / precision
    expected_mean = expected_var * (
        np.sqrt(a_s) * np.asarray(x0) / (1 - a_s) + np.sqrt(a_ts) * np.asarray(xt) / (1 - a_ts)
    )
    np.testing.assert_allclose(var, expected_var, rtol=1e-9)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-7)


def test_timestep_sequence_descends_over_the_whole_range():
    seq = diffusion.timestep_sequence(T, 50)
    assert seq[0] == T - 1 and seq[-1] == 0 and len(seq) == 50 and np.all(np.diff(seq) < 0)
    np.testing.assert_array_equal(diffusion.timestep_sequence(10, 10), np.arange(9, -1, -1))
    np.testing.assert_array_equal(
        diffusion.timestep_sequence(T, 1), [T - 1]
    )  # one step starts from pure noise


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_an_oracle_denoiser_makes_every_sampler_return_x0(sampler, steps):
    schedule = diffusion.make_schedule("linear_pow", T)
    x0 = jax.random.normal(jax.random.key(1), (3, 5, 6))
    out = diffusion.sample(
        lambda x_t, t: x0, schedule, x0.shape, jax.random.key(2), sampler=sampler, steps=steps, eta=0.5
    )
    np.testing.assert_allclose(out, x0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_skipping_timesteps_keeps_the_forward_marginals(sampler):
    # If x_t ~ q(x_t | x0) and a step to s < t (skipping many timesteps) uses
    # the true x0, then x_s must be distributed as q(x_s | x0). A DDPM step
    # that assumes s = t - 1 (a known bug of some schedulers) fails this.
    schedule = diffusion.make_schedule("linear", T)
    n, t, s = 200000, 800, 300
    x0 = jnp.full((n, 1), 1.5)
    eps = jax.random.normal(jax.random.key(0), x0.shape)
    x_t = diffusion.q_sample(schedule, x0, jnp.full((n,), t), eps)
    coef = jnp.asarray(diffusion.step_coefficients(sampler, schedule, t, s, eta=1.0), jnp.float32)
    x_s = diffusion.apply_step(coef, x_t, x0, jax.random.key(1))
    abar_s = float(schedule.alphas_cumprod[s])
    assert float(x_s.mean()) == pytest.approx(1.5 * np.sqrt(abar_s), abs=0.01)
    assert float(x_s.var()) == pytest.approx(1.0 - abar_s, rel=0.02)


def test_same_key_same_samples_and_different_keys_differ():
    schedule = diffusion.make_schedule("linear", 100)

    def denoise(x_t, t):
        return 0.5 * x_t  # any non-oracle function of x_t

    a = diffusion.sample(denoise, schedule, (2, 8), jax.random.key(0), steps=10)
    b = diffusion.sample(denoise, schedule, (2, 8), jax.random.key(0), steps=10)
    c = diffusion.sample(denoise, schedule, (2, 8), jax.random.key(1), steps=10)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_ddim_with_eta_0_is_deterministic_given_x_T():
    schedule = diffusion.make_schedule("linear", 100)
    x_t, x0 = jnp.ones((2, 3)), jnp.zeros((2, 3))

    def step(eta, seed):
        coef = jnp.asarray(diffusion.step_coefficients("ddim", schedule, 50, 20, eta), jnp.float32)
        return diffusion.apply_step(coef, x_t, x0, jax.random.key(seed))

    np.testing.assert_array_equal(step(0.0, 0), step(0.0, 1))
    assert not np.allclose(step(1.0, 0), step(1.0, 1))
    # eta = 1 is the DDPM posterior's noise level.
    np.testing.assert_allclose(
        diffusion.step_coefficients("ddim", schedule, 50, 20, 1.0)[2],
        diffusion.step_coefficients("ddpm", schedule, 50, 20)[2],
        rtol=1e-12,
    )


def test_the_compiled_sampler_does_not_grow_with_the_number_of_steps():
    schedule = diffusion.make_schedule("linear", T)

    def hlo_ops(steps):
        """Operations in the lowered program; constants (the per-step tables) are data."""
        fn = jax.jit(lambda k: diffusion.sample(lambda x, t: 0.9 * x, schedule, (2, 4), k, steps=steps))
        lines = fn.lower(jax.random.key(0)).as_text().splitlines()
        return sum(1 for line in lines if " = " in line and "constant" not in line)

    assert hlo_ops(1000) == hlo_ops(10)  # a scan: the step count is data, not code
