"""Properties of step rejection (``reject_steps=True``) on full-batch problems."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optax_dynlr import current_learning_rate, dynamic_lr, find_dynamic_lr_state

# An ill-conditioned quadratic: curvatures 1, 10 and 100, minimum at (1, -2, 0.5).
CURVATURES = jnp.array([1.0, 10.0, 100.0])
MINIMUM = jnp.array([1.0, -2.0, 0.5])


def quadratic(params):
    centred = params.astype(jnp.float32) - MINIMUM
    return 0.5 * jnp.sum(CURVATURES * centred**2)


def logistic_regression():
    """Loss of logistic regression on breast cancer data (standardised), and w0."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    features = (data.data - data.data.mean(0)) / data.data.std(0)
    inputs = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(data.target, jnp.float32)

    def loss(weights):
        return optax.sigmoid_binary_cross_entropy(inputs @ weights, labels).mean()

    return loss, jnp.zeros(inputs.shape[1], jnp.float32)


def run(loss_fn, opt, params, steps):
    """Full-batch training under lax.scan; per call: loss, rate, rejected, params."""

    def step(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, new_state = opt.update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)
        old, new = find_dynamic_lr_state(state), find_dynamic_lr_state(new_state)
        rejected = new.num_rejections > old.num_rejections
        record = (loss, new.learning_rate, rejected, params)
        return (params, new_state), record

    (params, state), record = jax.lax.scan(
        step, (params, opt.init(params)), None, length=steps
    )
    return params, state, record


@pytest.mark.parametrize("start", [10.0, 100.0, 1e4])
@pytest.mark.parametrize("problem", ["quadratic", "logistic regression"])
def test_accepted_losses_never_rise_from_large_starting_rates(problem, start):
    if problem == "quadratic":
        loss_fn, params = quadratic, jnp.zeros(3, jnp.float32)
    else:
        loss_fn, params = logistic_regression()
    opt = optax.chain(dynamic_lr(start, reject_steps=True), optax.sgd(1.0))

    params, state, (losses, rates, rejected, trajectory) = jax.jit(
        lambda p: run(loss_fn, opt, p, 150)
    )(params)

    losses, rejected = np.asarray(losses), np.asarray(rejected)
    accepted = losses[~rejected]
    # Every start here is above 2 / (largest curvature), so the first step
    # overshoots and at least one call is rejected.
    assert rejected.any()
    # A call is accepted only if its loss is at most the one remembered from the
    # last accepted call, which is the best so far: compared with rtol = atol = 0.
    assert np.all(accepted[1:] <= np.minimum.accumulate(accepted)[:-1])
    assert find_dynamic_lr_state(state).previous_value == accepted[-1]
    assert bool(jnp.all(jnp.isfinite(trajectory)))
    assert np.all(np.isfinite(np.asarray(rates)))
    # The runs get somewhere: the last accepted loss is well below the first.
    assert accepted[-1] < 0.5 * accepted[0]


def injected_run(params, start, low, high, nonfinite_kind, steps):
    """The quadratic with the loss replaced by nan, inf or -inf where kind > 0."""
    opt = optax.chain(
        dynamic_lr(
            start,
            min_learning_rate=low,
            max_learning_rate=high,
            reject_steps=True,
        ),
        optax.sgd(1.0),
    )
    replacements = jnp.array([0.0, jnp.nan, jnp.inf, -jnp.inf], jnp.float32)

    def step(carry, kind):
        params, state = carry
        loss, grads = jax.value_and_grad(quadratic)(params)
        value = jnp.where(kind > 0, replacements[kind], loss)
        updates, state = opt.update(grads, state, params, value=value)
        params = optax.apply_updates(params, updates)
        return (params, state), (params, current_learning_rate(state))

    (params, state), (trajectory, rates) = jax.lax.scan(
        step, (params, opt.init(params)), nonfinite_kind
    )
    return state, trajectory, rates


INJECTED_LENGTH = 40
injected_run_jit = jax.jit(injected_run, static_argnames="steps")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(
        st.sampled_from([0, 0, 0, 1, 2, 3]),
        min_size=INJECTED_LENGTH,
        max_size=INJECTED_LENGTH,
    ),
    log_start=st.floats(-3.0, 4.0),
    low=st.sampled_from([1e-10, 1e-4, 1e-2]),
    high=st.sampled_from([1e4, 1e10]),
)
def test_nonfinite_losses_keep_parameters_finite_and_rate_in_bounds(
    kinds, log_start, low, high
):
    kinds = np.array(kinds, np.int32)
    state, trajectory, rates = injected_run_jit(
        jnp.zeros(3, jnp.float32),
        jnp.float32(10.0**log_start),
        jnp.float32(low),
        jnp.float32(high),
        kinds,
        steps=INJECTED_LENGTH,
    )

    assert bool(jnp.all(jnp.isfinite(trajectory)))
    rates = np.asarray(rates)
    assert np.all(rates >= np.float32(low)) and np.all(rates <= np.float32(high))
    dynamic = find_dynamic_lr_state(state)
    assert int(dynamic.num_nonfinite) == int(np.sum(kinds > 0))
    # A non-finite loss after the first finite one is always a rejection; one at
    # the very first calls has nothing to take back.
    first_finite = int(np.argmax(kinds == 0)) if np.any(kinds == 0) else len(kinds)
    assert int(dynamic.num_rejections) >= int(np.sum(kinds[first_finite:] > 0))


