"""Tests of batch inputs: ZIP archives read in memory with limits (hostile archives refused), folders
searched recursively, and `covidscan predict` over a folder and a .zip."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile

import pandas as pd
import pytest
from synthetic import ct_dicom_bytes, encode, gradient_image, tiny_bundle

from covidscan.batch import (
    BatchError,
    BatchLimits,
    expand_inputs,
    folder_items,
    zip_items,
)


def make_zip(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name) if name.startswith("/") else name, data)
    return buffer.getvalue()


PNG = encode(gradient_image(64, 64))


def test_zip_images_and_dicoms_are_read_and_other_files_left_out():
    data = make_zip({"scans/a.png": PNG, "scans/deep/b.jpg": encode(gradient_image(50, 40), "JPEG"),
                     "IM0001": ct_dicom_bytes(), "readme.txt": b"hello", "__MACOSX/scans/._a.png": b"junk",
                     ".DS_Store": b"junk", "scans/": b""})
    items = zip_items(data)
    assert [item.name for item in items] == ["scans/a.png", "scans/deep/b.jpg", "IM0001"]
    assert all(item.error is None for item in items) and items[0].data == PNG


def test_path_traversal_absolute_and_nested_archives_are_refused_each():
    data = make_zip({"ok.png": PNG, "../../etc/evil.png": PNG, "/abs/evil.png": PNG, "C:/evil.png": PNG,
                     "inner.zip": make_zip({"x.png": PNG}), "deep/" * 12 + "x.png": PNG})
    items = {item.name: item for item in zip_items(data)}
    assert items["ok.png"].error is None
    for name in ("../../etc/evil.png", "/abs/evil.png", "C:/evil.png"):
        assert items[name].data is None and "unsafe path" in items[name].error
    assert "nested archives are not opened" in items["inner.zip"].error
    assert "folders deep" in items["deep/" * 12 + "x.png"].error


def test_zip_bombs_and_oversized_archives_are_refused():
    bomb = make_zip({"bomb.png": b"\0" * (20 * 1024 * 1024), "ok.png": PNG})
    assert len(bomb) < 200_000
    items = {item.name: item for item in zip_items(bomb)}
    assert "zip bomb" in items["bomb.png"].error and items["ok.png"].error is None
    small = BatchLimits(max_total_bytes=1024 * 1024)
    with pytest.raises(BatchError, match="would unpack to"):
        zip_items(bomb, small)
    with pytest.raises(BatchError, match="holds 6 files; at most 5"):
        zip_items(make_zip({f"{i}.png": PNG for i in range(6)}), BatchLimits(max_members=5))
    one_file = BatchLimits(max_member_bytes=1000)
    assert "one file may be at most" in zip_items(make_zip({"a.png": PNG}), one_file)[0].error
    with pytest.raises(BatchError, match="not a readable ZIP"):
        zip_items(b"PK\x03\x04 this is not really a zip")


def test_a_header_that_understates_the_size_cannot_inflate_past_the_limit():
    data = bytearray(make_zip({"big.png": b"\1" * 50_000}, compression=zipfile.ZIP_STORED))
    # Rewrite the uncompressed size in the local and central headers to claim 500 bytes.
    real = (50_000).to_bytes(4, "little")
    fake = (500).to_bytes(4, "little")
    assert data.count(real) >= 2
    data = bytes(data).replace(real, fake)
    items = zip_items(data, BatchLimits(max_member_bytes=10_000))
    assert items[0].data is None and items[0].error  # refused or unreadable, never 50 kB in memory


def test_folder_recursion_skips_hidden_files_links_and_nested_archives(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.png").write_bytes(PNG)
    (tmp_path / "a" / "b" / "two.dcm").write_bytes(ct_dicom_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(PNG)
    (tmp_path / "pack.zip").write_bytes(make_zip({"x.png": PNG}))
    os.symlink(tmp_path / "a", tmp_path / "loop")
    items = folder_items(tmp_path)
    assert [item.name for item in items] == ["a/b/two.dcm", "a/one.png", "pack.zip"]
    assert items[2].error and "nested" in items[2].error
    with pytest.raises(BatchError, match="more than 1 files"):
        folder_items(tmp_path, BatchLimits(max_members=1))


def test_expand_inputs_names_members_under_their_archive(tmp_path):
    archive = tmp_path / "batch.zip"
    archive.write_bytes(make_zip({"x.png": PNG}))
    empty = tmp_path / "empty"
    empty.mkdir()
    items = list(expand_inputs([str(archive), str(empty), str(tmp_path / "plain.png")]))
    assert [item.name for item in items] == [f"{archive}/x.png", str(empty), str(tmp_path / "plain.png")]
    assert items[0].data == PNG and "no image" in items[1].error and items[2].data is None


def test_cli_predicts_a_folder_and_a_zip_with_errors_per_file_and_a_csv(tmp_path):
    bundle = tiny_bundle(tmp_path / "bundle")
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    (folder / "good.png").write_bytes(PNG)
    (folder / "sub" / "broken.png").write_bytes(b"not a png at all" * 10)
    archive = tmp_path / "upload.zip"
    archive.write_bytes(make_zip({"z.png": PNG, "../evil.png": PNG}))
    csv = tmp_path / "results.csv"
    result = subprocess.run([sys.executable, "-m", "covidscan", "predict", "--model", str(bundle), "--json",
                             "--cam", "eigencam", "--colormap", "viridis", "--lung-outline", "--faithfulness",
                             "--out", str(tmp_path / "cams"), "--csv", str(csv), str(folder), str(archive)],
                            capture_output=True, text=True, timeout=600, env=os.environ)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    records = {record["file"]: record for record in map(json.loads, result.stdout.splitlines())}
    assert set(records) == {f"{folder}/good.png", f"{folder}/sub/broken.png", f"{archive}/z.png",
                            f"{archive}/../evil.png"}
    good = records[f"{folder}/good.png"]
    assert good["cam_method"] == "eigencam" and good["cam_faithfulness"]["metric"] == "ROAD"
    assert good["cam_in_lungs"] is None or 0.0 <= good["cam_in_lungs"] <= 1.0
    assert "not an image or DICOM" in records[f"{folder}/sub/broken.png"]["error"]
    assert "unsafe path" in records[f"{archive}/../evil.png"]["error"]
    assert records[f"{archive}/z.png"]["label"] in ("COVID", "NonCOVID")
    table = pd.read_csv(csv)
    assert len(table) == 4 and set(table["cam_method"].dropna()) == {"eigencam"}
    assert table["cam_faithfulness"].notna().sum() == 2  # the two images that were read
