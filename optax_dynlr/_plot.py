"""A quick look at a training run: the loss and the rate against the step."""

from typing import Any

import numpy as np


def plot_training(
    losses: Any,
    rates: Any,
    path: Any = None,
    ax: Any = None,
    *,
    title: str | None = None,
) -> tuple[Any, Any]:
    """Draws the loss and the learning rate of a run against the step.

    The loss goes on the left axis and the rate on a right twin axis, both on
    a log scale, so a rate cut shows next to the rise in the loss that caused
    it. Non-finite and non-positive losses leave gaps.

    Needs matplotlib, which ``optax_dynlr`` itself does not depend on: install
    it with ``pip install optax_dynlr[examples]``.

    Args:
      losses: one loss per step, any array-like (a list of scalars, a NumPy
        or JAX array).
      rates: one learning rate per step, as logged from
        :func:`optax_dynlr.current_learning_rate`; the same length as
        ``losses``.
      path: if given, the figure is saved there (format from the suffix) and,
        when this call created it, closed.
      ax: a matplotlib ``Axes`` to draw the loss on; by default a new figure.
      title: an optional title for the axes.

    Returns:
      The pair ``(loss_ax, rate_ax)`` of matplotlib axes.

    Raises:
      ImportError: if matplotlib is not installed.
      ValueError: if ``losses`` and ``rates`` differ in length.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "plot_training needs matplotlib, which optax_dynlr does not install "
            "by default: pip install 'optax_dynlr[examples]' (or matplotlib)."
        ) from error

    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    rates = np.asarray(rates, dtype=np.float64).reshape(-1)
    if losses.shape != rates.shape:
        raise ValueError(
            f"losses and rates must have one value per step each, got "
            f"{losses.size} losses and {rates.size} rates."
        )
    steps = np.arange(1, losses.size + 1)

    created = ax is None
    if created:
        figure, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    else:
        figure = ax.figure

    ax.plot(steps, losses, color="tab:blue", label="loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    rate_ax = ax.twinx()
    rate_ax.plot(steps, rates, color="tab:orange", label="learning rate")
    rate_ax.set_yscale("log")
    rate_ax.set_ylabel("learning rate", color="tab:orange")
    if title is not None:
        ax.set_title(title)

    if path is not None:
        figure.savefig(path, dpi=120)
        if created:
            # A figure made only to be saved would otherwise stay registered
            # with pyplot and pile up over a loop of runs.
            plt.close(figure)
    return ax, rate_ax
