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


def test_the_x0_estimate_of_v_recovers_x0_and_of_x0_is_the_output():
    schedule = diffusion.make_schedule("linear_pow", T)
    t = jnp.asarray([0, 1, 250, 999], jnp.int32)
    x0, eps = (jax.random.normal(jax.random.key(k), (4, 3, 5)) for k in (0, 1))
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t][:, None, None]
    v = jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    np.testing.assert_allclose(diffusion.x0_estimate(schedule, v, x_t, t, "v"), x0, atol=2e-5)
    assert diffusion.x0_estimate(schedule, v, x_t, t, "x0") is v
    # At t = 0 the estimate is x_t up to 1 % of v: a nearly clean input passes through.
    anything = jnp.ones_like(x_t)
    close = diffusion.x0_estimate(schedule, anything, x_t, t, "v")[0] - x_t[0]
    assert float(jnp.abs(close).max()) < 0.011
    with pytest.raises(ValueError, match="unknown prediction 'eps'"):
        diffusion.x0_estimate(schedule, v, x_t, t, "eps")


def test_the_v_loss_weight_turns_x0_errors_into_the_implied_v_errors():
    schedule = diffusion.make_schedule("linear_pow", T)
    t = jnp.asarray([0, 1, 250, 999], jnp.int32)
    x0, eps, error = (jax.random.normal(jax.random.key(k), (4, 3, 5)) for k in (0, 1, 2))
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    abar = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None]
    x0_hat = x0 + 0.01 * error

    def implied_v(x0_like):  # v from x_t and an x0 (estimate), in float64
        x_t64, x064 = np.asarray(x_t, np.float64), np.asarray(x0_like, np.float64)
        return (np.sqrt(abar) * x_t64 - x064) / np.sqrt(1 - abar)

    v_mse = np.mean(np.square(implied_v(x0_hat) - implied_v(x0)), axis=(1, 2))
    x0_mse = np.mean(np.square(np.asarray(x0_hat, np.float64) - np.asarray(x0, np.float64)), axis=(1, 2))
    np.testing.assert_allclose(diffusion.loss_weights(schedule, t, "v") * x0_mse, v_mse, rtol=1e-3)
    np.testing.assert_array_equal(diffusion.loss_weights(schedule, t, "x0"), np.ones(4))
    # At t = 0 one unit of x0 error costs 1 / beta_start = 1e4 units of v error.
    np.testing.assert_allclose(diffusion.loss_weights(schedule, t[:1], "v"), [1e4], rtol=1e-4)
    with pytest.raises(ValueError, match="unknown loss 'eps'"):
        diffusion.loss_weights(schedule, t, "eps")


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


# Oracle-denoiser checks. With a denoiser that returns the true x0, every sampler's x_t must
# follow the forward process: x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) at every
# visited timestep, with the step-to-step correlation of that sampler, and the sample is x0.
# The expectations below come from the papers' formulas written here, not from diffusion.py.
# Scaling any one step coefficient of any sampler by 1 % (or a DDPM step that assumes s = t - 1)
# makes some of them fail; that was tried by patching step_coefficients.
ORACLE_X0 = np.asarray([-1.5, -0.5, 0.5, 1.5])  # one column per value, many rows per column
ORACLE_SAMPLERS = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0), ("renoise", 0.0)]


def cosine_abar():
    """abar_t of the cosine schedule from its closed form (checked above), float64; abar_{-1} = 1."""
    s = diffusion.COSINE_OFFSET
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    abar = f(np.arange(1, T + 1)) / f(0)
    abar[-1] = abar[-2] * 0.001  # the last beta is clipped at 0.999
    return lambda t: 1.0 if t < 0 else float(abar[t])


def expected_correlation(sampler, eta, abar_t, abar_s):
    """corr(x_t, x_s) of one oracle step t -> s when x_t ~ q(x_t | x0).

    ddpm: the forward process's own joint, x_t = sqrt(abar_t / abar_s) x_s + noise, so
      cov = sqrt(abar_t / abar_s) (1 - abar_s) (Ho et al. 2020; any s < t).
    ddim: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z with eps the noise of x_t,
      sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s) (Song et al. 2021, eq. 16).
    renoise: fresh noise, independent of x_t.
    """
    if sampler == "renoise":
        return 0.0
    if sampler == "ddpm":
        return np.sqrt(abar_t / abar_s) * (1 - abar_s) / np.sqrt((1 - abar_t) * (1 - abar_s))
    sigma2 = eta**2 * (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)
    return np.sqrt(max(1 - abar_s - sigma2, 0.0)) / np.sqrt(1 - abar_s)


