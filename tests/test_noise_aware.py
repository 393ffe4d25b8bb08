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
    # at the first checkpoint (4 losses) and at every fourth call after it:
    # x1.05^4 each time. The updates are zero, so there is no Polyak guide.
    losses = np.exp(-0.05 * np.arange(12)).astype(np.float32)
    rates = _rates(losses, jit=jit)
    expected = np.full(12, START)
    expected[3:] *= 1.05**4
    expected[7:] *= 1.05**4
    expected[11:] *= 1.05**4
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
    guide = (jnp.float32(0.0), jnp.float32(START))
    multiplier, new_trend = decide(trend, jnp.float32(1.0), *guide, *factors)
    assert multiplier.dtype == jnp.float32 and multiplier.shape == ()
    _assert_same_leaves(new_trend, trend)

    def step(trend, loss):
        multiplier, trend = _noise_aware.decide(trend, loss, *guide, *factors)
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
            multiplier, trend = _noise_aware.decide(
                trend, loss, jnp.float32(0.0), jnp.float32(START), *factors
            )
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
    # A unit gradient and losses near 1 put the Polyak step near 2 and the
    # guide near 0.05 * 2 = 0.1. From 0.01 the first call holds (no earlier
    # loss to compare with), the second and third climb by 1.21 as the loss
    # fell, and the fourth grows by the trend test's 1.05^4 = 1.2155 (more than
    # 1.21). From 1.0, above the guide, only the trend test acts.
    expected = np.array([0.01 * 1.21**2, 1.0]) * 1.05**4
    np.testing.assert_allclose(rates, expected, rtol=1e-6)


def _rates_with_gradient(losses, start, norm=1.0):
    """Like ``_rates``, with a constant update of the given norm."""
    opt = dynamic_lr(start, noise_aware=True, max_learning_rate=1e6)
    params = jnp.zeros(1)
    gradient = jnp.full(1, norm, jnp.float32)

    def step(state, loss):
        _, state = opt.update(gradient, state, params, value=loss)
        return state, current_learning_rate(state)

    _, rates = jax.lax.scan(step, opt.init(params), jnp.asarray(losses, jnp.float32))
    return np.asarray(rates)


def test_far_too_small_rate_climbs_to_the_guide_and_stops():
    # Loss 1 and a unit gradient: the Polyak step 2 * 1 / 1 = 2, the guide
    # 0.05 * 2 = 0.1. From 0.01 the first call holds; then every loss is no
    # higher than the one before, so the rate grows by 1.21 per call while
    # below the guide (0.01 * 1.21^12 = 0.0985), reaches 0.1 on the 14th call
    # and stays there: a constant loss is no trend, and the guide never pushes
    # past itself.
    rates = _rates_with_gradient(np.ones(200), 0.01)
    expected = np.minimum(0.01 * 1.21 ** np.arange(200), 0.1)
    np.testing.assert_allclose(rates, expected, rtol=1e-5)


def test_guide_follows_the_polyak_step():
    # A gradient of norm 2 makes the Polyak step 2 * 1 / 4 = 0.5 and the guide
    # 0.025; a start above it is left alone.
    rates = _rates_with_gradient(np.ones(200), 0.001, norm=2.0)
    assert rates[-1] == pytest.approx(0.025, rel=1e-5)
    np.testing.assert_allclose(_rates_with_gradient(np.ones(50), 0.03, 2.0), 0.03)


def test_no_climb_without_a_gradient_or_a_positive_loss():
    np.testing.assert_allclose(_rates_with_gradient(np.ones(50), 0.01, 0.0), 0.01)
    np.testing.assert_allclose(_rates_with_gradient(np.zeros(50), 0.01), 0.01)


def _state_with_guide(loss_average, lowest_average):
    """A state mid-run: Polyak step 2, given loss averages, a fast average of
    log loss 0 and a previous log loss of 0.5 (so that a loss of 1 fell)."""
    return _noise_aware.init_trend()._replace(
        window_count=jnp.int32(1),
        has_last=jnp.bool_(True),
        last_log_loss=jnp.float32(0.5),
        last_loss=jnp.float32(np.exp(0.5)),
        has_best=jnp.bool_(True),
        has_polyak=jnp.bool_(True),
        log_polyak=jnp.float32(np.log(2.0)),
        loss_average=jnp.float32(loss_average),
        lowest_average=jnp.float32(lowest_average),
    )


def test_climb_waits_while_the_loss_is_well_above_its_lowest():
    # Loss 1 moves the average a tenth of the way: 1.2 -> 1.18 is within 1.5
    # times the lowest (1.0), so the rate climbs by 1.21; 2.0 -> 1.9 is not.
    args = (jnp.float32(1.0), jnp.float32(1.0), jnp.float32(0.01))
    factors = (jnp.float32(1.05), jnp.float32(0.5))
    near, _ = _noise_aware.decide(_state_with_guide(1.2, 1.0), *args, *factors)
    far, _ = _noise_aware.decide(_state_with_guide(2.0, 1.0), *args, *factors)
    assert float(near) == pytest.approx(1.21)
    assert float(far) == 1.0


