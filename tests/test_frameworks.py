"""The transform inside Flax NNX and Equinox training, logging and plotting."""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_dynlr import (
    current_learning_rate,
    dynamic_lr,
    find_dynamic_lr_state,
    plot_training,
)

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
MIN_RATE, MAX_RATE = 1e-10, 1e10


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rates_by_rule(losses, start_rate, increase=1.1, decrease=0.3):
    """The rate after each loss, by the rule written out in float32 NumPy."""
    rate = np.float32(start_rate)
    previous = None
    rates = []
    for loss in np.asarray(losses, np.float32):
        if previous is not None and loss < previous:
            rate = min(rate * np.float32(increase), np.float32(MAX_RATE))
        elif previous is not None and loss > previous:
            rate = max(rate * np.float32(decrease), np.float32(MIN_RATE))
        previous = loss
        rates.append(rate)
    return np.array(rates, np.float32)


# Models drawn with "rbg" keys compile seconds faster on CPU than with the
# default threefry keys; the training itself is the same.
FAST_KEY_IMPL = "rbg"


def check_training_log(losses, rates, state_rate, start_rate):
    assert losses.shape == rates.shape == (60,)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]
    assert np.all((rates >= MIN_RATE) & (rates <= MAX_RATE))
    # Full-batch losses from a small start fall for dozens of steps in a row.
    assert rates[-1] > start_rate
    # The framework handed every step's loss to the rule as value=loss.
    np.testing.assert_allclose(rates, rates_by_rule(losses, start_rate), rtol=1e-6)
    assert rates[-1] == state_rate


def test_flax_nnx_example_trains_and_logs_the_rate():
    example = load_example("flax_nnx")
    key = jax.random.key(0, impl=FAST_KEY_IMPL)
    result = example.train(num_steps=60, learning_rate=0.1, key=key, progress=False)

    state_rate = current_learning_rate(result["optimizer"].opt_state)[...]
    check_training_log(result["losses"], result["rates"], state_rate, 0.1)
    assert find_dynamic_lr_state(result["optimizer"].opt_state).count[...] == 60


def test_equinox_example_trains_and_logs_the_rate():
    example = load_example("equinox_mlp")
    # With the progress bar, so that its updates run too.
    key = jax.random.key(0, impl=FAST_KEY_IMPL)
    result = example.train(num_steps=60, learning_rate=0.1, key=key, progress=True)

    state_rate = current_learning_rate(result["opt_state"])
    check_training_log(result["losses"], result["rates"], state_rate, 0.1)
    assert find_dynamic_lr_state(result["opt_state"]).count == 60


def test_plot_training_draws_loss_and_rate_on_log_axes(tmp_path):
    losses = [2.0, 1.0, 1.5, 0.5]
    rates = [0.1, 0.105, 0.0525, 0.055125]
    path = tmp_path / "run.png"

    loss_ax, rate_ax = plot_training(losses, np.array(rates), path, title="run")

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (loss_line,) = loss_ax.get_lines()
    (rate_line,) = rate_ax.get_lines()
    np.testing.assert_array_equal(loss_line.get_xdata(), [1, 2, 3, 4])
    np.testing.assert_array_equal(loss_line.get_ydata(), losses)
    np.testing.assert_array_equal(rate_line.get_ydata(), rates)
    assert loss_ax.get_yscale() == rate_ax.get_yscale() == "log"
    assert loss_ax.get_title() == "run"


def test_plot_training_draws_on_given_axes():
    from matplotlib.figure import Figure

    figure = Figure()
    ax = figure.subplots()
    loss_ax, rate_ax = plot_training(
        jnp.array([1.0, 0.5]), jnp.array([0.1, 0.105]), ax=ax
    )

    assert loss_ax is ax
    assert rate_ax.figure is figure
    np.testing.assert_allclose(rate_ax.get_lines()[0].get_ydata(), [0.1, 0.105])


def test_plot_training_rejects_logs_of_different_lengths():
    with pytest.raises(ValueError, match="3 losses and 2 rates"):
        plot_training([1.0, 0.9, 0.8], [0.1, 0.105])


