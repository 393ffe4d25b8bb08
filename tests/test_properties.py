"""Properties of the rule over generated losses, gradients and hyperparameters.

Each property runs one jitted ``lax.scan`` whose hyperparameters are traced
arguments, so a single compilation serves every generated example.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optax_dynlr import dynamic_lr

NAN = float("nan")
INF = float("inf")
LENGTH = 16
SIZE = 3

fast = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# Losses on a grid of quarters, so that every threshold previous + atol +
# rtol * |previous| is exact in float32 for the tolerances below, plus the
# non-finite values.
grid_losses = st.lists(
    st.one_of(
        st.integers(-16, 16).map(lambda k: k / 4),
        st.sampled_from([NAN, INF, -INF]),
    ),
    min_size=LENGTH,
    max_size=LENGTH,
).map(lambda xs: np.array(xs, np.float32))

any_losses = st.lists(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    min_size=LENGTH,
    max_size=LENGTH,
).map(lambda xs: np.array(xs, np.float32))


@st.composite
def hyperparameters(draw):
    low = draw(st.floats(1e-6, 1e-2))
    high = draw(st.floats(1.0, 1e6))
    return {
        "learning_rate": draw(st.floats(low, high)),
        "increase_factor": draw(st.floats(1.0001, 4.0)),
        "decrease_factor": draw(st.floats(0.01, 0.9999)),
        "min_learning_rate": low,
        "max_learning_rate": high,
        "rtol": draw(st.sampled_from([0.0, 0.25, 0.5])),
        "atol": draw(st.sampled_from([0.0, 0.25, 1.0])),
    }


def reference(losses, hyper):
    """The rule in NumPy float32, with its counters."""
    f32 = np.float32
    rate = f32(
        np.clip(
            f32(hyper["learning_rate"]),
            f32(hyper["min_learning_rate"]),
            f32(hyper["max_learning_rate"]),
        )
    )
    previous = None
    rates, falls, rises = [], 0, 0
    for loss in losses:
        multiplier = f32(1.0)
        if not np.isfinite(loss):
            multiplier = f32(hyper["decrease_factor"])
        elif previous is not None:
            threshold = (
                previous + f32(hyper["atol"]) + f32(hyper["rtol"]) * abs(previous)
            )
            if loss < previous:
                multiplier = f32(hyper["increase_factor"])
            elif loss > threshold:
                multiplier = f32(hyper["decrease_factor"])
        falls += int(multiplier > 1)
        rises += int(multiplier < 1)
        rate = min(
            max(rate * multiplier, f32(hyper["min_learning_rate"])),
            f32(hyper["max_learning_rate"]),
        )
        if np.isfinite(loss):
            previous = loss
        rates.append(rate)
    return np.array(rates, np.float32), falls, rises


@jax.jit
def run_rule(losses, grads, hyper):
    """dynamic_lr alone over the losses; per-call rates and updates, final state."""
    opt = dynamic_lr(**hyper)

    def body(state, inputs):
        loss, grad = inputs
        updates, state = opt.update(grad, state, value=loss)
        return state, (state.learning_rate, updates)

    state, (rates, updates) = jax.lax.scan(
        body, opt.init(jnp.zeros(SIZE)), (losses, grads)
    )
    return rates, updates, state


def ones(dtype=jnp.float32):
    return jnp.ones((LENGTH, SIZE), dtype)


@fast
@given(losses=grid_losses, hyper=hyperparameters())
def test_rates_and_counts_match_a_float32_reference(losses, hyper):
    rates, _, state = run_rule(losses, ones(), hyper)
    expected, falls, rises = reference(losses, hyper)

    np.testing.assert_array_equal(np.asarray(rates), expected)
    assert int(state.num_falls) == falls
    assert int(state.num_rises) == rises
    assert int(state.num_nonfinite) == int(np.sum(~np.isfinite(losses)))
    assert int(state.count) == LENGTH


@fast
@given(
    losses=any_losses,
    hyper=hyperparameters(),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_losses_keep_the_rate_in_bounds_and_the_state_finite(losses, hyper, seed):
    grads = np.random.default_rng(seed).normal(size=(LENGTH, SIZE)).astype(np.float32)
    rates, updates, state = run_rule(losses, jnp.asarray(grads), hyper)
    rates = np.asarray(rates)

    assert np.all(rates >= np.float32(hyper["min_learning_rate"]))
    assert np.all(rates <= np.float32(hyper["max_learning_rate"]))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state))
    assert np.all(np.isfinite(np.asarray(updates)))


@fast
@given(losses=grid_losses, hyper=hyperparameters(), seed=st.integers(0, 2**32 - 1))
def test_updates_are_the_rate_times_the_incoming_updates(losses, hyper, seed):
    grads = np.random.default_rng(seed).normal(size=(LENGTH, SIZE)).astype(np.float32)
    rates, updates, _ = run_rule(losses, jnp.asarray(grads), hyper)
    rates, updates = np.asarray(rates), np.asarray(updates)

    # A single float32 product per element; zero where the loss is not finite.
    expected = np.where(
        np.isfinite(losses)[:, None], rates[:, None] * grads, np.float32(0.0)
    )
    np.testing.assert_array_equal(updates, expected)


@fast
@given(losses=grid_losses, hyper=hyperparameters())
def test_zero_gradients_give_zero_updates(losses, hyper):
    _, updates, _ = run_rule(losses, jnp.zeros((LENGTH, SIZE)), hyper)
    np.testing.assert_array_equal(np.asarray(updates), 0.0)


@fast
@given(
    losses=grid_losses,
    hyper=hyperparameters(),
    shift=st.integers(-64, 64).map(lambda k: k / 4),
)
def test_shifting_every_loss_leaves_the_rates_alone_without_rtol(losses, hyper, shift):
    # Only differences between losses matter when the tolerance is absolute;
    # quarters shifted by quarters stay exact in float32.
    hyper = {**hyper, "rtol": 0.0}
    rates, _, _ = run_rule(losses, ones(), hyper)
    shifted, _, _ = run_rule(losses + np.float32(shift), ones(), hyper)
    np.testing.assert_array_equal(np.asarray(shifted), np.asarray(rates))


@fast
@given(
    losses=grid_losses,
    hyper=hyperparameters(),
    power=st.integers(-20, 20),
)
def test_scaling_every_loss_leaves_the_rates_alone_without_atol(losses, hyper, power):
    # A positive power of two scales losses and relative thresholds exactly.
    hyper = {**hyper, "atol": 0.0}
    rates, _, _ = run_rule(losses, ones(), hyper)
    scaled, _, _ = run_rule(losses * np.float32(2.0**power), ones(), hyper)
    np.testing.assert_array_equal(np.asarray(scaled), np.asarray(rates))


@jax.jit
def run_rejection(losses, incoming, hyper):
    """dynamic_lr with rejection alone; parameters before and after each call."""
    opt = dynamic_lr(**hyper, reject_steps=True)

    def body(carry, inputs):
        params, state = carry
        loss, update_in = inputs
        updates, new_state = opt.update(update_in, state, params, value=loss)
        new_params = optax.apply_updates(params, updates)
        # Accepted: finite and not taken back (a rise at the floor is accepted).
        accepted = (new_state.num_rejections == state.num_rejections) & (
            new_state.num_nonfinite == state.num_nonfinite
        )
        return (new_params, new_state), (
            params,
            new_params,
            new_state.learning_rate,
            accepted,
            new_state.num_rejections,
        )

    init = (jnp.zeros(SIZE), opt.init(jnp.zeros(SIZE)))
    _, outputs = jax.lax.scan(body, init, (losses, incoming))
    return outputs


@fast
@given(losses=grid_losses, hyper=hyperparameters(), seed=st.integers(0, 2**32 - 1))
def test_rejection_keeps_parameters_on_the_last_accepted_ray(losses, hyper, seed):
    # After every call the parameters equal accepted_point + rate * direction,
    # where the accepted point is where the last accepted loss was measured and
    # the direction is the update that came in there.
    incoming = np.random.default_rng(seed).normal(size=(LENGTH, SIZE))
    before, after, rates, accepted, rejections = (
        np.asarray(x)
        for x in run_rejection(losses, jnp.asarray(incoming, jnp.float32), hyper)
    )

    point, direction = np.zeros(SIZE), np.zeros(SIZE)
    largest = 1.0
    for call in range(LENGTH):
        if accepted[call]:
            point = before[call].astype(np.float64)
            direction = incoming[call].astype(np.float32).astype(np.float64)
        expected = point + np.float64(rates[call]) * direction
        # float32 rounding of every earlier step stays in the parameters, each
        # at most an epsilon of the largest value met so far.
        largest = max(
            largest,
            np.abs(before[call]).max(),
            np.abs(after[call]).max(),
            np.abs(rates[call] * incoming[call]).max(),
        )
        np.testing.assert_allclose(after[call], expected, rtol=0, atol=1e-5 * largest)
    # Every call not accepted after the first accepted one is a rejection; a
    # non-finite loss before that has no step to take back.
    seen_accepted = np.cumsum(accepted) > 0
    after_first = np.concatenate([[False], seen_accepted[:-1]])
    np.testing.assert_array_equal(rejections, np.cumsum(~accepted & after_first))
