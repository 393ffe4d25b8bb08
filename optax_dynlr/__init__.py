"""A dynamic learning rate for Optax: grow it while the loss falls, cut it when
the loss rises."""

from optax_dynlr._dynamic_lr import DynamicLRState, dynamic_lr
from optax_dynlr._plot import plot_training
from optax_dynlr._state import current_learning_rate, find_dynamic_lr_state

__all__ = [
    "DynamicLRState",
    "current_learning_rate",
    "dynamic_lr",
    "find_dynamic_lr_state",
    "plot_training",
]

__version__ = "0.1.0"
