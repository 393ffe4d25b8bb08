"""dynamic_lr with the worked example's factors, for hand-worked tests.

The hand-worked numbers in the tests use the factors 1.05 and 0.5, the ones of
the worked example, rather than the package defaults.
"""

from optax_dynlr import dynamic_lr as dynamic_lr_with_package_defaults


def dynamic_lr(
    learning_rate,
    increase_factor=1.05,
    decrease_factor=0.5,
    min_learning_rate=1e-10,
    max_learning_rate=1e10,
    rtol=0.0,
    atol=0.0,
    *,
    reject_steps=False,
    noise_aware=False,
    axis_name=None,
):
    return dynamic_lr_with_package_defaults(
        learning_rate,
        increase_factor,
        decrease_factor,
        min_learning_rate,
        max_learning_rate,
        rtol,
        atol,
        reject_steps=reject_steps,
        noise_aware=noise_aware,
        axis_name=axis_name,
    )
