"""Model loading, prunable-layer selection, data readers and input capture.

Tests marked by the ``shared`` fixture read ``../shared`` (real weights and data) and skip when it is absent;
the rest build tiny timm models from scratch, so they need no files and no downloads.

    python -m pytest tests/models/test_models_data.py -q
"""

from __future__ import annotations

import gzip
import json
import struct
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from cap_dist.data import (
    IdxFormatError,
    ImageDecodeError,
    LabelledImageFolder,
    iter_image_batches,
    load_imagenet_samples,
    load_mnist,
    preprocess_mnist,
    read_idx,
    sample_indices,
)
from cap_dist.models import (
    ModelLoadError,
    capture_layer_inputs,
    find_prunable_layers,
    flattened_weight,
    load_model_dir,
    set_flattened_weight,
)
from cap_dist.models.spec import parse_head

TINY_VIT_JSON = {
    "architecture": "timm:VisionTransformer",
    "create_kwargs": {"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "embed_dim": 16,
                      "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "qkv_bias": False, "global_pool": "token",
                      "final_norm": False},
    "head": "replace model.head with Sequential(Linear(16,32), GELU(), Linear(32,10)); keys head.0.*, head.2.*",
    "norm_layer": "torch.nn.LayerNorm with eps=1e-5",
    "input": {"size": 28, "channels": 1, "scale": "x/255", "mean": [0.1307], "std": [0.3081]},
    "reference_top1_on_nothing": 0.5,
}


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def shared(shared_dir: Path) -> Path:
    return shared_dir


@pytest.fixture(scope="module")
def vit4mnist(shared: Path):
    return load_model_dir(str(shared / "models" / "vit4mnist"))


@pytest.fixture(scope="module")
def effnet(shared: Path):
    return load_model_dir(str(shared / "models" / "tf_efficientnet_lite0"))


