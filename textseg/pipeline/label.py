"""The model stage (GPU actors; CPU actors without GPUs): model-size pixels -> full-resolution uint8 labels.

One `Labeler` lives in each model actor (or in the in-process runner). It loads the weights and embeds
the ontology's prompts once, then for each batch runs the backend once per image (however many prompts)
and turns the scores into labels with `textseg.labels.postprocess` before anything leaves the device. A window
of a large scene leaves as uint8-quantized class scores instead, because its neighbours' scores must be
blended with it before labels can be decided (`textseg.pipeline.scenes`).

A batch the model raises on is retried image by image (`textseg.pipeline.batches.isolate`): what still
fails becomes that image's error row, and so does an image that kills the actor's process twice. Two
failures are the job's, not an image's, and raise `JobError`: the model cannot be loaded in the actor,
and CUDA runs out of memory before any batch has succeeded (every batch would; a smaller --batch-size
is the fix).
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from textseg.errors import JobError, describe_exception
from textseg.image.windows import SCORE_LEVELS
from textseg.labels.postprocess import ClassGrouping, class_scores, label_image, labels_from_scores
from textseg.labels.query_instances import query_instances
from textseg.models import ModelRef, load_model, resolve_device
from textseg.models.base import Queries
from textseg.ontology import Ontology
from textseg.pipeline.batches import Batch, CrashLedger, isolate, unpack_nodata
from textseg.pipeline.settings import (
    MODEL_CALLS,
    MODEL_IMAGES,
    MODEL_STARTUP_MS,
    MODELS_READY,
    QUERY_INSTANCES,
    ProgressCounter,
)


class Labeler:
    """Callable on batches: Ray Data's actor pool constructs it once per actor and calls it per batch."""

    def __init__(
        self,
        model: ModelRef,
        ontology: Ontology,
        device: str = "auto",
        batch_size: int = 8,
        keep_scores: bool = False,
        crashes: CrashLedger | None = None,
        progress: ProgressCounter | None = None,
        compile: bool = False,
        instances: bool = False,
    ):
        """keep_scores: also ship whole images' quantized class scores (vectors need per-polygon scores);
        crashes: where a restarted actor learns which image killed it (`isolate`); progress: told when
        the model is ready and how long that took (the run summary's start-up seconds); compile: on
        CUDA, `torch.compile` the model's forward (max-autotune: CUDA graphs) for one batch shape, every
        call padded to `batch_size` (`--compile`; off until measured on the GPU it runs on). The padding
        applies on any device, so the CPU tests check it; compilation only on CUDA; instances: a detector
        backend's objects (SAM 3's queries) leave as `instances` (JSON rows) with whole images."""
        self.crashes = crashes
        self.progress = progress
        self.device = torch.device(resolve_device(device))
        self.batch_size = batch_size
        self.keep_scores = keep_scores
        self._pinned: torch.Tensor | None = None  # reused host staging buffer for GPU -> CPU copies
        self._pinned_in: torch.Tensor | None = None  # and for CPU -> GPU copies of the pixels
        self.fixed_batch = compile  # every model call `batch_size` images: one compiled shape
        self.instances = instances
        self.class_names = list(ontology.class_names)
        self.prompts = list(ontology.prompts)
        self._succeeded = False  # some batch went through: a later OOM is that batch's, not the job's
        started = time.perf_counter()
        try:
            self.backend = load_model(model, str(self.device)).eval()
            self.grouping = ClassGrouping(tuple(ontology.prompt_class_index), tuple(ontology.thresholds))
            self._score = self.backend.score
            if compile and self.device.type == "cuda":
                self._score = torch.compile(self.backend.score, mode="max-autotune", dynamic=False)
            with torch.inference_mode():
                self.prompt_embeddings = self.backend.embed_prompts(ontology.prompts)
                self._warm_up()
        except Exception as err:
            raise JobError(
                f"the model {model.model_id!r} cannot be loaded on the {self.device.type} workers: "
                f"{describe_exception(err)}"
            ) from None
        if progress is not None:
            progress.add(**{MODELS_READY: 1, MODEL_STARTUP_MS: round((time.perf_counter() - started) * 1000)})

    def _warm_up(self) -> None:
        """One image through the model before the first batch: CUDA's context, kernels and allocator
        are set up while the listing and the first decodes run, not on the first batch's clock."""
        height, width = self.backend.input_spec.size
        ramp = torch.arange(height * width * 3, device=self.device) % 251  # an image, not a blank
        pixels = ramp.to(torch.uint8).reshape(1, height, width, 3)
        self._model(pixels)  # with --compile, this compiles
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, batch: Batch) -> Batch:
        """`label` isolated per image; see `label` for the columns."""
        return isolate(self._label_checked, batch, "the model stage", {}, self.crashes)

    def _label_checked(self, batch: Batch) -> Batch:
        try:
            out = self.label(batch)
        except torch.OutOfMemoryError as err:
            if not self._succeeded and len(batch["relpath"]) <= 1:
                raise JobError(
                    f"{self.device.type.upper()} ran out of memory on the first image the model saw; lower "
                    f"--batch-size or use a device with more memory ({describe_exception(err)})"
                ) from None
            raise
        self._succeeded = True
        return out

    def label(self, batch: Batch) -> Batch:
        """Adds `labels` (raw (H, W) uint8 bytes of a whole image), `scores` (raw (1 + K, h, w) uint8
        class scores of a window, or of a whole image with keep_scores), `class_pixel_count` and
        `class_score_sum` ((B, 1 + K), background first); drops the model-size `pixels`."""
        count = len(batch["relpath"])
        bins = self.grouping.num_classes + 1
        labels = np.full(count, b"", dtype=object)
        quantized_scores = np.full(count, b"", dtype=object)
        found = np.full(count, "", dtype=object)  # JSON instance rows of a detector; "": none
        pixel_counts = np.zeros((count, bins), dtype=np.int64)
        score_sums = np.zeros((count, bins), dtype=np.float64)
        elapsed = batch["elapsed_ms"].astype(np.float64)
        todo = [i for i in range(count) if not batch["error"][i]]
        if todo and self.progress is not None:  # how full the model's batches are (the run summary's)
            calls = -(-len(todo) // self.batch_size)
            self.progress.add(**{MODEL_CALLS: calls, MODEL_IMAGES: len(todo)})
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            started = time.perf_counter()
            with torch.inference_mode():
                logits, queries = self._model(self._to_device(batch["pixels"][chunk]))
                for j, i in enumerate(chunk):
                    size = (int(batch["height"][i]), int(batch["width"][i]))
                    kind = self.backend.score_kind
                    scores = None
                    if batch["windowed"][i] or self.keep_scores:
                        scores = class_scores(logits[j], size, self.grouping, kind)
                        quantized = (scores.clamp(0, 1) * SCORE_LEVELS).round().to(torch.uint8)
                        quantized_scores[i] = self._to_host(quantized)
                    if batch["windowed"][i]:
                        continue
                    if queries is not None:
                        rows = query_instances(
                            queries, j, size, self.grouping, self.class_names, self.prompts
                        )
                        found[i] = json.dumps(rows)
                    packed = unpack_nodata(batch["nodata"][i], *size)
                    nodata = None if packed is None else torch.from_numpy(packed).to(self.device)
                    result = (
                        label_image(logits[j], size, self.grouping, kind, nodata)
                        if scores is None
                        else labels_from_scores(scores, self.grouping, kind, nodata)
                    )
                    labels[i] = self._to_host(result.labels)
                    pixel_counts[i] = result.class_pixel_count
                    score_sums[i] = result.class_score_sum
            elapsed[chunk] += (time.perf_counter() - started) * 1000 / len(chunk)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out.update(
            labels=labels,
            scores=quantized_scores,
            class_pixel_count=pixel_counts,
            class_score_sum=score_sums,
            elapsed_ms=elapsed,
        )
        if self.instances:
            out[QUERY_INSTANCES] = found
        return out

    def _model(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Queries | None]:
        """uint8 (B, h, w, 3) on the device -> the backend's logits for those B images, and with
        `instances` its queries (None for a semantic backend); with a fixed batch, padded with copies of
        the last image to `batch_size` and the padding's logits dropped."""
        count = pixels.shape[0]
        if self.fixed_batch and count < self.batch_size:
            pixels = torch.cat([pixels, pixels[-1:].expand(self.batch_size - count, *pixels.shape[1:])])
        values = self.backend.normalize(pixels)
        if self.instances:
            logits, queries = self.backend.score_with_queries(values, self.prompt_embeddings)
            return logits[:count], queries
        return self._score(values, self.prompt_embeddings)[:count], None

    def _to_device(self, pixels: np.ndarray) -> torch.Tensor:
        """Model-size uint8 pixels -> a tensor on the device. To a GPU, through one reused pinned buffer
        with a non-blocking copy (a pageable copy is staged by the driver at a fraction of the speed).
        Reusing the buffer is safe: each call's labels come back through `_to_host`, which waits for the
        GPU, before the next chunk's pixels are copied in."""
        host = torch.from_numpy(np.ascontiguousarray(pixels))
        if self.device.type != "cuda":
            return host
        if self._pinned_in is None or self._pinned_in.numel() < host.numel():
            self._pinned_in = torch.empty(host.numel(), dtype=torch.uint8, pin_memory=True)
        staging = self._pinned_in[: host.numel()].view(host.shape)
        staging.copy_(host)
        return staging.to(self.device, non_blocking=True)

    def _to_host(self, values: torch.Tensor) -> bytes:
        """uint8 tensor -> its raw bytes on the host. From a GPU, through one reused pinned buffer: copies
        into fresh pageable memory run at page-fault speed (H100: 1.2 vs 54.6 GB/s, 938 vs 1,690 img/s
        end to end)."""
        if values.device.type != "cuda":
            return values.numpy().tobytes()
        count = values.numel()
        if self._pinned is None or self._pinned.numel() < count:
            self._pinned = torch.empty(count, dtype=torch.uint8, pin_memory=True)
        staging = self._pinned[:count]
        staging.copy_(values.reshape(-1))
        return staging.numpy().tobytes()
