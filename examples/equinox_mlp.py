"""Training an Equinox MLP on the digits with a dynamic learning rate.

The optimizer sees only the model's floating-point arrays
(``eqx.filter(model, eqx.is_inexact_array)``), and the loss reaches the rule as
``optimizer.update(grads, opt_state, params, value=loss)``. The whole training
set is one batch: the rule compares one loss with the next, which needs
losses that do not jitter from batch to batch.

    python examples/equinox_mlp.py --steps 600 --plot equinox_mlp.png

Needs ``pip install optax_dynlr[examples]`` (equinox, scikit-learn, tqdm and,
for ``--plot``, matplotlib).
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from optax_dynlr import current_learning_rate, dynamic_lr, plot_training


def load_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = jnp.asarray(digits.data / 16.0, jnp.float32)
    labels = jnp.asarray(digits.target, jnp.int32)
    return inputs, labels


@eqx.filter_jit
def create_model(key):
    # One compiled call instead of one small compilation per random draw.
    return eqx.nn.MLP(
        in_size=64, out_size=10, width_size=64, depth=1, activation=jnp.tanh, key=key
    )


def loss_fn(model, inputs, labels):
    logits = jax.vmap(model)(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_step(optimizer):
    @eqx.filter_jit
    def step(model, opt_state, inputs, labels):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, inputs, labels)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
        model = eqx.apply_updates(model, updates)
        return model, opt_state, loss, current_learning_rate(opt_state)

    return step


def train(num_steps=600, learning_rate=0.1, key=None, progress=True):
    """Trains the MLP; returns the per-step log, the model and the state.

    Args:
      num_steps: number of full-batch steps.
      learning_rate: the starting rate.
      key: the random key that initializes the model; ``jax.random.key(0)`` by
        default.
      progress: whether to show a progress bar.

    Returns:
      A dict with ``losses`` and ``rates`` (NumPy, one per step: the loss the
      step saw and the rate that scaled its update), ``model`` and
      ``opt_state``.
    """
    inputs, labels = load_digits()
    model = create_model(jax.random.key(0) if key is None else key)
    optimizer = optax.chain(dynamic_lr(learning_rate), optax.sgd(1.0))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step_fn = make_step(optimizer)

    losses, rates = [], []
    with tqdm(range(num_steps), disable=not progress) as bar:
        for step in bar:
            model, opt_state, loss, rate = step_fn(model, opt_state, inputs, labels)
            # Kept as device arrays: converting each step would wait for it.
            losses.append(loss)
            rates.append(rate)
            if step % 25 == 0 or step == num_steps - 1:
                bar.set_postfix(loss=f"{float(loss):.4f}", rate=f"{float(rate):.4g}")

    return {
        "losses": np.asarray(jax.device_get(losses)),
        "rates": np.asarray(jax.device_get(rates)),
        "model": model,
        "opt_state": opt_state,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--plot", help="save a plot of loss and rate here")
    args = parser.parse_args()

    result = train(args.steps, args.learning_rate)
    losses, rates = result["losses"], result["rates"]
    print(
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f} after {len(losses)} steps; "
        f"rate {args.learning_rate:g} -> {rates[-1]:.4g}"
    )
    if args.plot:
        plot_training(losses, rates, args.plot, title="Equinox MLP on digits")
        print(f"plot saved to {args.plot}")


if __name__ == "__main__":
    main()
