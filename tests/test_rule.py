"""The rule itself: rates, bounds, tolerances, numerics, dtypes and errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from worked_factors import dynamic_lr  # factors 1.05 and 0.5

from optax_dynlr import (
    DynamicLRState,
    current_learning_rate,
    find_dynamic_lr_state,
)
from optax_dynlr import (
    dynamic_lr as dynamic_lr_with_package_defaults,
)

NAN = float("nan")
INF = float("inf")

eager_and_jit = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def run_losses(opt, losses, params, grads=None, jit=False):
    """Feeds one loss per call with fixed gradients (ones by default).

    Returns the rate after each call, each call's updates, the parameters after
    each call and the final state.
    """
    if grads is None:
        grads = jax.tree.map(jnp.ones_like, params)

    def step(state, params, loss):
        return opt.update(grads, state, params, value=loss)

    if jit:
        step = jax.jit(step)
    state = opt.init(params)
    rates, all_updates, all_params = [], [], []
    for loss in losses:
        updates, state = step(state, params, loss)
        params = optax.apply_updates(params, updates)
        rates.append(float(current_learning_rate(state)))
        all_updates.append(updates)
        all_params.append(params)
    return rates, all_updates, all_params, state


def f32(x):
    return np.float32(x)


# ---------------------------------------------------------------------------
# The worked example.


@eager_and_jit
def test_worked_example_rates_updates_and_parameters(jit):
    # Rates: first call keeps 0.1; 0.9 < 1.0 grows to 0.1 * 1.05 = 0.105;
    # 1.2 > 0.9 halves to 0.0525; nan halves to 0.02625; 0.8 < 0.9 (the last
    # finite loss, not the nan) grows to 0.02625 * 1.05 = 0.0275625.
    opt = optax.chain(dynamic_lr(0.1, 1.05, 0.5), optax.sgd(1.0))
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    rates, updates, all_params, _ = run_losses(
        opt, [1.0, 0.9, 1.2, NAN, 0.8], params, jit=jit
    )

    np.testing.assert_allclose(
        rates, [0.1, 0.105, 0.0525, 0.02625, 0.0275625], rtol=1e-6
    )
    for call in [0, 1, 2, 4]:
        for leaf in jax.tree.leaves(updates[call]):
            np.testing.assert_allclose(leaf, -rates[call], rtol=1e-6)
    for leaf in jax.tree.leaves(updates[3]):
        np.testing.assert_array_equal(leaf, 0.0)
    # Parameter: -0.1, -0.1 - 0.105, -0.205 - 0.0525, unchanged on the nan,
    # -0.2575 - 0.0275625.
    trajectory = [float(p["b"][0]) for p in all_params]
    np.testing.assert_allclose(
        trajectory, [-0.1, -0.205, -0.2575, -0.2575, -0.2850625], rtol=1e-6
    )


@eager_and_jit
def test_worked_example_counts_and_remembered_loss(jit):
    opt = dynamic_lr(0.1)
    _, _, _, state = run_losses(opt, [1.0, 0.9, 1.2, NAN, 0.8], jnp.zeros(2), jit=jit)

    # Falls: 0.9 and 0.8. Rises: 1.2 and the nan. One non-finite loss.
    assert int(state.count) == 5
    assert int(state.num_falls) == 2
    assert int(state.num_rises) == 2
    assert int(state.num_nonfinite) == 1
    assert int(state.num_rejections) == 0
    assert float(state.previous_value) == f32(0.8)
    assert bool(state.has_previous_value)
    assert state.accepted_direction is None


@eager_and_jit
def test_sgd_first_then_dynamic_lr_scales_this_calls_step(jit):
    # Parameter 0, gradient 1: sgd(1.0) proposes -1 each call, which the rate
    # of this call (adjusted first) scales: -0.1, -0.105, -0.0525; the sum is
    # -0.2575.
    opt = optax.chain(optax.sgd(1.0), dynamic_lr(0.1))
    _, updates, all_params, _ = run_losses(opt, [1.0, 0.9, 1.2], jnp.zeros(()), jit=jit)

    np.testing.assert_allclose(
        [float(u) for u in updates], [-0.1, -0.105, -0.0525], rtol=1e-6
    )
    np.testing.assert_allclose(float(all_params[-1]), -0.2575, rtol=1e-6)


def test_first_call_keeps_the_rate_whatever_the_loss():
    for loss in [-5.0, 0.0, 1e30]:
        rates, updates, _, state = run_losses(dynamic_lr(0.1), [loss], jnp.zeros(2))
        assert rates == [f32(0.1)]
        np.testing.assert_allclose(updates[0], [0.1, 0.1], rtol=1e-7)
        assert float(state.previous_value) == f32(loss)


def test_non_finite_first_loss_cuts_and_is_not_remembered():
    # A nan at the first call cuts 0.1 to 0.05 and moves nothing; the next
    # call is then the first with a loss to compare, so it keeps 0.05.
    rates, updates, _, state = run_losses(dynamic_lr(0.1), [NAN, 3.0], jnp.zeros(2))

    np.testing.assert_allclose(rates, [0.05, 0.05], rtol=1e-7)
    np.testing.assert_array_equal(updates[0], [0.0, 0.0])
    assert float(state.previous_value) == 3.0
    assert int(state.num_falls) == 0


def test_equal_loss_keeps_the_rate():
    rates, _, _, _ = run_losses(dynamic_lr(0.1), [2.0, 2.0, 2.0], jnp.zeros(1))
    assert rates == [f32(0.1)] * 3


@eager_and_jit
def test_negative_losses_compare_by_sign(jit):
    # -2 < -1 is a fall (0.1 -> 0.105); -1.5 > -2 is a rise (-> 0.0525);
    # -1.5 -> -3 falls again (-> 0.055125). A comparison of magnitudes would
    # get every one of these backwards.
    rates, _, _, _ = run_losses(
        dynamic_lr(0.1), [-1.0, -2.0, -1.5, -3.0], jnp.zeros(1), jit=jit
    )
    np.testing.assert_allclose(rates, [0.1, 0.105, 0.0525, 0.055125], rtol=1e-6)


def test_zero_and_integer_losses():
    # Integer losses are compared as float32: 3 -> 0 falls, 0 -> 1 rises.
    rates, _, _, state = run_losses(dynamic_lr(0.1), [3, 0, 1], jnp.zeros(1))
    np.testing.assert_allclose(rates, [0.1, 0.105, 0.0525], rtol=1e-6)
    assert state.previous_value.dtype == jnp.float32


# ---------------------------------------------------------------------------
# Bounds.


@eager_and_jit
def test_rate_reaches_each_bound_exactly_and_stays(jit):
    # 0.25 * 2 = 0.5, then 1.0 is above the cap 0.75; 0.75 / 2 = 0.375, then
    # 0.1875 is below the floor 0.2. All exact in float32.
    opt = dynamic_lr(0.25, 2.0, 0.5, min_learning_rate=0.2, max_learning_rate=0.75)
    losses = [10.0, 9.0, 8.0, 7.0, 8.0, 9.0, 10.0]
    rates, _, _, _ = run_losses(opt, losses, jnp.zeros(1), jit=jit)
    assert rates == [0.25, 0.5, 0.75, 0.75, 0.375, f32(0.2), f32(0.2)]


def test_starting_rate_on_the_bounds_is_accepted():
    for rate in [1e-3, 1.0]:
        state = dynamic_lr(rate, min_learning_rate=1e-3, max_learning_rate=1.0).init(
            jnp.zeros(1)
        )
        assert float(state.learning_rate) == f32(rate)


def test_traced_starting_rate_outside_the_bounds_is_clipped_by_init():
    # Under vmap the rate cannot be checked at construction, so init clips it.
    rates = jax.vmap(
        lambda lr: (
            dynamic_lr(lr, min_learning_rate=0.01, max_learning_rate=1.0)
            .init(jnp.zeros(1))
            .learning_rate
        )
    )(jnp.array([0.001, 0.5, 2.0]))
    np.testing.assert_array_equal(rates, np.array([0.01, 0.5, 1.0], np.float32))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        # Fine in float64, but the rule computes in float32: 1e39 overflows to
        # inf (float32's largest is about 3.4e38), 1e-40 is subnormal (flushed
        # to zero on many devices) and 1e-46 rounds to 0, either of which would
        # let the rate reach inf or 0. 1 + 1e-9 and 1 - 1e-10 round to exactly
        # 1, and 1e-50 to 0.
        ({"max_learning_rate": 1e39}, "max_learning_rate"),
        ({"learning_rate": 1e39, "max_learning_rate": 1e39}, r"\blearning_rate"),
        ({"min_learning_rate": 1e-40}, "min_learning_rate"),
        ({"min_learning_rate": 1e-46}, "min_learning_rate"),
        ({"increase_factor": 1.0 + 1e-9}, "increase_factor"),
        ({"decrease_factor": 1.0 - 1e-10}, "decrease_factor"),
        ({"decrease_factor": 1e-50}, "decrease_factor"),
    ],
)
def test_hyperparameters_outside_float32_are_rejected(kwargs, name):
    kwargs = {"learning_rate": 1e-30, **kwargs}
    with pytest.raises(ValueError, match=name):
        dynamic_lr(**kwargs)


def test_smallest_normal_float32_floor_keeps_the_rate_alive():
    # From 1e-30, 80 rises would halve past float32's subnormals to zero; the
    # floor at the smallest normal float32 holds, and a fall lifts the rate.
    tiny = np.finfo(np.float32).tiny
    opt = dynamic_lr(1e-30, min_learning_rate=tiny)
    losses = jnp.concatenate([jnp.arange(80, dtype=jnp.float32), jnp.array([-1.0])])
    rates = _scan_losses(opt, losses, jnp.zeros(1))
    assert rates[79] == tiny
    assert rates[80] == tiny * np.float32(1.05)


def _scan_losses(opt, losses, params):
    """The rate after each call, under lax.scan."""

    def body(state, loss):
        _, state = opt.update(jnp.ones_like(params), state, params, value=loss)
        return state, state.learning_rate

    _, rates = jax.lax.scan(body, opt.init(params), losses)
    return np.asarray(rates)


# ---------------------------------------------------------------------------
# Tolerance.


@pytest.mark.parametrize(
    ("rtol", "atol", "previous", "loss", "factor"),
    [
        # threshold = previous + atol + rtol * |previous|; all values dyadic so
        # float32 computes the threshold exactly.
        (0.0, 0.25, 1.0, 1.25, 1.0),  # threshold 1.25: not above, kept
        (0.0, 0.25, 1.0, 1.5, 0.5),  # above 1.25: cut
        (0.5, 0.0, 2.0, 3.0, 1.0),  # threshold 2 + 1 = 3: kept
        (0.5, 0.0, 2.0, 3.25, 0.5),  # above 3: cut
        (0.5, 0.0, -2.0, -1.0, 1.0),  # threshold -2 + 1 = -1: kept
        (0.5, 0.0, -2.0, -0.75, 0.5),  # above -1: cut
        (0.25, 0.5, 4.0, 5.5, 1.0),  # threshold 4 + 0.5 + 1 = 5.5: kept
        (0.25, 0.5, 4.0, 5.75, 0.5),  # above 5.5: cut
        (0.25, 0.5, 4.0, 3.75, 1.05),  # a fall grows whatever the tolerance
        (0.0, 0.0, 1.0, 1.0000001, 0.5),  # no tolerance: the next float cuts
    ],
)
def test_tolerance_threshold(rtol, atol, previous, loss, factor):
    opt = dynamic_lr(0.25, rtol=rtol, atol=atol)
    rates, _, _, _ = run_losses(opt, [previous, loss], jnp.zeros(1))
    assert rates[1] == f32(0.25) * f32(factor)


def test_tolerance_compares_with_the_last_loss_not_the_best():
    # With atol 0.25 each rise of 0.25 is tolerated and becomes the new
    # reference, so 1.0 -> 1.25 -> 1.5 -> 1.75 never cuts; 1.75 -> 2.25 does.
    opt = dynamic_lr(0.25, atol=0.25)
    rates, _, _, _ = run_losses(opt, [1.0, 1.25, 1.5, 1.75, 2.25], jnp.zeros(1))
    assert rates == [0.25, 0.25, 0.25, 0.25, 0.125]


# ---------------------------------------------------------------------------
# Numerics and dtypes.


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize(
    "value",
    [0.3, np.float16(0.3), jnp.bfloat16(0.3), jnp.asarray(0.3, jnp.float16), 3],
    ids=["python", "np-f16", "bf16", "jnp-f16", "int"],
)
def test_state_is_float32_whatever_the_parameter_and_loss_dtypes(param_dtype, value):
    opt = dynamic_lr(0.1)
    params = jnp.zeros(3, param_dtype)
    _, state = opt.update(jnp.ones(3, param_dtype), opt.init(params), value=value)

    assert state.learning_rate.dtype == jnp.float32
    assert state.previous_value.dtype == jnp.float32
    # The loss is widened exactly: float32 holds every bf16 and f16 value.
    assert float(state.previous_value) == float(np.asarray(value).astype(np.float32))


def test_state_is_float32_for_float64_parameters_and_loss_under_x64():
    with jax.enable_x64(True):
        opt = dynamic_lr(0.1)
        params = jnp.zeros(3, jnp.float64)
        state = opt.init(params)
        updates, state = opt.update(
            jnp.ones(3, jnp.float64), state, value=jnp.asarray(0.3, jnp.float64)
        )
        updates, state = opt.update(jnp.ones(3, jnp.float64), state, value=0.2)

        assert state.learning_rate.dtype == jnp.float32
        assert state.previous_value.dtype == jnp.float32
        assert updates.dtype == jnp.float64
        # The float64 leaf meets the float32 rate without rounding to float32:
        # float32(0.1) * float32(1.05) widened exactly, times 1.0.
        expected = np.float64(np.float32(0.1) * np.float32(1.05))
        np.testing.assert_array_equal(updates, np.full(3, expected))


def test_bfloat16_parameters_still_see_a_small_increase_factor():
    # bf16 keeps 8 significant bits, so 1.002 would round to 1.0 and the rate
    # could never grow; in float32 each fall multiplies by 1.002.
    opt = dynamic_lr(0.1, increase_factor=1.002)
    params = jnp.zeros(2, jnp.bfloat16)
    losses = [10.0 - k for k in range(6)]
    rates, updates, _, _ = run_losses(opt, losses, params, jit=True)

    expected = [f32(0.1)]
    for _ in range(5):
        expected.append(expected[-1] * f32(1.002))
    assert rates == expected
    assert np.all(np.diff(rates) > 0)
    assert updates[-1].dtype == jnp.bfloat16


@eager_and_jit
def test_updates_keep_each_leafs_own_dtype(jit):
    params = {
        "bf16": jnp.zeros(2, jnp.bfloat16),
        "f16": jnp.zeros(3, jnp.float16),
        "f32": jnp.zeros((), jnp.float32),
    }
    # Gradients chosen so that rounding the rate 0.105 into the leaf's dtype
    # before multiplying gives another answer than one rounding of the float32
    # product: in bf16 2.78125 * 0.105 is 0.29296875, not 0.291015625; in f16
    # 2.75 * 0.105 is 0.288818359375, not 0.28857421875.
    grads = {
        "bf16": jnp.full(2, 2.78125, jnp.bfloat16),
        "f16": jnp.full(3, 2.75, jnp.float16),
        "f32": jnp.asarray(2.0, jnp.float32),
    }
    _, updates, _, _ = run_losses(dynamic_lr(0.1), [1.0, 0.5], params, grads, jit=jit)

    rate = np.float32(0.1) * np.float32(1.05)
    expected = {
        "bf16": 0.29296875,
        "f16": 0.288818359375,
        "f32": np.float32(2.0) * rate,
    }
    for name, dtype in [
        ("bf16", jnp.bfloat16),
        ("f16", jnp.float16),
        ("f32", jnp.float32),
    ]:
        assert updates[1][name].dtype == dtype
        np.testing.assert_array_equal(
            np.asarray(updates[1][name], np.float64),
            np.full(updates[1][name].shape, expected[name], np.float64),
        )


def _leaf_signature(tree):
    return jax.tree.map(lambda x: (x.dtype, x.shape, x.weak_type), tree)


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("reject_steps", [False, True])
def test_state_leaves_keep_dtype_shape_and_weak_type(param_dtype, reject_steps):
    opt = optax.chain(optax.sgd(1.0), dynamic_lr(0.1, reject_steps=reject_steps))
    params = {"a": jnp.zeros((2, 3), param_dtype), "b": jnp.zeros((), param_dtype)}
    grads = jax.tree.map(jnp.ones_like, params)
    state = opt.init(params)
    before = _leaf_signature(state)

    assert not any(leaf.weak_type for leaf in jax.tree.leaves(state))
    for loss in [1.0, 0.5, NAN, 2.0]:
        _, state = opt.update(grads, state, params, value=loss)
        assert _leaf_signature(state) == before
    jitted = jax.jit(lambda s, v: opt.update(grads, s, params, value=v)[1])
    assert _leaf_signature(jitted(state, 0.25)) == before


def test_jitted_step_traces_once_over_many_steps():
    opt = optax.chain(dynamic_lr(0.1), optax.sgd(1.0))
    params = jnp.zeros(4)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, loss):
        updates, state = opt.update(jnp.ones(4), state, params, value=loss)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for loss in [1.0, 0.9, 1.2, NAN, 0.8, INF, 0.7, -INF, 0.6, 0.5]:
        params, state = step(params, state, loss)
    assert float(current_learning_rate(state)) > 0


def test_scan_matches_step_by_step_and_traces_once():
    losses = jnp.array([1.0, 0.9, 0.95, 0.7, NAN, 0.6, 0.65, 0.64, 0.3, 0.3])
    opt = optax.chain(dynamic_lr(0.1, atol=0.02), optax.sgd(1.0))
    params = jnp.zeros(2)
    traces = []

    @jax.jit
    def run(losses):
        traces.append(None)

        def body(carry, loss):
            params, state = carry
            updates, state = opt.update(jnp.ones(2), state, params, value=loss)
            params = optax.apply_updates(params, updates)
            return (params, state), current_learning_rate(state)

        return jax.lax.scan(body, (params, opt.init(params)), losses)

    (scan_params, _), scan_rates = run(losses)
    run(losses[::-1])
    assert len(traces) == 1

    rates, _, all_params, _ = run_losses(opt, [float(x) for x in losses], params)
    np.testing.assert_array_equal(scan_rates, np.array(rates, np.float32))
    np.testing.assert_allclose(scan_params, all_params[-1], rtol=1e-6)
    # 0.9 falls (0.105); 0.95 > 0.9 + 0.02 cuts (0.0525); 0.7 falls (0.055125);
    # nan cuts (0.0275625); 0.6 falls (0.028940625); 0.65 > 0.62 cuts
    # (0.0144703125); 0.64 falls (0.0151938281); 0.3 falls (0.0159535195);
    # an equal 0.3 keeps it.
    np.testing.assert_allclose(
        rates,
        [0.1, 0.105, 0.0525, 0.055125, 0.0275625, 0.028940625, 0.0144703125]
        + [0.0151938281, 0.0159535195, 0.0159535195],
        rtol=1e-6,
    )


def test_eager_and_jit_agree_on_a_long_mixed_sequence():
    losses = [3.0, 2.5, 2.6, 2.0, 2.0, NAN, 1.9, 1.95, -INF, 1.5, 1.4, 1.6]
    opt = optax.chain(dynamic_lr(0.2, rtol=0.01), optax.sgd(1.0))
    params = {"a": jnp.zeros(3), "b": jnp.zeros((), jnp.bfloat16)}
    eager = run_losses(opt, losses, params, jit=False)
    jitted = run_losses(opt, losses, params, jit=True)

    assert eager[0] == jitted[0]
    chex.assert_trees_all_close(eager[2], jitted[2], rtol=1e-6)
    # rtol 0.01: 2.6 > 2.525 cuts, 2.0 equal keeps, 1.95 > 1.919 cuts, 1.6 >
    # 1.414 cuts; nan and -inf cut; the other losses fall.
    np.testing.assert_allclose(
        eager[0],
        [0.2, 0.21, 0.105, 0.11025, 0.11025, 0.055125, 0.05788125, 0.028940625]
        + [0.0144703125, 0.0151938281, 0.0159535195, 0.0079767598],
        rtol=1e-6,
    )


@eager_and_jit
@pytest.mark.parametrize("shape", [(3,), (1,), (2, 2)])
def test_non_scalar_loss_is_rejected(jit, shape):
    opt = dynamic_lr(0.1)
    params = jnp.zeros(2)

    def update(loss):
        return opt.update(jnp.ones(2), opt.init(params), params, value=loss)

    if jit:
        update = jax.jit(update)
    with pytest.raises(ValueError, match="scalar"):
        update(jnp.ones(shape))


def test_complex_loss_is_rejected():
    opt = dynamic_lr(0.1)
    with pytest.raises(ValueError, match="real"):
        opt.update(jnp.ones(2), opt.init(jnp.zeros(2)), value=jnp.asarray(1.0 + 2.0j))


# ---------------------------------------------------------------------------
# Hyperparameter errors.


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"learning_rate": 0.0}, r"\blearning_rate"),
        ({"learning_rate": -0.1}, r"\blearning_rate"),
        ({"learning_rate": NAN}, r"\blearning_rate"),
        ({"learning_rate": INF}, r"\blearning_rate"),
        ({"learning_rate": 20.0, "max_learning_rate": 10.0}, "max_learning_rate"),
        ({"learning_rate": 1e-4, "min_learning_rate": 1e-3}, "min_learning_rate"),
        ({"increase_factor": 1.0}, "increase_factor"),
        ({"increase_factor": 0.95}, "increase_factor"),
        ({"increase_factor": INF}, "increase_factor"),
        ({"increase_factor": NAN}, "increase_factor"),
        ({"decrease_factor": 0.0}, "decrease_factor"),
        ({"decrease_factor": 1.0}, "decrease_factor"),
        ({"decrease_factor": 1.5}, "decrease_factor"),
        ({"decrease_factor": -0.5}, "decrease_factor"),
        ({"decrease_factor": NAN}, "decrease_factor"),
        ({"min_learning_rate": 0.0}, "min_learning_rate"),
        ({"min_learning_rate": -1e-3}, "min_learning_rate"),
        ({"max_learning_rate": INF}, "max_learning_rate"),
        ({"max_learning_rate": NAN}, "max_learning_rate"),
        ({"min_learning_rate": 1.0, "max_learning_rate": 0.5}, "min_learning_rate"),
        ({"rtol": -0.1}, "rtol"),
        ({"rtol": INF}, "rtol"),
        ({"atol": -1e-9}, "atol"),
        ({"atol": NAN}, "atol"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, name):
    kwargs = {"learning_rate": 0.1, **kwargs}
    if "min_learning_rate" in kwargs and "max_learning_rate" in kwargs:
        kwargs["learning_rate"] = 0.75
    with pytest.raises(ValueError, match=name):
        dynamic_lr(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"increase_factor": 1.0000001},
        {"decrease_factor": 1e-6},
        {"decrease_factor": 0.999},
        {"min_learning_rate": 0.1, "max_learning_rate": 0.1},
        {"rtol": 0.0, "atol": 0.0},
        {"increase_factor": np.float32(1.5), "min_learning_rate": jnp.float32(1e-3)},
    ],
)
def test_boundary_hyperparameters_are_accepted(kwargs):
    opt = dynamic_lr(0.1, **kwargs)
    state = opt.init(jnp.zeros(1))
    assert float(state.learning_rate) == f32(0.1)


# ---------------------------------------------------------------------------
# Taking back rejected steps.


def _quadratic_run(losses_override, reject_steps=True):
    """Minimises 0.5 * x**2 from x = 1, with sgd(1.0) then dynamic_lr(6.0).

    ``losses_override`` maps a call index to a loss (and gradient) to report in
    place of the true ones.
    """
    opt = optax.chain(optax.sgd(1.0), dynamic_lr(6.0, reject_steps=reject_steps))
    params = jnp.asarray(1.0)
    state = opt.init(params)
    trajectory, states = [], []
    for call in range(6):
        loss = 0.5 * params**2
        grad = params
        if call in losses_override:
            loss = losses_override[call]
            grad = jnp.asarray(losses_override[call])
        updates, state = opt.update(grad, state, params, value=loss)
        params = optax.apply_updates(params, updates)
        trajectory.append(float(params))
        states.append(find_dynamic_lr_state(state))
    return trajectory, states


def test_rejection_on_a_quadratic_with_two_rejections_in_a_row_and_a_nan():
    # f(x) = x**2 / 2, gradient x, start x = 1, rate 6:
    # 1. f = 0.5, first call: rate 6, accept, step -6 -> x = -5.
    # 2. f = 12.5 > 0.5: rate 3, reject: back to 1, then 1 - 3 = -2.
    # 3. f = 2 > 0.5: rate 1.5, reject again: 1 - 1.5 = -0.5.
    # 4. f = 0.125 < 0.5: rate 1.575, accept at -0.5, step 1.575 * 0.5
    #    -> x = 0.2875.
    # 5. nan loss (and nan gradient): rate 0.7875, reject: back to -0.5, then
    #    -0.5 + 0.7875 * 0.5 = -0.10625.
    # 6. f = 0.0056445... < 0.125: rate 0.826875, accept, step 0.826875 *
    #    0.10625 -> x = -0.10625 + 0.08785546875 = -0.01839453125.
    trajectory, states = _quadratic_run({4: NAN})

    np.testing.assert_allclose(
        trajectory,
        [-5.0, -2.0, -0.5, 0.2875, -0.10625, -0.01839453125],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        [float(s.learning_rate) for s in states],
        [6.0, 3.0, 1.5, 1.575, 0.7875, 0.826875],
        rtol=1e-6,
    )
    assert [int(s.num_rejections) for s in states] == [0, 1, 2, 2, 3, 3]
    # The remembered loss is the one at the last accepted point.
    np.testing.assert_allclose(
        [float(s.previous_value) for s in states],
        [0.5, 0.5, 0.5, 0.125, 0.125, 0.5 * 0.10625**2],
        rtol=1e-6,
    )
    final = states[-1]
    assert int(final.num_nonfinite) == 1
    assert int(final.num_rises) == 3
    assert int(final.num_falls) == 2
    assert all(np.isfinite(trajectory))
    # The direction at the last accepted point: the update sgd proposed at
    # x = -0.10625, namely +0.10625.
    np.testing.assert_allclose(float(final.accepted_direction), 0.10625, rtol=1e-6)


def test_without_rejection_the_same_run_keeps_the_overshoots():
    # Same losses as above without taking steps back: x = 1 - 6 = -5, then
    # -5 + 3 * 5 = 10, showing that the rejection run's numbers come from the
    # undo and not from the rate alone.
    trajectory, states = _quadratic_run({}, reject_steps=False)
    np.testing.assert_allclose(trajectory[:2], [-5.0, 10.0], rtol=1e-6)
    assert int(states[-1].num_rejections) == 0


def test_rejection_with_a_nan_first_loss_moves_nothing():
    opt = dynamic_lr(0.1, reject_steps=True)
    params = jnp.zeros(2)
    updates, state = opt.update(jnp.full(2, NAN), opt.init(params), params, value=NAN)
    np.testing.assert_array_equal(updates, [0.0, 0.0])
    assert int(state.num_rejections) == 0
    assert not bool(state.has_previous_value)
    # The nan gradient of the non-finite call is not kept as a direction.
    assert bool(jnp.all(jnp.isfinite(state.accepted_direction)))


def test_rejection_tolerated_rise_is_accepted():
    # atol 0.5: 1.0 -> 1.4 is within tolerance, so the step is accepted and
    # the remembered loss moves to 1.4.
    opt = dynamic_lr(0.1, atol=0.5, reject_steps=True)
    _, _, _, state = run_losses(opt, [1.0, 1.4], jnp.zeros(1))
    assert int(state.num_rejections) == 0
    assert float(state.previous_value) == f32(1.4)
    assert isinstance(state, DynamicLRState)


def test_rejection_at_the_floor_accepts_the_rise_instead_of_stalling():
    # f(x) = x**2 / 2, gradient x, from x = 1 with the rate already at its floor
    # of 3: the first step overshoots to x = 1 - 3 = -2 (loss 2 > 0.5). A retry
    # at the same rate would land on -2 again forever; instead the point is
    # accepted and the next step goes from -2 to -2 + 3 * 2 = 4 (loss 8), also
    # accepted, and so on: the parameter keeps moving.
    opt = optax.chain(
        dynamic_lr(3.0, min_learning_rate=3.0, reject_steps=True), optax.sgd(1.0)
    )
    x = jnp.array(1.0)
    state = opt.init(x)
    trajectory = []
    for _ in range(3):
        updates, state = opt.update(x, state, x, value=0.5 * x**2)
        x = optax.apply_updates(x, updates)
        trajectory.append(float(x))
    assert trajectory == [-2.0, 4.0, -8.0]
    dlr = find_dynamic_lr_state(state)
    assert int(dlr.num_rejections) == 0
    assert int(dlr.num_rises) == 2
    assert float(dlr.previous_value) == 8.0


@eager_and_jit
def test_rejection_keeps_a_point_its_retry_could_not_move(jit):
    # dynamic_lr alone from rate 1 (factors 1.05 and 0.5), the parameter held at
    # 1.0 in float32, where the spacing towards zero is 2**-24 = 5.96e-8 (a
    # quarter of it: 1.49e-8). Incoming updates and losses as listed:
    # 1. u = 1e-8, loss 1.0, first call: accepted, update 1e-8; direction 1e-8.
    # 2. u = 5, loss 2.0 > 1.0: a retry would move the parameter by
    #    (0.5 - 1) * 1e-8 = 5e-9 <= 1.49e-8, lost to rounding, so the point is
    #    kept at rate 1 (a rise, not a rejection): update 1 * 5 = 5, direction 5,
    #    remembered loss 2.0.
    # 3. u = 1, loss 3.0 > 2.0: a retry moves it by (0.5 - 1) * 5 = -2.5, so the
    #    call is rejected: rate 0.5, update -2.5.
    # 4. u = 1, loss 2.0, equal to the remembered one: with rejection that grows
    #    the rate, 0.5 * 1.05 = 0.525; update 0.525.
    opt = dynamic_lr(1.0, reject_steps=True)
    params = jnp.ones(1, jnp.float32)
    step = jax.jit(opt.update) if jit else opt.update
    state = opt.init(params)
    rates, emitted, states = [], [], []
    for u, loss in zip([1e-8, 5.0, 1.0, 1.0], [1.0, 2.0, 3.0, 2.0], strict=True):
        updates, state = step(jnp.full(1, u), state, params, value=loss)
        rates.append(float(state.learning_rate))
        emitted.append(float(updates[0]))
        states.append(state)

    np.testing.assert_allclose(rates, [1.0, 1.0, 0.5, 0.525], rtol=1e-6)
    np.testing.assert_allclose(emitted, [1e-8, 5.0, -2.5, 0.525], rtol=1e-6)
    assert [int(s.num_rejections) for s in states] == [0, 0, 1, 1]
    assert [int(s.num_rises) for s in states] == [0, 1, 2, 2]
    assert [int(s.num_falls) for s in states] == [0, 0, 0, 1]
    assert [float(s.previous_value) for s in states] == [1.0, 2.0, 2.0, 2.0]
    assert float(states[1].accepted_direction[0]) == 5.0


def test_rejection_without_params_retries_until_the_floor():
    # The same second call without params: nothing tells that the retry is lost,
    # so the call is rejected, rate 0.5, update (0.5 - 1) * 1e-8.
    opt = dynamic_lr(1.0, reject_steps=True)
    state = opt.init(jnp.ones(1))
    _, state = opt.update(jnp.full(1, 1e-8), state, value=1.0)
    updates, state = opt.update(jnp.full(1, 5.0), state, value=2.0)
    assert int(state.num_rejections) == 1
    assert float(state.learning_rate) == 0.5
    np.testing.assert_allclose(float(updates[0]), -5e-9, rtol=1e-6)


def test_rejection_retries_a_point_whose_loss_equals_the_rejected_one():
    # f(p) = min(0.5 (p - 1)**2, 1.5), from p = 0 at rate 10 before sgd(1.0),
    # default factors 1.1 and 0.3. The loss is flat (1.5) at both p = 10 and
    # p = 3, but p = 3 can still move, so it is retried too:
    # 1. f = 0.5, gradient -1: p = 0 + 10 = 10.
    # 2. f = 1.5 > 0.5: rate 3, rejected: p = 0 + 3 = 3.
    # 3. f = 1.5 > 0.5 again: rate 0.9, rejected: p = 0 + 0.9 = 0.9.
    # 4. f = 0.005 < 0.5: rate 0.99, accepted, gradient -0.1: p = 0.999.
    def loss_fn(p):
        return jnp.minimum(0.5 * (p - 1.0) ** 2, 1.5)

    opt = optax.chain(
        dynamic_lr_with_package_defaults(10.0, reject_steps=True), optax.sgd(1.0)
    )
    p = jnp.asarray(0.0)
    state = opt.init(p)
    trajectory = []
    for _ in range(4):
        loss, grad = jax.value_and_grad(loss_fn)(p)
        updates, state = opt.update(grad, state, p, value=loss)
        p = optax.apply_updates(p, updates)
        trajectory.append(float(p))
    np.testing.assert_allclose(trajectory, [10.0, 3.0, 0.9, 0.999], rtol=1e-6)
    assert int(find_dynamic_lr_state(state).num_rejections) == 2


def test_rejection_rejects_a_state_made_without_it():
    state = dynamic_lr(0.1).init(jnp.zeros(2))
    with pytest.raises(ValueError, match="without step rejection"):
        dynamic_lr(0.1, reject_steps=True).update(jnp.ones(2), state, value=1.0)


def test_without_rejection_an_equal_loss_holds_the_rate():
    # The seed's rule: a loss equal to the previous one changes nothing.
    opt = dynamic_lr(1.0)
    rates, _, _, state = run_losses(opt, [2.0, 2.0, 2.0], jnp.zeros(1))
    assert rates == [1.0, 1.0, 1.0]
    assert int(state.num_falls) == 0


def test_default_factors_are_1_1_and_0_3():
    # Losses 1.0, 0.9, 1.2 from 0.1: kept, then 0.1 * 1.1 = 0.11, then
    # 0.11 * 0.3 = 0.033.
    opt = dynamic_lr_with_package_defaults(0.1)
    state = opt.init(jnp.zeros(1))
    rates = []
    for loss in [1.0, 0.9, 1.2]:
        _, state = opt.update(jnp.ones(1), state, value=loss)
        rates.append(float(state.learning_rate))
    np.testing.assert_allclose(rates, [0.1, 0.11, 0.033], rtol=1e-6)


def _rates_with_traced_hyperparameters(losses, **hyperparameters):
    opt = optax.inject_hyperparams(dynamic_lr_with_package_defaults)(**hyperparameters)
    params = jnp.zeros(2)
    state = jax.jit(opt.init)(params)
    update = jax.jit(lambda s, v: opt.update(jnp.ones(2), s, params, value=v))
    rates = []
    for loss in losses:
        _, state = update(state, loss)
        rates.append(float(current_learning_rate(state)))
    return rates


@pytest.mark.parametrize(
    "hyperparameters, expected",
    [
        # A nan increase factor cannot grow the rate: the falls keep it, the
        # rise cuts it by the default 0.3.
        (dict(increase_factor=NAN), [0.1, 0.1, 0.03, 0.03, 0.009]),
        # An inverted increase factor (0.5) must not shrink on a fall.
        (dict(increase_factor=0.5), [0.1, 0.1, 0.03, 0.03, 0.009]),
        # A nan decrease factor cannot cut: rises keep the rate; the nan loss
        # too.
        (dict(decrease_factor=NAN), [0.1, 0.11, 0.11, 0.121, 0.121]),
        # A negative tolerance is read as zero.
        (dict(atol=-1.0), [0.1, 0.11, 0.033, 0.0363, 0.01089]),
    ],
)
def test_traced_nonsense_hyperparameters_keep_the_rule_sane(hyperparameters, expected):
    rates = _rates_with_traced_hyperparameters(
        [1.0, 0.9, 1.2, 0.8, NAN], learning_rate=0.1, **hyperparameters
    )
    np.testing.assert_allclose(rates, expected, rtol=1e-6)


def test_traced_nan_starting_rate_or_bounds_never_give_a_nan_rate():
    # No usable rate from the arguments: the state falls back to 1e-3.
    for hyperparameters in [
        dict(learning_rate=NAN),
        dict(learning_rate=0.1, min_learning_rate=NAN),
    ]:
        rates = _rates_with_traced_hyperparameters([1.0, 0.9], **hyperparameters)
        assert all(np.isfinite(rates)) and all(r > 0 for r in rates)
    starts = jax.vmap(
        lambda lr: dynamic_lr_with_package_defaults(lr).init(jnp.zeros(1)).learning_rate
    )(jnp.array([NAN, 0.1, -1.0]))
    np.testing.assert_allclose(starts, [1e-3, 0.1, 1e-10], rtol=1e-6)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (dict(learning_rate="abc"), TypeError, "learning_rate must be a real number"),
        (dict(learning_rate="0.1"), TypeError, "learning_rate must be a real number"),
        (dict(learning_rate=0.1 + 0j), TypeError, "learning_rate must be a real"),
        (
            dict(learning_rate=optax.constant_schedule(0.1)),
            TypeError,
            "takes no schedule",
        ),
        (dict(learning_rate=[0.1, 0.2]), ValueError, "learning_rate must be a scalar"),
        (dict(learning_rate=0.1, reject_steps="yes"), TypeError, "reject_steps"),
        (dict(learning_rate=0.1, noise_aware=1), TypeError, "noise_aware"),
    ],
)
def test_arguments_of_the_wrong_kind_are_named(arguments, error, message):
    with pytest.raises(error, match=message):
        dynamic_lr_with_package_defaults(**arguments)


def test_integer_parameters_and_string_losses_are_refused_clearly():
    opt = dynamic_lr(0.1)
    with pytest.raises(TypeError, match="floating-point"):
        opt.update(jnp.ones(2, jnp.int32), opt.init(jnp.ones(2, jnp.int32)), value=1.0)
    with pytest.raises(TypeError, match="value=loss"):
        opt.update(jnp.ones(2), opt.init(jnp.ones(2)), value="0.5")


def test_a_python_int_loss_beyond_int32_is_read_as_a_float():
    # 2**40 does not fit in int32; as a loss it is just a large number: the
    # second call (2**40 > 1.0) cuts the rate from 0.1 to 0.05.
    opt = dynamic_lr(0.1)
    rates, _, _, _ = run_losses(opt, [1.0, 2**40], jnp.zeros(1))
    assert rates == [f32(0.1), f32(0.05)]


@pytest.mark.parametrize(
    "huge", [1e300, np.float64(1e300), np.array(-1e300), np.float64(np.inf)]
)
def test_a_host_loss_beyond_float32_is_non_finite_without_warnings(huge):
    # Beyond float32's range the loss is +-inf in float32: a non-finite loss,
    # which cuts (0.1 -> 0.05) and is counted, and no numpy overflow warning
    # (filterwarnings = error would turn it into a failure).
    opt = dynamic_lr(0.1)
    rates, _, _, state = run_losses(opt, [1.0, huge], jnp.zeros(1))
    assert rates == [f32(0.1), f32(0.05)]
    assert int(state.num_nonfinite) == 1


@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("kind", [float, np.asarray, jnp.asarray])
def test_tolerances_are_refused_with_noise_aware(name, kind):
    with pytest.raises(ValueError, match=f"{name} has no effect with noise_aware"):
        dynamic_lr(0.1, noise_aware=True, **{name: kind(0.01)})
    dynamic_lr(0.1, noise_aware=True, **{name: kind(0.0)})


def test_python_float_and_float64_numpy_parameters_are_scaled_without_warnings():
    # Rate 0.1 on an update of 2.0: 0.2, as a JAX float32 array (filterwarnings
    # = error turns JAX's float64 truncation warning into a failure).
    opt = dynamic_lr(0.1)
    for update in (2.0, np.full(2, 2.0, np.float64)):
        updates, _ = opt.update(update, opt.init(update), value=1.0)
        np.testing.assert_allclose(np.asarray(updates), 0.2, rtol=1e-6)
        assert jnp.asarray(updates).dtype == jnp.float32


@pytest.mark.parametrize("axis_name", [3, 1.5, ["batch"]])
def test_axis_name_must_be_a_name(axis_name):
    with pytest.raises(TypeError, match="axis_name must be the name"):
        dynamic_lr(0.1, axis_name=axis_name)


@pytest.mark.parametrize("reject_steps", [False, True])
def test_runs_under_jax_debug_nans(reject_steps):
    # The state holds no nan placeholder: JAX's nan checker, which raises on
    # any nan an operation produces, stays quiet through an accepted call, a
    # rise (a rejection with reject_steps) and a fall: rates 0.1, 0.05, 0.0525.
    opt = dynamic_lr(0.1, reject_steps=reject_steps)
    params = jnp.zeros(2)
    with jax.debug_nans(True):
        state = opt.init(params)
        rates = []
        for loss in (1.0, 2.0, 0.5):
            _, state = opt.update(jnp.ones(2), state, params, value=loss)
            rates.append(float(state.learning_rate))
    np.testing.assert_allclose(rates, [0.1, 0.05, 0.0525], rtol=1e-6)


def _second_call_after_a_tiny_step(params, first_update, second_update):
    """Rate 1 (factors 1.05 / 0.5): an accepted first call, then a rise."""
    opt = dynamic_lr(1.0, reject_steps=True)
    state = opt.init(first_update)
    _, state = opt.update(first_update, state, params, value=1.0)
    updates, state = opt.update(second_update, state, params, value=2.0)
    return updates, state


def test_rejection_with_params_that_do_not_match_the_updates_retries():
    # The parameters hold a function where the updates hold None (as a model
    # object with its gradients filtered would): nothing tells whether the retry
    # is lost, so the rise is rejected, rate 0.5, update (0.5 - 1) * 1e-8.
    params = {"w": jnp.ones(1), "activation": jax.nn.relu}
    first = {"w": jnp.full(1, 1e-8), "activation": None}
    second = {"w": jnp.full(1, 5.0), "activation": None}
    updates, state = _second_call_after_a_tiny_step(params, first, second)
    assert int(state.num_rejections) == 1
    np.testing.assert_allclose(float(updates["w"][0]), -5e-9, rtol=1e-6)


def test_rejection_with_complex_params_retries_without_error():
    # Complex parameters have no spacing to compare with, so they are retried:
    # update (0.5 - 1) * 1e-8.
    params = jnp.ones(1, jnp.complex64)
    first = jnp.full(1, 1e-8, jnp.complex64)
    second = jnp.full(1, 5.0, jnp.complex64)
    updates, state = _second_call_after_a_tiny_step(params, first, second)
    assert int(state.num_rejections) == 1
    np.testing.assert_allclose(complex(updates[0]), -5e-9, rtol=1e-6)


def test_rejection_compares_float64_params_in_float64():
    # With x64, p = 1e60 and a step of 1e60: the retry moves p by
    # (0.5 - 1) * 1e60, far more than its spacing (about 1.5e44), so the rise is
    # rejected. In float32 both numbers would overflow to inf and look lost.
    with jax.enable_x64(True):
        params = jnp.full(1, 1e60, jnp.float64)
        first = jnp.full(1, 1e60, jnp.float64)
        updates, state = _second_call_after_a_tiny_step(params, first, first)
        assert int(state.num_rejections) == 1
        np.testing.assert_allclose(float(updates[0]), -5e59, rtol=1e-6)