def test_cut_halves_the_guide():
    trend = _state_with_guide(1.0, 1.0)
    factors = (jnp.float32(1.05), jnp.float32(0.5))
    # A loss of 10 after a flat level is a spike: cut, and the guide's
    # fraction halves from 0.05 to 0.025.
    multiplier, trend = _noise_aware.decide(
        trend, jnp.float32(10.0), jnp.float32(1.0), jnp.float32(0.01), *factors
    )
    assert float(multiplier) == pytest.approx(0.125)
    assert float(trend.climb_fraction) == pytest.approx(0.025)


def test_two_high_losses_in_a_row_cut_where_one_does_not():
    # Alternating losses 1.0 and 1.1 (log step 0.0953) put sigma at
    # sqrt(0.5) * 0.0953 = 0.067: one loss must be 10 sigma = 0.67 above the
    # fast average to cut, two in a row only max(ln 1.25, 3 sigma) = 0.223.
    # A loss of 1.5 is about 0.36 above it: once is noise, twice is a cut
    # (by one halving: 0.32 is less than two thresholds).
    flat = [1.0, 1.1] * 10
    once = np.array(flat + [1.5] + [1.0, 1.1] * 3, np.float32)
    twice = np.array(flat + [1.5, 1.5], np.float32)
    np.testing.assert_allclose(_rates(once), START)
    np.testing.assert_allclose(_rates(twice), [START] * 21 + [START / 2])


def test_rate_agrees_across_a_mapped_axis():
    # Two replicas with different losses and gradient sizes: the loss and the
    # gradient's squared norm are both averaged over the axis, so the Polyak
    # guide, and with it the rate, is the same on both.
    opt = dynamic_lr(0.01, noise_aware=True, axis_name="replica")
    params = jnp.zeros(2)

    def run(gradient_scale, loss_scale):
        def step(state, call):
            loss = loss_scale * jnp.exp(-0.05 * call)
            gradient = gradient_scale * jnp.ones(2)
            _, state = opt.update(gradient, state, params, value=loss)
            return state, current_learning_rate(state)

        return jax.lax.scan(step, opt.init(params), jnp.arange(20.0))[1]

    rates = jax.vmap(run, axis_name="replica")(
        jnp.array([1.0, 3.0]), jnp.array([1.0, 2.0])
    )
    np.testing.assert_array_equal(rates[0], rates[1])
    assert float(rates[0, -1]) > 0.01 * 1.1**3


@pytest.mark.parametrize("seed", range(20))
def test_strictly_rising_losses_never_grow_the_rate_nor_falling_ones_cut_it(seed):
    # The property of the plain rule's inverted-comparison case, here with a
    # far too small rate and a unit gradient, where the climb is active: it
    # acts only on calls whose loss did not rise.
    rng = np.random.default_rng(seed)
    relative_steps = rng.uniform(1e-3, 0.5, size=80)
    rising = np.cumprod(1.0 + relative_steps).astype(np.float32)
    falling = np.cumprod(1.0 / (1.0 + relative_steps)).astype(np.float32)
    rising_rates = _rates_with_gradient(rising, 1e-3)
    falling_rates = _rates_with_gradient(falling, 1e-3)
    start = np.float32(1e-3)
    assert np.all(np.diff(np.concatenate([[start], rising_rates])) <= 0)
    assert np.all(np.diff(np.concatenate([[start], falling_rates])) >= 0)


def test_a_zero_loss_does_not_make_the_next_ordinary_loss_a_spike():
    # Zero reads as the floor, 1.19e-7 times the first loss: about 16 below the
    # log loss of 0.5, yet it enters the fast average only three thresholds
    # down, so the next loss of 0.5 is no spike. Zero gradients: no climb.
    losses = np.array([0.5, 0.52, 0.48, 0.51, 0.49, 0.0, 0.5, 0.52, 0.48], np.float32)
    np.testing.assert_allclose(_rates(losses), START)


def test_losses_falling_to_zero_stop_growing_the_rate():
    # A loss halving every call falls below the floor (1.19e-7 times the first
    # loss) after about 23 calls, and soon reads as flat. The deterministic
    # fall grows the rate at calls 4 to 20 and 28 (at 24 the four log losses
    # bend into the floor, too curved for the 4-point test). The window opened
    # after call 28 holds
    # the last of the fall and then a flat floor, a slope still significant at
    # the 256-call checkpoint (call 284): one more growth, then nothing, as the
    # exact zeros and leftover 1e-15 losses that follow read as the floor too.
    falling = 0.5 ** np.arange(150)
    losses = np.concatenate([falling, np.tile([0.0, 1e-15], 100)]).astype(np.float32)
    rates = _rates(losses)
    grew = np.flatnonzero(np.diff(np.concatenate([[np.float32(START)], rates])))
    np.testing.assert_array_equal(grew + 1, [4, 8, 12, 16, 20, 28, 284])
    np.testing.assert_allclose(rates[-1], START * 1.05 ** (4 * 7), rtol=1e-5)


