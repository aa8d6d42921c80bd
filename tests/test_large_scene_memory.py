"""A 16k x 16k tiled GeoTIFF is labeled with bounded memory: read window by window, blended block by
block, its mask streamed into a tiled GeoTIFF. Peak memory is measured in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import rasterio

from textseg.training.geo_synth import write_geotiff_scene

SIDE = 16384
LABEL_SCRIPT = """
import json, sys
import textseg
summary = textseg.label(sys.argv[1], sys.argv[2], runner="local", model=sys.argv[3], prompts="roof,road",
                        device="cpu", threshold=0.5, batch_size=16, tile_size=2048, tile_overlap=64)
peak_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"ok": summary.ok, "error": summary.error, "peak_mib": peak_kib / 1024}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from /proc")
def test_16k_scene_is_labeled_with_peak_memory_under_2_gb(tmp_path, tiny_clipseg_dir):
    write_geotiff_scene(
        str(tmp_path / "scene"), SIDE, SIDE, seed=7, render_block_size=2048, distinct_blocks=2
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            LABEL_SCRIPT,
            str(tmp_path / "scene" / "images"),
            str(tmp_path / "out"),
            str(tiny_clipseg_dir),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"16k x 16k scene: peak resident memory {result['peak_mib']:.0f} MiB")
    assert (result["ok"], result["error"]) == (1, 0)
    assert result["peak_mib"] < 2048
    with rasterio.open(tmp_path / "out" / "masks" / "scene.tif") as mask:
        assert (mask.width, mask.height) == (SIDE, SIDE) and mask.profile["tiled"]