def check_forward_marginal(x_t, abar_t, what):
    """Columns of x_t (n, 4): mean sqrt(abar_t) x0, variance 1 - abar_t, at 5 standard errors."""
    x_t = np.asarray(x_t, np.float64)
    n = x_t.shape[0]
    var = 1 - abar_t
    mean_err = np.abs(x_t.mean(axis=0) - np.sqrt(abar_t) * ORACLE_X0)
    assert np.all(mean_err <= 5 * np.sqrt(var / n) + 1e-5), (what, mean_err, np.sqrt(var / n))
    pooled_var = np.mean((x_t - x_t.mean(axis=0)) ** 2)
    assert abs(pooled_var / var - 1) <= 5 * np.sqrt(2 / x_t.size), (what, pooled_var, var)


def correlation(x_t, x_s):
    a = np.asarray(x_t, np.float64) - np.mean(x_t, axis=0)
    b = np.asarray(x_s, np.float64) - np.mean(x_s, axis=0)
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def oracle_run(sampler, eta, steps, rows):
    """(sample, {t: the x_t the denoiser saw}) of one run with the true x0 as the denoiser."""
    schedule = diffusion.make_schedule("cosine", T)
    x0 = jnp.asarray(np.tile(ORACLE_X0, (rows, 1)), jnp.float32)
    seen = {}

    def record(t, x_t):
        seen[int(t[0])] = np.asarray(x_t)

    def denoise(x_t, t):
        jax.debug.callback(record, t, x_t)
        return x0

    out = diffusion.sample(
        denoise, schedule, x0.shape, jax.random.key(2), sampler=sampler, steps=steps, eta=eta
    )
    out = np.asarray(out)
    jax.effects_barrier()
    return out, seen


@pytest.mark.parametrize("sampler, eta", ORACLE_SAMPLERS)
@pytest.mark.parametrize("steps", [7, 50])
def test_an_oracle_denoiser_walks_every_sampler_through_the_forward_marginals(sampler, eta, steps):
    rows = 100_000
    out, seen = oracle_run(sampler, eta, steps, rows)
    np.testing.assert_allclose(out, np.tile(ORACLE_X0, (rows, 1)), atol=1e-5)  # no noise after the end
    ts = sorted(seen, reverse=True)
    assert ts == list(diffusion.timestep_sequence(T, steps))
    abar = cosine_abar()
    # x_T is pure noise; with the cosine schedule q(x_{T-1} | x0) is N(0, I) up to 5e-5 in the mean.
    for t in ts:
        check_forward_marginal(seen[t], abar(t), (sampler, eta, t))
    for t, s in zip(ts, ts[1:], strict=False):
        rho = expected_correlation(sampler, eta, abar(t), abar(s))
        got = correlation(seen[t], seen[s])
        assert abs(got - rho) <= 5 * (1 - rho**2) / np.sqrt(4 * rows) + 2e-4, (t, s, got, rho)
    if sampler == "ddim" and eta == 0.0:
        # Deterministic: every x_t carries x_T's noise, eps = (x_T - sqrt(abar_T) x0) / sqrt(1 - abar_T).
        eps = (seen[ts[0]] - np.sqrt(abar(ts[0])) * ORACLE_X0) / np.sqrt(1 - abar(ts[0]))
        for t in ts:
            np.testing.assert_allclose(
                seen[t], np.sqrt(abar(t)) * ORACLE_X0 + np.sqrt(1 - abar(t)) * eps, atol=2e-5
            )


