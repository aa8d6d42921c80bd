"""mIoU of a fusion model on held-out synthetic tiles, with the training prompts and with unseen synonyms,
and what prompts for absent concepts claim.

    python benchmarks/eval_demo_model.py [MODEL_DIR ...] [--n 64] [--seed 20001] [--threshold 0]

Tiles are rendered as `textseg synth --seed SEED` would write them (tile i = default_rng([SEED, i])), from
a seed never used in training, and labeled exactly as `textseg label` labels (textseg.training.evaluation).
Several model directories are scored side by side on the same tiles, one row each, so a table compares
like with like (e.g. with and without the adversarial loss).

Unrelated concepts (`UNRELATED_CONCEPTS`: none shown by a tile, none asked in the demo's training): each
in turn takes one class's place in the ontology (as "cloud" in place of water); its claim is the share
of all pixels it is given. A model that knows what it does not know claims ~0 everywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from textseg.models.fusion import load_fusion
from textseg.training.evaluation import (
    DEMO_MODEL_DIR,
    UNRELATED_CONCEPTS,
    UNSEEN_SYNONYMS,
    evaluate_backend,
    render_tiles,
    unrelated_claims,
)
from textseg.training.synth import SYNTH_CLASSES


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=[str(DEMO_MODEL_DIR)], help="model directories")
    parser.add_argument("--n", type=int, default=64, help="number of tiles")
    parser.add_argument("--seed", type=int, default=20_001, help="tile seed (never used in training)")
    parser.add_argument("--threshold", type=float, default=0.0, help="per-class softmax threshold")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)

    images, masks = render_tiles(args.n, args.seed)
    thresholds = [args.threshold] * len(SYNTH_CLASSES)
    prompt_sets = {
        "training prompts": [[name] for name in SYNTH_CLASSES],
        "unseen synonyms": [[word] for word in UNSEEN_SYNONYMS],
    }
    rows = []
    for model in args.models:
        backend = load_fusion(model)
        row: dict = {"model": model}
        for label, prompts in prompt_sets.items():
            started = time.perf_counter()
            result = evaluate_backend(backend, images, masks, prompts, SYNTH_CLASSES, thresholds)
            row[label] = result["miou"]
            row[f"{label} IoU"] = result["iou"]
            row[f"{label} seconds"] = time.perf_counter() - started
        row["unrelated claims"] = unrelated_claims(
            backend, images, prompt_sets["training prompts"], UNRELATED_CONCEPTS, thresholds
        )
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{args.n} tiles of seed {args.seed}, threshold {args.threshold}")
    print(f"{'model':<40} {'mIoU (training prompts)':>24} {'mIoU (unseen synonyms)':>23}")
    for row in rows:
        print(f"{row['model'][-40:]:<40} {row['training prompts']:>24.3f} {row['unseen synonyms']:>23.3f}")
        for label in prompt_sets:
            per_class = ", ".join(f"{k} {v:.3f}" for k, v in row[f"{label} IoU"].items() if v is not None)
            print(f"    {label}: {per_class}")
        claims = row["unrelated claims"]
        mean = sum(sum(c.values()) / len(c) for c in claims.values()) / len(claims)
        print(f"    unrelated concepts in a class's place, share of pixels claimed (mean {mean:.4f}):")
        for concept, by_class in claims.items():
            worst = max(by_class, key=by_class.__getitem__)
            shares = ", ".join(f"{k} {v:.4f}" for k, v in by_class.items())
            print(f"      {concept:<18} {shares}  (most: in {worst}'s place)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
