"""``ExplainedError``: the mark of an error whose message is the whole story.

A refused config, a data set that is missing or damaged, a checkpoint that cannot be used or
written, a run whose numbers stopped being finite: each of these errors says what happened and
what to change. ``python train.py`` and ``eval.py`` print such a message alone (Hydra prints it
without a traceback; ``HYDRA_FULL_ERROR=1`` shows the traceback too), where any other error,
a bug, keeps its traceback. Light on purpose: the command-line entry points import it before
torch.
"""

from __future__ import annotations


class ExplainedError(Exception):
    """An error whose message says what happened and what to change (see the module)."""


class SettingError(ValueError, ExplainedError):
    """A setting's value that the code using it refuses (checked where the value is used, when
    the config check before the run cannot know it): the message names the key and the fix."""


class Terminated(SystemExit):
    """The process was told to stop (SIGTERM: a job's time limit, ``timeout``, ``kill``): it
    ends with status 143 (128 + SIGTERM), as a process the signal ended would, not with the
    0 of Lightning's ``SIGTERMException`` (a ``SystemExit`` without a code), which told a job
    script or a requeue that the run had finished. Stopped by Ctrl-C, ``code`` is 130 (128 +
    SIGINT). The message says where training got to and how to continue it."""

    def __init__(self, message: str, code: int = 143):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def epoch_label(epoch: int, max_epochs: int | None) -> str:
    """Lightning's 0-based ``current_epoch`` as the console's epoch lines count it: ``epoch
    2/6`` for the second of six (``epoch 2`` without a bound: ``max_epochs`` of -1 or None)."""
    return f"epoch {epoch + 1}/{max_epochs}" if max_epochs is not None and max_epochs > 0 else f"epoch {epoch + 1}"