def _write_tiny_model_dir(folder: Path, state_edit=None) -> nn.Module:
    """Save a tiny ViT (random init) as model.json + model.safetensors; return the saved module."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps(TINY_VIT_JSON))
    kwargs = dict(TINY_VIT_JSON["create_kwargs"])
    model = timm.models.VisionTransformer(**kwargs, norm_layer=partial(nn.LayerNorm, eps=1e-5))
    model.head = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 10))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if state_edit is not None:
        state_edit(state)
    save_file(state, str(folder / "model.safetensors"))
    return model.eval()


# --------------------------------------------------------------------------------------------------------
# Loading


def test_vit4mnist_reaches_reference_accuracy(vit4mnist, shared: Path) -> None:
    model, spec = vit4mnist
    assert not model.training
    assert isinstance(model.head, nn.Sequential) and model.blocks[0].norm1.eps == 1e-5
    images, labels = load_mnist(str(shared / "data" / "mnist"))
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    x = preprocess_mnist(images[:1000], spec.input)
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.float32
    with torch.no_grad():
        top1 = (model(x).argmax(1) == labels[:1000]).float().mean().item()
    assert top1 >= 0.97, f"vit4mnist top-1 {top1:.4f} on the first 1000 test digits"
    assert spec.reference_accuracy["reference_top1_on_mnist_test"] == pytest.approx(0.9791)


def test_efficientnet_classifies_imagenet_samples(effnet, shared: Path) -> None:
    model, spec = effnet
    data = load_imagenet_samples(str(shared / "data" / "imagenet-samples"), spec.input, indices=range(64))
    assert data.images.shape == (64, 3, 224, 224) and not data.skipped
    with torch.no_grad():
        top1 = (model(data.images).argmax(1) == data.labels).float().mean().item()
    assert top1 > 0.75, f"tf_efficientnet_lite0 top-1 {top1:.3f} on the first 64 samples"


def test_round_trip_of_a_tiny_model_dir(tmp_path: Path) -> None:
    saved = _write_tiny_model_dir(tmp_path / "tiny")
    model, spec = load_model_dir(str(tmp_path / "tiny"))
    assert spec.architecture == "timm:VisionTransformer"
    assert spec.reference_accuracy == {"reference_top1_on_nothing": 0.5}
    assert spec.input["mean"] == [0.1307] and spec.raw["head"].startswith("replace")
    assert model.blocks[1].norm2.eps == 1e-5 and isinstance(model.head[1], nn.GELU)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), saved(x))


def test_load_model_dir_reads_fsspec_uris(tmp_path: Path) -> None:
    import fsspec

    saved = _write_tiny_model_dir(tmp_path / "tiny")
    fs = fsspec.filesystem("memory")
    for name in ("model.json", "model.safetensors"):
        fs.pipe(f"/cap-dist-test/tiny/{name}", (tmp_path / "tiny" / name).read_bytes())
    try:
        model, _ = load_model_dir("memory://cap-dist-test/tiny")
    finally:
        fs.rm("/cap-dist-test", recursive=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), saved(x))


def test_mismatched_weights_name_the_keys(tmp_path: Path) -> None:
    def rename_and_reshape(state: dict) -> None:
        state["blocks.0.attn.qkv.weight_renamed"] = state.pop("blocks.0.attn.qkv.weight")
        del state["head.2.bias"]
        state["blocks.1.mlp.fc1.weight"] = torch.zeros(5, 16)

    _write_tiny_model_dir(tmp_path / "bad", rename_and_reshape)
    with pytest.raises(ModelLoadError) as info:
        load_model_dir(str(tmp_path / "bad"))
    message = str(info.value)
    for key in ("blocks.0.attn.qkv.weight_renamed", "blocks.0.attn.qkv.weight", "head.2.bias",
                "blocks.1.mlp.fc1.weight (5, 16)"):
        assert key in message
    assert "missing" in message and "unexpected" in message and "wrong shape" in message


def test_missing_folder_and_files_say_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_model_dir(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/model\.json"):
        load_model_dir(str(tmp_path / "empty"))
    _write_tiny_model_dir(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"noweights/model\.safetensors"):
        load_model_dir(str(tmp_path / "noweights"))


def test_bad_json_fields_are_model_load_errors(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    _write_tiny_model_dir(folder)
    (folder / "model.json").write_text(json.dumps({**TINY_VIT_JSON, "weights": "model.pt"}))
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model_dir(str(folder))
    (folder / "model.json").write_text(json.dumps({**TINY_VIT_JSON, "architecture": "timm:NoSuchNet"}))
    with pytest.raises(ModelLoadError, match="NoSuchNet"):
        load_model_dir(str(folder))


def test_parse_head_builds_the_described_mlp() -> None:
    path, head = parse_head("replace model.head with Sequential(Linear(64,128), GELU(), Linear(128,10, bias=False))")
    assert path == "head"
    assert [type(m) for m in head] == [nn.Linear, nn.GELU, nn.Linear]
    assert head[0].in_features == 64 and head[2].out_features == 10 and head[2].bias is None
    with pytest.raises(ModelLoadError, match="Conv2d"):
        parse_head("replace model.head with Sequential(Conv2d(3,4))")


# --------------------------------------------------------------------------------------------------------
# Prunable layers


def test_prunable_layers_of_vit4mnist(vit4mnist) -> None:
    model, _ = vit4mnist
    layers = find_prunable_layers(model)
    expected = [f"blocks.{b}.{layer}" for b in range(6) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert list(layers) == expected
    assert all(isinstance(m, nn.Linear) for m in layers.values())


def test_capture_on_vit4mnist_counts_every_token(vit4mnist, shared: Path) -> None:
    model, spec = vit4mnist
    images, _ = load_mnist(str(shared / "data" / "mnist"))
    x = preprocess_mnist(images[:64], spec.input)
    accs = capture_layer_inputs(model, find_prunable_layers(model), [(x[:32], None), (x[32:], None)])
    assert len(accs) == 24 and {acc.count for acc in accs.values()} == {64 * 17}  # 16 patches + class token
    h = accs["blocks.0.mlp.fc2"].hessian()
    assert h.shape == (128, 128) and h.dtype == torch.float64
    torch.testing.assert_close(h, h.T)


def test_prunable_layers_of_efficientnet(effnet) -> None:
    model, _ = effnet
    layers = find_prunable_layers(model)
    assert layers and all(isinstance(m, nn.Conv2d) and m.groups == 1 for m in layers.values())
    assert "conv_stem" not in layers and "classifier" not in layers and "conv_head" in layers
    assert not any("conv_dw" in name for name in layers)


def test_prunable_layer_patterns() -> None:
    model = timm.models.VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=16,
                                          depth=2, num_heads=2)
    assert list(find_prunable_layers(model, targets=["blocks.*.mlp.*"])) == [
        "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert list(find_prunable_layers(model, targets=["head"])) == ["head"]  # explicit targets may pick the head
    kept = find_prunable_layers(model, ignore=["blocks.1", "*.qkv"])
    assert list(kept) == ["blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    with pytest.raises(ValueError, match="blocks.*.mlpp"):
        find_prunable_layers(model, targets=["blocks.*.mlpp.*"])
    with pytest.raises(ValueError, match="nothing"):
        find_prunable_layers(model, ignore=["nothing"])
    with pytest.raises(ValueError, match="no prunable layers left"):
        find_prunable_layers(model, ignore=["blocks"])


# --------------------------------------------------------------------------------------------------------
# Capture


def _patches(x: torch.Tensor, kernel: int, stride: int, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Conv patches by explicit slicing (independent of F.unfold): [B·L, C·k·k], channel-major like a weight."""
    x = F.pad(x, pad)
    rows = []
    for b in range(x.shape[0]):
        for i in range(0, x.shape[2] - kernel + 1, stride):
            for j in range(0, x.shape[3] - kernel + 1, stride):
                rows.append(x[b, :, i:i + kernel, j:j + kernel].reshape(-1))
    return torch.stack(rows).double()


