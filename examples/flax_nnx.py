"""Training a Flax NNX classifier on the digits with a dynamic learning rate.

``nnx.Optimizer.update`` forwards its keyword arguments to the optax update, so
the loss reaches the rule as ``optimizer.update(model, grads, value=loss)``.
The whole training set is one batch: the rule compares one loss with the
next, which needs losses that do not jitter from batch to batch.

    python examples/flax_nnx.py --steps 600 --plot flax_nnx.png

Needs ``pip install optax_dynlr[examples]`` (flax, scikit-learn, tqdm and, for
``--plot``, matplotlib).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from optax_dynlr import current_learning_rate, dynamic_lr, plot_training


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, sizes=(64, 64, 10)):
        self.hidden = nnx.Linear(sizes[0], sizes[1], rngs=rngs)
        self.output = nnx.Linear(sizes[1], sizes[2], rngs=rngs)

    def __call__(self, inputs):
        return self.output(jnp.tanh(self.hidden(inputs)))


def load_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = jnp.asarray(digits.data / 16.0, jnp.float32)
    labels = jnp.asarray(digits.target, jnp.int32)
    return inputs, labels


@nnx.jit
def create_model(key):
    # One compiled call instead of one small compilation per random draw.
    return MLP(nnx.Rngs(key))


def read_rate(optimizer):
    return current_learning_rate(optimizer.opt_state)


@nnx.jit
def train_step(model, optimizer, inputs, labels):
    def loss_fn(model):
        logits = model(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, value=loss)
    return loss, read_rate(optimizer)


def train(num_steps=600, learning_rate=0.1, key=None, progress=True):
    """Trains the MLP; returns the per-step log, the model and the optimizer.

    Args:
      num_steps: number of full-batch steps.
      learning_rate: the starting rate.
      key: the random key that initializes the model; ``jax.random.key(0)`` by
        default.
      progress: whether to show a progress bar.

    Returns:
      A dict with ``losses`` and ``rates`` (NumPy, one per step: the loss the
      step saw and the rate that scaled its update), ``model`` and
      ``optimizer``.
    """
    inputs, labels = load_digits()
    model = create_model(jax.random.key(0) if key is None else key)
    optimizer = nnx.Optimizer(
        model, optax.chain(dynamic_lr(learning_rate), optax.sgd(1.0)), wrt=nnx.Param
    )

    losses, rates = [], []
    with tqdm(range(num_steps), disable=not progress) as bar:
        for step in bar:
            loss, rate = train_step(model, optimizer, inputs, labels)
            # Kept as device arrays: converting each step would wait for it.
            losses.append(loss)
            rates.append(rate)
            if step % 25 == 0 or step == num_steps - 1:
                bar.set_postfix(loss=f"{float(loss):.4f}", rate=f"{float(rate):.4g}")

    return {
        "losses": np.asarray(jax.device_get(losses)),
        "rates": np.asarray(jax.device_get(rates)),
        "model": model,
        "optimizer": optimizer,
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
        plot_training(losses, rates, args.plot, title="Flax NNX MLP on digits")
        print(f"plot saved to {args.plot}")


if __name__ == "__main__":
    main()
