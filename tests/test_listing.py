"""textseg.source.listing over local folders and a real S3 protocol server (moto over loopback, s3fs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.s3_server import S3Server
from textseg.source.listing import ListingError, list_images, plan_shards
from textseg.source.refs import ImageRef, flag_collisions, mask_relpath

# Nested folders, spaces, unicode, an upper-case extension and files that are not images.
TREE = {
    "a.jpg": b"a",
    "b.PNG": b"bb",
    "notes.txt": b"not an image",
    "sub/c d.jpeg": b"ccc",
    "sub/deeper/é ü.tif": b"dddd",
    "sub/deeper/readme": b"no extension",
    "zz/w.webp": b"w",
}
IMAGE_RELPATHS = ["a.jpg", "b.PNG", "sub/c d.jpeg", "sub/deeper/é ü.tif", "zz/w.webp"]


def _make_tree(root: Path, files: dict[str, bytes] = TREE) -> Path:
    for relpath, body in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(body)
    return root


def _put_tree(s3_server: S3Server, bucket: str, prefix: str, files: dict[str, bytes] = TREE) -> None:
    for relpath, body in files.items():
        s3_server.put_object(bucket, f"{prefix}{relpath}", body)


def _relpaths(refs: list[ImageRef]) -> list[str]:
    return [ref.relpath for ref in refs]


# ----------------------------------------------------------------------------------------------------------
# Folders and prefixes


def test_local_folder_lists_images_recursively_by_extension(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "src")
    refs = list(list_images(str(root)))
    assert _relpaths(refs) == IMAGE_RELPATHS
    by_relpath = {ref.relpath: ref for ref in refs}
    assert by_relpath["sub/c d.jpeg"].uri == f"{root}/sub/c d.jpeg"
    assert by_relpath["sub/c d.jpeg"].size == 3
    assert by_relpath["sub/c d.jpeg"].fingerprint.startswith("size:3;mtime:")
    assert all(ref.problem is None for ref in refs)


def test_file_uri_and_trailing_slash_list_the_same_images(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "src")
    assert list(list_images(f"file://{root}/")) == list(list_images(str(root)))


def test_s3_prefix_lists_images_and_skips_directory_markers(s3_server: S3Server, s3_bucket: str) -> None:
    _put_tree(s3_server, s3_bucket, "raw/")
    s3_server.put_object(s3_bucket, "raw/sub/", b"")  # a "folder" made by a console
    s3_server.put_object(s3_bucket, "raw/empty.jpg/", b"")  # a marker that looks like an image
    s3_server.put_object(s3_bucket, "rawer/not-under-raw.jpg", b"x")  # shares the prefix string only
    refs = list(list_images(f"s3://{s3_bucket}/raw/", s3_server.storage_options))
    assert _relpaths(refs) == IMAGE_RELPATHS
    ref = refs[IMAGE_RELPATHS.index("sub/deeper/é ü.tif")]
    assert ref.uri == f"s3://{s3_bucket}/raw/sub/deeper/é ü.tif"
    assert ref.size == 4
    assert ref.fingerprint.startswith("size:4;etag:") and '"' not in ref.fingerprint


def test_s3_bucket_root_and_prefix_without_slash_work(s3_server: S3Server, s3_bucket: str) -> None:
    _put_tree(s3_server, s3_bucket, "")
    assert _relpaths(list(list_images(f"s3://{s3_bucket}", s3_server.storage_options))) == IMAGE_RELPATHS
    assert _relpaths(list(list_images(f"s3://{s3_bucket}/sub", s3_server.storage_options))) == [
        "c d.jpeg",
        "deeper/é ü.tif",
    ]


def test_credentials_in_the_source_uri_never_reach_the_refs(s3_server: S3Server, s3_bucket: str) -> None:
    s3_server.put_object(s3_bucket, "raw/a.jpg", b"a")
    options = {"client_kwargs": s3_server.storage_options["client_kwargs"]}
    source = f"s3://textseg-test-key:textseg-test-secret@{s3_bucket}/raw"
    (ref,) = list_images(source, options)
    assert ref.uri == f"s3://{s3_bucket}/raw/a.jpg"
    assert "textseg-test-secret" not in repr(ref) and "textseg-test-key" not in repr(ref)


def test_s3_listing_streams_across_batches(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("textseg.source.listing._S3_PAGE", 2)  # hand keys over 2 at a time instead of 1000
    _put_tree(s3_server, s3_bucket, "raw/")
    refs = list_images(f"s3://{s3_bucket}/raw", s3_server.storage_options)
    assert next(refs).relpath == "a.jpg"
    assert _relpaths(list(refs)) == IMAGE_RELPATHS[1:]


def test_s3_keys_that_cannot_become_safe_relpaths_are_problem_refs(
    s3_server: S3Server, s3_bucket: str
) -> None:
    for key in ("raw/ok.jpg", "raw/../evil.jpg", "raw/./dot.jpg", "raw//double.jpg", "raw/a/../b.jpg"):
        s3_server.put_object(s3_bucket, key, b"x")
    refs = list(list_images(f"s3://{s3_bucket}/raw/", s3_server.storage_options))
    ok = [ref for ref in refs if ref.problem is None]
    problems = {ref.uri: ref for ref in refs if ref.problem is not None}
    assert _relpaths(ok) == ["ok.jpg"]
    assert set(problems) == {
        f"s3://{s3_bucket}/raw/../evil.jpg",
        f"s3://{s3_bucket}/raw/./dot.jpg",
        f"s3://{s3_bucket}/raw//double.jpg",
        f"s3://{s3_bucket}/raw/a/../b.jpg",
    }
    assert "'..'" in (problems[f"s3://{s3_bucket}/raw/../evil.jpg"].problem or "")
    assert all(ref.relpath == "" for ref in problems.values())  # never a path to write to


def test_fingerprint_changes_when_a_local_file_changes(tmp_path: Path) -> None:
    image = tmp_path / "src" / "a.jpg"
    image.parent.mkdir()
    image.write_bytes(b"one")
    os.utime(image, (1_700_000_000, 1_700_000_000))
    (first,) = list_images(str(image.parent))
    image.write_bytes(b"two")  # same size
    os.utime(image, (1_700_000_100, 1_700_000_100))
    (second,) = list_images(str(image.parent))
    image.write_bytes(b"three")
    os.utime(image, (1_700_000_100, 1_700_000_100))  # same mtime, other size
    (third,) = list_images(str(image.parent))
    assert len({first.fingerprint, second.fingerprint, third.fingerprint}) == 3
    assert list(list_images(str(image.parent)))[0].fingerprint == third.fingerprint  # stable when unchanged


def test_fingerprint_changes_when_an_s3_object_changes(s3_server: S3Server, s3_bucket: str) -> None:
    s3_server.put_object(s3_bucket, "raw/a.jpg", b"one")
    (first,) = list_images(f"s3://{s3_bucket}/raw", s3_server.storage_options)
    s3_server.put_object(s3_bucket, "raw/a.jpg", b"two")  # same size, new content, behind s3fs's back
    (second,) = list_images(f"s3://{s3_bucket}/raw", s3_server.storage_options)
    assert first.fingerprint != second.fingerprint
    assert first.size == second.size == 3


def test_exclude_prefix_skips_dest_inside_source(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "src")
    _make_tree(root / "out" / "masks", {"a.png": b"m", "sub/c d.png": b"m"})
    _make_tree(root / "outside", {"x.png": b"x"})  # shares the name prefix, not the folder
    refs = list(list_images(str(root), exclude_prefix=f"{root}/out/"))
    assert _relpaths(refs) == [*IMAGE_RELPATHS[:2], "outside/x.png", *IMAGE_RELPATHS[2:]]


def test_exclude_prefix_on_s3(s3_server: S3Server, s3_bucket: str) -> None:
    _put_tree(s3_server, s3_bucket, "", {"a.jpg": b"a", "out/masks/a.png": b"m"})
    refs = list(
        list_images(f"s3://{s3_bucket}", s3_server.storage_options, exclude_prefix=f"s3://{s3_bucket}/out")
    )
    assert _relpaths(refs) == ["a.jpg"]


def test_symlink_loops_are_listed_once(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "src", {"a.jpg": b"a", "sub/b.jpg": b"b"})
    (root / "sub" / "loop").symlink_to(root)
    (root / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    refs = list(list_images(str(root)))
    assert _relpaths([ref for ref in refs if ref.problem is None]) == ["a.jpg", "sub/b.jpg"]
    (broken,) = [ref for ref in refs if ref.problem is not None]
    assert broken.uri == f"{root}/broken.jpg" and "broken symbolic link" in (broken.problem or "")


def test_an_empty_folder_lists_nothing(tmp_path: Path) -> None:
    assert list(list_images(str(tmp_path))) == []


# ----------------------------------------------------------------------------------------------------------
# Globs and single files


def test_local_glob_is_relative_to_its_fixed_folder(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "src")
    assert _relpaths(list(list_images(f"{root}/**/*.jpg"))) == ["a.jpg"]  # case-sensitive, like a shell
    assert _relpaths(list(list_images(f"{root}/**/*.j*"))) == ["a.jpg", "sub/c d.jpeg"]
    assert _relpaths(list(list_images(f"{root}/*.*"))) == ["a.jpg", "b.PNG"]  # one level only
    assert _relpaths(list(list_images(f"{root}/sub/*/*"))) == ["deeper/é ü.tif"]


def test_s3_glob_is_relative_to_its_fixed_prefix(s3_server: S3Server, s3_bucket: str) -> None:
    _put_tree(s3_server, s3_bucket, "raw/")
    options = s3_server.storage_options
    assert _relpaths(list(list_images(f"s3://{s3_bucket}/raw/**/*.j*", options))) == ["a.jpg", "sub/c d.jpeg"]
    assert _relpaths(list(list_images(f"s3://{s3_bucket}/raw/*", options))) == ["a.jpg", "b.PNG"]
    assert _relpaths(list(list_images(f"s3://{s3_bucket}/raw/s*/*", options))) == ["sub/c d.jpeg"]


def test_a_folder_whose_name_has_glob_characters_is_a_folder(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "photos [2020]", {"a.jpg": b"a"})
    assert _relpaths(list(list_images(str(root)))) == ["a.jpg"]


def test_a_single_image_is_its_own_source(tmp_path: Path, s3_server: S3Server, s3_bucket: str) -> None:
    root = _make_tree(tmp_path / "src")
    (ref,) = list_images(str(root / "sub" / "c d.jpeg"))
    assert (ref.relpath, ref.uri, ref.size) == ("c d.jpeg", f"{root}/sub/c d.jpeg", 3)
    s3_server.put_object(s3_bucket, "raw/x/ü.JPG", b"abc")
    (ref,) = list_images(f"s3://{s3_bucket}/raw/x/ü.JPG", s3_server.storage_options)
    assert (ref.relpath, ref.size) == ("ü.JPG", 3) and ref.fingerprint.startswith("size:3;etag:")


# ----------------------------------------------------------------------------------------------------------
# Manifests


def test_local_manifest_resolves_relative_lines_and_skips_comments(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "data")
    manifest = tmp_path / "data" / "lists" / "train.txt"
    manifest.parent.mkdir()
    manifest.write_text(
        "\ufeff# training images\n"
        "\n"
        "../sub/deeper/é ü.tif\n"
        f"{root}/sub/c d.jpeg\n"
        "   ../a.jpg   \n"
        "../a.jpg\n"  # the same image twice is listed once
        "../missing.jpg\n"
        "../sub\n",
        encoding="utf-8",
    )
    # A shard's refs come sorted by relpath (the skip check reads the state by relpath range).
    refs = sorted(list_images(str(manifest)), key=lambda ref: ref.uri)
    assert [(ref.uri, ref.relpath, ref.problem is None) for ref in refs] == [
        (f"{root}/a.jpg", "a.jpg", True),
        (f"{root}/missing.jpg", "", False),
        (f"{root}/sub", "", False),
        (f"{root}/sub/c d.jpeg", "sub/c d.jpeg", True),
        (f"{root}/sub/deeper/é ü.tif", "sub/deeper/é ü.tif", True),
    ]
    assert refs[4].size == 4
    assert "does not exist" in (refs[1].problem or "") and "folder" in (refs[2].problem or "")


def test_manifest_relpaths_are_relative_to_the_common_folder(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "data")
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"{root}/sub/c d.jpeg\n{root}/sub/deeper/é ü.tif\n")
    assert _relpaths(list(list_images(str(manifest)))) == ["c d.jpeg", "deeper/é ü.tif"]


def test_s3_manifest_with_relative_and_absolute_lines(s3_server: S3Server, s3_bucket: str) -> None:
    _put_tree(s3_server, s3_bucket, "raw/")
    s3_server.put_object(
        s3_bucket,
        "lists/batch.lst",
        f"../raw/a.jpg\ns3://{s3_bucket}/raw/sub/c d.jpeg\n../raw/gone.png\n".encode(),
    )
    refs = sorted(
        list_images(f"s3://{s3_bucket}/lists/batch.lst", s3_server.storage_options), key=lambda ref: ref.uri
    )
    assert [ref.relpath for ref in refs] == ["a.jpg", "", "sub/c d.jpeg"]
    assert refs[0].uri == f"s3://{s3_bucket}/raw/a.jpg" and refs[0].fingerprint.startswith("size:1;etag:")
    assert refs[1].uri == f"s3://{s3_bucket}/raw/gone.png" and "does not exist" in (refs[1].problem or "")


def test_local_manifest_of_s3_uris(tmp_path: Path, s3_server: S3Server, s3_bucket: str) -> None:
    _put_tree(s3_server, s3_bucket, "raw/")
    manifest = tmp_path / "images.txt"
    manifest.write_text(f"s3://{s3_bucket}/raw/a.jpg\ns3://{s3_bucket}/raw/zz/w.webp\n")
    refs = list(list_images(str(manifest), s3_server.storage_options))
    assert [(ref.uri, ref.relpath) for ref in refs] == [
        (f"s3://{s3_bucket}/raw/a.jpg", "a.jpg"),
        (f"s3://{s3_bucket}/raw/zz/w.webp", "zz/w.webp"),
    ]


def test_manifest_lines_with_credentials_fail_without_showing_them(tmp_path: Path) -> None:
    manifest = tmp_path / "images.txt"
    manifest.write_text("s3://AKIAEXAMPLE:very-secret-value@bucket/a.jpg\n")
    with pytest.raises(ListingError, match="line 1 .* embeds credentials") as caught:
        list_images(str(manifest))
    assert "very-secret-value" not in str(caught.value) and "AKIAEXAMPLE" not in str(caught.value)


def test_manifest_mixing_storages_is_refused(tmp_path: Path) -> None:
    _make_tree(tmp_path, {"a.jpg": b"a"})
    manifest = tmp_path / "images.txt"
    manifest.write_text(f"{tmp_path}/a.jpg\ns3://bucket/b.jpg\n")
    with pytest.raises(ListingError, match="more than one storage"):
        list_images(str(manifest), {"key": "k", "secret": "s"})


def test_a_binary_file_that_is_not_an_image_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "images.zip"
    archive.write_bytes(b"PK\x03\x04\xff\xfe\x00\x81")
    with pytest.raises(ListingError, match="not a folder, an image .* or a text manifest"):
        list_images(str(archive))


# ----------------------------------------------------------------------------------------------------------
# Missing SOURCE: job-level errors raised when list_images is called


def test_missing_local_source_fails_before_iteration(tmp_path: Path) -> None:
    with pytest.raises(ListingError, match=r"SOURCE '.*/nope' does not exist"):
        list_images(str(tmp_path / "nope"))
    with pytest.raises(ListingError, match="does not exist"):
        list_images(str(tmp_path / "nope" / "**" / "*.jpg"))


def test_missing_bucket_is_named(s3_server: S3Server) -> None:
    with pytest.raises(ListingError, match="bucket 'textseg-no-such-bucket' does not exist"):
        list_images("s3://textseg-no-such-bucket/raw/", s3_server.storage_options)


def test_missing_prefix_in_an_existing_bucket(s3_server: S3Server, s3_bucket: str) -> None:
    with pytest.raises(ListingError, match="no object has this key or prefix"):
        list_images(f"s3://{s3_bucket}/raw/", s3_server.storage_options)


# ----------------------------------------------------------------------------------------------------------
# Mask names


def test_mask_relpath_swaps_the_extension_for_png() -> None:
    assert mask_relpath("a/b c.jpg") == "a/b c.png"
    assert mask_relpath("x.tar.TIFF") == "x.tar.png"
    assert mask_relpath("é/ü.png") == "é/ü.png"
    with pytest.raises(ValueError, match="unsafe"):
        mask_relpath("../a.jpg")


def _collisions(refs: list[ImageRef]) -> dict[str, str]:
    return {r.relpath: r.problem for r in flag_collisions(refs) if r.problem and r.relpath}


def test_flag_collisions_names_every_other_image_with_the_same_mask() -> None:
    def ref(relpath: str, problem: str | None = None) -> ImageRef:
        return ImageRef(uri=f"/src/{relpath}", relpath=relpath, fingerprint="size:1", size=1, problem=problem)

    refs = [
        ref("a.jpg"),
        ref("a.png"),
        ref("a.sub.png"),  # stem 'a.sub' lies between the 'a.' names in sorted order
        ref("a.tif"),
        ref("b.jpg"),
        ref("sub/a.jpg"),
        ref("", problem="unsafe"),
    ]
    out = list(flag_collisions(refs))
    assert len(out) == len(refs)  # nothing dropped
    assert _collisions(refs) == {
        "a.jpg": "mask name collision with 'a.png', 'a.tif'",
        "a.png": "mask name collision with 'a.jpg', 'a.tif'",
        "a.tif": "mask name collision with 'a.jpg', 'a.png'",
    }
    assert _collisions([ref("a.jpg"), ref("A.png")]) == {}


def test_collisions_found_in_a_real_listing(tmp_path: Path) -> None:
    root = _make_tree(tmp_path, {"x/a.jpg": b"1", "x/a.png": b"2", "x/b.jpg": b"3", "y/a.jpg": b"4"})
    refs = list(list_images(str(root)))
    assert {r.relpath: r.problem for r in refs if r.problem} == {
        "x/a.jpg": "mask name collision with 'x/a.png'",
        "x/a.png": "mask name collision with 'x/a.jpg'",
    }
    assert len(refs) == 4


def test_a_folder_source_is_split_into_shards_that_list_every_image_once(tmp_path: Path) -> None:
    files = {f"d{i}/e{j}/img{k}.png": b"x" for i in range(3) for j in range(2) for k in range(2)}
    root = _make_tree(tmp_path, {**files, "top.png": b"t"})
    shards = plan_shards(str(root), target=4)
    assert len(shards) > 1
    names = [r.relpath for shard in shards for r in shard.refs(None)]
    assert sorted(names) == sorted([*files, "top.png"])
