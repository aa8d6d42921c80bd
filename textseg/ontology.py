"""Classes -> prompts, thresholds and colours, and the ontology's stable hash.

Class indices are 1, 2, 3 ... in file order; 0 is background and 255 is no-data. The YAML form:

    classes:
      building:
        prompts: [building, house, rooftop]  # default: [the class name]
        threshold: 0.45  # default: --threshold
        color: "#e41a1c"  # the mask palette; default: a colour-blind-safe cycle
        min_area_m2: 20  # --vectors: drop polygons under 20 m^2 (default: --vector-min-area)
        simplify_m: 0.5  # --vectors: simplify by 0.5 m on the ground (default: --vector-simplify px)

min_area_m2 is the class's minimum mapping unit, in square metres on the ground (geodesic), applied to
whole objects after pieces are merged across tile and window borders. simplify_m is a simplification
tolerance in metres, turned into pixels per image with its metres per pixel (`textseg.labels.vectors`);
where an image's CRS has no metric scale, the pixel tolerance is used and the image's row notes it.
Both only shape polygons, never masks, so (like colours) they are not part of the stable hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from textseg import storage

BACKGROUND = 0
NODATA = 255
MAX_CLASSES = 254  # 1..254: 0 is background and 255 is no-data in the 8-bit mask

# A colour-blind-safe qualitative palette (ColorBrewer Set1 then Dark2), cycled for classes without a colour.
DEFAULT_COLORS = (
    "#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#ffff33", "#a65628", "#f781bf",
    "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666",
)  # fmt: skip


class OntologyError(ValueError):
    """The ontology file or --prompts value is unusable; the message says what to fix."""


@dataclass(frozen=True)
class OntologyClass:
    name: str
    prompts: tuple[str, ...]
    threshold: float
    color: tuple[int, int, int]
    min_area_m2: float | None = None  # polygons (--vectors) smaller than this are dropped; None: the job's
    simplify_m: float | None = None  # polygon simplification in metres; None: the job's pixel tolerance


@dataclass(frozen=True)
class Ontology:
    classes: tuple[OntologyClass, ...]

    @property
    def class_names(self) -> list[str]:
        """Names with background first, so `class_names[i]` is the name of mask value i."""
        return ["background", *(c.name for c in self.classes)]

    @property
    def prompts(self) -> list[str]:
        """Every prompt of every class, flattened in class order (what the model embeds)."""
        return [p for c in self.classes for p in c.prompts]

    @property
    def prompt_class_index(self) -> list[int]:
        """For each entry of `prompts`, its class index (1-based)."""
        return [i for i, c in enumerate(self.classes, start=1) for _ in c.prompts]

    @property
    def thresholds(self) -> list[float]:
        return [c.threshold for c in self.classes]

    def palette(self) -> list[int]:
        """A 768-entry Pillow palette: background black, classes their colours, 255 (no-data) white."""
        flat = [0] * 768
        for i, c in enumerate(self.classes, start=1):
            flat[3 * i : 3 * i + 3] = c.color
        flat[3 * NODATA : 3 * NODATA + 3] = (255, 255, 255)
        return flat

    def stable_hash(self) -> str:
        """Hash of everything that changes the labels (names, prompts, thresholds, order), not colours."""
        canonical = [[c.name, list(c.prompts), round(c.threshold, 6)] for c in self.classes]
        return hashlib.sha256(json.dumps(canonical).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The ontology YAML form (README), round-trippable through `from_mapping`."""
        return {
            "classes": {
                c.name: {
                    "prompts": list(c.prompts),
                    "threshold": c.threshold,
                    "color": _hex(c.color),
                    **{key: getattr(c, key) for key in _VECTOR_KEYS if getattr(c, key) is not None},
                }
                for c in self.classes
            }
        }


