"""Evaluation metrics against values worked out by hand, the DINO k-NN classifier on data whose answer is
known, evaluate_model on a tiny timm ViT, and the layer-report plot.

    python -m pytest tests/test_eval.py -q
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import fsspec
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from cap_dist.eval import (
    ClassificationMeter,
    EmbeddingMeter,
    classification_metrics,
    embedding_metrics,
    evaluate_model,
    knn_accuracy,
    plot_layer_report,
    pooled_features,
)


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


# Three rows, four classes. Row 0: ranking 2 > 0 > 1 > 3; row 1: 3 > 2 > 1 > 0; row 2: 0 > 1 > 2 > 3.
LOGITS = torch.tensor([[1.0, 0.0, 3.0, -1.0], [0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
DENSE = torch.tensor([[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 2.0, 0.0, 0.0]])


def _softmax(row: list[float]) -> list[float]:
    z = [math.exp(v) for v in row]
    return [v / sum(z) for v in z]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_classification_metrics_by_hand() -> None:
    labels = torch.tensor([2, 2, 1])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("cap_dist.eval.TOP_K", 2)  # top-2 on 4 classes, so "top5" is not trivially 1
        m = classification_metrics(LOGITS, labels, DENSE)
    assert m["n"] == 3 and m["labelled"] == 3
    assert m["top1"] == pytest.approx(1 / 3)  # only row 0 has its label ranked first
    assert m["top5"] == pytest.approx(1.0)  # as "top-2": row 0 (2 first), row 1 (2 second), row 2 (1 second)
    assert m["dense_top1"] == pytest.approx(2 / 3)  # dense predicts 2, 3, 1
    assert m["agreement"] == pytest.approx(2 / 3)  # rows 0 and 1 agree (2, 3); row 2: 0 vs 1
    kl = sum(_kl(_softmax(d), _softmax(m_)) for d, m_ in zip(DENSE.tolist(), LOGITS.tolist())) / 3
    assert m["kl"] == pytest.approx(kl, rel=1e-9)
    full = classification_metrics(LOGITS, labels)
    assert full["top5"] == 1.0 and "agreement" not in full and "kl" not in full
    same = classification_metrics(LOGITS, dense_logits=LOGITS.clone())
    assert same["agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-12) and "top1" not in same


def test_classification_meter_accumulates_batches_and_skips_unlabelled() -> None:
    torch.manual_seed(0)
    logits, dense = torch.randn(50, 7), torch.randn(50, 7)
    labels = torch.randint(0, 7, (50,))
    whole = classification_metrics(logits, labels, dense)
    meter = ClassificationMeter()
    for start in range(0, 50, 16):
        meter.update(logits[start:start + 16], labels[start:start + 16], dense[start:start + 16])
    for key, value in whole.items():
        assert meter.compute()[key] == pytest.approx(value, rel=1e-12)
    partly = labels.clone()
    partly[::2] = -1
    m = classification_metrics(logits, partly)
    kept = partly >= 0
    assert m["labelled"] == int(kept.sum())
    assert m["top1"] == pytest.approx((logits[kept].argmax(1) == labels[kept]).float().mean().item())


def test_classification_meter_errors() -> None:
    with pytest.raises(ValueError, match="outside 0..3"):
        classification_metrics(LOGITS, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="differs from logits shape"):
        classification_metrics(LOGITS, dense_logits=DENSE[:, :3])
    with pytest.raises(ValueError, match="2 labels for 3 rows"):
        classification_metrics(LOGITS, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="saw no rows"):
        ClassificationMeter().compute()


def test_embedding_metrics_by_hand() -> None:
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    m = embedding_metrics(e, d)
    assert m["cosine"] == pytest.approx((1 + 1 / math.sqrt(2) + 1) / 3)
    assert m["cosine_min"] == pytest.approx(1 / math.sqrt(2))
    assert m["rel_error"] == pytest.approx((0 + 1 / math.sqrt(2) + 1) / 3)
    meter = EmbeddingMeter()
    meter.update(e[:1], d[:1])
    meter.update(e[1:], d[1:])
    assert meter.compute() == pytest.approx(m)
    with pytest.raises(ValueError, match="differs from dense_embeddings"):
        embedding_metrics(e, d[:, :1])


def test_knn_on_separable_clusters_and_random_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=generator) * 5
    train_y = torch.arange(200) % 5
    test_y = torch.arange(100) % 5
    train = centres[train_y] + 0.3 * torch.randn(200, 16, generator=generator)
    test = centres[test_y] + 0.3 * torch.randn(100, 16, generator=generator)
    assert knn_accuracy(train, train_y, test, test_y, k=20, chunk_size=32) == 1.0

    train = torch.randn(2000, 32, generator=generator)
    test = torch.randn(1000, 32, generator=generator)
    accuracy = knn_accuracy(train, torch.randint(0, 10, (2000,), generator=generator), test,
                            torch.randint(0, 10, (1000,), generator=generator))
    assert 0.05 < accuracy < 0.16  # chance is 0.1; 3 standard deviations of 1000 draws is 0.03


def test_knn_weights_votes_by_similarity_and_temperature() -> None:
    # One class-1 neighbour at cosine 1; two class-0 neighbours at cosine 0.8. Sharp weights (low temperature)
    # let the nearest win; flat weights (high temperature) let the majority win.
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    train_y = torch.tensor([1, 0, 0])
    test, test_y = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    assert knn_accuracy(train, train_y, test, test_y, k=3, temperature=0.07) == 1.0
    assert knn_accuracy(train, train_y, test, test_y, k=3, temperature=10.0) == 0.0
    assert knn_accuracy(train, train_y, test, test_y, k=1, temperature=10.0) == 1.0
    with pytest.raises(ValueError, match="one label per embedding"):
        knn_accuracy(train, train_y[:2], test, test_y)


def _tiny_vit(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                         mlp_ratio=2.0, num_classes=num_classes)


def test_evaluate_model_classifier_and_encoder() -> None:
    model = _tiny_vit()
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (12,), generator=torch.Generator().manual_seed(2))
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    model.train()
    with torch.no_grad():
        logits = model.eval()(x)
    model.train()
    m = evaluate_model(model, batches, dense_model=copy.deepcopy(model))
    assert model.training  # mode restored
    assert m["n"] == 12 and m["agreement"] == 1.0 and m["kl"] == pytest.approx(0.0, abs=1e-10)
    assert m["top1"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert m["top1"] == m["dense_top1"]

    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for block in pruned.blocks:
            weight = block.mlp.fc1.weight
            weight[weight.abs() < weight.abs().median()] = 0
    m = evaluate_model(pruned, [x[:6], x[6:]], dense_model=model)
    assert "top1" not in m and m["kl"] > 0 and 0.0 <= m["agreement"] <= 1.0

    e = evaluate_model(pruned, batches, dense_model=model, kind="encoder")
    with torch.no_grad():
        features = pooled_features(pruned.eval(), x)
        dense_features = pooled_features(model.eval(), x)
    assert features.shape == (12, 32)
    assert e["cosine"] == pytest.approx(embedding_metrics(features, dense_features)["cosine"], rel=1e-6)
    assert e["cosine"] < 1.0 and e["n"] == 12
    assert evaluate_model(model, batches, dense_model=copy.deepcopy(model), kind="encoder")["cosine"] \
        == pytest.approx(1.0, abs=1e-6)
    assert evaluate_model(model, batches, kind="encoder") == {"n": 12.0}


def test_evaluate_model_plain_module_and_errors() -> None:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x = torch.randn(6, 3, 2, 2)
    m = evaluate_model(encoder, [x], dense_model=encoder, kind="encoder")
    assert m["cosine"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="kind="):
        evaluate_model(encoder, [x], kind="detector")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no batches"):
        evaluate_model(encoder, [])
    with pytest.raises(ValueError, match=r"needs \[batch, features\]"):
        evaluate_model(nn.Identity(), [x])
    with pytest.raises(TypeError, match="pair"):
        evaluate_model(encoder, [(x, x, x)])


def test_plot_layer_report_writes_a_png(tmp_path: Path) -> None:
    rows = [{"layer": f"blocks.{i}.mlp.fc1", "sparsity": 0.3 + 0.05 * i, "rel_error": 10.0 ** -(i + 1)}
            for i in range(8)]
    rows.append({"layer": "head", "sparsity": 0.0, "rel_error": 0.0})
    path = tmp_path / "report" / "layers.png"
    plot_layer_report(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 600
    assert [p.name for p in path.parent.iterdir()] == ["layers.png"]

    uri = "memory://capdist-eval-plot/layers.png"
    plot_layer_report(rows[:2], uri)
    with fsspec.open(uri, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    fsspec.filesystem("memory").rm("/capdist-eval-plot", recursive=True)

    with pytest.raises(ValueError, match=r"row 0 lacks \['rel_error'\]; it has keys \['layer', 'sparsity'\]"):
        plot_layer_report([{"layer": "a", "sparsity": 0.5}], str(path))
    with pytest.raises(ValueError, match="outside 0..1"):
        plot_layer_report([{"layer": "a", "sparsity": 50, "rel_error": 0.1}], str(path))
    with pytest.raises(ValueError, match="no rows"):
        plot_layer_report([], str(path))
