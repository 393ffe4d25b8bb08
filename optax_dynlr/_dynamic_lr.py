"""The dynamic learning rate: grow it while the loss falls, cut it when it rises."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_dynlr import _noise_aware

_FLOAT = jnp.float32
_COUNT = jnp.int32


class DynamicLRState(NamedTuple):
    """State of :func:`dynamic_lr`.

    Every scalar is a 0-d array of a fixed dtype, so the state can be carried
    through ``jax.jit``, ``jax.lax.scan`` and ``jax.vmap`` and saved with the
    rest of the optimizer state.

    Attributes:
      learning_rate: float32, the rate that scaled the most recent update (the
        starting rate before the first update).
      previous_value: float32, the loss the next one is compared with: the last
        finite loss seen, or with step rejection the loss at the last accepted
        point. Zero until a finite loss has been seen.
      has_previous_value: bool, whether ``previous_value`` holds a loss yet.
      count: int32, number of updates made.
      num_falls: int32, updates whose loss fell, which grew the rate (with
        ``noise_aware``, updates whose decision was to grow it).
      num_rises: int32, updates whose loss rose beyond the tolerance or was not
        finite, which cut the rate (with ``noise_aware``, updates whose
        decision was to cut it).
      num_nonfinite: int32, updates whose loss was nan or infinite.
      num_rejections: int32, steps taken back (always zero without step
        rejection).
      accepted_direction: with step rejection, the incoming updates at the last
        accepted point, in each leaf's own dtype; ``None`` without it.
      trend: with ``noise_aware``, the statistics of recent losses that decide
        the rate, as one float32 vector in the order of the fields of
        ``optax_dynlr._noise_aware.TrendState``; ``None`` without it.
    """

    learning_rate: jax.Array
    previous_value: jax.Array
    has_previous_value: jax.Array
    count: jax.Array
    num_falls: jax.Array
    num_rises: jax.Array
    num_nonfinite: jax.Array
    num_rejections: jax.Array
    accepted_direction: Any
    trend: Any = None


_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# The starting rate used when a traced starting rate and bounds give none.
_SAFE_START = 1e-3


def _concrete(name: str, value: Any) -> np.ndarray | None:
    """Returns ``value`` as the float32 array the rule will compute with.

    Returns ``None`` if it is traced. Checking the float32 value catches numbers
    that are fine in float64 but overflow, vanish or round to a bound in
    float32 (a factor of 1 + 1e-9 is exactly 1 in float32).
    """
    if isinstance(value, jax.core.Tracer):
        return None
    if callable(value):
        raise TypeError(
            f"{name} must be a number, got the callable {value!r}. dynamic_lr "
            "chooses the rate itself from the losses, so it takes no schedule."
        )
    kind = np.asarray(value).dtype
    if not (jnp.issubdtype(kind, jnp.floating) or jnp.issubdtype(kind, jnp.integer)):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    as_float64 = np.asarray(value, dtype=np.float64)
    if as_float64.shape != ():
        raise ValueError(
            f"{name} must be a scalar, got an array of shape {as_float64.shape}. "
            "To train several models with their own rates, use jax.vmap."
        )
    with np.errstate(over="ignore", under="ignore"):
        return as_float64.astype(np.float32)


def _is_bad_rate(x: np.ndarray) -> np.ndarray:
    # Subnormal rates would be flushed to zero on many devices, and a rate of
    # zero can never grow again.
    return ~((x >= _FLOAT32_TINY) & (x <= _FLOAT32_MAX))


def _check_hyperparameters(hyperparameters: dict[str, Any]) -> None:
    """Raises ValueError for hyperparameters that are concrete and nonsensical.

    Traced hyperparameters (under ``optax.inject_hyperparams`` in a jitted step,
    or ``jax.vmap`` over starting rates) cannot be inspected and are let through;
    ``init`` clips a traced starting rate into the bounds, and ``update`` keeps a
    traced factor from inverting the rule.
    """
    values = {name: _concrete(name, x) for name, x in hyperparameters.items()}
    learning_rate = hyperparameters["learning_rate"]
    increase_factor = hyperparameters["increase_factor"]
    decrease_factor = hyperparameters["decrease_factor"]
    min_learning_rate = hyperparameters["min_learning_rate"]
    max_learning_rate = hyperparameters["max_learning_rate"]

    def known(name):
        return values[name] is not None

    def fails(name, condition):
        return known(name) and bool(np.any(condition(values[name])))

    rate_range = f"between {_FLOAT32_TINY:.3g} and {_FLOAT32_MAX:.3g} (float32)"
    if fails("learning_rate", _is_bad_rate):
        raise ValueError(
            f"learning_rate must be positive, {rate_range}, got {learning_rate}."
        )
    if fails("increase_factor", lambda x: ~((x > 1) & np.isfinite(x))):
        raise ValueError(
            "increase_factor must be a finite number greater than 1 in float32 "
            "(the rate is multiplied by it when the loss falls), got "
            f"{increase_factor}."
        )
    if fails("decrease_factor", lambda x: ~((x > 0) & (x < 1))):
        raise ValueError(
            "decrease_factor must lie strictly between 0 and 1 in float32 (the "
            f"rate is multiplied by it when the loss rises), got {decrease_factor}."
        )
    if fails("min_learning_rate", _is_bad_rate):
        raise ValueError(
            f"min_learning_rate must be positive, {rate_range} (a rate of zero "
            f"could never grow again), got {min_learning_rate}."
        )
    if fails("max_learning_rate", _is_bad_rate):
        raise ValueError(
            f"max_learning_rate must be positive, {rate_range}, got "
            f"{max_learning_rate}."
        )
    if known("min_learning_rate") and known("max_learning_rate"):
        if np.any(values["min_learning_rate"] > values["max_learning_rate"]):
            raise ValueError(
                f"min_learning_rate ({min_learning_rate}) must not exceed "
                f"max_learning_rate ({max_learning_rate})."
            )
    for name in ("min_learning_rate", "max_learning_rate"):
        if known("learning_rate") and known(name):
            outside = (
                values["learning_rate"] < values[name]
                if name == "min_learning_rate"
                else values["learning_rate"] > values[name]
            )
            if np.any(outside):
                raise ValueError(
                    f"learning_rate ({learning_rate}) must lie within "
                    f"[min_learning_rate, max_learning_rate]; it is outside "
                    f"{name} = {values[name]}."
                )
    for name in ("rtol", "atol"):
        if fails(name, lambda x: ~(x >= 0) | ~np.isfinite(x)):
            raise ValueError(
                f"{name} must be non-negative and finite, got {values[name]}."
            )


def _loss_as_float32(value: Any) -> jax.Array:
    """Checks that the loss was passed and is a scalar; returns it as float32."""
    if value is None:
        raise TypeError(
            "dynamic_lr needs the loss of the step: call "
            "update(updates, state, params, value=loss). The loss must be a "
            "scalar, for example the mean loss of the batch."
        )
    if isinstance(value, int) and not isinstance(value, bool):
        # A Python int beyond int32 would overflow on the way to an array.
        value = float(value)
    if isinstance(value, float | np.floating | np.ndarray) and np.issubdtype(
        np.asarray(value).dtype, np.floating
    ):
        # A host loss beyond float32's range becomes inf (a rise, as any
        # non-finite loss), without numpy's overflow warning on the way.
        with np.errstate(over="ignore"):
            value = np.asarray(value).astype(np.float32)
    try:
        value = jnp.asarray(value)
    except TypeError as error:
        raise TypeError(
            f"dynamic_lr needs a real scalar loss as value=loss, got {value!r}."
        ) from error
    if value.shape != ():
        raise ValueError(
            "dynamic_lr needs a scalar loss as value=loss, got an array of shape "
            f"{value.shape}. Pass the mean (or sum) of per-example losses."
        )
    if not (
        jnp.issubdtype(value.dtype, jnp.floating)
        or jnp.issubdtype(value.dtype, jnp.integer)
    ):
        raise ValueError(
            f"dynamic_lr needs a real-valued loss, got dtype {value.dtype}."
        )
    return value.astype(_FLOAT)


def _describe_trend(trend: Any) -> str:
    if trend is None:
        return "None (a state made without noise_aware)"
    shape = getattr(trend, "shape", None)
    if shape is not None:
        return f"an array of shape {tuple(shape)}"
    return f"a {type(trend).__name__}"


def _squared_norm(tree: Any) -> jax.Array:
    """The sum of squared magnitudes of every leaf, in float32."""
    total = jnp.zeros((), _FLOAT)
    for leaf in jax.tree.leaves(tree):
        leaf = jnp.asarray(leaf)
        if jnp.iscomplexobj(leaf):
            leaf = jnp.abs(leaf)
        total = total + jnp.sum(jnp.square(leaf.astype(_FLOAT)))
    return total


def _scale_tree(scale: jax.Array, tree: Any) -> Any:
    """Multiplies every leaf by a float32 scalar, keeping each leaf's dtype.

    The product is formed in the wider of the leaf's dtype and float32, so a
    bfloat16 leaf meets the full float32 rate and a float64 leaf keeps its
    precision.
    """

    def scale_leaf(leaf):
        if leaf is None:
            return None
        # Python floats and NumPy arrays become JAX arrays first, so a float64
        # NumPy leaf follows JAX's precision setting instead of asking for
        # float64 where it is off.
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise TypeError(
                "dynamic_lr scales floating-point updates; got a leaf of dtype "
                f"{leaf.dtype}, whose scaled updates would round to integers. "
                "Keep trainable parameters in a floating-point dtype."
            )
        compute_dtype = jnp.promote_types(leaf.dtype, _FLOAT)
        product = leaf.astype(compute_dtype) * scale.astype(compute_dtype)
        return product.astype(leaf.dtype)

    return jax.tree.map(scale_leaf, tree)


def dynamic_lr(
    learning_rate: jax.typing.ArrayLike,
    increase_factor: jax.typing.ArrayLike | None = None,
    decrease_factor: jax.typing.ArrayLike | None = None,
    min_learning_rate: jax.typing.ArrayLike = 1e-10,
    max_learning_rate: jax.typing.ArrayLike = 1e10,
    rtol: jax.typing.ArrayLike = 0.0,
    atol: jax.typing.ArrayLike = 0.0,
    *,
    reject_steps: bool = False,
    noise_aware: bool = False,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales updates by a rate that grows while the loss falls.

    Each call compares the loss passed as ``value`` with the previous finite
    loss :math:`\ell_{\text{prev}}` and adjusts the rate :math:`\eta` before
    scaling that call's updates:

    .. math::

      \eta_t = \begin{cases}
        \min(\eta_{t-1} \cdot \text{increase\_factor},\ \eta_{\max})
          & \ell_t < \ell_{\text{prev}} \\
        \max(\eta_{t-1} \cdot \text{decrease\_factor},\ \eta_{\min})
          & \ell_t > \ell_{\text{prev}} + \text{atol}
            + \text{rtol} \cdot |\ell_{\text{prev}}|
            \text{ or } \ell_t \text{ is not finite} \\
        \eta_{t-1} & \text{otherwise, and on the first call}
      \end{cases}

    and the call returns :math:`\eta_t \cdot u_t` for incoming updates
    :math:`u_t`. The comparison is signed, so negative losses work. A loss that
    is nan or infinite cuts the rate, gives all-zero updates and is not
    remembered: the next loss is compared with the last finite one.

    The rate lives in the state as float32 whatever the parameters' dtype, and
    stays within ``[min_learning_rate, max_learning_rate]``, reaching each bound
    exactly. Read it with :func:`optax_dynlr.current_learning_rate`.

    Place it before plain SGD, ``optax.chain(dynamic_lr(0.1), optax.sgd(1.0))``,
    or last in the chain after any other optimizer. Placed before Adam it does
    nothing (Adam divides the scale away), and placed before momentum it is
    folded into the momentum buffer.

    Args:
      learning_rate: the starting rate, positive. Only ``init`` reads it.
      increase_factor: multiplies the rate after a call whose loss fell; > 1.
        ``None`` picks 1.1, or 1.05 with ``noise_aware``.
      decrease_factor: multiplies the rate after a call whose loss rose, or was
        not finite; in (0, 1). ``None`` picks 0.3, or 0.5 with ``noise_aware``.
        Both defaults of the plain rule were chosen by measurement: on
        full-batch digits, breast-cancer and diabetes tasks, 1.1 / 0.3 reached
        the target in fewer steps than 1.05 / 0.5, 1.05 / 0.7 or 1.1 / 0.5
        from every starting rate.
      min_learning_rate: the floor of the rate; positive, so the rate can always
        grow again.
      max_learning_rate: the cap of the rate; finite.
      rtol: a rise smaller than ``atol + rtol * |previous loss|`` leaves the rate
        unchanged instead of cutting it.
      atol: see ``rtol``.
      reject_steps: if true, a call whose loss rose beyond the tolerance, or was
        not finite, takes back the step that raised it: its updates return the
        parameters to the last accepted point and step from there along the
        last accepted direction with the cut rate. Costs one buffer the size of
        the updates. The remembered loss is then the one at the last accepted
        point, and a loss equal to it grows the rate (a kept step too small to
        change the rounded parameters would otherwise hold the rate there for
        good). A finite rise is kept, at the rate that reached it, where a
        retry cannot move the parameters: while the rate sits at
        ``min_learning_rate``, or, when ``params`` passed to ``update`` are
        real floating-point arrays of the updates' structure, where the retry
        is smaller than a quarter of every parameter's floating-point spacing.
        That test assumes the updates reach the parameters unscaled (last in
        the chain, or before ``optax.sgd(1.0)``); a scale above 1 after this
        transform can make it keep a point a retry would still move.
      noise_aware: if true, decide from the trend of recent losses instead of
        comparing each loss with the previous one, for minibatch (noisy) losses.
        The log loss is fitted by least squares over a window that restarts
        after every decision and is tested at 4, 8, ..., 1024 calls. A
        significant fall multiplies the rate by ``increase_factor ** 4``
        (none for the first fall after a cut). A significant rise, a window
        mean three times the best earlier level, or a non-finite loss
        multiplies it by ``decrease_factor``. A single loss far above the
        recent ones (``max(ln 1.25, 10 sigma)``), or two in a row well above
        them (``max(ln 1.25, 3 sigma)``, the second counting a spike just cut
        as the first), do too, up to ``decrease_factor ** 3``. A rate below a
        twentieth of the stochastic Polyak step ``2 * loss / |updates|^2``
        (averaged over recent calls; the fraction halves with every cut)
        climbs by up to 1.21 (never past that guide) on each call whose loss
        is no higher than the one before, while the loss's average stays
        within 1.5 times its lowest; a rising loss never grows the rate.
        Losses below 1.19e-7 (float32's resolution) times the first one count
        as that, so a loss that reaches zero neither grows the rate for ever
        nor makes the next tiny loss look like a spike; before the first
        positive loss, a loss of zero or below changes nothing. Otherwise the
        rate is held. ``num_falls`` and ``num_rises`` then count the calls
        that decided to grow or cut the rate (also where a bound stopped it).
        The defaults become 1.05 and 0.5. The extra state is one float32
        vector of 20 statistics (``DynamicLRState.trend``); ``rtol`` and
        ``atol`` must be zero. With
        ``optax.MultiSteps``, pass the mean loss of the micro-batches
        accumulated so far: on the step that emits, that is the loss of the
        whole batch, and MultiSteps keeps this transform's state only from that
        step. See the warnings below for what it does not yet do well.
      axis_name: if given, the loss is averaged with ``jax.lax.pmean`` over this
        mapped axis before the rule (with ``noise_aware``, so is the squared
        norm of the updates, which assumes every device holds the whole update,
        as in data parallelism), so that every device of a ``shard_map`` or
        ``pmap`` computation keeps the same rate.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
      the loss as the keyword argument ``value``; other keyword arguments are
      ignored.

    Examples:
      The rates of the rule for the losses 1.0, 0.9, 1.2, nan, 0.8, with
      gradients of ones; the nan leaves the parameter where it was:

      >>> import jax.numpy as jnp
      >>> import optax
      >>> from optax_dynlr import current_learning_rate, dynamic_lr
      >>> rule = dynamic_lr(0.1, increase_factor=1.05, decrease_factor=0.5)
      >>> opt = optax.chain(rule, optax.sgd(1.0))
      >>> params = jnp.zeros(2)
      >>> state = opt.init(params)
      >>> for loss in [1.0, 0.9, 1.2, float("nan"), 0.8]:
      ...     updates, state = opt.update(jnp.ones(2), state, params, value=loss)
      ...     params = optax.apply_updates(params, updates)
      ...     rate = current_learning_rate(state)
      ...     print(f"rate {float(rate):.7f}, parameter {float(params[0]):.7f}")
      rate 0.1000000, parameter -0.1000000
      rate 0.1050000, parameter -0.2050000
      rate 0.0525000, parameter -0.2575000
      rate 0.0262500, parameter -0.2575000
      rate 0.0275625, parameter -0.2850625

    References:
      Vogl et al., `Accelerating the convergence of the back-propagation method
      <https://doi.org/10.1007/BF00332914>`_, 1988 (the "bold driver").

      Battiti, `Accelerated backpropagation learning: two optimization methods
      <https://www.complex-systems.com/abstracts/v03_i04_a02/>`_, 1989.

    .. warning::
      The rule compares one loss with the next. With minibatch losses, which
      rise about as often as they fall, a small increase against a sharp
      decrease drives the rate to ``min_learning_rate``. Feed it full-batch
      losses, or average the loss over many steps before passing it.

    .. warning::
      ``noise_aware=True`` needs positive losses (a loss of zero or below reads
      as the floor, a fall). Its climb reads the updates it receives as the
      gradient: put it first in the chain, before ``optax.sgd(1.0)``. After a
      preconditioner such as Adam, whose updates have entries near 1, the
      Polyak step is about ``2 * loss / (number of parameters)``: far too
      small to climb on a model of any size, so the slower trend test alone
      lifts a small rate (on a model of a few dozen parameters it may still
      climb). In its first calls it knows nothing of the noise, so a batch
      1.25 times the first loss already counts as a spike and cuts. Its guide
      assumes a loss whose minimum is near zero (cross-entropy); a loss with a
      large floor overstates it. It cannot undo the very first step: a start
      so large that one step breaks the network (a small tanh CNN from 10)
      stays broken. On full-batch losses it is slower than the plain rule:
      keep it off there.

    .. warning::
      The gradients are not checked: a finite loss with nan gradients passes
      nan updates through (and, with ``reject_steps``, into the buffer). Wrap
      the whole chain in ``optax.apply_if_finite`` to skip such steps.

    .. warning::
      With ``reject_steps``, the undo is exact in exact arithmetic when this
      transform is last in the chain or chained before plain ``optax.sgd``.
      After momentum or Adam the parameters still return to the last accepted
      point, but those optimizers' own state has already absorbed the rejected
      gradient. In floating point the undo is one more update, rounded at the
      magnitude of the rejected point, so it errs by up to half an ulp there:
      for a step 1,000 times the size of the parameters, about 4 times their
      size in bfloat16 and 6e-5 of it in float32. No update can do better,
      since the parameters themselves were rounded at the rejected point. The
      retries then close in on a point near the accepted one whose loss may be
      higher; once a retry no longer moves the parameters, that point is kept
      and training goes on from it at the small rate the retries reached. A
      step that overflows the parameters' dtype (float16 beyond 65504) cannot
      be undone at all: an infinite parameter stays infinite or turns nan. Do
      not use ``reject_steps`` with minibatch losses under the plain rule: a
      rejection then compares a new batch with the best loss of earlier ones
      and mostly undoes good steps. With ``noise_aware`` a step is taken back
      only when that rule cuts the rate, and only the last one, though the
      rise may have built up over many; that combination is not benchmarked.
    """
    for name, flag in [("reject_steps", reject_steps), ("noise_aware", noise_aware)]:
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"{name} must be True or False, got {flag!r}.")
    if axis_name is not None and not isinstance(axis_name, str | tuple):
        raise TypeError(
            "axis_name must be the name of a mapped axis (a string, or a tuple "
            f"of them), got {axis_name!r}."
        )
    if noise_aware:
        for name, tolerance in (("rtol", rtol), ("atol", atol)):
            value = _concrete(name, tolerance)
            if value is not None and np.any(value != 0):
                raise ValueError(
                    f"{name} has no effect with noise_aware=True, which decides "
                    f"from a statistical test instead; got {name}={tolerance}."
                )
    if increase_factor is None:
        increase_factor = 1.05 if noise_aware else 1.1
    if decrease_factor is None:
        decrease_factor = 0.5 if noise_aware else 0.3
    _check_hyperparameters(
        dict(
            learning_rate=learning_rate,
            increase_factor=increase_factor,
            decrease_factor=decrease_factor,
            min_learning_rate=min_learning_rate,
            max_learning_rate=max_learning_rate,
            rtol=rtol,
            atol=atol,
        )
    )

    def as_float(x):
        return jnp.asarray(x, dtype=_FLOAT)

    def init_fn(params) -> DynamicLRState:
        rate = _within_bounds(
            as_float(learning_rate),
            as_float(min_learning_rate),
            as_float(max_learning_rate),
            fallback=jnp.asarray(_SAFE_START, _FLOAT),
        )
        zero = jnp.zeros((), _COUNT)
        direction = None
        if reject_steps:
            direction = jax.tree.map(jnp.zeros_like, params)
        trend = None
        if noise_aware:
            trend = _noise_aware.pack(_noise_aware.init_trend())
        return DynamicLRState(
            learning_rate=rate,
            previous_value=jnp.zeros((), _FLOAT),
            has_previous_value=jnp.zeros((), jnp.bool_),
            count=zero,
            num_falls=zero,
            num_rises=zero,
            num_nonfinite=zero,
            num_rejections=zero,
            accepted_direction=direction,
            trend=trend,
        )

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        del extra_args
        if reject_steps and state.accepted_direction is None:
            raise ValueError(
                "dynamic_lr(reject_steps=True) got a state made without step "
                "rejection (accepted_direction is None); initialise the state "
                "with the same transform that updates it."
            )
        if not noise_aware and state.trend is not None:
            raise ValueError(
                "dynamic_lr(noise_aware=False) got a state made with "
                "noise_aware=True (its trend is not None); initialise the state "
                "with the same transform that updates it."
            )
        if noise_aware and jnp.shape(state.trend) != (_noise_aware.SIZE,):
            raise ValueError(
                "dynamic_lr(noise_aware=True) got a state whose trend is "
                f"{_describe_trend(state.trend)}, not the float32 vector of "
                f"{_noise_aware.SIZE} statistics it keeps; initialise the state "
                "with the same transform that updates it."
            )
        loss = _loss_as_float32(value)
        if axis_name is not None:
            loss = jax.lax.pmean(loss, axis_name)

        previous = state.previous_value
        finite = jnp.isfinite(loss)
        # Traced factors and tolerances are not checked at construction;
        # clamped here, a fall can never shrink the rate nor a rise grow it (not
        # even a negative factor raised to an even power), and a negative
        # tolerance cannot turn equal losses into rises.
        increase = jnp.maximum(as_float(increase_factor), 1)
        decrease = jnp.clip(as_float(decrease_factor), 0, 1)

        old_rate = state.learning_rate
        if noise_aware:
            norm_squared = _squared_norm(updates)
            if axis_name is not None:
                norm_squared = jax.lax.pmean(norm_squared, axis_name)
            multiplier, trend = _noise_aware.decide(
                _noise_aware.unpack(state.trend),
                loss,
                norm_squared,
                old_rate,
                increase,
                decrease,
            )
            # A non-finite loss says nothing about the trend but always cuts.
            multiplier = jnp.where(finite, multiplier, decrease)
            trend = jnp.where(finite, _noise_aware.pack(trend), state.trend)
            fell = multiplier > 1
            rose = multiplier < 1
        else:
            tolerance = jnp.maximum(as_float(atol), 0) + jnp.maximum(
                as_float(rtol), 0
            ) * jnp.abs(previous)
            # With step rejection an unchanged loss grows the rate: the step
            # was kept, and a step too small to change the parameters' rounding
            # leaves the loss exactly equal, which must not hold the rate there.
            no_higher = (loss <= previous) if reject_steps else (loss < previous)
            fell = finite & state.has_previous_value & no_higher
            rose = ~finite | (state.has_previous_value & (loss > previous + tolerance))
            multiplier = jnp.where(
                rose, decrease, jnp.where(fell, increase, jnp.ones((), _FLOAT))
            )
            trend = None
        rate = _within_bounds(
            old_rate * multiplier,
            as_float(min_learning_rate),
            as_float(max_learning_rate),
            fallback=old_rate,
        )

        if reject_steps:
            # Where a retry cannot move the parameters, retrying would land on
            # the same point forever (with a deterministic loss), so a finite
            # rise there is kept at the rate that reached it: at the floor, or
            # where the retry is lost to the parameters' rounding.
            stuck = rate >= old_rate
            if params is not None:
                stuck = stuck | _retry_is_lost(
                    params,
                    state.accepted_direction,
                    rate - old_rate,
                    axis_name,
                    needed=rose & finite & ~stuck,
                )
            keep = finite & stuck
            rate = jnp.where(rose & keep, old_rate, rate)
            accept = ~rose | keep
            new_updates, direction, previous = _step_with_rejection(
                updates, state, accept, loss, rate
            )
            rejected = ~accept & state.has_previous_value
        else:
            scaled = _scale_tree(rate, updates)
            new_updates = jax.tree.map(
                lambda u: jnp.where(finite, u, jnp.zeros_like(u)), scaled
            )
            direction = None
            previous = jnp.where(finite, loss, previous)
            rejected = jnp.zeros((), jnp.bool_)

        new_state = DynamicLRState(
            learning_rate=rate,
            previous_value=previous.astype(_FLOAT),
            has_previous_value=state.has_previous_value | (finite & ~rejected),
            count=optax.safe_increment(state.count),
            num_falls=_increment_if(fell, state.num_falls),
            num_rises=_increment_if(rose, state.num_rises),
            num_nonfinite=_increment_if(~finite, state.num_nonfinite),
            num_rejections=_increment_if(rejected, state.num_rejections),
            accepted_direction=direction,
            trend=trend,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _within_bounds(rate, min_rate, max_rate, fallback):
    """Clips the rate into its bounds, falling back where that gives no rate.

    Only traced hyperparameters (nan, non-positive or crossed bounds) can get
    here without a ValueError; the fallback keeps the state finite and positive.
    """
    clipped = jnp.clip(rate, min_rate, max_rate)
    usable = jnp.isfinite(clipped) & (clipped > 0)
    return jnp.where(usable, clipped, fallback).astype(_FLOAT)


def _increment_if(condition: jax.Array, count: jax.Array) -> jax.Array:
    return jnp.where(condition, optax.safe_increment(count), count)


def _retry_is_lost(params, direction, rate_change, axis_name, needed):
    """Whether a retry of ``rate_change * direction`` would leave every
    parameter where it is.

    A parameter stays put when the change is below half the spacing of its
    dtype there; a quarter of the spacing towards zero (the smaller of the two
    around it) keeps the test sound through the rounding of the update itself.
    It assumes the updates reach the parameters unscaled, as when this
    transform is last in the chain or before ``optax.sgd(1.0)``. The pass over
    the parameters is made only where ``needed`` (a rise that would be
    retried), not on every call.
    """
    if jax.tree.structure(params) != jax.tree.structure(direction):
        # Parameters that do not match the updates (a wrapper or a model object
        # that passes something else) cannot tell; only the floor stops the
        # retries then.
        return jnp.zeros((), jnp.bool_)
    pairs = list(zip(jax.tree.leaves(params), jax.tree.leaves(direction), strict=True))
    for p, d in pairs:
        kind = getattr(p, "dtype", None)
        if not (
            isinstance(p, jax.Array | np.ndarray | np.generic | float)
            and (kind is None or jnp.issubdtype(kind, jnp.floating))
            and jnp.shape(p) == d.shape
        ):
            return jnp.zeros((), jnp.bool_)

    def every_parameter_stays(pairs):
        lost = jnp.ones((), jnp.bool_)
        for p, d in pairs:
            p = jnp.asarray(p)
            # float64 parameters (with x64 on) are compared in float64, so that
            # their spacing does not overflow or flush to zero in float32.
            wide = jnp.promote_types(p.dtype, _FLOAT)
            gap = jnp.abs(p - jnp.nextafter(p, jnp.zeros_like(p))).astype(wide)
            change = jnp.abs(rate_change.astype(wide) * d.astype(wide))
            lost = lost & jnp.all(change <= 0.25 * gap)
        return lost

    lost = jax.lax.cond(
        needed, every_parameter_stays, lambda _: jnp.zeros((), jnp.bool_), pairs
    )
    if axis_name is not None:
        lost = jax.lax.pmin(lost.astype(jnp.int32), axis_name) > 0
    return lost


def _step_with_rejection(updates, state, accept, loss, rate):
    """Returns the updates, the accepted direction and the remembered loss.

    Since the last accepted point the parameters have moved by
    ``old_rate * direction``. Accepting the current point steps from it along
    the incoming updates; rejecting it replaces that move by
    ``rate * direction``, a single update of ``(rate - old_rate) * direction``.
    Before any accepted point the direction is zero and so is the update.
    """
    old_rate = state.learning_rate
    retry = _scale_tree(rate - old_rate, state.accepted_direction)
    step = _scale_tree(rate, updates)
    new_updates = jax.tree.map(
        lambda s, r: jnp.where(accept, s, r).astype(s.dtype), step, retry
    )
    direction = jax.tree.map(
        lambda u, d: jnp.where(accept, u, d).astype(d.dtype),
        updates,
        state.accepted_direction,
    )
    previous = jnp.where(accept, loss, state.previous_value)
    return new_updates, direction, previous