_VECTOR_KEYS = ("min_area_m2", "simplify_m")  # per-class polygon settings (module docstring)
_CLASS_KEYS = ("prompts", "threshold", "color", *_VECTOR_KEYS)


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def parse_color(value: str | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, str):
        text = value.strip().lstrip("#")
        if len(text) != 6:
            raise OntologyError(f"colour {value!r} is not of the form '#rrggbb'")
        try:
            return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
        except ValueError as err:
            raise OntologyError(f"colour {value!r} is not of the form '#rrggbb'") from err
    if len(value) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in value):
        raise OntologyError(f"colour {value!r} must be '#rrggbb' or three integers 0-255")
    return (value[0], value[1], value[2])


def from_mapping(mapping: Mapping[str, Any], default_threshold: float) -> Ontology:
    """Build an ontology from the ontology YAML structure (module docstring:
    `classes: {name: {prompts, threshold, color, min_area_m2, simplify_m}}`)."""
    classes_in = mapping.get("classes") if isinstance(mapping, Mapping) else None
    if not isinstance(classes_in, Mapping) or not classes_in:
        raise OntologyError("an ontology needs a non-empty 'classes:' mapping of class name -> settings")
    classes = []
    for i, (name, spec) in enumerate(classes_in.items()):
        spec = spec or {}
        if not isinstance(spec, Mapping):
            raise OntologyError(
                f"class {name!r}: settings must be a mapping with keys {', '.join(_CLASS_KEYS)}"
            )
        unknown = set(spec) - set(_CLASS_KEYS)
        if unknown:
            raise OntologyError(
                f"class {name!r}: unknown keys {sorted(unknown)}; allowed: {', '.join(_CLASS_KEYS)}"
            )
        prompts = spec.get("prompts", [name])
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = tuple(str(p).strip() for p in prompts if str(p).strip())
        if not prompts:
            raise OntologyError(f"class {name!r} has no prompts")
        threshold = float(spec.get("threshold", default_threshold))
        if not 0.0 <= threshold <= 1.0:
            raise OntologyError(f"class {name!r}: threshold {threshold} is outside [0, 1]")
        color = (
            parse_color(spec["color"])
            if "color" in spec
            else parse_color(DEFAULT_COLORS[i % len(DEFAULT_COLORS)])
        )
        vector = {key: _non_negative(name, key, spec[key]) for key in _VECTOR_KEYS if key in spec}
        classes.append(OntologyClass(str(name), prompts, threshold, color, **vector))
    if len(classes) > MAX_CLASSES:
        raise OntologyError(f"{len(classes)} classes: an 8-bit mask holds at most {MAX_CLASSES}")
    return Ontology(tuple(classes))


def _non_negative(name: object, key: str, value: Any) -> float:
    """A class's min_area_m2 or simplify_m: a finite number >= 0 (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        unit = "square metres" if key == "min_area_m2" else "metres"
        raise OntologyError(f"class {name!r}: {key} must be a number of {unit} >= 0, got {value!r}")
    return float(value)


def from_prompts(prompts: str | Sequence[str], default_threshold: float) -> Ontology:
    """`--prompts "building,road,water"`: one class per prompt, named by it."""
    items = prompts.split(",") if isinstance(prompts, str) else list(prompts)
    names = [p.strip() for p in items if p.strip()]
    if not names:
        raise OntologyError("--prompts is empty: give comma-separated prompts such as 'building,road'")
    if len(set(names)) != len(names):
        raise OntologyError(f"--prompts repeats a prompt: {names}")
    return from_mapping({"classes": {n: {"prompts": [n]} for n in names}}, default_threshold)


def from_yaml_text(text: str, default_threshold: float) -> Ontology:
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise OntologyError(f"the ontology file is not valid YAML: {err}") from err
    return from_mapping(mapping or {}, default_threshold)


def read_ontology(uri: str, storage_options: Mapping[str, Any], default_threshold: float) -> Ontology:
    """An ontology YAML file on local disk or any fsspec storage (`--ontology`); a missing file is an
    OntologyError naming it."""
    fs, path = storage.filesystem_for(uri, storage_options)
    try:
        text = storage.read_bytes(fs, path).decode("utf-8")
    except FileNotFoundError:
        raise OntologyError(f"ontology file {storage.redact_uri(uri)!r} does not exist") from None
    return from_yaml_text(text, default_threshold)
