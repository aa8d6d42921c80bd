"""The Python API and `jobs/label.py --config` run the same job as the CLI."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import yaml
from PIL import Image

import textseg
from textseg.config import ConfigError, from_mapping

REPO = pathlib.Path(__file__).resolve().parent.parent


def write_images(folder: pathlib.Path, count: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_python_api_labels_in_process_without_ray(tmp_path, tiny_clipseg_dir):
    write_images(tmp_path / "imgs", 3)
    summary = textseg.label(
        str(tmp_path / "imgs"),
        str(tmp_path / "out"),
        runner="local",
        model=str(tiny_clipseg_dir),
        prompts="cat,dog",
        device="cpu",
    )
    assert (summary.listed, summary.ok, summary.error, summary.status) == (3, 3, 0, "succeeded")
    table = pq.read_table(tmp_path / "out" / "metadata" / summary.run_id)
    assert sorted(table["relpath"].to_pylist()) == ["img0.png", "img1.png", "img2.png"]
    assert len(list((tmp_path / "out" / "masks").glob("*.png"))) == 3


def test_job_config_file_runs_the_cli_job(tmp_path, tiny_clipseg_dir):
    write_images(tmp_path / "imgs", 2)
    config = {
        "source": str(tmp_path / "imgs"),
        "dest": str(tmp_path / "out"),
        "model": str(tiny_clipseg_dir),
        "prompts": "cat,dog",
        "device": "cpu",
        "max-error-rate": 0.0,
        "dry-run": True,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "label.py"), "--config", str(tmp_path / "job.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "listed 2, already done 0, would label 2" in done.stdout


def test_example_job_config_parses():
    values = yaml.safe_load((REPO / "jobs" / "example.yaml").read_text())
    config = from_mapping(values)
    assert config.source.startswith("s3://") and config.max_error_rate == 0.01


def test_unknown_config_keys_are_refused_with_the_known_names():
    try:
        from_mapping({"source": "a", "dest": "b", "prompts": "x", "trehshold": 0.3})
    except ConfigError as err:
        assert "trehshold" in str(err) and "threshold" in str(err)
    else:
        raise AssertionError("a misspelt option must be an error")


def test_credentials_in_uris_move_into_storage_options_and_out_of_every_kept_string():
    config = from_mapping(
        {"source": "s3://AKIDEXAMPLE:s3cr3tValue@bucket/raw/", "dest": "s3://bucket/out", "prompts": "x"}
    )
    assert config.source == "s3://bucket/raw/"
    assert config.storage_options == {"key": "AKIDEXAMPLE", "secret": "s3cr3tValue"}
    assert "s3cr3tValue" not in repr(config.to_public_dict()) + repr(config)