class _TinyNet(nn.Module):
    def __init__(self, same_conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.same = same_conv
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.same(torch.relu(self.conv(x)))  # [B, 4, h, w]
        return self.fc(y.permute(0, 2, 3, 1))     # [B, h, w, 4]: every position is a token


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("same_kind", ["timm_Conv2dSame", "torch_same"])
def test_capture_matches_direct_hessians(same_kind: str) -> None:
    torch.manual_seed(0)
    same = (timm.layers.Conv2dSame(4, 4, 4, stride=2) if same_kind == "timm_Conv2dSame"
            else nn.Conv2d(4, 4, 4, stride=1, padding="same"))
    net = _TinyNet(same).eval()
    batches = [torch.randn(2, 3, 9, 9), torch.randn(3, 3, 9, 9)]
    accs = capture_layer_inputs(net, {"conv": net.conv, "same": net.same, "fc": net.fc}, batches)

    x = torch.cat(batches)
    with torch.no_grad():
        conv_out = torch.relu(net.conv(x))
        fc_in = net.same(conv_out).permute(0, 2, 3, 1).reshape(-1, 4).double()
    conv_rows = _patches(x, 3, 2, (1, 1, 1, 1))
    # TF SAME for 5x5 input, k=4, s=2 pads 3 = (1 before, 2 after); PyTorch 'same' for k=4 pads (1, 2) too.
    same_rows = _patches(conv_out, 4, 2 if same_kind == "timm_Conv2dSame" else 1, (1, 2, 1, 2))
    for name, rows in (("conv", conv_rows), ("same", same_rows), ("fc", fc_in)):
        torch.testing.assert_close(accs[name].hessian(), 2.0 / rows.shape[0] * rows.T @ rows)
        assert accs[name].count == rows.shape[0]
    # the patches are what the layers multiply: W_flat @ patch reproduces the conv output
    with torch.no_grad():
        out = net.same(conv_out).permute(0, 2, 3, 1).reshape(-1, 4)
        direct = same_rows.float() @ flattened_weight(net.same).T + net.same.bias
    torch.testing.assert_close(direct, out, rtol=1e-4, atol=1e-5)


def test_capture_removes_hooks_on_error() -> None:
    net = _TinyNet(nn.Conv2d(4, 4, 1)).eval()

    def failing_batches():
        yield torch.randn(1, 3, 9, 9)
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        capture_layer_inputs(net, {"conv": net.conv, "fc": net.fc}, failing_batches())
    assert all(not m._forward_pre_hooks for m in net.modules())
    with pytest.raises(ValueError, match="grouped"):
        capture_layer_inputs(net, {"g": nn.Conv2d(4, 4, 3, groups=2)}, [torch.randn(1, 3, 9, 9)])
    with pytest.raises(ValueError, match="not a submodule"):
        capture_layer_inputs(net, {"other": nn.Linear(4, 5)}, [torch.randn(1, 3, 9, 9)])


def test_flattened_weight_round_trip() -> None:
    conv = nn.Conv2d(3, 4, (3, 2))
    w2d = flattened_weight(conv).clone()
    assert w2d.shape == (4, 3 * 3 * 2)
    set_flattened_weight(conv, w2d * 2)
    torch.testing.assert_close(flattened_weight(conv), w2d * 2)
    with pytest.raises(ValueError, match=r"\(4, 18\)"):
        set_flattened_weight(conv, torch.zeros(4, 17))


# --------------------------------------------------------------------------------------------------------
# Data


def _write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes) -> None:
    path.write_bytes(gzip.compress(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload))


