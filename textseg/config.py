"""JobConfig: one frozen settings object for a labeling run, built from CLI flags or a YAML file.

Every module below the CLI receives a JobConfig (or values taken from it); nothing reads flags, globals
or environment variables on its own. YAML keys are the CLI's long option names (`--max-error-rate` ->
`max-error-rate` or `max_error_rate`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from textseg.storage import secret_values, split_credentials

Device = Literal["auto", "cpu", "cuda"]


class ConfigError(ValueError):
    """The job's settings are unusable; the message says which option to change."""


@dataclass(frozen=True)
class JobConfig:
    source: str
    dest: str
    prompts: str | None = None
    ontology: str | None = None  # path or URI of an ontology YAML (README); exclusive with prompts
    # The published CLIPSeg checkpoint the README names as the default model.
    model: str = "clipseg"
    # CLIPSeg's sigmoid scores sit around 0.3-0.6 on true regions; 0.4 is the SPEC default.
    threshold: float = 0.4
    device: Device = "auto"
    # None: 64 images per model call on a GPU (measured on an H100: throughput grows to ~128), 8 on a CPU.
    batch_size: int | None = None
    # None: one model actor per GPU in the cluster, or one CPU actor per core when there is none.
    actors: int | None = None
    ray_address: str | None = None
    # Seconds the run waits for a first model actor to get its resources (GPUs an autoscaler is to add).
    startup_timeout: float = 600.0
    limit: int | None = None
    dry_run: bool = False
    tile_size: int | None = None
    tile_overlap: int = 64
    gsd: float | None = None  # metres per pixel the model was trained at; None: the model's `gsd_m`
    verbose: bool = False  # Ray's own log lines and block progress too
    vectors: bool = False  # also write polygons per class as GeoParquet (georeferenced images only)
    # 1 px removes the pixel staircase whatever the ground resolution; 0 keeps exact pixel outlines.
    vector_simplify: float = 1.0
    vector_min_area: float = 0.0  # m^2; smaller polygons are dropped
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)  # may hold secrets
    # 1%: a nightly job should fail loudly when more than a sliver of its input is unreadable.
    max_error_rate: float = 0.01
    # Decompression-bomb limit in pixels; large satellite scenes are legitimate, so it is generous.
    max_image_pixels: int = 40_000 * 40_000
    # The asset of each STAC item to label; None: `visual`, else the item's only image or data asset.
    stac_asset: str | None = None
    # Attempt images whose latest attempt failed for a reason that cannot pass while the file is
    # unchanged (known bad: undecodable bytes), which an incremental run otherwise skips.
    retry_errors: bool = False
    # CUDA only: torch.compile the model for one batch shape (`textseg.pipeline.label.Labeler`). Off until
    # measured on the GPU it runs on: compilation costs start-up seconds that only a long run repays.
    compile: bool = False
    # SAM 3 only: scale each prompt's map by the model's belief that the concept is in the image at all.
    presence_gate: bool = False
    # Also one row per object to DEST/instances/<run_id>/ (textseg.labels.instances).
    instances: bool = False

    @property
    def keeps_scores(self) -> bool:
        """Whether whole images' class scores travel to the write stage: polygons and instances are
        scored by their class's mean score."""
        return self.vectors or self.instances

    def __post_init__(self) -> None:
        if not self.source or not self.dest:
            raise ConfigError("SOURCE and DEST are both required")
        if (self.prompts is None) == (self.ontology is None):
            raise ConfigError("give exactly one of --prompts 'a,b,c' or --ontology FILE.yaml")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold {self.threshold} is outside [0, 1]")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r}: choose auto, cpu or cuda")
        for name in ("batch_size", "actors", "limit", "tile_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.gsd is not None and not self.gsd > 0:
            raise ConfigError(f"--gsd must be a positive number of metres per pixel, got {self.gsd}")
        if self.tile_overlap < 0:
            raise ConfigError(f"--tile-overlap must be >= 0, got {self.tile_overlap}")
        if self.tile_size is not None and self.tile_overlap * 2 >= self.tile_size:
            raise ConfigError("--tile-overlap must be less than half of --tile-size")
        if self.vector_simplify < 0 or self.vector_min_area < 0:
            raise ConfigError("--vector-simplify and --vector-min-area must be >= 0")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ConfigError(f"--max-error-rate {self.max_error_rate} is outside [0, 1]")
        if not self.startup_timeout > 0:
            raise ConfigError(
                f"--startup-timeout must be a positive number of seconds, got {self.startup_timeout}"
            )
        if not isinstance(self.storage_options, Mapping):
            raise ConfigError(
                "storage options must be a mapping (YAML `storage_options:`) or KEY=VALUE strings "
                f"(`--storage-option`, YAML `storage-option:`), got {type(self.storage_options).__name__}"
            )
        self._move_uri_credentials_into_storage_options()
        # A local DEST is kept absolute: mask_uri values in the metadata must not depend on the working
        # directory of the run (`textseg train DEST` from another folder, Ray workers elsewhere).
        if _is_local_path(self.dest):
            object.__setattr__(self, "dest", os.path.abspath(os.path.expanduser(self.dest)))

    def _move_uri_credentials_into_storage_options(self) -> None:
        """`s3://KEY:SECRET@bucket/...` works, but the secret must live on only in storage_options, which
        is never logged or written (explicit --storage-option values win)."""
        options = dict(self.storage_options)
        for name in ("source", "dest", "ontology"):
            uri = getattr(self, name)
            if uri is None:
                continue
            clean, credentials = split_credentials(uri)
            for key, value in credentials.items():
                if options.setdefault(key, value) != value:
                    raise ConfigError(
                        f"--{name} carries different credentials than the other URIs or options"
                    )
            object.__setattr__(self, name, clean)
        object.__setattr__(self, "storage_options", options)

    def to_public_dict(self) -> dict[str, Any]:
        """The settings as recorded in run summaries: storage option values are never written out."""
        public = dataclasses.asdict(self)
        public["storage_options"] = sorted(self.storage_options)
        return public


_FIELDS = {f.name for f in dataclasses.fields(JobConfig)}


def _is_local_path(uri: str) -> bool:
    """A plain local path (no `proto://`, no fsspec chain `a::b`); `file://` URIs are absolute already."""
    return "://" not in uri and "::" not in uri


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings -> fsspec storage options; dotted keys nest (`client_kwargs.endpoint_url=...`).

    Values `true`/`false` become booleans, so `anon=true` works as users expect, and numbers become int or
    float (`config_kwargs.read_timeout=5`, `config_kwargs.retries.max_attempts=3`: botocore compares them
    with numbers and fails on strings). A value starting with `{` or `[` is read as JSON
    (`client_kwargs={"endpoint_url": "http://..."}`). Secret values (`secret=1234...`) stay strings for
    redaction. A malformed pair is a ConfigError that never repeats the value (it may be a secret).
    """
    options: dict[str, Any] = {}
    for pair in pairs or []:
        if not isinstance(pair, str):
            kind = type(pair).__name__
            raise ConfigError(f"--storage-option expects KEY=VALUE strings, got a value of type {kind}")
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--storage-option expects KEY=VALUE, got {pair.split('=')[0]!r}...")
        *parents, leaf = key.split(".")
        if "" in (*parents, leaf):
            raise ConfigError(f"--storage-option {key!r}: a dotted key needs a name between every two dots")
        nested: dict[str, Any] = {leaf: value}
        for parent in reversed(parents):
            nested = {parent: nested}
        parsed: Any = {"true": True, "false": False}.get(value.lower(), value)
        secret = bool(secret_values(nested))
        if parsed is value and _NUMBER.fullmatch(value) and not secret:
            parsed = int(value) if value.lstrip("+-").isdigit() else float(value)
        elif value.lstrip().startswith(("{", "[")) and not secret:
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as err:
                raise ConfigError(
                    f"--storage-option {key}: the value starts like JSON but is not valid JSON "
                    f"({err.msg} at character {err.pos})"
                ) from None
        target = options
        for depth, parent in enumerate(parents):
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(
                    f"--storage-option {key}: {'.'.join(parents[: depth + 1])!r} already has a value, "
                    "so it cannot also hold nested options"
                )
        if isinstance(target.get(leaf), dict) and isinstance(parsed, dict):
            parsed = _merged(target[leaf], parsed)
        elif isinstance(target.get(leaf), dict):
            raise ConfigError(f"--storage-option {key}: {key!r} already holds nested options")
        target[leaf] = parsed
    return options


def _merged(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Nested option mappings merged, `top` winning on conflicts."""
    merged = dict(base)
    for key, value in top.items():
        old = merged.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            value = _merged(old, value)
        merged[key] = value
    return merged


_NUMBER = re.compile(r"[+-]?(\d+|\d*\.\d+|\d+\.\d*)([eE][+-]?\d+)?")


def from_mapping(values: Mapping[str, Any]) -> JobConfig:
    """Build a JobConfig from option names with dashes or underscores; unknown keys are an error."""
    normalized = {str(k).replace("-", "_"): v for k, v in values.items() if v is not None}
    unknown = sorted(set(normalized) - _FIELDS - {_FLAG_STORAGE_OPTION})
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; known: {sorted(_FIELDS)}")
    _collect_storage_options(normalized)
    if isinstance(normalized.get("prompts"), list):
        normalized["prompts"] = ",".join(normalized["prompts"])
    try:
        return JobConfig(**normalized)
    except TypeError as err:
        raise ConfigError(str(err)) from err


# `storage-option:` in a job YAML, spelt as the flag: KEY=VALUE strings (`storage_options:` is a mapping).
_FLAG_STORAGE_OPTION = "storage_option"


def _collect_storage_options(normalized: dict[str, Any]) -> None:
    """In place: `storage_options` (a mapping, or KEY=VALUE strings as `--storage-option` collects them)
    and `storage_option` (KEY=VALUE strings, one or a list, as written on the command line) -> one
    `storage_options` mapping, the KEY=VALUE strings winning where both set a key."""
    as_flag = normalized.pop(_FLAG_STORAGE_OPTION, None)
    options = normalized.get("storage_options")
    if isinstance(options, str | list):
        options = parse_storage_options([options] if isinstance(options, str) else options)
    if as_flag is not None:
        if isinstance(as_flag, str):
            as_flag = [as_flag]
        if not isinstance(as_flag, list):
            raise ConfigError("`storage-option:` takes KEY=VALUE strings, as --storage-option does")
        options = _merged(options if isinstance(options, Mapping) else {}, parse_storage_options(as_flag))
    if options is not None:
        normalized["storage_options"] = options


def from_yaml_file(path: str, overrides: Mapping[str, Any] | None = None) -> JobConfig:
    """A job YAML (keys = long option names), with command-line overrides applied on top.

    The command line wins over the file, also across exclusive pairs: `--prompts` replaces the file's
    `ontology:` (and `--ontology` its `prompts:`); `--storage-option` values are merged over the file's.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config file {path!r}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path!r} is not valid YAML: {err}") from err
    if not isinstance(values, Mapping):
        raise ConfigError(f"config file {path!r} must be a mapping of option names to values")
    from_file = {str(k).replace("-", "_"): v for k, v in values.items() if v is not None}
    given = {str(k).replace("-", "_"): v for k, v in (overrides or {}).items() if v is not None}
    if "prompts" in given or "ontology" in given:
        from_file.pop("prompts", None)
        from_file.pop("ontology", None)
    _collect_storage_options(from_file)
    _collect_storage_options(given)
    if "storage_options" in from_file and "storage_options" in given:
        given["storage_options"] = _merged(from_file["storage_options"], given["storage_options"])
    return from_mapping({**from_file, **given})
