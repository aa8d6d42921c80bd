"""Batches as every stage sees them (Ray Data's numpy format: column -> array), and the isolation that
keeps one bad row or batch from failing the rest.

A stage is a function of a batch. Every stage passes a row whose `error` is non-empty through untouched,
so `isolate` can always fall back to handing a failed image on as an error row: a stage that raises on a
batch is retried image by image, and an image that still raises continues with the reason in `error`.
Only `JobError` (a problem every image would hit) escapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from textseg import storage
from textseg.errors import JobError, describe_exception

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
StageOutput = TypeVar("StageOutput", Batch, pa.Table)

# Columns whose values are fixed-size numbers rather than Python objects, with their dtype and row shape.
_NUMERIC_COLUMNS: Mapping[str, tuple[Any, tuple[int, ...]]] = {
    "width": (np.int32, ()),
    "height": (np.int32, ()),
    "window": (np.int32, (4,)),
    "transform": (np.float64, (6,)),
    "windowed": (bool, ()),
    "elapsed_ms": (np.float64, ()),
}


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
    stage: Callable[[Batch], StageOutput], batch: Batch, what: str, storage_options: Mapping[str, Any]
) -> StageOutput:
    """`stage(batch)`, or, when it raises, the stage applied image by image with failures as error rows.

    `what` names the stage in reasons ("the model stage failed: RuntimeError: ..."). Secrets from
    `storage_options` are redacted from every reason.
    """
    try:
        return stage(batch)
    except JobError:
        raise
    except Exception as err:  # noqa: BLE001 - retried image by image below, never lost
        if batch_len(batch) == 1:
            return _as_error(stage, batch, what, err, storage_options)
        log.warning("%s failed on a batch of %d (%s); retrying image by image", what, batch_len(batch), err)
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


def _as_error(
    stage: Callable[[Batch], StageOutput],
    one: Batch,
    what: str,
    err: BaseException,
    storage_options: Mapping[str, Any],
) -> StageOutput:
    reason = storage.redact(
        f"{what} failed: {describe_exception(err)}", storage.secret_values(storage_options)
    )
    failed = dict(one)
    failed["error"] = np.array([reason], dtype=object)
    return stage(failed)


def unpack_nodata(packed: bytes, height: int, width: int) -> np.ndarray | None:
    """The inverse of the packing in `read_and_decode`: (H, W) bool, or None when nothing is no-data."""
    if not packed:
        return None
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=height * width)
    return bits.reshape(height, width).astype(bool)