def test_mnist_reader_rejects_bad_files(tmp_path: Path) -> None:
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2049, (2, 28, 28), bytes(2 * 28 * 28))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, (2,), bytes(2))
    with pytest.raises(IdxFormatError, match="magic number 0x00000801, expected 0x00000803"):
        load_mnist(str(tmp_path))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, (2, 28, 28), bytes(28 * 28))
    with pytest.raises(IdxFormatError, match="truncated"):
        load_mnist(str(tmp_path))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, (2, 28, 28), bytes(range(256)) * 6 + bytes(32))
    images, labels = load_mnist(str(tmp_path))
    assert images.shape == (2, 28, 28) and labels.tolist() == [0, 0]
    (tmp_path / "junk.gz").write_bytes(b"not gzip at all")
    with pytest.raises(IdxFormatError, match="gzip"):
        read_idx(str(tmp_path / "junk.gz"))
    with pytest.raises(FileNotFoundError, match="absent"):
        read_idx(str(tmp_path / "absent.gz"))


def test_preprocess_mnist_scales_and_normalises() -> None:
    images = torch.tensor([[[0, 255]]], dtype=torch.uint8).expand(1, 28, 2).contiguous()
    x = preprocess_mnist(images, {"mean": [0.5], "std": [0.25]})
    assert x.shape == (1, 1, 28, 2)
    torch.testing.assert_close(x[0, 0, 0], torch.tensor([-2.0, 2.0]))


def test_sample_indices_is_seeded() -> None:
    a = sample_indices(1000, 32, seed=7)
    assert a == sample_indices(1000, 32, seed=7) != sample_indices(1000, 32, seed=8)
    assert len(set(a)) == 32 and a == sorted(a) and 0 <= min(a) and max(a) < 1000
    with pytest.raises(ValueError, match="n=11"):
        sample_indices(10, 11, seed=0)


def test_image_folder_skips_or_raises_on_bad_images(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "images" / "red.png")
    (tmp_path / "images" / "broken.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "labels.csv").write_text("file,wnid,label,name\nimages/red.png,n0,3,red\n"
                                         "images/broken.JPEG,n1,4,broken\nimages/missing.png,n2,5,missing\n")
    spec = {"resize_short_side": 20, "interpolation": "bicubic", "center_crop": 16,
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    with pytest.raises(ImageDecodeError, match="broken.JPEG"):
        load_imagenet_samples(str(tmp_path), spec)
    with pytest.warns(RuntimeWarning, match="skipped 2"):
        data = load_imagenet_samples(str(tmp_path), spec, skip_bad=True)
    assert data.images.shape == (1, 3, 16, 16) and data.labels.tolist() == [3]
    assert data.skipped == ["images/broken.JPEG", "images/missing.png"]
    torch.testing.assert_close(data.images[0, 0], torch.ones(16, 16))   # red -> +1 after (x - .5)/.5
    torch.testing.assert_close(data.images[0, 1], -torch.ones(16, 16))
    with pytest.warns(RuntimeWarning, match="skipped 1"):
        batches = list(iter_image_batches(LabelledImageFolder(str(tmp_path), spec, indices=[1, 0]), 4, skip_bad=True))
    assert [b[1].tolist() for b in batches] == [[3]]
