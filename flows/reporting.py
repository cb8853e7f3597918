"""What a step's logic raises, logged before the flow stops.

The step logics quarantine what a record makes them raise (`flows.steps.quarantine`), so what
reaches Bytewax is a bug; and in a cluster Bytewax reports it only as its network threads'
panic ("Send thread panic"), keeping the exception itself unprinted. So every Bytewax entry point
of the flow's stateful logics (`flows.ordering`'s steps, `flows.stamping`'s) is `reported`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

logger = logging.getLogger(__name__)

_WHEN = {
    "on_batch": "on a batch",
    "on_notify": "on a timer",
    "on_eof": "at the end of the input",
    "snapshot": "saving its state at an epoch close",
}
F = TypeVar("F", bound=Callable[..., Any])


def reported(method: F) -> F:
    """A Bytewax entry point of a step's logic (`self.step_name` names the step) that logs an
    exception (step, when, traceback) before it stops the flow."""
    when = _WHEN[method.__name__]

    @wraps(method)
    def call(self: Any, *args: Any) -> Any:
        try:
            return method(self, *args)
        except Exception:
            logger.critical("step %r failed %s: the flow stops", self.step_name, when, exc_info=True)
            raise

    return cast(F, call)