def test_plot_training_without_matplotlib_says_what_to_install(monkeypatch):
    # A None entry in sys.modules makes the import fail as if not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"optax_dynlr\[examples\]"):
        plot_training([1.0], [0.1])


def reference_descent_on_square(start_rate, reject_steps, num_steps):
    """Gradient descent on x**2 from x = 1 with the rule, in plain Python.

    With step rejection, a rise returns x to the last accepted point and steps
    from there along that point's gradient with the cut rate.
    """
    x, rate, previous = 1.0, start_rate, None
    accepted_x = accepted_grad = None
    log = {name: [] for name in ("loss", "learning_rate", "num_falls", "num_rises")}
    log["num_rejections"] = []
    falls = rises = rejections = 0
    for _ in range(num_steps):
        loss, grad = x * x, 2.0 * x
        fell = previous is not None and loss < previous
        rose = previous is not None and loss > previous
        if fell:
            rate, falls = rate * 1.05, falls + 1
        elif rose:
            rate, rises = rate * 0.5, rises + 1
        if reject_steps and rose:
            rejections += 1
            x = accepted_x - rate * accepted_grad
        else:
            accepted_x, accepted_grad, previous = x, grad, loss
            x = x - rate * grad
        for name, value in [
            ("loss", loss),
            ("learning_rate", rate),
            ("num_falls", falls),
            ("num_rises", rises),
            ("num_rejections", rejections),
        ]:
            log[name].append(value)
    return {name: np.array(values) for name, values in log.items()}


@pytest.mark.parametrize("reject_steps", [False, True])
def test_logging_rate_and_counts_as_scan_outputs(reject_steps):
    def loss_fn(params):
        return jnp.sum(params**2)

    params = jnp.array([1.0])

    # The snippet: the rate and the counts leave the jitted scan as its
    # outputs, one row per step, with no transfer to the host inside the loop.
    rule = dynamic_lr(
        0.9, increase_factor=1.05, decrease_factor=0.5, reject_steps=reject_steps
    )
    optimizer = optax.chain(rule, optax.sgd(1.0))
    opt_state = optimizer.init(params)

    @jax.jit
    def train(params, opt_state):
        def step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
            params = optax.apply_updates(params, updates)
            dlr = find_dynamic_lr_state(opt_state)
            log = {
                "loss": loss,
                "learning_rate": dlr.learning_rate,
                "num_falls": dlr.num_falls,
                "num_rises": dlr.num_rises,
                "num_nonfinite": dlr.num_nonfinite,
                "num_rejections": dlr.num_rejections,
            }
            return (params, opt_state), log

        return jax.lax.scan(step, (params, opt_state), length=40)

    (params, opt_state), log = train(params, opt_state)
    # End of the snippet.

    # By hand, from x = 1 with x <- x - 2 * rate * x: the losses 1, 0.64,
    # 0.506944, 0.491350 fall and give the rates 0.9, 0.945, 0.99225,
    # 1.0418625; x overshoots to 0.759652, the loss 0.577071 rises and the
    # rate is cut to 0.52093125.
    np.testing.assert_allclose(
        log["learning_rate"][:5],
        [0.9, 0.945, 0.99225, 1.0418625, 0.52093125],
        rtol=1e-6,
    )
    expected = reference_descent_on_square(0.9, reject_steps, num_steps=40)
    np.testing.assert_allclose(log["loss"], expected["loss"], rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(
        log["learning_rate"], expected["learning_rate"], rtol=1e-5
    )
    for name in ("num_falls", "num_rises", "num_rejections"):
        assert log[name].dtype == jnp.int32
        np.testing.assert_array_equal(log[name], expected[name])
    np.testing.assert_array_equal(log["num_nonfinite"], np.zeros(40))
    assert expected["num_rises"][-1] > 0
    if reject_steps:
        assert expected["num_rejections"][-1] > 0
    assert log["learning_rate"][-1] == current_learning_rate(opt_state)
