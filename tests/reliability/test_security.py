"""Security: credentials never leak, weights are data (safetensors, no remote code), nothing escapes DEST.

Credentials come in the three ways users pass them: in the URI (`s3://KEY:SECRET@bucket/...`), as
`--storage-option key=/secret=/token=`, and in the AWS_* environment (a `textseg label` subprocess with its
own Ray, so its workers inherit that environment). Each run includes an object the proxy refuses (403) and
one it reports missing (404), so error messages with URIs are written too. Then every byte the runs left
behind is searched for every secret, raw and percent-encoded: stdout and stderr, Ray's log files, and every
object under DEST (masks, Parquet metadata, run summaries).
"""

from __future__ import annotations

import ast
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
from urllib.parse import quote

import fsspec
import pytest

from tests.reliability.conftest import subprocess_env
from tests.reliability.dataset import Runs, label_args, lost_and_duplicated, tiny_images, tiny_png
from tests.reliability.faulty_s3 import FaultyS3Proxy, Rule
from tests.s3_server import S3Server
from textseg.cli import main
from textseg.models.base import from_pretrained_options

TEXTSEG = pathlib.Path(__file__).resolve().parents[2] / "textseg"
IMAGES = 4


def _forms(secrets: list[str]) -> list[bytes]:
    return sorted({form.encode() for s in secrets for form in (s, quote(s, safe=""), quote(s))})


def _leaks(blobs: dict[str, bytes], secrets: list[str]) -> list[str]:
    return [
        f"{name} holds {form!r}" for name, blob in blobs.items() for form in _forms(secrets) if form in blob
    ]


def _files_under(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _dest_objects(s3_server: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_server.storage_options)
    return {path: fs.cat_file(path) for path in fs.find(f"{bucket}/{prefix}")}


def _source(s3_server: S3Server, bucket: str) -> list[str]:
    images = tiny_images(IMAGES, seed=5)
    for relpath, data in {**images, "forbidden.png": tiny_png(6), "gone.png": tiny_png(7)}.items():
        s3_server.put_object(bucket, f"raw/{relpath}", data)
    return [*images, "forbidden.png", "gone.png"]


def _proxy(s3_server: S3Server) -> FaultyS3Proxy:
    rules = [Rule("GET", r"^raw/forbidden\.png$", "deny"), Rule("GET", r"^raw/gone\.png$", "missing")]
    return FaultyS3Proxy(s3_server.endpoint_url, rules=rules)


def _check_rows(s3_server: S3Server, bucket: str, prefix: str, expected: list[str]) -> tuple[int, int]:
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_server.storage_options)
    runs = Runs.read(fs, f"{bucket}/{prefix}")
    rows = {row["relpath"]: row for row in runs.rows}
    assert rows["forbidden.png"]["error"] == "access denied reading the source object"
    assert rows["gone.png"]["status"] == "error"
    assert all(row["source_uri"] == f"s3://{bucket}/raw/{row['relpath']}" for row in runs.rows)
    return lost_and_duplicated(runs.rows, expected)


def test_credentials_in_uris_and_storage_options_never_appear_in_output_logs_or_dest(
    s3_server: S3Server,
    s3_bucket: str,
    tiny_clipseg_dir: pathlib.Path,
    ray_session: None,
    capfd: pytest.CaptureFixture[str],
    ledger,
) -> None:
    import ray

    expected = _source(s3_server, s3_bucket)
    key, secret, token = (
        "AKIAURIKEYFORTEXTSEG1",
        "uri/Secret+With/Slashes=9z",
        "SessionTokenOfTextseg0123456789",
    )
    with _proxy(s3_server) as proxy:
        args = label_args(
            f"s3://{key}:{quote(secret, safe='')}@{s3_bucket}/raw/",
            f"s3://{key}:{quote(secret, safe='')}@{s3_bucket}/labels",
            tiny_clipseg_dir,
            f"--storage-option=client_kwargs.endpoint_url={proxy.endpoint_url}",
            f"--storage-option=key={key}",
            f"--storage-option=secret={secret}",
            f"--storage-option=token={token}",
            "--max-error-rate",
            "1",
        )
        assert main(args) == 0
    output = capfd.readouterr()
    lost, duplicated = _check_rows(s3_server, s3_bucket, "labels", expected)
    ledger(
        "credentials in the URI and --storage-option (+403, +404)",
        runs=1,
        images=len(expected),
        lost=lost,
        duplicated=duplicated,
    )
    assert (lost, duplicated) == (0, 0)

    logs = pathlib.Path(ray._private.worker._global_node.get_logs_dir_path())
    blobs = {
        "stdout": output.out.encode(),
        "stderr": output.err.encode(),
        **_files_under(logs),
        **_dest_objects(s3_server, s3_bucket, "labels"),
    }
    assert any(name.endswith(".json") for name in blobs) and any(name.endswith(".parquet") for name in blobs)
    assert not _leaks(blobs, [key, secret, token])


