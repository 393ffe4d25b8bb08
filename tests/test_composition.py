"""dynamic_lr among other Optax transforms and wrappers."""

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

NAN = float("nan")

# The worked example's losses and the rates they give with dynamic_lr(0.1).
LOSSES = [1.0, 0.9, 1.2]
RATES = [0.1, 0.105, 0.0525]


def run(opt, params, grads, losses, jit=True):
    """One call per loss with fixed gradients; each call's updates and state."""

    def step(state, params, loss):
        return opt.update(grads, state, params, value=loss)

    if jit:
        step = jax.jit(step)
    state = opt.init(params)
    all_updates = []
    for loss in losses:
        updates, state = step(state, params, loss)
        params = optax.apply_updates(params, updates)
        all_updates.append(updates)
    return all_updates, params, state


def numpy_adam(scaled_grads, b1=0.9, b2=0.999, eps=1e-8):
    """Adam with learning rate 1 in float64, one row of gradients per step."""
    m = np.zeros_like(scaled_grads[0])
    v = np.zeros_like(scaled_grads[0])
    out = []
    for t, g in enumerate(scaled_grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        out.append(-m_hat / (np.sqrt(v_hat) + eps))
    return np.array(out)


GRADS = jnp.array([1.0, -2.0, 0.5, 3.0])


def test_before_plain_sgd_on_a_pytree():
    opt = optax.chain(dynamic_lr(0.1), optax.sgd(1.0))
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    grads = {"w": jnp.full((2, 2), 2.0), "b": jnp.full(2, -1.0)}
    _, params, state = run(opt, params, grads, LOSSES)

    # Each leaf moves by -(0.1 + 0.105 + 0.0525) * gradient = -0.2575 * g.
    np.testing.assert_allclose(params["w"], np.full((2, 2), -0.515), rtol=1e-6)
    np.testing.assert_allclose(params["b"], np.full(2, 0.2575), rtol=1e-6)
    np.testing.assert_allclose(current_learning_rate(state), 0.0525, rtol=1e-6)


def test_last_after_momentum_scales_the_final_update():
    # Momentum 0.9 with gradient 1: traces 1, 1.9, 2.71, so sgd proposes
    # -1, -1.9, -2.71 and the rate scales each: -0.1, -0.1995, -0.142275.
    opt = optax.chain(optax.sgd(1.0, momentum=0.9), dynamic_lr(0.1))
    updates, _, _ = run(opt, jnp.zeros(()), jnp.ones(()), LOSSES)
    np.testing.assert_allclose(
        [float(u) for u in updates], [-0.1, -0.1995, -0.142275], rtol=1e-6
    )


def test_before_momentum_the_rate_is_folded_into_the_buffer():
    # The trace accumulates the scaled gradients 0.1, 0.105, 0.0525:
    # 0.1, 0.09 + 0.105 = 0.195, 0.1755 + 0.0525 = 0.228. The rise at the
    # third call cuts the rate, yet the step still grows, from 0.195 to 0.228.
    opt = optax.chain(dynamic_lr(0.1), optax.sgd(1.0, momentum=0.9))
    updates, _, _ = run(opt, jnp.zeros(()), jnp.ones(()), LOSSES)
    np.testing.assert_allclose(
        [float(u) for u in updates], [-0.1, -0.195, -0.228], rtol=1e-6
    )


def test_last_after_adam_multiplies_adams_update():
    # With constant gradients Adam's bias-corrected ratio is g / (|g| + eps),
    # so each of its updates is -sign(g) to within 1e-8; the rate scales that.
    opt = optax.chain(optax.adam(1.0), dynamic_lr(0.1))
    updates, _, _ = run(opt, jnp.zeros(4), GRADS, LOSSES)
    adam_alone, _, _ = run(optax.adam(1.0), jnp.zeros(4), GRADS, LOSSES)

    for rate, update, plain in zip(RATES, updates, adam_alone, strict=True):
        # Adam's float32 bias correction 1 - 0.999**t is good to about 1e-5.
        np.testing.assert_allclose(update, -rate * np.sign(GRADS), rtol=5e-5)
        np.testing.assert_allclose(update, np.float32(rate) * plain, rtol=1e-6)


def test_before_adam_the_rate_is_divided_away():
    # Adam normalises its input, so the scale in front of it cancels: the
    # first update is -sign(g), ten times the rate-scaled step, and a start
    # at 0.001 instead of 0.1 gives the same updates.
    opt = optax.chain(dynamic_lr(0.1), optax.adam(1.0))
    updates, _, _ = run(opt, jnp.zeros(4), GRADS, LOSSES)
    updates = np.array(updates)

    reference = numpy_adam(np.array(RATES)[:, None] * np.asarray(GRADS)[None, :])
    # Adam's float32 bias correction 1 - 0.999**t is good to about 1e-5.
    np.testing.assert_allclose(updates, reference, rtol=5e-5)
    np.testing.assert_allclose(updates[0], -np.sign(GRADS), rtol=5e-5)

    small_start = optax.chain(dynamic_lr(0.001), optax.adam(1.0))
    small_updates, _, _ = run(small_start, jnp.zeros(4), GRADS, LOSSES)
    np.testing.assert_allclose(np.array(small_updates), updates, rtol=1e-4)


@pytest.mark.parametrize("reject_steps", [False, True])
def test_inside_masked_only_the_masked_leaves_are_scaled(reject_steps):
    mask = {"scaled": True, "plain": False}
    opt = optax.chain(
        optax.masked(dynamic_lr(0.1, reject_steps=reject_steps), mask),
        optax.sgd(1.0),
    )
    params = {"scaled": jnp.zeros(2), "plain": jnp.zeros(3)}
    grads = jax.tree.map(jnp.ones_like, params)
    updates, params, state = run(opt, params, grads, [1.0, 0.9])

    np.testing.assert_allclose(updates[1]["scaled"], [-0.105, -0.105], rtol=1e-6)
    np.testing.assert_array_equal(updates[1]["plain"], [-1.0, -1.0, -1.0])
    np.testing.assert_allclose(params["scaled"], [-0.205, -0.205], rtol=1e-6)
    np.testing.assert_allclose(current_learning_rate(state), 0.105, rtol=1e-6)


def test_inside_named_chain():
    opt = optax.named_chain(("rate", dynamic_lr(0.1)), ("sgd", optax.sgd(1.0)))
    updates, _, state = run(opt, jnp.zeros(2), jnp.ones(2), LOSSES)

    assert isinstance(state["rate"], DynamicLRState)
    np.testing.assert_allclose(state["rate"].learning_rate, 0.0525, rtol=1e-6)
    np.testing.assert_allclose(current_learning_rate(state), 0.0525, rtol=1e-6)
    np.testing.assert_allclose(updates[2], [-0.0525, -0.0525], rtol=1e-6)


def test_deeply_nested_wrappers_still_find_the_rate():
    inner = optax.named_chain(
        ("clip", optax.clip_by_global_norm(100.0)),
        ("rate", optax.masked(dynamic_lr(0.1), {"a": True})),
        ("sgd", optax.sgd(1.0)),
    )
    opt = optax.MultiSteps(optax.apply_if_finite(inner, 3), every_k_schedule=1)
    _, params, state = run(opt, {"a": jnp.zeros(2)}, {"a": jnp.ones(2)}, LOSSES)

    np.testing.assert_allclose(current_learning_rate(state), 0.0525, rtol=1e-6)
    assert int(find_dynamic_lr_state(state).num_rises) == 1
    np.testing.assert_allclose(params["a"], [-0.2575, -0.2575], rtol=1e-6)


def test_multi_steps_inside_another_wrapper_needs_its_extra_args_kept():
    # optax.MultiSteps is not a GradientTransformationExtraArgs, and neither is
    # its gradient_transformation(), so a wrapper around it drops value=loss.
    # Rebuilding it from its init and update keeps the keyword arguments.
    multi = optax.MultiSteps(
        optax.chain(dynamic_lr(0.1), optax.sgd(1.0)), every_k_schedule=2
    )
    opt = optax.apply_if_finite(
        optax.GradientTransformationExtraArgs(multi.init, multi.update), 3
    )
    updates, _, state = run(opt, jnp.zeros(2), jnp.ones(2), [5.0, 1.0, 5.0, 0.9])

    np.testing.assert_allclose(current_learning_rate(state), 0.105, rtol=1e-6)
    np.testing.assert_allclose(updates[3], [-0.105, -0.105], rtol=1e-6)


def test_apply_if_finite_skips_a_call_with_nan_gradients_entirely():
    # The second call's gradients are nan, so apply_if_finite keeps the old
    # inner state: the rule never sees its loss 0.9, and the third loss 0.8
    # is compared with 1.0, growing the rate once to 0.105.
    opt = optax.apply_if_finite(
        optax.chain(dynamic_lr(0.1), optax.sgd(1.0)), max_consecutive_errors=3
    )
    params = jnp.zeros(2)
    state = opt.init(params)
    step = jax.jit(lambda g, s, v: opt.update(g, s, params, value=v))
    rates, got = [], []
    for grads, loss in [
        (jnp.ones(2), 1.0),
        (jnp.full(2, NAN), 0.9),
        (jnp.ones(2), 0.8),
    ]:
        updates, state = step(grads, state, loss)
        rates.append(float(current_learning_rate(state)))
        got.append(updates)

    np.testing.assert_allclose(rates, [0.1, 0.1, 0.105], rtol=1e-6)
    np.testing.assert_array_equal(got[1], [0.0, 0.0])
    assert int(find_dynamic_lr_state(state).count) == 2


def test_inject_hyperparams_keeps_the_starting_rate_apart_from_the_live_one():
    opt = optax.inject_hyperparams(dynamic_lr)(learning_rate=0.1, increase_factor=1.05)
    params = jnp.zeros(2)
    state = opt.init(params)
    step = jax.jit(lambda s, v: opt.update(jnp.ones(2), s, params, value=v))

    _, state = step(state, 1.0)
    _, state = step(state, 0.9)
    # The injected learning_rate is the starting rate, read only by init; the
    # live rate is in the inner state.
    np.testing.assert_allclose(state.hyperparams["learning_rate"], 0.1, rtol=1e-7)
    np.testing.assert_allclose(current_learning_rate(state), 0.105, rtol=1e-6)

    # A changed factor takes effect at the next fall: 0.105 * 2 = 0.21.
    state.hyperparams["increase_factor"] = jnp.asarray(2.0)
    updates, state = step(state, 0.5)
    np.testing.assert_allclose(current_learning_rate(state), 0.21, rtol=1e-6)
    np.testing.assert_allclose(updates, [0.21, 0.21], rtol=1e-6)


def test_reading_the_rate_without_a_dynamic_lr_state_raises():
    state = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0).init(jnp.zeros(2))
    with pytest.raises(ValueError, match="no DynamicLRState"):
        current_learning_rate(state)
    with pytest.raises(ValueError, match="no DynamicLRState"):
        find_dynamic_lr_state(optax.sgd(1.0).init(jnp.zeros(2)))


def test_reading_the_rate_with_two_dynamic_lr_states_raises():
    opt = optax.chain(dynamic_lr(0.1), optax.sgd(1.0), dynamic_lr(0.2))
    state = opt.init(jnp.zeros(2))
    with pytest.raises(ValueError, match="2 DynamicLRState"):
        current_learning_rate(state)
    with pytest.raises(ValueError, match="2 DynamicLRState"):
        find_dynamic_lr_state(state)
    # Each one can still be read from its place in the chain.
    assert float(state[0].learning_rate) == np.float32(0.1)
    assert float(state[2].learning_rate) == np.float32(0.2)
