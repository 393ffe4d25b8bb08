"""Inputs on which learning-rate schedulers of this kind have gone wrong.

Unless a test says otherwise: ``dynamic_lr(0.1)`` (factors 1.05 and 0.5)
chained before ``optax.sgd(1.0)``, gradients of ones, and "rates" are the rate
read after each call, which is the one that scaled that call's update.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from worked_factors import dynamic_lr  # factors 1.05 and 0.5

from optax_dynlr import (
    current_learning_rate,
    find_dynamic_lr_state,
)

NAN = float("nan")
INF = float("inf")

eager_and_jit = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def default_chain(**kwargs):
    return optax.chain(
        dynamic_lr(kwargs.pop("learning_rate", 0.1), **kwargs), optax.sgd(1.0)
    )


def run_losses(opt, losses, params=None, jit=False):
    """One call per loss with gradients of ones; rates, updates, final params."""
    if params is None:
        params = jnp.zeros(2)
    grads = jax.tree.map(jnp.ones_like, params)

    def step(state, params, loss):
        return opt.update(grads, state, params, value=loss)

    if jit:
        step = jax.jit(step)
    state = opt.init(params)
    rates, all_updates = [], []
    for loss in losses:
        updates, state = step(state, params, loss)
        params = optax.apply_updates(params, updates)
        rates.append(current_learning_rate(state))
        all_updates.append(updates)
    return np.array(rates), all_updates, params, state


def scan_rates(opt, losses, params=None):
    """Rates and final parameters of one call per loss, under jit and scan."""
    if params is None:
        params = jnp.zeros(2)

    @jax.jit
    def run(losses):
        def body(carry, loss):
            params, state = carry
            updates, state = opt.update(
                jnp.ones_like(params), state, params, value=loss
            )
            params = optax.apply_updates(params, updates)
            return (params, state), current_learning_rate(state)

        (params_out, state), rates = jax.lax.scan(
            body, (params, opt.init(params)), losses
        )
        return rates, params_out, state

    return run(jnp.asarray(losses, jnp.float32))


def float32_reference(losses, rate, increase, decrease, low, high):
    """The rule in NumPy float32, one step at a time, without tolerance."""
    rate, increase, decrease = (
        np.float32(rate),
        np.float32(increase),
        np.float32(decrease),
    )
    low, high = np.float32(low), np.float32(high)
    previous = None
    rates = []
    for loss in np.asarray(losses, np.float32):
        if not np.isfinite(loss):
            rate = max(rate * decrease, low)
        elif previous is not None and loss < previous:
            rate = min(rate * increase, high)
        elif previous is not None and loss > previous:
            rate = max(rate * decrease, low)
        if np.isfinite(loss):
            previous = loss
        rates.append(rate)
    return np.array(rates, np.float32)


# ---------------------------------------------------------------------------
# Direction of the comparison.


@eager_and_jit
def test_strictly_rising_losses_halve_the_rate_every_call(jit):
    rates, _, _, _ = run_losses(default_chain(), [1.0, 1.2, 1.5, 1.9], jit=jit)
    np.testing.assert_allclose(rates, [0.1, 0.05, 0.025, 0.0125], rtol=1e-7)


@eager_and_jit
def test_strictly_falling_losses_grow_the_rate_every_call(jit):
    rates, _, _, _ = run_losses(default_chain(), [1.9, 1.5, 1.2, 1.0], jit=jit)
    np.testing.assert_allclose(rates, [0.1, 0.105, 0.11025, 0.1157625], rtol=1e-6)


_LENGTH = 12


@jax.jit
def _traced_rates(losses, learning_rate, increase, decrease, low, high):
    # Hyperparameters are traced, so one compilation serves every example.
    opt = dynamic_lr(learning_rate, increase, decrease, low, high)

    def body(state, loss):
        _, state = opt.update(jnp.ones(1), state, value=loss)
        return state, state.learning_rate

    _, rates = jax.lax.scan(body, opt.init(jnp.zeros(1)), losses)
    return rates


hyperparameters = st.fixed_dictionaries(
    {
        "learning_rate": st.floats(1e-4, 1.0),
        "increase": st.floats(1.0001, 3.0),
        "decrease": st.floats(0.01, 0.9999),
    }
)


def monotonic_losses(sign):
    @st.composite
    def build(draw):
        start = draw(st.floats(-1e3, 1e3))
        steps = draw(
            st.lists(st.floats(1e-2, 1e2), min_size=_LENGTH - 1, max_size=_LENGTH - 1)
        )
        losses = np.float32(start + sign * np.cumsum([0.0, *steps]))
        assume(np.all(sign * np.diff(losses) > 0))
        return losses

    return build()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(losses=monotonic_losses(+1), hyper=hyperparameters)
def test_rates_never_grow_on_strictly_rising_losses(losses, hyper):
    rates = np.asarray(
        _traced_rates(
            losses,
            hyper["learning_rate"],
            hyper["increase"],
            hyper["decrease"],
            1e-10,
            1e10,
        )
    )
    assert np.all(np.diff(rates) <= 0)
    # Every call after the first is a rise: rate * decrease each time, until
    # the floor.
    assert rates[1] < rates[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(losses=monotonic_losses(-1), hyper=hyperparameters)
def test_rates_never_shrink_on_strictly_falling_losses(losses, hyper):
    rates = np.asarray(
        _traced_rates(
            losses,
            hyper["learning_rate"],
            hyper["increase"],
            hyper["decrease"],
            1e-10,
            1e10,
        )
    )
    assert np.all(np.diff(rates) >= 0)
    assert rates[1] > rates[0]


# ---------------------------------------------------------------------------
# Endless tiny improvements.


def _tiny_improvements():
    losses = (1.0 - 1e-6 * np.arange(2000)).astype(np.float32)
    # Each 1e-6 step spans about 17 float32 spacings, so every loss falls.
    assert np.all(np.diff(losses) < 0)
    return losses


def test_endless_tiny_improvements_stop_exactly_at_the_cap():
    losses = _tiny_improvements()
    rates, params, _ = scan_rates(default_chain(max_learning_rate=1.0), losses)
    rates = np.asarray(rates)

    # 0.1 * 1.05**47 is 0.99 and 0.1 * 1.05**48 is 1.04: the 49th call is the
    # first to hit the cap, and every later one stays on it.
    assert rates[47] < 1.0
    assert np.all(rates[48:] == np.float32(1.0))
    assert np.all(rates <= np.float32(1.0))
    np.testing.assert_array_equal(
        rates, float32_reference(losses, 0.1, 1.05, 0.5, 1e-10, 1.0)
    )
    assert np.all(np.isfinite(params))


def test_endless_tiny_improvements_stay_finite_with_the_default_bounds():
    losses = _tiny_improvements()
    # Without a cap, float32 overflows within these 2,000 calls.
    with np.errstate(over="ignore"):
        uncapped = float32_reference(losses, 0.1, 1.05, 0.5, 0.0, np.inf)
    assert np.isinf(uncapped[-1])

    rates, params, state = scan_rates(default_chain(), losses)
    rates = np.asarray(rates)
    assert np.all(np.isfinite(rates))
    assert rates[-1] == np.float32(1e10)
    np.testing.assert_array_equal(
        rates, float32_reference(losses, 0.1, 1.05, 0.5, 1e-10, 1e10)
    )
    assert np.all(np.isfinite(params))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state))


# ---------------------------------------------------------------------------
# Floors: none hidden, the given one exact, the default one alive.


@eager_and_jit
def test_a_small_rate_keeps_halving_with_no_hidden_floor(jit):
    losses = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    rates, _, _, _ = run_losses(default_chain(learning_rate=1e-7), losses, jit=jit)

    np.testing.assert_allclose(
        rates, [1e-7, 5e-8, 2.5e-8, 1.25e-8, 6.25e-9, 3.125e-9], rtol=1e-6
    )
    # Halving is exact in float32.
    np.testing.assert_array_equal(
        rates, np.float32(1e-7) * np.float32(0.5) ** np.arange(6)
    )


@eager_and_jit
def test_rate_lands_exactly_on_the_floor_and_a_fall_lifts_it(jit):
    # 0.1 halves to 0.0015625 at the 7th call; 0.00078125 would be below the
    # floor, so the 8th to 10th calls sit on float32(1e-3).
    losses = [float(k) for k in range(1, 11)] + [0.5]
    rates, _, _, _ = run_losses(default_chain(min_learning_rate=1e-3), losses, jit=jit)

    np.testing.assert_allclose(rates[6], 0.0015625, rtol=1e-6)
    assert np.all(rates[7:10] == np.float32(1e-3))
    assert rates[10] == np.float32(1e-3) * np.float32(1.05)
    np.testing.assert_allclose(rates[10], 1.05e-3, rtol=1e-6)


def test_default_floor_keeps_the_rate_alive_after_many_halvings():
    losses = np.arange(1, 201, dtype=np.float32).tolist() + [0.0]
    # About 147 float32 halvings take 0.1 to zero, and zero never grows.
    assert float32_reference(losses[:200], 0.1, 1.05, 0.5, 0.0, np.inf)[-1] == 0.0

    rates, params, _ = scan_rates(default_chain(), losses)
    rates = np.asarray(rates)
    assert rates[199] == np.float32(1e-10)
    assert rates[200] == np.float32(1e-10) * np.float32(1.05)
    assert np.all(rates > 0)
    assert np.all(np.isfinite(params))


# ---------------------------------------------------------------------------
# Nonsense hyperparameters.


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"increase_factor": 0.95}, "increase_factor"),
        ({"decrease_factor": 1.5}, "decrease_factor"),
        ({"decrease_factor": -0.5}, "decrease_factor"),
        ({"min_learning_rate": 0.5, "max_learning_rate": 0.01}, "min_learning_rate"),
        ({"learning_rate": 0.0}, r"\blearning_rate"),
        ({"learning_rate": -0.1}, r"\blearning_rate"),
    ],
)
def test_nonsense_hyperparameters_raise_at_construction(kwargs, name):
    kwargs = {"learning_rate": 0.1, **kwargs}
    with pytest.raises(ValueError, match=name):
        dynamic_lr(**kwargs)


def test_min_above_max_error_names_both_bounds():
    with pytest.raises(ValueError, match="max_learning_rate"):
        dynamic_lr(0.1, min_learning_rate=0.5, max_learning_rate=0.01)


@eager_and_jit
def test_injected_hyperparameters_work_traced_and_concrete(jit):
    opt = optax.chain(
        optax.inject_hyperparams(dynamic_lr)(
            learning_rate=0.1,
            increase_factor=1.05,
            decrease_factor=0.5,
            min_learning_rate=1e-4,
            max_learning_rate=1.0,
        ),
        optax.sgd(1.0),
    )
    rates, updates, params, _ = run_losses(opt, [1.0, 0.9, 1.2], jit=jit)

    np.testing.assert_allclose(rates, [0.1, 0.105, 0.0525], rtol=1e-6)
    np.testing.assert_allclose(params, [-0.2575, -0.2575], rtol=1e-6)


@pytest.mark.parametrize(
    ("low", "high"), [(1e-10, 1e10), (1e-3, 1.0)], ids=["default-bounds", "tight"]
)
def test_random_losses_with_specials_keep_the_rate_in_bounds_and_state_finite(
    low, high
):
    rng = np.random.default_rng(0)
    specials = np.array([0.0, -0.0, NAN, INF, -INF, -1.0, -1e30, 1e30], np.float32)
    losses = np.where(
        rng.random(1000) < 0.3,
        rng.choice(specials, 1000),
        rng.normal(0.0, 10.0, 1000).astype(np.float32),
    ).astype(np.float32)
    opt = default_chain(min_learning_rate=low, max_learning_rate=high)

    rates, params, state = scan_rates(opt, losses)
    rates = np.asarray(rates)
    assert np.all(rates >= np.float32(low))
    assert np.all(rates <= np.float32(high))
    assert np.all(np.isfinite(params))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state))

    dyn = find_dynamic_lr_state(state)
    assert int(dyn.count) == 1000
    assert int(dyn.num_nonfinite) == int(np.sum(~np.isfinite(losses)))
    assert int(dyn.num_falls) + int(dyn.num_rises) <= 1000
    last_finite = losses[np.isfinite(losses)][-1]
    assert float(dyn.previous_value) == last_finite
    np.testing.assert_array_equal(
        rates, float32_reference(losses, 0.1, 1.05, 0.5, low, high)
    )


# ---------------------------------------------------------------------------
# Which step the new rate scales.


@eager_and_jit
@pytest.mark.parametrize(
    "dynamic_first", [True, False], ids=["before-sgd", "after-sgd"]
)
def test_the_rate_set_by_a_loss_scales_the_same_calls_update(jit, dynamic_first):
    # Parameter 0, gradient 1, losses 1.0, 0.9, 1.2: the 0.9 grows the rate to
    # 0.105 before its own step, the 1.2 halves it to 0.0525 before its own.
    parts = [dynamic_lr(0.1), optax.sgd(1.0)]
    opt = optax.chain(*(parts if dynamic_first else parts[::-1]))
    _, updates, params, _ = run_losses(opt, [1.0, 0.9, 1.2], jnp.zeros(()), jit=jit)

    np.testing.assert_allclose(
        [float(u) for u in updates], [-0.1, -0.105, -0.0525], rtol=1e-6
    )
    np.testing.assert_allclose(float(params), -0.2575, rtol=1e-6)


# ---------------------------------------------------------------------------
# Double precision switched on.


@eager_and_jit
@pytest.mark.parametrize("reject_steps", [False, True])
def test_x64_with_float32_parameters_keeps_every_state_dtype(jit, reject_steps):
    with jax.enable_x64(True):
        opt = optax.chain(dynamic_lr(0.1, reject_steps=reject_steps), optax.sgd(1.0))
        params = {"w": jnp.zeros((2, 2), jnp.float32), "b": jnp.zeros(2, jnp.float32)}
        state = opt.init(params)
        dtypes = jax.tree.map(lambda x: (x.dtype, x.weak_type), state)
        expected_dyn = {
            "learning_rate": jnp.float32,
            "previous_value": jnp.float32,
            "has_previous_value": jnp.bool_,
            "count": jnp.int32,
        }
        for field, dtype in expected_dyn.items():
            assert getattr(find_dynamic_lr_state(state), field).dtype == dtype

        grads = jax.tree.map(jnp.ones_like, params)
        step = opt.update
        if jit:
            step = jax.jit(step)
        for loss in [1.0, 0.9, 1.2, 0.8]:
            updates, state = step(grads, state, params, value=loss)
            params = optax.apply_updates(params, updates)
            assert jax.tree.map(lambda x: (x.dtype, x.weak_type), state) == dtypes
            assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))
        np.testing.assert_allclose(
            current_learning_rate(state), 0.0525 * 1.05, rtol=1e-6
        )


# ---------------------------------------------------------------------------
# Low-precision parameters with float32 bounds.


@eager_and_jit
@pytest.mark.parametrize(
    "floor", [jnp.float32(1e-4), np.float32(1e-4)], ids=["jnp", "np"]
)
def test_bfloat16_parameters_with_float32_bounds(jit, floor):
    opt = default_chain(learning_rate=1e-3, min_learning_rate=floor)
    params = jnp.zeros(3, jnp.bfloat16)
    rates, updates, params, _ = run_losses(
        opt, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], params, jit=jit
    )

    np.testing.assert_allclose(
        rates, [1e-3, 5e-4, 2.5e-4, 1.25e-4, 1e-4, 1e-4], rtol=1e-6
    )
    assert rates[-1] == np.float32(1e-4)
    for rate, update in zip(rates, updates, strict=True):
        assert update.dtype == jnp.bfloat16
        np.testing.assert_array_equal(update, jnp.full(3, -rate, jnp.bfloat16))
    assert params.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "hyper_dtype", [jnp.bfloat16, jnp.float16, np.float64], ids=["bf16", "f16", "f64"]
)
@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float16])
def test_hyperparameters_of_any_float_dtype_mix_with_any_parameter_dtype(
    hyper_dtype, param_dtype
):
    # Every hyperparameter given in one dtype, the parameters in another; the
    # rule runs in float32 with each hyperparameter rounded once to float32.
    cast = np.dtype(hyper_dtype).type
    opt = optax.chain(
        dynamic_lr(cast(0.5), cast(2.0), cast(0.25), cast(0.125), cast(1.0)),
        optax.sgd(1.0),
    )
    rates, updates, _, _ = run_losses(
        opt, [1.0, 0.5, 0.25, 2.0, 4.0], jnp.zeros(2, param_dtype), jit=True
    )
    # 0.5 -> 1.0 -> capped 1.0 -> 0.25 -> floored 0.125; all exact.
    np.testing.assert_array_equal(
        rates, np.array([0.5, 1.0, 1.0, 0.25, 0.125], np.float32)
    )
    assert all(update.dtype == param_dtype for update in updates)


# ---------------------------------------------------------------------------
# Wrappers that compare dtypes inside lax.cond.


@pytest.mark.parametrize("reject_steps", [False, True])
def test_multi_steps_with_bfloat16_parameters_under_jit(reject_steps):
    inner = optax.chain(dynamic_lr(0.1, reject_steps=reject_steps), optax.sgd(1.0))
    opt = optax.MultiSteps(inner, every_k_schedule=2)
    params = jnp.zeros(2, jnp.bfloat16)
    # Only every second call's loss reaches the kept inner state: 1.0, 0.9,
    # 1.2, the worked example. The other losses are ignored.
    losses = [9.0, 1.0, 9.0, 0.9, 9.0, 1.2]
    _, updates, params, state = run_losses(opt, losses, params, jit=True)

    assert all(update.dtype == jnp.bfloat16 for update in updates)
    # With rejection, the third emitted step returns to the first accepted
    # point (-0.1) and retries with 0.0525: -0.1525, an update of +0.0525.
    last = 0.0525 if reject_steps else -0.0525
    expected = [0.0, -0.1, 0.0, -0.105, 0.0, last]
    got = [float(update[0]) for update in updates]
    np.testing.assert_allclose(got, expected, rtol=1e-2)
    np.testing.assert_allclose(current_learning_rate(state), 0.0525, rtol=1e-6)
    assert params.dtype == jnp.bfloat16


@pytest.mark.parametrize("reject_steps", [False, True])
def test_apply_if_finite_with_bfloat16_parameters_under_jit(reject_steps):
    inner = optax.chain(dynamic_lr(0.1, reject_steps=reject_steps), optax.sgd(1.0))
    opt = optax.apply_if_finite(inner, max_consecutive_errors=3)
    params = jnp.zeros(2, jnp.bfloat16)
    _, updates, params, state = run_losses(opt, [1.0, 0.9, 1.2], params, jit=True)

    assert all(update.dtype == jnp.bfloat16 for update in updates)
    last = 0.0525 if reject_steps else -0.0525
    got = [float(update[0]) for update in updates]
    np.testing.assert_allclose(got, [-0.1, -0.105, last], rtol=1e-2)
    np.testing.assert_allclose(current_learning_rate(state), 0.0525, rtol=1e-6)


# ---------------------------------------------------------------------------
# A training loop that forgets the loss.


@eager_and_jit
@pytest.mark.parametrize("chained", [False, True])
@pytest.mark.parametrize("pass_none", [False, True], ids=["missing", "none"])
def test_forgotten_loss_raises_and_says_how_to_pass_it(jit, chained, pass_none):
    opt = default_chain() if chained else dynamic_lr(0.1)
    params = jnp.zeros(2)
    state = opt.init(params)
    kwargs = {"value": None} if pass_none else {}

    def update(grads, state, params):
        return opt.update(grads, state, params, **kwargs)

    if jit:
        update = jax.jit(update)
    with pytest.raises(TypeError, match="value=loss"):
        update(jnp.ones(2), state, params)


# ---------------------------------------------------------------------------
# Other keyword arguments.


@eager_and_jit
@pytest.mark.parametrize("dynamic_first", [True, False], ids=["before", "after"])
def test_extra_keyword_arguments_pass_through_beside_plain_transforms(
    jit, dynamic_first
):
    def loss_fn(x):
        return jnp.sum(x**2)

    plain = [optax.clip_by_global_norm(10.0), optax.sgd(1.0)]
    parts = [dynamic_lr(0.1), *plain] if dynamic_first else [*plain, dynamic_lr(0.1)]
    opt = optax.chain(*parts)
    params = jnp.zeros(2)
    grads = jnp.ones(2)
    state = opt.init(params)

    def step(state, params, loss):
        return opt.update(
            grads, state, params, value=loss, grad=grads, value_fn=loss_fn
        )

    if jit:
        step = jax.jit(step)
    got = []
    for loss in [1.0, 0.9, 1.2]:
        updates, state = step(state, params, loss)
        got.append(float(updates[0]))
    np.testing.assert_allclose(got, [-0.1, -0.105, -0.0525], rtol=1e-6)


def test_backtracking_line_search_then_dynamic_lr():
    # f(x) = x**2 / 2 from x = 1. The line search tries the full sgd step,
    # which lands on 0 and satisfies its decrease condition, so it passes
    # -x unchanged; the rate then scales it.
    # 1. -1 * 0.1 -> x = 0.9.  2. f fell: -0.9 * 0.105 = -0.0945 -> 0.8055.
    # 3. f fell: -0.8055 * 0.11025 = -0.08880638 -> 0.71669362.
    def f(x):
        return 0.5 * jnp.sum(x**2)

    opt = optax.chain(
        optax.sgd(1.0),
        optax.scale_by_backtracking_linesearch(max_backtracking_steps=15),
        dynamic_lr(0.1),
    )

    @jax.jit
    def step(x, state):
        value, grad = jax.value_and_grad(f)(x)
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=f)
        return optax.apply_updates(x, updates), state

    x = jnp.array([1.0])
    state = opt.init(x)
    trajectory = []
    for _ in range(3):
        x, state = step(x, state)
        trajectory.append(float(x[0]))
    np.testing.assert_allclose(trajectory, [0.9, 0.8055, 0.71669362], rtol=1e-6)
    np.testing.assert_allclose(current_learning_rate(state), 0.11025, rtol=1e-6)


# ---------------------------------------------------------------------------
# A non-finite loss in the middle.


@eager_and_jit
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_non_finite_loss_in_the_middle(jit, bad):
    # Cut on the bad loss (0.0525 -> 0.02625) with no movement, then compare
    # 0.8 with the last finite loss 1.2: a fall, 0.02625 * 1.05 = 0.0275625.
    # Storing the bad loss, or growing on it, gives other rates.
    losses = [1.0, 0.9, 1.2, bad, 0.8]
    rates, updates, params, state = run_losses(default_chain(), losses, jit=jit)

    np.testing.assert_allclose(
        rates, [0.1, 0.105, 0.0525, 0.02625, 0.0275625], rtol=1e-6
    )
    np.testing.assert_array_equal(updates[3], [0.0, 0.0])
    np.testing.assert_allclose(params, [-0.2850625] * 2, rtol=1e-6)
    dyn = find_dynamic_lr_state(state)
    assert float(dyn.previous_value) == np.float32(0.8)
    assert int(dyn.num_nonfinite) == 1


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_apply_if_finite_lets_a_non_finite_loss_through_to_the_rule(bad):
    # apply_if_finite checks only the gradients, which are finite here, so it
    # counts no error; the rule itself zeroes the step and cuts the rate.
    opt = optax.apply_if_finite(default_chain(), max_consecutive_errors=3)
    rates, updates, _, state = run_losses(opt, [1.0, 0.9, 1.2, bad, 0.8], jit=True)

    assert int(state.total_notfinite) == 0
    np.testing.assert_allclose(
        rates, [0.1, 0.105, 0.0525, 0.02625, 0.0275625], rtol=1e-6
    )
    np.testing.assert_array_equal(updates[3], [0.0, 0.0])


# ---------------------------------------------------------------------------
# Reading the rate back.


def _read_after_one_fall(opt, calls=2, jit=False):
    losses = {2: [1.0, 0.9], 4: [5.0, 1.0, 5.0, 0.9]}[calls]
    _, _, _, state = run_losses(opt, losses, jit=jit)
    return state


@eager_and_jit
def test_rate_read_back_from_a_chain(jit):
    state = _read_after_one_fall(default_chain(), jit=jit)
    np.testing.assert_allclose(current_learning_rate(state), 0.105, rtol=1e-6)


def test_rate_read_back_beside_another_learning_rate():
    opt = optax.chain(
        dynamic_lr(0.1), optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    )
    state = _read_after_one_fall(opt)

    # The generic lookup finds two "learning_rate" entries and gives up.
    with pytest.raises(KeyError):
        optax.tree.get(state, "learning_rate")
    np.testing.assert_allclose(current_learning_rate(state), 0.105, rtol=1e-6)


def test_rate_read_back_inside_multi_steps():
    opt = optax.MultiSteps(default_chain(), every_k_schedule=2)
    state = _read_after_one_fall(opt, calls=4, jit=True)
    np.testing.assert_allclose(current_learning_rate(state), 0.105, rtol=1e-6)


def test_rate_read_back_inside_apply_if_finite():
    opt = optax.apply_if_finite(default_chain(), max_consecutive_errors=3)
    state = _read_after_one_fall(opt, jit=True)
    np.testing.assert_allclose(current_learning_rate(state), 0.105, rtol=1e-6)


def test_rate_read_back_inside_a_jitted_function():
    opt = default_chain()
    state = _read_after_one_fall(opt)
    rate = jax.jit(current_learning_rate)(state)
    assert rate.dtype == jnp.float32
    np.testing.assert_allclose(rate, 0.105, rtol=1e-6)


# ---------------------------------------------------------------------------
# Several models at once.


def test_vmapped_models_each_move_their_own_rate():
    starting = jnp.array([0.1, 0.01, 0.001])
    # One loss sequence per model: falls, rise-then-fall, flat-then-fall.
    losses = np.array(
        [[1.0, 0.9, 0.8, 0.7], [1.0, 1.1, 1.0, 1.2], [1.0, 1.0, 0.5, NAN]],
        np.float32,
    )
    params = jnp.zeros((3, 2))

    # init alone reads the starting rate; update never does.
    def build(lr):
        return optax.chain(dynamic_lr(lr), optax.sgd(1.0))

    states = jax.vmap(lambda lr, p: build(lr).init(p))(starting, params)
    update = jax.jit(jax.vmap(lambda g, s, p, v: build(1.0).update(g, s, p, value=v)))
    rates = []
    for call in range(losses.shape[1]):
        updates, states = update(
            jnp.ones((3, 2)), states, params, jnp.asarray(losses[:, call])
        )
        params = optax.apply_updates(params, updates)
        rates.append(current_learning_rate(states))
    rates = np.stack(rates, axis=1)

    for model in range(3):
        separate_rates, _, separate_params, _ = run_losses(
            build(float(starting[model])), losses[model].tolist(), jit=True
        )
        np.testing.assert_array_equal(rates[model], separate_rates)
        np.testing.assert_allclose(params[model], separate_params, rtol=1e-6)
    # Hand values: 0.1 grows three times; 0.01 halves, grows, halves; 0.001
    # stays, grows, halves on the nan.
    np.testing.assert_allclose(
        rates,
        [
            [0.1, 0.105, 0.11025, 0.1157625],
            [0.01, 0.005, 0.00525, 0.002625],
            [0.001, 0.001, 0.00105, 0.000525],
        ],
        rtol=1e-6,
    )
