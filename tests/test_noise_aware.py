"""The noise-aware rate decision, on synthetic loss streams of known mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_dynlr import _noise_aware, current_learning_rate, dynamic_lr

START = 0.1
FLOOR = START * 1e-6
CAP = START * 1e6


def _rates(losses, jit=True):
    """The rate after each loss of the stream, with zero gradients."""
    opt = dynamic_lr(
        START,
        noise_aware=True,
        min_learning_rate=FLOOR,
        max_learning_rate=CAP,
    )
    params = jnp.zeros(1)

    def step(state, loss):
        _, state = opt.update(jnp.zeros(1), state, params, value=loss)
        return state, current_learning_rate(state)

    if jit:
        _, rates = jax.lax.scan(step, opt.init(params), jnp.asarray(losses))
        return np.asarray(rates)
    state = opt.init(params)
    rates = []
    for loss in losses:
        state, rate = step(state, loss)
        rates.append(float(rate))
    return np.asarray(rates)


def _noisy_stream(mean_log_slope, steps, seed, sigma=0.3):
    """Log-normal noise of spread sigma around exp(mean_log_slope * t)."""
    rng = np.random.default_rng(seed)
    mean = mean_log_slope * np.arange(steps)
    return np.exp(mean + sigma * rng.standard_normal(steps)).astype(np.float32)


@pytest.mark.parametrize("jit", [False, True])
def test_deterministic_fall_grows_at_every_fourth_call(jit):
    # Exactly exponential losses leave no residual, so the slope is significant
    # at the first checkpoint (4 losses): x1.05^4 there, then x1.05^8 at call 8
    # and call 12 (second and third falls in a row).
    losses = np.exp(-0.05 * np.arange(12)).astype(np.float32)
    rates = _rates(losses, jit=jit)
    expected = np.full(12, START)
    expected[3:] *= 1.05**4
    expected[7:] *= 1.05**8
    expected[11:] *= 1.05**8
    np.testing.assert_allclose(rates, expected, rtol=1e-5)


def test_deterministic_rise_halves_at_every_fourth_call():
    # A rise of 0.01 per call in log loss stays far below the spike threshold
    # (the fast average lags about 0.01 / 0.1 = 0.1 < ln 1.25), so only the
    # trend test cuts: at calls 4 and 8.
    losses = np.exp(0.01 * np.arange(8)).astype(np.float32)
    rates = _rates(losses)
    expected = np.array([1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25]) * START
    np.testing.assert_allclose(rates, expected, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_noisy_falling_mean_grows_the_rate(seed):
    # Slope -0.002 per call under noise 0.3: at a 256-call window the slope's
    # standard error is 0.3 * sqrt(12 / 256^3) = 2.5e-4, t = -8, so about one
    # growth per 256 calls or faster; eight windows in 2,048 calls.
    rates = _rates(_noisy_stream(-0.002, 2048, seed))
    assert rates[-1] > 4 * START
    assert np.all(rates >= START * 0.5**2)


@pytest.mark.parametrize("seed", [0, 1])
def test_noisy_rising_mean_cuts_the_rate(seed):
    rates = _rates(_noisy_stream(0.002, 2048, seed))
    assert rates[-1] < START / 4
    assert np.all(rates <= START * 1.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_noise_neither_collapses_nor_runs_away(seed):
    # A flat mean: the plain rule would cut on about half the calls and reach
    # its floor within a few hundred. Here a false alarm needs a 3-sigma slope
    # at one of a few checkpoints per window, so the rate barely moves.
    rates = _rates(_noisy_stream(0.0, 5000, seed))
    assert START / 10 <= rates.min()
    assert rates.max() <= START * 10


def test_heavy_tailed_noise_neither_collapses_nor_runs_away():
    # Late in training single batches can be many times the mean loss: here
    # log loss with Student-t (3 degrees of freedom) noise, where one call in
    # a thousand is more than 10 standard deviations (3.1, a factor 22) up.
    rng = np.random.default_rng(3)
    losses = np.exp(0.3 * rng.standard_t(df=3, size=5000)).astype(np.float32)
    rates = _rates(losses)
    assert START / 10 <= rates.min()
    assert rates.max() <= START * 10


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_cuts_at_once(jit, bad):
    rates = _rates(np.array([1.0, 1.0, bad, 1.0], np.float32), jit=jit)
    np.testing.assert_allclose(rates, [START, START, START / 2, START / 2])


def test_spike_cuts_once_per_threshold_up_to_three_times():
    # Five equal losses leave the spread at zero, so the threshold is ln 1.25 =
    # 0.223; a loss ten times the mean is ln 10 / 0.223 = 10 thresholds up,
    # capped at three halvings.
    losses = np.array([1.0] * 5 + [10.0], np.float32)
    rates = _rates(losses)
    np.testing.assert_allclose(rates, [START] * 5 + [START / 8])


def test_small_spike_cuts_once():
    # ln 1.4 = 0.336 is one threshold (0.223) up, not two.
    losses = np.array([1.0] * 5 + [1.4], np.float32)
    np.testing.assert_allclose(_rates(losses), [START] * 5 + [START / 2])


def _assert_same_leaves(new, old):
    for new_leaf, old_leaf in zip(
        jax.tree.leaves(new), jax.tree.leaves(old), strict=True
    ):
        assert new_leaf.dtype == old_leaf.dtype
        assert new_leaf.shape == old_leaf.shape
        assert new_leaf.weak_type == old_leaf.weak_type


def test_initial_state_is_scalars_of_fixed_dtypes():
    trend = _noise_aware.init_trend()
    for leaf in jax.tree.leaves(trend):
        assert leaf.shape == ()
        assert leaf.dtype in (jnp.float32, jnp.int32, jnp.bool_)
        assert not leaf.weak_type


def test_state_keeps_dtypes_under_jit_and_scan():
    trend = _noise_aware.init_trend()
    decide = jax.jit(_noise_aware.decide)
    factors = (jnp.float32(1.05), jnp.float32(0.5))
    multiplier, new_trend = decide(trend, jnp.float32(1.0), *factors)
    assert multiplier.dtype == jnp.float32 and multiplier.shape == ()
    _assert_same_leaves(new_trend, trend)

    def step(trend, loss):
        multiplier, trend = _noise_aware.decide(trend, loss, *factors)
        return trend, multiplier

    final, multipliers = jax.lax.scan(step, trend, jnp.linspace(2.0, 1.0, 40))
    _assert_same_leaves(final, trend)
    # Falls are decided at calls 4, 8, ..., 40: ten growths.
    assert int(np.sum(np.asarray(multipliers) > 1)) == 10


def test_vmap_over_streams_decides_each_stream_separately():
    falling = np.exp(-0.05 * np.arange(4))
    rising = np.exp(0.01 * np.arange(4))
    flat = np.ones(4)
    streams = jnp.asarray(np.stack([falling, rising, flat], axis=1), jnp.float32)
    factors = (jnp.float32(1.05), jnp.float32(0.5))

    def run(losses):
        def step(trend, loss):
            multiplier, trend = _noise_aware.decide(trend, loss, *factors)
            return trend, multiplier

        return jax.lax.scan(step, _noise_aware.init_trend(), losses)[1]

    multipliers = jax.vmap(run, in_axes=1)(streams)
    np.testing.assert_allclose(multipliers[:, -1], [1.05**4, 0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(multipliers[:, :3], 1.0)


def test_vmap_over_starting_rates_through_the_transform():
    params = jnp.zeros(1)
    losses = jnp.asarray(np.exp(-0.05 * np.arange(4)), jnp.float32)

    def final_rate(rate):
        opt = dynamic_lr(rate, noise_aware=True)

        def step(state, loss):
            _, state = opt.update(jnp.ones(1), state, params, value=loss)
            return state, None

        state, _ = jax.lax.scan(step, opt.init(params), losses)
        return current_learning_rate(state)

    rates = jax.jit(jax.vmap(final_rate))(jnp.array([0.01, 1.0]))
    np.testing.assert_allclose(rates, np.array([0.01, 1.0]) * 1.05**4, rtol=1e-6)
