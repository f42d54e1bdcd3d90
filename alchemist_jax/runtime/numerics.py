"""Non-finite guards: a step whose loss or gradient is NaN/Inf is skipped, counted and logged;
too many in a row stop the run with the likely cause.

In the jitted step (pure):
    ok = all_finite((loss, grads))
    state = keep_if(ok, new_state, old_state)     # the update is skipped, not applied
On the host, per step:
    guard.check(step, ok, {"loss": loss, ...})    # logs, counts; raises NonFiniteError after
                                                  # `max_bad_steps` consecutive bad steps
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp

log = logging.getLogger("alchemist_jax.numerics")


class NonFiniteError(ValueError):
    """Too many consecutive steps with non-finite values; the message names the likely cause."""


def all_finite(tree: Any) -> jax.Array:
    """True () when every floating-point leaf of `tree` is finite (non-float leaves ignored)."""
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """`new` where `ok` (a scalar bool), else `old`, leaf by leaf (same structure)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


class BadStepGuard:
    """Counts consecutive skipped steps of one loop (see the module docstring).

    Args:
      what: the loop, for messages ("rate", "train", ...).
      max_bad_steps: consecutive skipped steps tolerated; the next one raises.
      cause: one line on what usually makes this loop diverge (named settings and values).
    """

    def __init__(self, what: str, max_bad_steps: int, cause: str):
        self.what, self.max_bad_steps, self.cause = what, max_bad_steps, cause
        self.consecutive = 0
        self.skipped = 0

    def check(self, step: int, ok: Any, values: dict[str, Any]) -> bool:
        """Records step `step` (1-based); returns whether it was applied. `values` are the
        step's scalars (host numbers or arrays), the non-finite ones are named in the log."""
        if bool(ok):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        bad = (
            ", ".join(f"{k}={float(v)}" for k, v in values.items() if not math.isfinite(float(v)))
            or "the gradient"
        )
        log.warning(
            "%s step %d skipped: non-finite %s (%d in a row, %d in all)",
            self.what,
            step,
            bad,
            self.consecutive,
            self.skipped,
        )
        if self.consecutive >= self.max_bad_steps:
            raise NonFiniteError(
                f"{self.what} stopped at step {step}: {self.consecutive} consecutive steps with "
                f"non-finite values ({bad}); {self.cause}. The last checkpoint holds the last "
                "finite state"
            )
        return False
