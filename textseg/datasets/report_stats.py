"""What `textseg report` adds up while it streams DEST: bounded memory however many images DEST holds.

A report sees each labeled image once, in DEST's order, and DEST may hold millions. So class shares and
scores are running sums, score histograms have fixed bins, the random sample is a reservoir (Algorithm R:
every image equally likely whatever DEST's size, the same images for the same seed and DEST), the least
confident images a bounded heap, and error reasons counts per category with a few examples each. What is
kept per image is an `ImageRecord` (a few short lists), never pixels.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from textseg.errors import reason_category

# 0.05 wide: fine enough to see a mode near a class's threshold, few enough bars to read at a glance.
HISTOGRAM_BINS = 20
# Examples kept per error category: enough to see whether a category is one cause or several.
ERROR_EXAMPLES = 3
# Categories counted one by one; reasons of any further category count as OTHER_CATEGORY (a reason's
# category is its text before ':', so real runs have a handful; this only bounds a pathological DEST).
MAX_CATEGORIES = 1000
OTHER_CATEGORY = "other categories"


@dataclass(frozen=True)
class ImageRecord:
    """What a report keeps of one labeled image: enough to count it and to draw its preview later.

    class_names: background first (mask value i is class_names[i]); fractions and scores by the same
    index (`class_pixel_fraction`, `class_mean_score`: None where the class has no pixel).
    confidence: the mean of `scores` over the classes other than background that have a pixel; None when
    the image holds none of them.
    """

    relpath: str
    run_id: str
    source_uri: str
    mask_uri: str
    pixels: int
    class_names: tuple[str, ...]
    fractions: tuple[float, ...]
    scores: tuple[float | None, ...]
    confidence: float | None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> ImageRecord:
        """From an `ok` metadata row (`METADATA_SCHEMA`)."""
        names = tuple(row["class_names"] or ())
        fractions = tuple(float(f or 0.0) for f in row["class_pixel_fraction"] or ())
        scores = tuple(row["class_mean_score"] or (None,) * len(fractions))
        present = [s for f, s in zip(fractions[1:], scores[1:], strict=True) if f > 0 and s is not None]
        return cls(
            relpath=str(row["relpath"]),
            run_id=str(row["run_id"]),
            source_uri=str(row["source_uri"]),
            mask_uri=str(row["mask_uri"]),
            pixels=int(row["width"] or 0) * int(row["height"] or 0),
            class_names=names,
            fractions=fractions,
            scores=scores,
            confidence=sum(present) / len(present) if present else None,
        )


@dataclass
class ClassTotals:
    """One class's running sums over the images seen."""

    pixels: float = 0.0  # the class's pixels: its fraction x the image's pixels, summed over images
    scored_pixels: float = 0.0  # of those, pixels of images that recorded a mean score for the class
    score_sum: float = 0.0  # mean score x the class's pixels, summed: / scored_pixels is the pixel mean
    images: int = 0  # images where the class has a pixel
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)  # per-image mean scores


class ClassStatistics:
    """Per-class pixel share and mean score over the images added, by class name (runs with different
    ontologies share a class by its name), and how many images hold no class but background.

    share(name): the class's pixels over all images' pixels (each image weighted by width x height).
    mean_score(name): the mean score over all the class's pixels (each image's mean score for the class
    weighted by the class's pixels in it), so a large image counts as much as its pixels.
    """

    def __init__(self) -> None:
        self.images = 0
        self.pixels = 0
        self.without_class = 0
        self.by_class: dict[str, ClassTotals] = {}

    def add(self, record: ImageRecord) -> None:
        self.images += 1
        self.pixels += record.pixels
        found = False
        for index, (name, fraction, score) in enumerate(
            zip(record.class_names, record.fractions, record.scores, strict=True)
        ):
            totals = self.by_class.setdefault(name, ClassTotals())
            class_pixels = fraction * record.pixels
            totals.pixels += class_pixels
            if fraction <= 0:
                continue
            totals.images += 1
            found = found or index > 0
            if score is not None:
                totals.scored_pixels += class_pixels
                totals.score_sum += score * class_pixels
                totals.histogram[min(max(int(score * HISTOGRAM_BINS), 0), HISTOGRAM_BINS - 1)] += 1
        self.without_class += not found

    def totals(self, name: str) -> ClassTotals:
        """The class's sums; all zero for a class no image named."""
        return self.by_class.get(name) or ClassTotals()

    def share(self, name: str) -> float:
        return self.totals(name).pixels / self.pixels if self.pixels else 0.0

    def mean_score(self, name: str) -> float | None:
        totals = self.totals(name)
        return totals.score_sum / totals.scored_pixels if totals.scored_pixels else None

    @property
    def without_class_share(self) -> float | None:
        """The share of images where no class but background has a pixel; None before any image."""
        return self.without_class / self.images if self.images else None


class Reservoir:
    """A uniform random sample of at most `size` of the records offered (Algorithm R), seeded."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seen = 0
        self.items: list[ImageRecord] = []
        self._random = random.Random(seed)

    def offer(self, record: ImageRecord) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(record)
            return
        slot = self._random.randrange(self.seen)
        if slot < self.size:
            self.items[slot] = record


class LeastConfident:
    """The `size` records of lowest confidence offered (records without one are not candidates); among
    equal confidences the earlier record stays."""

    def __init__(self, size: int) -> None:
        self.size = size
        # A max-heap by confidence, as (-confidence, -arrival, record): the root is the one to drop next.
        self._heap: list[tuple[float, int, ImageRecord]] = []
        self._arrivals = itertools.count()

    def offer(self, record: ImageRecord) -> None:
        if record.confidence is None or self.size == 0:
            return
        entry = (-record.confidence, -next(self._arrivals), record)
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, entry)
        else:
            heapq.heappushpop(self._heap, entry)

    @property
    def items(self) -> list[ImageRecord]:
        """Least confident first."""
        return [record for _, _, record in sorted(self._heap, key=lambda e: (-e[0], -e[1]))]


class ErrorCategories:
    """Error rows counted by reason category (`textseg.errors.reason_category`), with the first
    ERROR_EXAMPLES (relpath, reason) of each."""

    def __init__(self) -> None:
        self.total = 0
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[tuple[str, str]]] = {}

    def add(self, relpath: str, reason: str) -> None:
        self.total += 1
        category = reason_category(reason)
        if category not in self.counts and len(self.counts) >= MAX_CATEGORIES:
            category = OTHER_CATEGORY
        self.counts[category] = self.counts.get(category, 0) + 1
        examples = self.examples.setdefault(category, [])
        if len(examples) < ERROR_EXAMPLES:
            examples.append((relpath, reason))

    def top(self, count: int) -> list[tuple[str, int, list[tuple[str, str]]]]:
        """(category, rows, examples) of the `count` most frequent categories, most frequent first."""
        ranked = sorted(self.counts.items(), key=lambda item: (-item[1], item[0]))[:count]
        return [(category, rows, self.examples[category]) for category, rows in ranked]
