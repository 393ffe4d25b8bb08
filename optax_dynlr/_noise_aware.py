"""The noise-aware decision of :func:`optax_dynlr.dynamic_lr`.

Successive minibatch losses rise about as often as they fall, so comparing one
loss with the next says nothing about the trend. This module decides from a
sequential trend test instead, helped by the size of the gradient, with scalar
state only:

* **Trend test.** Losses enter a window as pairs (call number, log loss), fitted
  by least squares. At window lengths 4, 8, 16, ..., ``MAX_WINDOW`` the slope's
  t statistic is compared with the one-sided Student-t quantile of a 3-sigma
  tail for that many degrees of freedom. A significant fall multiplies the rate
  by ``increase_factor ** 4`` (four calls' worth of the plain rule's growth,
  1.22 with the default 1.05), a significant rise by ``decrease_factor``;
  reaching ``MAX_WINDOW`` without either holds it. Every decision restarts the
  window. After a cut the first significant fall earns no growth, since it is
  mostly the recovery from what was cut. Reading the test only at doubling
  lengths keeps false alarms rare; the small-sample quantiles keep the shortest
  windows honest, yet a deterministic loss (full batch), whose residuals are
  near zero, gives a huge statistic and is decided after four calls. Larger
  growth steps climbed faster but overshot the edge of stability, late in
  training above all, where one step past it undoes the run.
* **Climb.** The stochastic Polyak step ``2 * loss / |g|^2`` (``g`` the update
  this transform receives) is the step that would take a linear model of the
  batch loss to zero, twice over; a useful rate is some fraction of it. Its
  moving average (in log space) gives a guide, ``CLIMB_FRACTION`` of it at
  first, halved by every cut. While the rate is below the guide and the loss's
  moving average is within ``CLIMB_LEVEL`` times its lowest, the rate grows by
  ``CLIMB_FACTOR`` on every call whose loss is no higher than the one before,
  without waiting for the trend test, which cannot see the tiny progress of a
  far too small rate through the noise. Noisy losses fall on about every other
  call, so that is about 1.1 per call; a rising loss never grows the rate. The
  guide only ever raises a rate: a guide too low (after a preconditioner on a
  large model, say) leaves the trend test in charge.
* **Level guard.** The first loss, and then the lowest mean of any closed
  window, is the reference level. A window whose mean log loss is more than
  ``ln 3`` above it at a checkpoint cuts the rate; the new level then becomes
  the reference, so a net that stays worse is not cut again and again. This
  catches a divergence whose losses vary too wildly for the slope to be
  significant.
* **Spike guard.** Every call, a log loss above a fast moving average by more
  than ``max(ln 1.25, 10 sigma)``, or two successive log losses both above it
  by more than ``max(ln 1.25, 3 sigma)``, cut at once, by ``decrease_factor``
  once per threshold exceeded, at most three times (sigma from a slow, debiased
  moving average of squared successive differences, each clipped at the
  single-loss threshold so that one explosion does not blind it). A far too
  large starting rate is cut after its first step, by up to 8x; the
  heavy-tailed single batches of late training, often several times the mean
  loss, stay under ten sigma, while a divergence, which raises every loss,
  trips the two-loss test early. The spike becomes the guard's reference, so
  the loss right after it counts as the second of a pair: one that rises
  further still is cut again at once. A slower divergence, under the pair
  threshold from call to call, waits for the trend test's next checkpoint.

The tests work on ``log(loss + floor)``, the floor being ``LOSS_FLOOR_FRACTION``
times the first positive loss, so losses must be positive (cross-entropy,
squared error) and lose their meaning once far below where they started. After
the first positive loss, a loss of zero or below reads as the floor and gives
no guide, and so does any loss below the floor; before it, such a loss has no
scale to be read against and changes nothing. Without the floor a loss falling
on towards zero would grow the rate without end, and one exact zero would make
the next tiny loss look like a spike.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_FLOAT = jnp.float32
_INT = jnp.int32

MIN_WINDOW = 4  # the shortest window at which the trend test is read
MAX_WINDOW = 1024  # a window this long without a significant trend holds the rate
GROWTH_CALLS = 4  # a significant fall grows the rate by increase_factor ** 4
LEVEL_MARGIN = float(np.log(3.0))
SPIKE_MARGIN = float(np.log(1.25))
SPIKE_SIGMAS = 10.0  # one loss this far above the fast average cuts
PAIR_SIGMAS = 3.0  # two successive losses this far above it cut
SPIKE_MAX_CUTS = 3
FALL_THRESHOLDS = 3.0  # a fall enters the fast average only this far down
FAST_AVERAGE = 0.1  # weight of the newest log loss in the fast average
SPREAD_AVERAGE = 0.02  # the same for the spread; slow, as tails are heavy
GUIDE_AVERAGE = 0.1  # the same for the log of the Polyak step
LOSS_AVERAGE = 0.1  # the same for the loss itself, which the climb watches
CLIMB_FRACTION = 0.05  # the guide starts at this fraction of the Polyak step
# Growth per call while below the guide, on calls whose loss did not rise: under
# noise about every other call, so about 1.1 per call; never on a rising loss.
CLIMB_FACTOR = 1.21
CLIMB_LEVEL = 1.5  # climb only while the loss average is within this of its lowest
# A loss below this fraction of the first one (float32's resolution of it)
# counts as that fraction: a loss that reaches zero, or falls on towards it,
# neither grows the rate for ever nor makes the next tiny loss a spike.
LOSS_FLOOR_FRACTION = float(np.finfo(np.float32).eps)
# A residual spread below this (in log loss, about 8 float32 ulps) is rounding:
# it keeps a constant loss from giving 0/0 and a tiny drift from looking sure.
_RESOLUTION = 1e-6

# One-sided Student-t quantiles with the tail of a 3-sigma normal deviate
# (p = 0.00135), for windows of 4, 8, ..., 1024 points (n - 2 degrees of
# freedom): scipy.stats.t.isf(scipy.stats.norm.sf(3), n - 2).
_CRITICAL_T = (19.207, 4.904, 3.636, 3.270, 3.126, 3.061, 3.030, 3.015, 3.007)


class TrendState(NamedTuple):
    """Scalar statistics of recent losses that decide the noise-aware rate.

    Attributes:
      window_count: int32, number of losses in the current window.
      window_mean: float32, mean log loss of the window.
      window_comoment: float32, sum over the window of (call - mean call) *
        (log loss - mean log loss).
      window_sum_squares: float32, sum over the window of squared deviations of
        the log loss from its mean.
      best_mean: float32, the reference level: the lowest mean log loss of a
        closed window (or the level accepted after a level cut).
      has_best: bool, whether ``best_mean`` holds a level yet.
      fast_mean: float32, fast moving average of the log loss.
      difference_variance: float32, moving average of half the squared
        difference of successive log losses, a variance estimate that a trend
        barely affects.
      difference_weight: float32, the total weight of ``difference_variance``'s
        average, which divides it to remove the bias of its zero start.
      last_log_loss: float32, the previous log loss.
      last_loss: float32, the previous loss itself, which the climb compares
        with: two losses one float32 step apart can have the same log.
      has_last: bool, whether a loss has been seen.
      recovering: bool, true after a cut until the next decision of the trend
        test; a significant fall then earns no growth.
      log_polyak: float32, moving average of the log of the Polyak step
        ``2 * loss / |g|^2``.
      has_polyak: bool, whether ``log_polyak`` holds a value yet (it needs a
        positive loss and a finite, nonzero update).
      climb_fraction: float32, the guide's fraction of the Polyak step; halved
        by every cut.
      loss_average: float32, moving average of the loss.
      lowest_average: float32, the lowest ``loss_average`` so far.
      loss_floor: float32, ``LOSS_FLOOR_FRACTION`` times the first positive
        finite loss (zero until one is seen); the test reads
        ``log(loss + loss_floor)``.
      spiked: bool, whether the previous call's loss was a spike.
    """

    window_count: jax.Array
    window_mean: jax.Array
    window_comoment: jax.Array
    window_sum_squares: jax.Array
    best_mean: jax.Array
    has_best: jax.Array
    fast_mean: jax.Array
    difference_variance: jax.Array
    difference_weight: jax.Array
    last_log_loss: jax.Array
    last_loss: jax.Array
    has_last: jax.Array
    recovering: jax.Array
    log_polyak: jax.Array
    has_polyak: jax.Array
    climb_fraction: jax.Array
    loss_average: jax.Array
    lowest_average: jax.Array
    loss_floor: jax.Array
    spiked: jax.Array


def init_trend() -> TrendState:
    zero = jnp.zeros((), _FLOAT)
    false = jnp.zeros((), jnp.bool_)
    return TrendState(
        window_count=jnp.zeros((), _INT),
        window_mean=zero,
        window_comoment=zero,
        window_sum_squares=zero,
        best_mean=zero,
        has_best=false,
        fast_mean=zero,
        difference_variance=zero,
        difference_weight=zero,
        last_log_loss=zero,
        last_loss=zero,
        has_last=false,
        recovering=false,
        log_polyak=zero,
        has_polyak=false,
        climb_fraction=jnp.asarray(CLIMB_FRACTION, _FLOAT),
        loss_average=zero,
        lowest_average=zero,
        loss_floor=zero,
        spiked=false,
    )


_FIELD_DTYPES = tuple(leaf.dtype for leaf in init_trend())
SIZE = len(TrendState._fields)


def pack(trend: TrendState) -> jax.Array:
    """The statistics as one float32 vector, in the order of the fields.

    A state of one array instead of a scalar per statistic costs a jitted
    training step far less to pass in and out: the dispatch of each argument
    and result is paid per leaf. float32 holds the counts (at most MAX_WINDOW) and
    the flags (0 or 1) exactly.
    """
    return jnp.stack([jnp.asarray(value, _FLOAT) for value in trend])


def unpack(vector: jax.Array) -> TrendState:
    """The statistics of a vector made by :func:`pack`, with their own dtypes."""
    return TrendState(
        *(vector[index].astype(dtype) for index, dtype in enumerate(_FIELD_DTYPES))
    )


def _slope_t_statistic(count, comoment, sum_squares):
    """t statistic of the least-squares slope of log loss against call number.

    With calls 0..n-1 the centred sum of squares of the call numbers is
    n (n^2 - 1) / 12; the residual variance has n - 2 degrees of freedom.
    """
    n = count.astype(_FLOAT)
    call_sum_squares = n * (n * n - 1.0) / 12.0
    safe_call_sum_squares = jnp.maximum(call_sum_squares, 1.0)
    slope = comoment / safe_call_sum_squares
    residual = jnp.maximum(sum_squares - comoment * slope, 0.0)
    residual_variance = jnp.maximum(
        residual / jnp.maximum(n - 2.0, 1.0), _RESOLUTION * _RESOLUTION
    )
    return slope / jnp.sqrt(residual_variance / safe_call_sum_squares)


def decide(
    trend: TrendState, loss, update_norm_squared, rate, increase_factor, decrease_factor
):
    """Returns the rate multiplier for this call and the new statistics.

    Args:
      trend: the statistics so far.
      loss: this call's loss.
      update_norm_squared: the squared norm of the update this transform
        received, for the Polyak step.
      rate: the rate before this call.
      increase_factor: the plain rule's growth per fall, at least 1.
      decrease_factor: the cut per rise, in [0, 1].
    """
    loss = jnp.asarray(loss, _FLOAT)
    update_norm_squared = jnp.asarray(update_norm_squared, _FLOAT)
    rate = jnp.asarray(rate, _FLOAT)
    increase_factor = jnp.asarray(increase_factor, _FLOAT)
    decrease_factor = jnp.asarray(decrease_factor, _FLOAT)
    tiny = jnp.finfo(_FLOAT).tiny
    given = trend
    # The floor is set by the first positive loss (a non-finite one never
    # reaches here: the caller keeps the old statistics).
    loss_floor = jnp.where(
        (trend.loss_floor == 0) & (loss > 0),
        LOSS_FLOOR_FRACTION * loss,
        trend.loss_floor,
    )
    log_raw_loss = jnp.log(jnp.maximum(loss, tiny))
    # log(loss + floor) in log space: the sum may overflow float32.
    log_loss = jnp.logaddexp(log_raw_loss, jnp.log(jnp.maximum(loss_floor, tiny)))

    # The first loss is the first reference level.
    trend = trend._replace(
        best_mean=jnp.where(trend.has_last, trend.best_mean, log_loss),
        has_best=trend.has_best | ~trend.has_last,
    )

    # The spike guard reads the averages before this loss enters them.
    sigma = jnp.sqrt(
        trend.difference_variance / jnp.maximum(trend.difference_weight, 1e-6)
    )
    spike_threshold = jnp.maximum(SPIKE_MARGIN, SPIKE_SIGMAS * sigma)
    pair_threshold = jnp.maximum(SPIKE_MARGIN, PAIR_SIGMAS * sigma)
    single = trend.has_last & (log_loss > trend.fast_mean + spike_threshold)
    # A divergence raises every loss: two in a row above a lower threshold. A
    # spike became the reference, so after one a further rise is the second.
    pair = (
        trend.has_last
        & (log_loss > trend.fast_mean + pair_threshold)
        & (trend.spiked | (trend.last_log_loss > trend.fast_mean + pair_threshold))
    )
    spike = single | pair
    # A fall enters the fast average only down to FALL_THRESHOLDS thresholds
    # below it: one batch of near-zero loss would otherwise drag the reference
    # so far down that the next ordinary loss looked like a spike.
    fast_input = jnp.maximum(
        log_loss, trend.fast_mean - FALL_THRESHOLDS * spike_threshold
    )
    fast_mean = jnp.where(
        trend.has_last,
        trend.fast_mean + FAST_AVERAGE * (fast_input - trend.fast_mean),
        log_loss,
    )
    # A jump enters the spread only up to the threshold: otherwise one
    # explosion would blind the guard to the next for a long while.
    step = jnp.minimum(jnp.abs(log_loss - trend.last_log_loss), spike_threshold)
    # Debiased like Adam's moments: the weight is what a constant 1 would
    # average to, so early estimates are not pulled towards the initial zero.
    difference_variance = jnp.where(
        trend.has_last,
        trend.difference_variance
        + SPREAD_AVERAGE * (0.5 * step * step - trend.difference_variance),
        trend.difference_variance,
    )
    difference_weight = jnp.where(
        trend.has_last,
        trend.difference_weight + SPREAD_AVERAGE * (1.0 - trend.difference_weight),
        trend.difference_weight,
    )
    # A spike becomes the guard's reference, so only a further rise cuts again.
    fast_mean = jnp.where(
        single,
        log_loss,
        jnp.where(pair, jnp.minimum(log_loss, trend.last_log_loss), fast_mean),
    )

    # Welford's update of the window's means and co-moments; the call numbers
    # are 0, 1, ..., so the new one lies (n + 1) / 2 above the old mean call.
    count = trend.window_count + 1
    deviation = log_loss - trend.window_mean
    window_mean = trend.window_mean + deviation / count.astype(_FLOAT)
    call_deviation = 0.5 * count.astype(_FLOAT)
    new_deviation = log_loss - window_mean
    comoment = trend.window_comoment + call_deviation * new_deviation
    sum_squares = trend.window_sum_squares + deviation * new_deviation

    # Read the test only at window lengths 4, 8, 16, ...
    is_power_of_two = (count & (count - 1)) == 0
    checkpoint = (count >= MIN_WINDOW) & is_power_of_two
    level_index = jnp.clip(
        jnp.round(jnp.log2(count.astype(_FLOAT))).astype(_INT) - 2,
        0,
        len(_CRITICAL_T) - 1,
    )
    critical = jnp.asarray(_CRITICAL_T, _FLOAT)[level_index]
    t_statistic = _slope_t_statistic(count, comoment, sum_squares)
    fell = checkpoint & (t_statistic < -critical)
    rose = checkpoint & (t_statistic > critical)
    level_rose = (
        checkpoint & trend.has_best & (window_mean > trend.best_mean + LEVEL_MARGIN)
    )
    window_full = count >= MAX_WINDOW

    cut = spike | rose | level_rose
    grow = fell & ~cut
    closed = checkpoint & (rose | level_rose | fell | window_full)
    restart = closed | spike

    one = jnp.ones((), _FLOAT)
    growth = jnp.where(trend.recovering, one, increase_factor**GROWTH_CALLS)
    # A spike cuts once per threshold it exceeds, up to SPIKE_MAX_CUTS times:
    # the first loss after a step at a far too large rate is many thresholds up.
    spike_unit = jnp.where(single, spike_threshold, 2.0 * pair_threshold)
    spike_cuts = jnp.clip(
        jnp.floor((log_loss - trend.fast_mean) / spike_unit), 1, SPIKE_MAX_CUTS
    )
    cuts = jnp.where(spike, spike_cuts, 1.0)
    multiplier = jnp.where(cut, decrease_factor**cuts, jnp.where(grow, growth, one))

    # The climb towards a fraction of the Polyak step.
    usable = (
        jnp.isfinite(update_norm_squared)
        & (update_norm_squared > 0)
        & (loss > loss_floor)
    )
    # log 2 + log loss, as 2 * loss may overflow.
    log_polyak_now = (
        jnp.log(2.0) + log_raw_loss - jnp.log(jnp.maximum(update_norm_squared, tiny))
    )
    log_polyak = jnp.where(
        usable,
        jnp.where(
            trend.has_polyak,
            trend.log_polyak + GUIDE_AVERAGE * (log_polyak_now - trend.log_polyak),
            log_polyak_now,
        ),
        trend.log_polyak,
    )
    has_polyak = trend.has_polyak | usable
    # Negative losses count as zero here, which also keeps the average finite.
    nonnegative_loss = jnp.maximum(loss, 0.0)
    loss_average = jnp.where(
        trend.has_last,
        trend.loss_average + LOSS_AVERAGE * (nonnegative_loss - trend.loss_average),
        nonnegative_loss,
    )
    lowest_average = jnp.where(
        trend.has_last, jnp.minimum(trend.lowest_average, loss_average), loss_average
    )
    climb_fraction = jnp.where(cut, 0.5 * trend.climb_fraction, trend.climb_fraction)
    # In log space, so that a huge Polyak step (a vanishing update) cannot
    # overflow; the ratio is capped at the climb factor anyway.
    log_room = jnp.log(climb_fraction) + log_polyak - jnp.log(jnp.maximum(rate, tiny))
    room = jnp.exp(jnp.minimum(log_room, jnp.log(CLIMB_FACTOR)))
    climb = (
        has_polyak
        & trend.has_last
        & (loss <= trend.last_loss)
        & ~cut
        & (multiplier < room)
        & (loss_average <= CLIMB_LEVEL * lowest_average)
    )
    multiplier = jnp.where(climb, room, multiplier)

    # A closed window's mean becomes the reference if it is the lowest; after a
    # level cut the new level is accepted, so that only a further rise cuts.
    lower_best = jnp.where(
        trend.has_best, jnp.minimum(trend.best_mean, window_mean), window_mean
    )
    best_mean = jnp.where(
        level_rose,
        window_mean,
        jnp.where(closed, lower_best, trend.best_mean),
    )
    zero = jnp.zeros((), _FLOAT)
    new_trend = TrendState(
        window_count=jnp.where(restart, jnp.zeros((), _INT), count),
        window_mean=jnp.where(restart, zero, window_mean),
        window_comoment=jnp.where(restart, zero, comoment),
        window_sum_squares=jnp.where(restart, zero, sum_squares),
        best_mean=best_mean,
        has_best=trend.has_best | closed,
        fast_mean=fast_mean,
        difference_variance=difference_variance,
        difference_weight=difference_weight,
        last_log_loss=log_loss,
        last_loss=loss,
        has_last=jnp.ones((), jnp.bool_),
        recovering=cut | (trend.recovering & ~closed),
        log_polyak=log_polyak,
        has_polyak=has_polyak,
        climb_fraction=climb_fraction,
        loss_average=loss_average,
        lowest_average=lowest_average,
        loss_floor=loss_floor,
        spiked=spike,
    )
    # Until a positive loss has set the floor, a loss of zero or below has no
    # scale to be read against: the call holds the rate and changes nothing.
    unscaled = loss_floor == 0
    multiplier = jnp.where(unscaled, 1.0, multiplier)
    new_trend = jax.tree.map(
        lambda new, old: jnp.where(unscaled, old, jnp.asarray(new, old.dtype)),
        new_trend,
        given,
    )
    return multiplier.astype(_FLOAT), new_trend
