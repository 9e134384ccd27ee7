"""Importing torchvision ImageNet checkpoints for machines without internet: library, CLI and Train page."""
from __future__ import annotations

import hashlib
import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from covidscan import models
from covidscan.cli import main
from covidscan.errors import ModelRegistryError
from covidscan.models import (
    cached_imagenet_weights,
    create_model,
    imagenet_checkpoint_files,
    import_imagenet_checkpoint,
    pretrained_available,
)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "weights" / "mobilenet_v2-b0353104.pth"
TRAIN_PAGE = str(Path(__file__).resolve().parents[1] / "app_pages" / "train.py")


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def checkpoint_bytes(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def named_by_its_hash(data: bytes, stem: str = "fake_net") -> str:
    """A file name in torchvision's style whose hash part is this content's own sha256 prefix."""
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


@pytest.fixture
def fake_names(monkeypatch):
    """Let names made by named_by_its_hash count as checkpoints of mobilenet_v2 (real names stay known)."""
    extra: dict[str, str] = {}
    real = models.imagenet_checkpoint_files
    monkeypatch.setattr(models, "imagenet_checkpoint_files", lambda: {**real(), **extra})
    return extra


def test_registered_architectures_know_their_torchvision_file_names():
    files = imagenet_checkpoint_files()
    assert files["mobilenet_v2-b0353104.pth"] == "mobilenet_v2"  # ImageNet V1
    assert files["mobilenet_v2-7ebf99e0.pth"] == "mobilenet_v2"  # V2, torchvision's default
    assert files["resnet18-f37072fd.pth"] == "resnet18"
    assert "tiny_cnn" not in files.values()


def test_a_tiny_checkpoint_is_checked_and_cached_atomically(torch_home, tmp_path, fake_names):
    data = checkpoint_bytes({"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.zeros(4)})
    name = named_by_its_hash(data)
    fake_names[name] = "mobilenet_v2"

    cached = import_imagenet_checkpoint(data, name)  # an upload: bytes and its name
    assert cached == torch_home / "hub" / "checkpoints" / name
    assert cached.read_bytes() == data
    assert list(cached.parent.iterdir()) == [cached]  # no temporary file left behind

    source = tmp_path / name  # a path: the name comes from it
    source.write_bytes(data)
    cached.unlink()
    assert import_imagenet_checkpoint(source) == cached and cached.read_bytes() == data


def test_bad_checkpoints_are_refused_and_leave_nothing(torch_home, tmp_path, fake_names):
    good = checkpoint_bytes({"w": torch.ones(2)})
    name = named_by_its_hash(good)
    fake_names[name] = "mobilenet_v2"

    tampered = good[:-1] + bytes([good[-1] ^ 1])  # one bit off: the name's hash no longer matches
    with pytest.raises(ModelRegistryError, match="damaged or not the original"):
        import_imagenet_checkpoint(tampered, name)

    with pytest.raises(ModelRegistryError, match="not the name of a torchvision ImageNet checkpoint"):
        import_imagenet_checkpoint(good, "my_weights.pth")
    with pytest.raises(ModelRegistryError, match="file name"):
        import_imagenet_checkpoint(good)
    with pytest.raises(ModelRegistryError, match="does not exist"):
        import_imagenet_checkpoint(tmp_path / name)

    not_a_state_dict = checkpoint_bytes([torch.ones(2)])
    list_name = named_by_its_hash(not_a_state_dict, "list_net")
    fake_names[list_name] = "mobilenet_v2"
    with pytest.raises(ModelRegistryError, match="holds no state dict"):
        import_imagenet_checkpoint(not_a_state_dict, list_name)

    unsafe = pickle.dumps(shutil.rmtree)  # a pickle that would call code: weights_only refuses it
    unsafe_name = named_by_its_hash(unsafe, "unsafe_net")
    fake_names[unsafe_name] = "mobilenet_v2"
    with pytest.raises(ModelRegistryError, match="not a PyTorch weights file that loads safely"):
        import_imagenet_checkpoint(unsafe, unsafe_name)

    checkpoints = torch_home / "hub" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


def test_download_failure_says_how_to_import(torch_home, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ModelRegistryError) as info:
        create_model("resnet18", 2, pretrained=True)
    assert "covidscan weights import resnet18-f37072fd.pth" in str(info.value)


@pytest.mark.shared_data
def test_real_checkpoint_imports_through_the_cli_and_trains_from_it(torch_home, tmp_path, capsys):
    if not REAL.is_file():
        pytest.skip("../shared/data/weights is not present")
    assert not pretrained_available("mobilenet_v2")
    assert main(["weights", "list"]) == 0
    assert "mobilenet_v2     missing" in capsys.readouterr().out

    assert main(["weights", "import", str(REAL)]) == 0
    assert "Imported ImageNet weights for mobilenet_v2" in capsys.readouterr().out
    assert cached_imagenet_weights()["mobilenet_v2"] == torch_home / "hub" / "checkpoints" / REAL.name
    assert main(["weights", "list"]) == 0
    assert f"mobilenet_v2     cached   {torch_home / 'hub' / 'checkpoints' / REAL.name}" in capsys.readouterr().out
    model = create_model("mobilenet_v2", 2, pretrained=True)
    reference = torch.load(REAL, map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.features[0][0].weight, reference["features.0.0.weight"])

    damaged = tmp_path / REAL.name
    data = bytearray(REAL.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert main(["weights", "import", str(damaged)]) == 2
    assert "damaged or not the original" in capsys.readouterr().err


def test_train_page_offers_imagenet_and_imports_an_upload(torch_home, fake_names):
    app = AppTest.from_file(TRAIN_PAGE, default_timeout=120)
    app.run()
    app.selectbox(key="train_arch").set_value("mobilenet_v2").run()
    assert not app.exception, app.exception
    toggle = app.toggle(key="train_pretrained")
    assert not toggle.disabled  # offered even though nothing is cached: torchvision downloads it
    assert any("torchvision downloads mobilenet_v2-7ebf99e0.pth when the run starts" in t for t in
               [str(c.value) for c in app.caption])
    toggle.set_value(True).run()
    assert app.toggle(key="train_pretrained").value

    wrong = checkpoint_bytes({"w": torch.ones(2)})
    app.get("file_uploader")[0].upload("my_weights.pth", wrong).run()
    assert any("not the name of a torchvision ImageNet checkpoint" in str(e.value) for e in app.error)

    name = named_by_its_hash(wrong)
    fake_names[name] = "mobilenet_v2"
    app.get("file_uploader")[0].upload(name, wrong).run()
    assert not app.exception, app.exception
    assert any(f"Imported {name}: ImageNet weights for mobilenet_v2" in str(s.value) for s in app.success)
    assert (torch_home / "hub" / "checkpoints" / name).read_bytes() == wrong