def bf16_params():
    return {
        "w": jnp.array([[0.5, -1.0], [2.0, 0.25]], jnp.bfloat16),
        "b": jnp.array([1.0, -0.5], jnp.bfloat16),
    }


def bf16_loss(params):
    # Curvature 3 in every direction: a rate above 2/3 overshoots.
    return 1.5 * sum(
        jnp.sum(leaf.astype(jnp.float32) ** 2) for leaf in jax.tree.leaves(params)
    )


WRAPPERS = {
    "chain": lambda inner: inner,
    "multi_steps": lambda inner: optax.MultiSteps(inner, every_k_schedule=2),
    "apply_if_finite": lambda inner: optax.apply_if_finite(
        inner, max_consecutive_errors=3
    ),
}


def dtypes(tree):
    return jax.tree.map(lambda leaf: jnp.asarray(leaf).dtype, tree)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_bf16_rejection_under_jit_and_scan_in_wrappers(wrapper):
    opt = WRAPPERS[wrapper](
        optax.chain(dynamic_lr(2.0, reject_steps=True), optax.sgd(1.0))
    )
    params = bf16_params()
    state = opt.init(params)
    state_dtypes = dtypes(state)
    traces = []

    @jax.jit
    def train_step(params, state):
        traces.append(None)
        loss, grads = jax.value_and_grad(bf16_loss)(params)
        updates, state = opt.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state, updates

    for _ in range(6):
        params, state, updates = train_step(params, state)
        assert dtypes(updates) == dtypes(params)
        assert dtypes(state) == state_dtypes
    assert len(traces) == 1
    assert dtypes(params) == dtypes(bf16_params())

    def scan_step(carry, _):
        params, state, _ = train_step(*carry)
        return (params, state), None

    (params, state), _ = jax.jit(
        lambda carry: jax.lax.scan(scan_step, carry, None, length=10)
    )((params, state))
    assert dtypes(state) == state_dtypes
    dynamic = find_dynamic_lr_state(state)
    assert jax.tree.leaves(dynamic.accepted_direction)[0].dtype == jnp.bfloat16
    # Rate 2 on curvature 3 overshoots, so the rejection path ran.
    assert int(dynamic.num_rejections) >= 1
    assert bool(jnp.all(jnp.isfinite(jnp.stack([bf16_loss(params)]))))
    assert float(bf16_loss(params)) < float(bf16_loss(bf16_params()))


@pytest.mark.parametrize("start", [0.5, 100.0])
def test_last_after_sgd_gives_the_trajectory_of_before_sgd(start):
    loss_fn, params = logistic_regression()
    before = optax.chain(dynamic_lr(start, reject_steps=True), optax.sgd(1.0))
    after = optax.chain(optax.sgd(1.0), dynamic_lr(start, reject_steps=True))

    _, state_before, (_, _, rejected_before, path_before) = jax.jit(
        lambda p: run(loss_fn, before, p, 120)
    )(params)
    _, state_after, (_, _, rejected_after, path_after) = jax.jit(
        lambda p: run(loss_fn, after, p, 120)
    )(params)

    # sgd(1.0) only negates, which is exact, so the undo lands on the same
    # float32 numbers whichever side of it the rate is applied.
    assert int(find_dynamic_lr_state(state_before).num_rejections) >= 1
    np.testing.assert_array_equal(rejected_before, rejected_after)
    np.testing.assert_allclose(path_after, path_before, rtol=1e-6, atol=1e-7)


def one_dimensional_run(dtype, start, value, steps=100):
    """0.5 (p - 1)^2 from p = value; returns the final loss and rate."""

    def loss_fn(params):
        return 0.5 * jnp.sum((params.astype(jnp.float32) - 1.0) ** 2)

    opt = optax.chain(dynamic_lr(start, reject_steps=True), optax.sgd(1.0))
    params, state, _ = jax.jit(lambda p: run(loss_fn, opt, p, steps))(
        jnp.full((1,), value, dtype)
    )
    return float(loss_fn(params)), float(current_learning_rate(state))


@pytest.mark.parametrize(
    "dtype, start, value, steps",
    [(jnp.bfloat16, 1000.0, 1.52, 100), (jnp.float32, 1e9, 0.8, 200)],
)
def test_a_far_too_large_start_does_not_freeze_the_parameters(
    dtype, start, value, steps
):
    # The first step moves p by about start * |p - 1|: to about -518 in
    # bfloat16 (spacing 4 there) and 2e8 in float32 (spacing 16). The undo is
    # rounded at that magnitude, so the accepted point is lost: the retries close
    # in on a point about 2 (bfloat16) or 4 (float32) away from 1 instead, above
    # the accepted loss, and are cut until a retry would be lost to rounding (a
    # rate near 2e-3 in bfloat16, 6e-7 in float32). That point is then kept and
    # the rate grows by 1.1 per call: about 65 (bfloat16) or 150 (float32) calls
    # to reach a rate near 1, after which 0.5 (p - 1)^2 shrinks by (1 - rate)^2
    # per call and ends far below 1e-3 within the calls given.
    loss, rate = one_dimensional_run(dtype, start, value, steps)
    assert rate > 1e-10
    assert loss < 1e-3
