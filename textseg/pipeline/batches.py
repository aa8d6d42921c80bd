"""Batches as every stage sees them (Ray Data's numpy format: column -> array), and the isolation that
keeps one bad row or batch from failing the rest.

A stage is a function of a batch. Every stage passes a row whose `error` is non-empty through untouched,
so `isolate` can always fall back to handing a failed image on as an error row: a stage that raises on a
batch is retried image by image, and an image that still raises continues with the reason in `error`.
Only `JobError` (a problem every image would hit) escapes.

The reason in an error row is one line. The traceback behind it goes to the worker's log, which Ray
forwards to the driver's output (`ray job logs` on a cluster): the first failure of each kind (stage and
exception type) in each worker process, so a million failing images cost a handful of tracebacks.

Some images do not raise: they kill the process that handles them (a decoder that segfaults, a model
that exhausts host memory, a CUDA fault that aborts). Ray retries such a task without limit, so with a
`CrashLedger` a retried task goes image by image, marking each image in flight before it starts; an
image that was in flight when the process died again becomes an error row instead of a third death.
"""

from __future__ import annotations

import hashlib
import logging
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa

from textseg import storage
from textseg.errors import JobError, describe_exception

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
_REPORTED: set[tuple[str, str]] = set()  # per worker process: (stage, exception type) already logged
StageOutput = TypeVar("StageOutput", Batch, pa.Table)

# Columns whose values are fixed-size numbers rather than Python objects, with their dtype and row shape.
_NUMERIC_COLUMNS: Mapping[str, tuple[Any, tuple[int, ...]]] = {
    "width": (np.int32, ()),
    "height": (np.int32, ()),
    "window": (np.int32, (4,)),
    "transform": (np.float64, (6,)),
    "windowed": (bool, ()),
    "permanent": (bool, ()),
    "elapsed_ms": (np.float64, ()),
}


class CrashLedger(Protocol):
    """Where a stage marks work in flight, so that the retry of work whose worker process died can tell
    which image was in flight when it died (`textseg.plan.crash_ledger` keeps it in a Ray actor)."""

    def batch_retried(self, key: str) -> bool:
        """The batch `key` starts: whether an earlier attempt at it died."""
        ...

    def batch_done(self, key: str) -> None:
        """The batch `key` came through."""
        ...

    def begin(self, key: str) -> int:
        """Mark the image `key` in flight; how many earlier marks of it were never ended."""
        ...

    def end(self, key: str) -> None:
        """The image `key` came through."""
        ...


def to_batch(columns: Mapping[str, Sequence[Any]]) -> Batch:
    """Column lists -> a batch: `pixels` stacked, known numeric columns typed, everything else objects."""
    batch: Batch = {}
    for key, values in columns.items():
        if key == "pixels":
            batch[key] = np.stack(list(values))
        elif key in _NUMERIC_COLUMNS:
            dtype, shape = _NUMERIC_COLUMNS[key]
            batch[key] = np.array(values, dtype=dtype).reshape(-1, *shape)
        else:
            array = np.empty(len(values), dtype=object)
            array[:] = list(values)
            batch[key] = array
    return batch


def rows_to_batch(rows: Sequence[Mapping[str, Any]]) -> Batch:
    """Row dicts -> a batch."""
    return to_batch({key: [row[key] for row in rows] for key in rows[0]})


def batch_len(batch: Batch) -> int:
    return len(batch["relpath"])


def take(batch: Batch, indices: Sequence[int]) -> Batch:
    return {key: column[list(indices)] for key, column in batch.items()}


def concat(parts: Sequence[StageOutput]) -> StageOutput:
    """Stage outputs of the same kind, one after the other."""
    if isinstance(parts[0], pa.Table):
        return pa.concat_tables(parts)  # type: ignore[return-value]
    keys = parts[0].keys()
    return {key: np.concatenate([part[key] for part in parts]) for key in keys}  # type: ignore[return-value]


def isolate(
    stage: Callable[[Batch], StageOutput],
    batch: Batch,
    what: str,
    storage_options: Mapping[str, Any],
    crashes: CrashLedger | None = None,
) -> StageOutput:
    """`stage(batch)`, or, when it raises, the stage applied image by image with failures as error rows.

    `what` names the stage in reasons ("the model stage failed: RuntimeError: ..."). Secrets from
    `storage_options` are redacted from every reason. With `crashes`, a retried task's batch goes image
    by image under the ledger's watch (see the module's docstring).
    """
    if crashes is None:
        return _isolated(stage, batch, what, storage_options)
    key = f"{what}/" + hashlib.sha1("\n".join(_row_keys(batch)).encode()).hexdigest()
    if crashes.batch_retried(key):
        out = _watched_one_by_one(stage, batch, what, storage_options, crashes)
    else:
        out = _isolated(stage, batch, what, storage_options)
    crashes.batch_done(key)
    return out


