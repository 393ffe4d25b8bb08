"""Finding the dynamic learning rate's state inside a whole optimizer state."""

from typing import Any

import jax
import jax.numpy as jnp

from optax_dynlr._dynamic_lr import DynamicLRState


def find_dynamic_lr_state(opt_state: Any) -> DynamicLRState:
    """Returns the one :class:`DynamicLRState` inside an optimizer state.

    Searches the whole state as a pytree, so the transform may sit in
    ``optax.chain``, ``optax.named_chain``, ``optax.inject_hyperparams``,
    ``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.masked`` or any
    nesting of them. Works inside ``jax.jit``.

    Args:
      opt_state: the state returned by the optimizer's ``init`` or ``update``.

    Returns:
      The :class:`DynamicLRState`, whose fields hold the rate and the counts of
      falls, rises, non-finite losses and rejected steps.

    Raises:
      ValueError: if the state holds no :class:`DynamicLRState`, or more than
        one.
    """
    found = [
        leaf
        for leaf in jax.tree.leaves(
            opt_state, is_leaf=lambda node: isinstance(node, DynamicLRState)
        )
        if isinstance(leaf, DynamicLRState)
    ]
    if not found:
        raise ValueError(
            "The optimizer state holds no DynamicLRState: was the optimizer built "
            "with optax_dynlr.dynamic_lr?"
        )
    if len(found) > 1:
        raise ValueError(
            f"The optimizer state holds {len(found)} DynamicLRState values, so "
            "the rate to return is ambiguous; read each one from its place in the "
            "state instead."
        )
    return found[0]


def current_learning_rate(opt_state: Any) -> jax.Array:
    """Returns the rate that scaled the most recent update.

    Before the first update it is the starting rate. The result is a float32
    array (a scalar, or one rate per model under ``jax.vmap``), so it can be
    logged from inside a jitted step without a host round trip.

    Args:
      opt_state: the state returned by the optimizer's ``init`` or ``update``.

    Returns:
      The ``learning_rate`` field of the one :class:`DynamicLRState` in the
      state.

    Raises:
      ValueError: if the state holds no :class:`DynamicLRState`, or more than
        one.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from optax_dynlr import current_learning_rate, dynamic_lr
      >>> opt = optax.chain(
      ...     dynamic_lr(0.1, increase_factor=1.05),
      ...     optax.inject_hyperparams(optax.sgd)(learning_rate=1.0),
      ... )
      >>> params = jnp.zeros(3)
      >>> state = opt.init(params)
      >>> for loss in [1.0, 0.9]:
      ...     _, state = opt.update(jnp.ones(3), state, params, value=loss)
      >>> print(f"{float(current_learning_rate(state)):.3f}")
      0.105
    """
    # asarray unwraps frameworks' variable boxes (Flax NNX keeps each state leaf
    # in one) and is free on a plain array.
    return jnp.asarray(find_dynamic_lr_state(opt_state).learning_rate)