def test_credentials_in_the_aws_environment_never_appear_in_output_logs_or_dest(
    s3_server: S3Server,
    s3_bucket: str,
    tiny_clipseg_dir: pathlib.Path,
    ray_tmpdir: pathlib.Path,
    sessions,
    ledger,
) -> None:
    expected = _source(s3_server, s3_bucket)
    key, secret, token = (
        "AKIAENVKEYFORTEXTSEG2",
        "env/Secret+With/Slashes=8y",
        "EnvSessionTokenOfTextseg98765",
    )
    with _proxy(s3_server) as proxy:
        env = subprocess_env(
            ray_tmpdir,
            AWS_ACCESS_KEY_ID=key,
            AWS_SECRET_ACCESS_KEY=secret,
            AWS_SESSION_TOKEN=token,
            AWS_ENDPOINT_URL=proxy.endpoint_url,
            AWS_DEFAULT_REGION="us-east-1",
        )
        args = label_args(
            f"s3://{s3_bucket}/raw/",
            f"s3://{s3_bucket}/labels-env",
            tiny_clipseg_dir,
            "--max-error-rate",
            "1",
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "textseg.cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        sessions.append(proc.pid)
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    lost, duplicated = _check_rows(s3_server, s3_bucket, "labels-env", expected)
    ledger(
        "credentials in the AWS_* environment, subprocess (+403, +404)",
        runs=1,
        images=len(expected),
        lost=lost,
        duplicated=duplicated,
    )
    assert (lost, duplicated) == (0, 0)

    blobs = {
        "stdout": out,
        "stderr": err,
        **_files_under(ray_tmpdir),
        **_dest_objects(s3_server, s3_bucket, "labels-env"),
    }
    assert any("/logs/" in name for name in blobs), "found no Ray log files to search"
    assert not _leaks(blobs, [key, secret, token])


def _from_pretrained_calls() -> list[tuple[str, ast.Call]]:
    calls = []
    for path in sorted(TEXTSEG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "from_pretrained":
                    calls.append((f"{path.relative_to(TEXTSEG.parent)}:{node.lineno}", node))
    return calls


def _keyword(call: ast.Call, name: str) -> object:
    """The constant a call passes as `name`; a call that spreads `**from_pretrained_options(...)` gets
    what that function gives, anything else "<not a constant>"."""
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else "<not a constant>"
        spread = keyword.value
        if (
            keyword.arg is None
            and isinstance(spread, ast.Call)
            and ast.unparse(spread.func) == "from_pretrained_options"
        ):
            return from_pretrained_options("cpu", None).get(name)
    return None


def test_every_from_pretrained_call_refuses_remote_code_and_model_weights_are_safetensors_only() -> None:
    calls = _from_pretrained_calls()
    assert calls, "no from_pretrained calls found: has the loading code moved?"
    for where, call in calls:
        assert _keyword(call, "trust_remote_code") is False, f"{where}: trust_remote_code must be False"
        owner = ast.unparse(call.func.value)  # type: ignore[attr-defined]
        if not any(word in owner for word in ("Tokenizer", "Processor", "Config")):
            assert _keyword(call, "use_safetensors") is True, f"{where}: {owner} must load safetensors only"
    source = "\n".join(path.read_text() for path in TEXTSEG.rglob("*.py"))
    for forbidden in ("torch.load(", "pickle.load", "trust_remote_code=True", "weights_only=False"):
        assert forbidden not in source, forbidden


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def test_a_checkpoint_with_only_pickled_weights_is_refused_without_unpickling_it(
    tiny_clipseg_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from textseg.models import load_model, resolve_model

    model_dir = tmp_path / "pickled-model"
    shutil.copytree(tiny_clipseg_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    tripwire = tmp_path / "UNPICKLED"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(str(tripwire))))
    with pytest.raises(OSError, match="safetensors"):
        load_model(resolve_model(str(model_dir)))
    assert not tripwire.exists(), "the pickled weights were executed"


def test_a_local_run_writes_nothing_outside_dest(
    tmp_path_factory: pytest.TempPathFactory, tiny_clipseg_dir: pathlib.Path, ray_session: None
) -> None:
    """Snapshot the whole pytest temporary tree (the model, SOURCE, every other test's folders) around a
    run, with names made to tempt an escape (spaces, unicode, a 255-byte name); only DEST may change."""
    root = tmp_path_factory.getbasetemp()
    work = tmp_path_factory.mktemp("outside-dest")
    names = {"a b/ü ñ.png": tiny_png(1), "x" * 251 + ".png": tiny_png(2), "plain.png": tiny_png(3)}
    for relpath, data in names.items():
        (work / "src" / relpath).parent.mkdir(parents=True, exist_ok=True)
        (work / "src" / relpath).write_bytes(data)
    dest = work / "dest"

    def snapshot() -> dict[str, tuple[int, int]]:
        found = {}
        for folder, subfolders, files in os.walk(root):
            if pathlib.Path(folder) == dest:
                subfolders.clear()
                continue
            for name in subfolders:
                found[os.path.join(folder, name)] = (-1, -1)  # a folder: only whether it exists
            for name in files:
                stat = os.lstat(os.path.join(folder, name))
                found[os.path.join(folder, name)] = (stat.st_size, stat.st_mtime_ns)
        return found

    before = snapshot()
    assert main(label_args(str(work / "src"), str(dest), tiny_clipseg_dir)) == 0
    after = snapshot()
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p) and p != str(dest))
    assert not changed, f"written outside DEST: {changed}"
    assert len(list((dest / "masks").rglob("*.png"))) == len(names)
