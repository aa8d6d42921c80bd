"""Images that kill the process handling them, in a local Ray of its own: one kills the model actor (an
all-black image), one kills its decode task's worker (a file named `segfault.png`); and one whose
decoding raises (`raises.png`), whose traceback must reach the driver's output. Run as
`python -m tests.reliability.poison_images WORKDIR MODEL_DIR`; prints `RESULT {json}`.

The processes die by `os._exit` from inside the stages' real code paths, patched into every Ray worker
by a `worker_process_setup_hook` (`install`), so Ray sees exactly what a segfault looks like: a worker
gone without an exception.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np
from PIL import Image

IMAGES = 9  # six good images, one all-black (kills the model), segfault.png (kills decoding), raises.png
RAISED = "injected decoder failure"


def install() -> None:
    """Runs in every Ray worker before its first task."""
    import textseg.pipeline.decode as decode
    from textseg.models.clipseg import ClipSegBackend

    score, open_source = ClipSegBackend.score, decode.open_source

    def dying_score(self, pixel_values, prompt_embeddings):  # type: ignore[no-untyped-def]
        if (pixel_values[:, 0].flatten(1).std(1) < 1e-6).any():
            os._exit(1)
        return score(self, pixel_values, prompt_embeddings)

    def dying_open(fs, path, relpath, *args):  # type: ignore[no-untyped-def]
        if "segfault" in relpath:
            os._exit(1)
        if "raises" in relpath:
            raise RuntimeError(RAISED)
        return open_source(fs, path, relpath, *args)

    ClipSegBackend.score = dying_score  # type: ignore[method-assign]
    decode.open_source = dying_open  # type: ignore[assignment]


def main(workdir: pathlib.Path, model_dir: str) -> None:
    import pyarrow.parquet as pq
    import ray

    from textseg.cli import main as cli
    from textseg.plan.runner_ray import RAY_INIT_OPTIONS

    source = workdir / "imgs"
    source.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(IMAGES - 3):
        Image.fromarray(rng.integers(1, 256, (24, 24, 3), dtype=np.uint8)).save(source / f"img{i}.png")
    Image.fromarray(np.zeros((24, 24, 3), dtype=np.uint8)).save(source / "black.png")
    Image.fromarray(np.full((24, 24, 3), 50, dtype=np.uint8)).save(source / "segfault.png")
    Image.fromarray(np.full((24, 24, 3), 70, dtype=np.uint8)).save(source / "raises.png")
    ray.init(
        num_cpus=2,
        runtime_env={"worker_process_setup_hook": "tests.reliability.poison_images.install"},
        **RAY_INIT_OPTIONS,  # as `textseg label` starts Ray: the workers' logs reach this output
    )
    dest = workdir / "out"
    args = ["label", str(source), str(dest), "--model", model_dir, "--prompts", "cat,dog"]
    code = cli([*args, "--max-error-rate", "0.5"])
    rows = pq.read_table(dest / "metadata").to_pylist()
    (summary,) = [json.loads(p.read_text()) for p in (dest / "runs").glob("*.json")]
    result = {
        "exit": code,
        "rows": {r["relpath"]: [r["status"], r["error"]] for r in rows},
        "row_count": len(rows),
        "summary": {k: summary[k] for k in ("status", "listed", "ok", "error", "top_errors")},
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), sys.argv[2])