def test_a_loss_near_the_float32_maximum_leaves_the_state_finite():
    # 2 * loss overflows float32 for a loss above 1.7e38; the Polyak step is
    # formed in log space. The spike cuts 8x and halves the guide's fraction to
    # 0.025; once the loss's average has come back down, the rate climbs to the
    # new guide 0.025 * 2 = 0.05.
    opt = dynamic_lr(1e-4, noise_aware=True)
    params = jnp.zeros(1)
    state = opt.init(params)
    losses = np.array([1.0, 3e38] + [1.0] * 1500, np.float32)
    update = jax.jit(opt.update)
    for loss in losses:
        _, state = update(jnp.ones(1), state, params, value=loss)
        assert np.all(np.isfinite(np.asarray(state.trend)))
    assert float(current_learning_rate(state)) == pytest.approx(0.05, rel=1e-5)


def test_a_divergence_is_cut_on_every_rising_loss():
    # After a quiet stretch (1.0 and 1.1 in turn), losses that triple on every
    # call: the first is a spike, and each later one, above the spike that
    # became the reference, is the second of a pair and cuts again.
    quiet = [1.0, 1.1] * 50
    losses = np.array(quiet + [3.0**k for k in range(1, 7)], np.float32)
    rates = _rates(losses)
    assert np.all(rates[:100] == START)
    assert np.all(np.diff(rates[99:]) < 0)


def test_a_first_loss_at_the_float32_maximum_leaves_the_state_finite():
    # The floor is then 1.19e-7 * 3.4e38 = 4e31, and loss + floor would round
    # to inf in float32; it is added in log space. Every later loss lies far
    # below that floor, so all of them read as the floor: one high point and
    # then a flat line, never a significant slope (its t statistic stays near
    # 2), so the rate holds, whatever the later losses do.
    huge = np.finfo(np.float32).max
    losses = np.array([huge] + [1.0, 1.1] * 50 + [3.0**k for k in range(1, 7)])
    opt = dynamic_lr(START, noise_aware=True)
    params = jnp.zeros(1)
    state = opt.init(params)
    update = jax.jit(opt.update)
    rates = []
    for loss in losses.astype(np.float32):
        _, state = update(jnp.zeros(1), state, params, value=loss)
        assert np.all(np.isfinite(np.asarray(state.trend)))
        rates.append(float(current_learning_rate(state)))
    np.testing.assert_allclose(rates, START)


def test_losses_one_float32_step_apart_are_not_equal_for_the_climb():
    # Near 100 successive float32 numbers have the same float32 log; the climb
    # compares the losses themselves, so a loss one step up is a rise and the
    # far too small rate (guide 0.05 * 2 * 100 / 3 = 3.3) does not climb.
    losses = [np.float32(100.0)]
    for _ in range(59):
        losses.append(np.nextafter(losses[-1], np.float32(np.inf)))
    opt = dynamic_lr(1e-4, noise_aware=True)
    params = jnp.zeros(3)

    def step(state, loss):
        _, state = opt.update(jnp.ones(3), state, params, value=loss)
        return state, current_learning_rate(state)

    _, rates = jax.lax.scan(step, opt.init(params), jnp.asarray(losses))
    assert np.all(np.asarray(rates) <= np.float32(1e-4))


def test_losses_of_zero_before_any_positive_one_change_nothing():
    # Without a first positive loss there is no floor to read zero against:
    # the zeros leave the statistics as they were, and the tiny losses after
    # them set the floor and read as flat, so nothing cuts.
    losses = np.array([0.0, 0.0, 0.0, 1e-15, 1e-15, 1e-15], np.float32)
    np.testing.assert_allclose(_rates(losses), START)
    opt = dynamic_lr(START, noise_aware=True)
    state = opt.init(jnp.zeros(1))
    fresh = np.asarray(state.trend)
    _, state = opt.update(jnp.zeros(1), state, jnp.zeros(1), value=0.0)
    np.testing.assert_array_equal(np.asarray(state.trend), fresh)


def test_a_traced_negative_decrease_factor_still_cuts():
    # Checked at construction a negative factor is refused; traced (under jit)
    # it cannot be, and it must not turn a cut into growth: (-2)^2 = 4. It is
    # read as 0, so the spike at 1.7 sends the rate to its floor.
    losses = jnp.asarray([1.0, 1.0, 1.0, 1.0, 1.7], jnp.float32)

    def rates(decrease):
        opt = dynamic_lr(START, decrease_factor=decrease, noise_aware=True)
        params = jnp.zeros(1)

        def step(state, loss):
            _, state = opt.update(jnp.zeros(1), state, params, value=loss)
            return state, current_learning_rate(state)

        return jax.lax.scan(step, opt.init(params), losses)[1]

    result = np.asarray(jax.jit(rates)(jnp.float32(-2.0)))
    np.testing.assert_allclose(result[:4], START)
    assert result[4] == np.float32(1e-10)


def test_a_noise_aware_state_is_refused_by_the_plain_rule():
    state = dynamic_lr(START, noise_aware=True).init(jnp.zeros(1))
    with pytest.raises(ValueError, match="made with noise_aware=True"):
        dynamic_lr(START).update(jnp.zeros(1), state, value=1.0)
