"""`make demo`: synthesize fresh satellite-like tiles, label them with `textseg label` on a local Ray using
the shipped demo model (no download), and score the masks against the tiles' ground truth."""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq

from textseg.cli import main as textseg_main
from textseg.evaluation import evaluate_folders
from textseg.training.synth import write_synth_dataset


def class_fractions(names: Sequence[str] | None, fractions: Sequence[float] | None) -> str:
    """A row's `class_pixel_fraction` beside its `class_names`: 'background: 0.712, building: 0.201, ...'."""
    if names is None or fractions is None:  # an error row has no fractions
        return "-"
    return ", ".join(f"{name}: {float(value):.3f}" for name, value in zip(names, fractions, strict=True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", help="folder for the tiles and the labels (recreated)")
    parser.add_argument("--n", type=int, default=16, help="number of tiles")
    parser.add_argument("--seed", type=int, help="tile seed (default: a fresh random one)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6, 10**9)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    tiles, labels = out / "tiles", out / "labels"
    write_synth_dataset(str(tiles), args.n, seed)
    print(f"synthesized {args.n} tiles with seed {seed} under {tiles}/images")

    status = textseg_main(
        [
            "label",
            str(tiles / "images"),
            str(labels),
            "--model",
            "demo",
            "--ontology",
            str(tiles / "ontology.yaml"),
        ]
    )
    if status != 0:
        return status
    metadata = pq.read_table(labels / "metadata").to_pandas()
    print(f"\nmasks:    {labels / 'masks'}/")
    print(f"metadata: {labels / 'metadata'}/  ({len(metadata)} rows)")
    print(f"summary:  {next((labels / 'runs').glob('*.json'))}\n")
    columns = ["relpath", "status", "width", "height", "duration_ms", "class_pixel_fraction"]
    readable = metadata[columns].assign(
        class_pixel_fraction=[
            class_fractions(names, fractions)
            for names, fractions in zip(
                metadata["class_names"], metadata["class_pixel_fraction"], strict=True
            )
        ]
    )
    print(readable.head(5).to_string(index=False))

    report = evaluate_folders(str(labels / "masks"), str(tiles / "masks"))
    print("\n" + report.table())
    print(f"\nmIoU against the ground truth of {report.images} fresh tiles: {report.miou:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