def _isolated(
    stage: Callable[[Batch], StageOutput], batch: Batch, what: str, storage_options: Mapping[str, Any]
) -> StageOutput:
    try:
        return stage(batch)
    except JobError:
        raise
    except Exception as err:  # noqa: BLE001 - retried image by image below, never lost
        if batch_len(batch) == 1:
            return _as_error(stage, batch, what, err, storage_options)
        log.debug(
            "%s failed on a batch of %d (%s); retrying image by image",
            what,
            batch_len(batch),
            storage.redact(describe_exception(err), storage.secret_values(storage_options)),
        )
    parts: list[StageOutput] = []
    for i in range(batch_len(batch)):
        one = take(batch, [i])
        try:
            parts.append(stage(one))
        except JobError:
            raise
        except Exception as err:  # noqa: BLE001 - this image's error row
            parts.append(_as_error(stage, one, what, err, storage_options))
    return concat(parts)


def _watched_one_by_one(
    stage: Callable[[Batch], StageOutput],
    batch: Batch,
    what: str,
    storage_options: Mapping[str, Any],
    crashes: CrashLedger,
) -> StageOutput:
    parts: list[StageOutput] = []
    for i, row_key in enumerate(_row_keys(batch)):
        one, key = take(batch, [i]), f"{what}/{row_key}"
        if crashes.begin(key):
            parts.append(_as_error(stage, one, what, WorkerDied(), storage_options))
        else:
            parts.append(_isolated(stage, one, what, storage_options))
        crashes.end(key)
    return concat(parts)


class WorkerDied(Exception):
    """The reason of an image that killed its worker process twice."""

    def __str__(self) -> str:
        return "the worker process died with this image in its batch, and again with the image alone"


def _row_keys(batch: Batch) -> list[str]:
    """Each row's name within its run: relpath, and the window of a scene's piece."""
    windows = batch["window"].tolist() if "window" in batch else [""] * batch_len(batch)
    return [f"{relpath}@{window}" for relpath, window in zip(batch["relpath"], windows, strict=True)]


def _as_error(
    stage: Callable[[Batch], StageOutput],
    one: Batch,
    what: str,
    err: BaseException,
    storage_options: Mapping[str, Any],
) -> StageOutput:
    secrets = storage.secret_values(storage_options)
    reason = storage.redact(f"{what} failed: {describe_exception(err)}", secrets)
    report_failure(reason, err, str(one["relpath"][0]), secrets)
    failed = dict(one)
    failed["error"] = np.array([reason], dtype=object)
    failed["permanent"] = np.array([False])  # a stage that raised may pass on another attempt
    return stage(failed)


def is_permanent(batch: Batch, i: int) -> bool:
    """Whether row i's error was marked permanent where it was made (the metadata `permanent` column);
    False for a batch without the column."""
    column = batch.get("permanent")
    return bool(column[i]) if column is not None else False


def report_failure(reason: str, err: BaseException, relpath: str, secrets: Sequence[str]) -> None:
    """Log the traceback behind an error row's `reason` (already redacted) to this worker's log, the
    first time this process sees a failure of its kind (the reason's category, the text before ':', and
    the exception type); secrets are redacted from the traceback too."""
    kind = (reason.split(":", 1)[0], type(err).__name__)
    if kind in _REPORTED:
        return
    _REPORTED.add(kind)
    trace = "".join(traceback.format_exception(err)).rstrip() if err.__traceback__ is not None else ""
    log.warning(
        "%s on %r (the first failure of this kind in this worker; later ones are only in the metadata)%s",
        reason,
        relpath,
        "\n" + storage.redact(trace, secrets) if trace else "",
    )


def unpack_nodata(packed: bytes, height: int, width: int) -> np.ndarray | None:
    """The inverse of the packing in `read_and_decode`: (H, W) bool, or None when nothing is no-data."""
    if not packed:
        return None
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=height * width)
    return bits.reshape(height, width).astype(bool)
