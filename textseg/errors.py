"""The two kinds of failure a labeling run knows, and how an exception becomes a reason.

A per-image problem is a value (an `error` row with a reason); a job-level problem (`JobError`) ends the
whole run at once with one sentence and exit status 2: the model cannot be loaded on the workers, CUDA
runs out of memory on the first batch, the cluster cannot provide the resources asked for. Stages raise
`JobError` only for problems that every further image would hit too.
"""

from __future__ import annotations


class JobError(RuntimeError):
    """A problem no image can get past; the message is the one sentence the user sees."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, after its summary was written (status `interrupted`): running the same command
    again finishes the run, skipping what is done. Still a KeyboardInterrupt for library callers."""

    def __init__(self, run_id: str):
        super().__init__(run_id)
        self.run_id = run_id


def reason_category(reason: str) -> str:
    """The part of a reason before its first ':' ("cannot read the source object: Timeout: ..." ->
    "cannot read the source object"), so error counts group by kind even at a million errors."""
    head = reason.split(":", 1)[0].strip()
    return head[:120] or "unknown error"


def describe_exception(err: BaseException) -> str:
    """`Type: message` on one line, the shape every reason ends in."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