@pytest.mark.parametrize("sampler, eta", ORACLE_SAMPLERS)
@pytest.mark.parametrize("t, s", [(800, 300), (999, 998), (10, 0), (500, 499)])
def test_one_oracle_step_from_q_of_x_t_lands_on_q_of_x_s(sampler, eta, t, s):
    # If x_t ~ q(x_t | x0) and a step to s < t (skipping many timesteps) uses the true x0, x_s must
    # be distributed as q(x_s | x0), with the sampler's correlation to x_t. A DDPM step that assumes
    # s = t - 1 (a known bug of some schedulers) fails this.
    schedule = diffusion.make_schedule("cosine", T)
    abar = cosine_abar()
    rows = 100_000
    x0 = jnp.asarray(np.tile(ORACLE_X0, (rows, 1)), jnp.float32)
    eps = jax.random.normal(jax.random.key(0), x0.shape)
    x_t = np.sqrt(abar(t)) * x0 + np.sqrt(1 - abar(t)) * eps  # q(x_t | x0), written out
    coef = jnp.asarray(diffusion.step_coefficients(sampler, schedule, t, s, eta=eta), jnp.float32)
    x_s = diffusion.apply_step(coef, x_t, x0, jax.random.key(1))
    check_forward_marginal(x_s, abar(s), (sampler, eta, t, s))
    rho = expected_correlation(sampler, eta, abar(t), abar(s))
    assert abs(correlation(x_t, x_s) - rho) <= 5 * (1 - rho**2) / np.sqrt(4 * rows) + 2e-4
    if sampler == "ddim" and eta == 0.0:  # exactly the forward value with the same noise
        np.testing.assert_allclose(x_s, np.sqrt(abar(s)) * x0 + np.sqrt(1 - abar(s)) * eps, atol=2e-5)


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
@pytest.mark.parametrize("steps", [1, 1000])
def test_every_sampler_returns_the_last_prediction_without_noise(sampler, steps):
    schedule = diffusion.make_schedule("linear_pow", T)

    def denoise(x_t, t):  # not an oracle: the prediction depends on x_t and t
        return 0.5 * x_t + t[:, None, None] / T

    out, trajectory = diffusion.sample(
        denoise,
        schedule,
        (3, 5, 6),
        jax.random.key(2),
        sampler=sampler,
        steps=steps,
        eta=0.5,
        return_trajectory=True,
    )
    assert trajectory.shape == (steps, 3, 5, 6)
    np.testing.assert_array_equal(out, trajectory[-1])
    # The first prediction is made at t = T - 1 from x_T = N(0, I) drawn with fold_in(key, 0).
    x_T = jax.random.normal(jax.random.fold_in(jax.random.key(2), 0), (3, 5, 6))
    np.testing.assert_allclose(trajectory[0], 0.5 * x_T + (T - 1) / T, rtol=1e-6)


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


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
@pytest.mark.parametrize("t, s", [(999, 899), (40, 39), (3, -1)])
def test_eps_scale_is_the_step_on_the_x0_that_implies_the_predicted_noise_over_lambda(sampler, t, s):
    schedule, lam = diffusion.make_schedule("linear_pow", T), 1.15
    rng = np.random.default_rng(0)
    x0, x_t = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    alpha, sigma = np.sqrt(schedule.abar(t)), np.sqrt(1 - schedule.abar(t))
    eps = (x_t - alpha * x0) / sigma
    x0_scaled = (x_t - sigma * eps / lam) / alpha
    plain = diffusion.step_coefficients(sampler, schedule, t, s, eta=0.3)
    scaled = diffusion.step_coefficients(sampler, schedule, t, s, eta=0.3, eps_scale=lam)
    np.testing.assert_allclose(
        scaled[0] * x0 + scaled[1] * x_t, plain[0] * x0_scaled + plain[1] * x_t, rtol=1e-9, atol=1e-9
    )
    assert scaled[2] == plain[2]  # the fresh noise is untouched
    one = diffusion.step_coefficients(sampler, schedule, t, s, eta=0.3, eps_scale=1.0)
    np.testing.assert_array_equal(one, plain)  # 1 is exactly off


def test_eps_scaled_ddpm_is_ho_et_als_noise_form_mean_with_the_noise_divided():
    # One DDPM step in the noise form (Ho et al. eq. 11): x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t)
    # eps) / sqrt(alpha_t), derived independently of the x0 form the sampler uses.
    schedule, lam, t = diffusion.make_schedule("linear", T), 1.1, 500
    beta, abar = 1 - schedule.abar(t) / schedule.abar(t - 1), schedule.abar(t)
    rng = np.random.default_rng(1)
    x0, x_t = rng.normal(size=4), rng.normal(size=4)
    eps = (x_t - np.sqrt(abar) * x0) / np.sqrt(1 - abar)
    expected = (x_t - beta / np.sqrt(1 - abar) * eps / lam) / np.sqrt(1 - beta)
    a, b, _ = diffusion.step_coefficients("ddpm", schedule, t, t - 1, eps_scale=lam)
    np.testing.assert_allclose(a * x0 + b * x_t, expected, rtol=1e-9)


def test_an_eps_scaled_sample_ends_on_the_scaled_x0_and_sharpens_a_smoothing_denoiser():
    schedule, lam = diffusion.make_schedule("linear_pow", T), 1.2

    def denoise(x_t, t):  # shrinks x_t toward 0: less noise inferred means more of x_t kept
        return 0.5 * x_t

    key = jax.random.key(3)
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (2, 6))
    one = diffusion.sample(denoise, schedule, (2, 6), key, steps=1, eps_scale=lam)
    alpha = np.sqrt(schedule.abar(T - 1))
    np.testing.assert_allclose(one, 0.5 * x_T / lam + (1 - 1 / lam) * x_T / alpha, rtol=1e-5)
    plain = diffusion.sample(denoise, schedule, (2, 6), key, steps=50)
    scaled = diffusion.sample(denoise, schedule, (2, 6), key, steps=50, eps_scale=lam)
    assert np.abs(scaled).mean() > np.abs(plain).mean()
    with pytest.raises(ValueError, match="eps_scale must be positive, got 0"):
        diffusion.step_coefficients("ddpm", schedule, 10, 5, eps_scale=0)
