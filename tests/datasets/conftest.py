"""A labeled DEST for the export, report and calibration tests: synthetic satellite tiles (buildings,
roads, water, trees; their ground truth beside them) labeled by the demo model in this process, with and
without instance rows."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import pytest

from textseg.api import label
from textseg.training.synth import write_synth_dataset

TILES = 10


@dataclass(frozen=True)
class LabeledFixture:
    source: pathlib.Path  # the images (SOURCE)
    truth: pathlib.Path  # ground-truth masks by relpath (palette PNGs, the classes of `ontology`)
    ontology: pathlib.Path  # the ontology YAML the DEST was labeled with
    dest: pathlib.Path


def _labeled(root: pathlib.Path, instances: bool) -> LabeledFixture:
    synth = root / "synth"
    write_synth_dataset(str(synth), TILES, seed=31)
    dest = root / "dest"
    summary = label(
        str(synth / "images"),
        str(dest),
        runner="local",
        model="demo",
        ontology=str(synth / "ontology.yaml"),
        device="cpu",
        instances=instances,
    )
    assert summary.ok == TILES, summary
    return LabeledFixture(synth / "images", synth / "masks", synth / "ontology.yaml", dest)


@pytest.fixture(scope="session")
def labeled_dest(tmp_path_factory: pytest.TempPathFactory) -> LabeledFixture:
    """Labeled with --instances: DEST/instances/ holds the regions' rows."""
    return _labeled(tmp_path_factory.mktemp("labeled-instances"), instances=True)


@pytest.fixture(scope="session")
def labeled_dest_plain(tmp_path_factory: pytest.TempPathFactory) -> LabeledFixture:
    """Labeled without --instances: an export finds the regions in the masks."""
    return _labeled(tmp_path_factory.mktemp("labeled-plain"), instances=False)
