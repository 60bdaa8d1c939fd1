"""Errors of the training layer that callers act on (the CLI maps them to exit statuses).

- ``UserError``: a mistake the user can fix (bad path, unknown model, bad value, a checkpoint
  that does not match the run). ``mae3d <command>`` prints ``mae3d <command>: <message>`` on
  stderr, one line, and exits with status 2.
- ``NonFiniteLossError``: the loss became NaN or inf; training stopped before the update, and the
  last checkpoint written (always from a state whose loss was finite) is kept. Exit status 3.
- ``Terminated``: SIGTERM where the process cannot stop gracefully (outside the training loop,
  or a second SIGTERM during one). Exit status 143.

This module imports nothing from mae3d, so every layer may raise these errors.
"""

from __future__ import annotations

__all__ = ["NonFiniteLossError", "Terminated", "UserError"]


class UserError(Exception):
    """A mistake the user can fix; the message names the flag or file and what was expected."""


class Terminated(BaseException):
    """SIGTERM arrived; like KeyboardInterrupt it is no ``Exception``, so nothing swallows it."""


class NonFiniteLossError(RuntimeError):
    """The loss is NaN or inf at ``step``; nothing was updated with it.

    ``last_checkpoint`` (settable by the loop that knows it) is the newest checkpoint written, or
    None when none had been written yet; the message names it.
    """

    def __init__(self, step: int, loss: float, last_checkpoint: str | None = None):
        super().__init__(step, loss, last_checkpoint)
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint

    def __str__(self) -> str:
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint had been written yet")
        return (f"loss is {self.loss} at step {self.step}; training stopped before the update, "
                f"{where}. Try a lower --lr, --amp off, or check the input data.")
