"""Evaluation of pruned models against labels and against their dense originals, in pure torch.

A pruned model is judged twice: by accuracy on labels (top-1/top-5; for encoders a k-NN classifier on
their embeddings) and by how closely it still reproduces the dense model (top-1 agreement, KL of the
softmax outputs, cosine similarity of embeddings). The second needs no labels and is far less noisy on a
small calibration-sized set, so it is what tells whether a solver or an allocation change helped.
Everything accumulates batch by batch (the meters), so a set of any size streams through in bounded memory,
and nothing here depends on a model family: timm models are recognised by ``forward_features`` /
``forward_head``, anything else is used through its output.

    metrics = evaluate_model(pruned, iter_image_batches(data, 64), dense_model=dense)   # top1, agreement, kl, ...
    plot_layer_report([{"layer": n, "sparsity": s, "rel_error": e} for ...], "s3://bucket/run/layers.png")
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cap_dist.storage import atomic_write_bytes

TOP_K = 5
UNLABELLED = -1


def _as_2d(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be [batch, features], got shape {tuple(x.shape)}")
    return x.detach()


class ClassificationMeter:
    """Accumulates classification metrics over batches.

    ``update(logits, labels, dense_logits)`` per batch, ``compute()`` at the end:

    - ``top1``, ``top5``: accuracy on labels (top-5 means top-min(5, classes)); rows labelled ``-1`` (unlabelled)
      are left out; present once any labelled row was seen. ``labelled`` counts those rows.
    - ``dense_top1``: the dense model's accuracy on the same labelled rows (when dense logits came with labels).
    - ``agreement``: fraction of rows where the model's top-1 class equals the dense model's.
    - ``kl``: mean over rows of KL(softmax(dense) || softmax(model)), in nats (computed in float64).
    - ``n``: rows seen.
    """

    def __init__(self) -> None:
        self.n = 0
        self.labelled = 0
        self.correct1 = 0
        self.correct5 = 0
        self.dense_correct1 = 0
        self.dense_labelled = 0
        self.compared = 0
        self.agree = 0
        self.kl_sum = 0.0

    def update(self, logits: torch.Tensor, labels: torch.Tensor | None = None,
               dense_logits: torch.Tensor | None = None) -> None:
        logits = _as_2d("logits", logits)
        batch, classes = logits.shape
        prediction = logits.argmax(dim=1)
        dense_prediction: torch.Tensor | None = None
        if dense_logits is not None:
            dense_logits = _as_2d("dense_logits", dense_logits).to(logits.device)
            if dense_logits.shape != logits.shape:
                raise ValueError(f"dense_logits shape {tuple(dense_logits.shape)} differs from logits shape "
                                 f"{tuple(logits.shape)}; both models must score the same rows and classes")
            dense_prediction = dense_logits.argmax(dim=1)
            self.compared += batch
            self.agree += int((prediction == dense_prediction).sum())
            log_model = F.log_softmax(logits.double(), dim=1)
            log_dense = F.log_softmax(dense_logits.double(), dim=1)
            self.kl_sum += float((log_dense.exp() * (log_dense - log_model)).sum())
        if labels is not None:
            labels = torch.as_tensor(labels).detach().to(logits.device).reshape(-1)
            if labels.shape[0] != batch:
                raise ValueError(f"{labels.shape[0]} labels for {batch} rows of logits")
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
            if bool((labels >= classes).any()) or bool((labels < UNLABELLED).any()):
                bad = labels[(labels >= classes) | (labels < UNLABELLED)][:5].tolist()
                raise ValueError(f"labels {bad} are outside 0..{classes - 1} (and -1 for unlabelled); "
                                 "do the labels index the model's classes?")
            keep = labels >= 0
            if bool(keep.any()):
                y = labels[keep]
                top = logits[keep].topk(min(TOP_K, classes), dim=1).indices
                self.labelled += int(y.numel())
                self.correct1 += int((top[:, 0] == y).sum())
                self.correct5 += int((top == y[:, None]).any(dim=1).sum())
                if dense_prediction is not None:
                    self.dense_labelled += int(y.numel())
                    self.dense_correct1 += int((dense_prediction[keep] == y).sum())
        self.n += batch

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("ClassificationMeter saw no rows; call update() with at least one batch first")
        out: dict[str, float] = {"n": float(self.n)}
        if self.labelled:
            out["labelled"] = float(self.labelled)
            out["top1"] = self.correct1 / self.labelled
            out["top5"] = self.correct5 / self.labelled
        if self.dense_labelled:
            out["dense_top1"] = self.dense_correct1 / self.dense_labelled
        if self.compared:
            out["agreement"] = self.agree / self.compared
            out["kl"] = self.kl_sum / self.compared
        return out


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor | None = None,
                           dense_logits: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics of one set of logits ``[N, classes]``; see :class:`ClassificationMeter` for the keys."""
    meter = ClassificationMeter()
    meter.update(logits, labels, dense_logits)
    return meter.compute()


class EmbeddingMeter:
    """Accumulates how close embeddings ``[B, D]`` stay to the dense model's, over batches.

    ``compute()`` gives ``cosine`` (mean cosine similarity per row), ``cosine_min`` (the worst row),
    ``rel_error`` (mean of ‖e − e_dense‖ / ‖e_dense‖ per row) and ``n``.
    """

    def __init__(self) -> None:
        self.n = 0
        self.cosine_sum = 0.0
        self.cosine_min = math.inf
        self.rel_error_sum = 0.0

    def update(self, embeddings: torch.Tensor, dense_embeddings: torch.Tensor) -> None:
        e = _as_2d("embeddings", embeddings).double()
        d = _as_2d("dense_embeddings", dense_embeddings).to(e.device).double()
        if e.shape != d.shape:
            raise ValueError(f"embeddings shape {tuple(e.shape)} differs from dense_embeddings shape "
                             f"{tuple(d.shape)}; both models must embed the same rows in the same dimension")
        cosine = F.cosine_similarity(e, d, dim=1, eps=1e-12)
        self.cosine_sum += float(cosine.sum())
        self.cosine_min = min(self.cosine_min, float(cosine.min()))
        self.rel_error_sum += float(((e - d).norm(dim=1) / d.norm(dim=1).clamp_min(1e-12)).sum())
        self.n += e.shape[0]

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("EmbeddingMeter saw no rows; call update() with at least one batch first")
        return {"n": float(self.n), "cosine": self.cosine_sum / self.n, "cosine_min": self.cosine_min,
                "rel_error": self.rel_error_sum / self.n}


def embedding_metrics(embeddings: torch.Tensor, dense_embeddings: torch.Tensor) -> dict[str, float]:
    """Closeness of one set of embeddings to the dense ones; see :class:`EmbeddingMeter` for the keys."""
    meter = EmbeddingMeter()
    meter.update(embeddings, dense_embeddings)
    return meter.compute()


def knn_accuracy(train_emb: torch.Tensor, train_labels: torch.Tensor, test_emb: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024) -> float:
    """Top-1 accuracy of the weighted k-NN classifier of DINO (Caron et al., 2021) on embeddings.

    Embeddings are L2-normalised; each test row takes its ``k`` most cosine-similar training rows, each
    voting for its class with weight ``exp(similarity / temperature)``; the class with the largest total wins.
    Test rows are processed ``chunk_size`` at a time, so memory is ``chunk_size × len(train)``.
    """
    train = _as_2d("train_emb", train_emb).float()
    test = _as_2d("test_emb", test_emb).float().to(train.device)
    train_y = torch.as_tensor(train_labels).reshape(-1).to(train.device).long()
    test_y = torch.as_tensor(test_labels).reshape(-1).to(train.device).long()
    if train.shape[0] != train_y.shape[0] or test.shape[0] != test_y.shape[0]:
        raise ValueError(f"{train.shape[0]} train embeddings with {train_y.shape[0]} labels, {test.shape[0]} test "
                         f"embeddings with {test_y.shape[0]} labels; pass one label per embedding")
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train embeddings have dimension {train.shape[1]}, test embeddings {test.shape[1]}")
    if train.shape[0] == 0 or test.shape[0] == 0:
        raise ValueError("k-NN needs at least one train and one test embedding")
    if k <= 0 or temperature <= 0 or chunk_size <= 0:
        raise ValueError(f"k={k}, temperature={temperature} and chunk_size={chunk_size} must be positive")
    if bool((train_y < 0).any()):
        raise ValueError("train labels must be class indices >= 0")
    classes = int(num_classes) if num_classes is not None else int(max(train_y.max(), test_y.max())) + 1
    k = min(k, train.shape[0])
    train = F.normalize(train, dim=1)
    test = F.normalize(test, dim=1)
    correct = 0
    for start in range(0, test.shape[0], chunk_size):
        similarity = test[start:start + chunk_size] @ train.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(similarity.shape[0], classes, device=train.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_y[top_index], weights)
        correct += int((votes.argmax(dim=1) == test_y[start:start + chunk_size]).sum())
    return correct / test.shape[0]


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for parameter in model.parameters():
        return parameter.device, parameter.dtype
    return torch.device("cpu"), None


def _check_output(name: str, out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} returned {type(out).__name__}; evaluate_model needs a tensor [batch, features], "
                        "so wrap the model to return one")
    if out.ndim != 2:
        raise ValueError(f"{name} returned shape {tuple(out.shape)}; evaluate_model needs [batch, features] "
                         "(pool or select a token first)")
    return out


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The embedding of ``x``: timm's pooled pre-logits features when the model has ``forward_features`` and
    ``forward_head``, else the model's output."""
    if callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None)):
        return _check_output("forward_head(pre_logits=True)",
                             model.forward_head(model.forward_features(x), pre_logits=True))
    return _check_output("the model", model(x))


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return batch[0], None if batch[1] is None else torch.as_tensor(batch[1])
    if isinstance(batch, (tuple, list)) and len(batch) == 1 and isinstance(batch[0], torch.Tensor):
        return batch[0], None
    raise TypeError(f"a batch must be a tensor x or a pair (x, labels), got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def evaluate_model(model: nn.Module, batches: Iterable[Any], dense_model: nn.Module | None = None,
                   kind: Literal["classifier", "encoder"] = "classifier") -> dict[str, float]:
    """Evaluate ``model`` (and compare it with ``dense_model``) over ``batches``, under ``torch.no_grad``.

    Batches are ``x`` or ``(x, labels)``; ``x`` is moved to each model's device and floating dtype. Both
    models run in eval mode and get their previous mode back afterwards.

    ``kind="classifier"``: the model's output are logits; returns :class:`ClassificationMeter` metrics
    (``top1``/``top5`` with labels, ``agreement``/``kl``/``dense_top1`` with a dense model).
    ``kind="encoder"``: embeddings from :func:`pooled_features`; with a dense model returns
    :class:`EmbeddingMeter` metrics (``cosine``, ``cosine_min``, ``rel_error``), without one only ``n``
    (for accuracy of an encoder use :func:`knn_accuracy` on its embeddings).
    """
    if kind not in ("classifier", "encoder"):
        raise ValueError(f"kind={kind!r}; use 'classifier' (logits) or 'encoder' (embeddings)")
    models = [model] + ([dense_model] if dense_model is not None else [])
    modes = [m.training for m in models]
    meter: ClassificationMeter | EmbeddingMeter = ClassificationMeter() if kind == "classifier" else EmbeddingMeter()
    seen = 0

    def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        device, dtype = _model_device_dtype(m)
        x = x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else None)
        if kind == "encoder":
            return pooled_features(m, x).float()
        return _check_output("the model", m(x)).float()

    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            for batch in batches:
                x, labels = _split_batch(batch)
                out = run(model, x)
                dense_out = run(dense_model, x).to(out.device) if dense_model is not None else None
                seen += out.shape[0]
                if isinstance(meter, ClassificationMeter):
                    meter.update(out, labels, dense_out)
                elif dense_out is not None:
                    meter.update(out, dense_out)
    finally:
        for m, training in zip(models, modes):
            m.train(training)
    if seen == 0:
        raise ValueError("evaluate_model got no batches; is the dataset empty or the iterator exhausted?")
    if isinstance(meter, EmbeddingMeter) and dense_model is None:
        return {"n": float(seen)}
    return meter.compute()


REPORT_KEYS = ("layer", "sparsity", "rel_error")
_MIN_LOG_ERROR = 1e-12


def knn_from_batches(model: nn.Module, train_batches: Iterable[Any], test_batches: Iterable[Any],
                     k: int = 20, temperature: float = 0.07) -> float:
    """Weighted k-NN accuracy of an encoder's pooled features: labelled ``train_batches`` are the memory bank,
    ``test_batches`` are classified against it (unlabelled items, label -1, are left out)."""
    def embed(batches: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        feats, labels = [], []
        device, dtype = _model_device_dtype(model)
        with torch.no_grad():
            for batch in batches:
                x, y = _split_batch(batch)
                if y is None:
                    raise ValueError("k-NN accuracy needs labelled images for both the memory bank and the test set")
                feats.append(pooled_features(model, x.to(device=device, dtype=dtype)).float().cpu())
                labels.append(y.cpu())
        f, l = torch.cat(feats), torch.cat(labels)
        keep = l >= 0
        return f[keep], l[keep]

    was_training = model.training
    model.eval()
    try:
        train_f, train_l = embed(train_batches)
        test_f, test_l = embed(test_batches)
    finally:
        model.train(was_training)
    return knn_accuracy(train_f, train_l, test_f, test_l, k=k, temperature=temperature)


def plot_layer_report(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    """Write a PNG of per-layer sparsity (bars, left axis) and relative output error (line, log scale, right
    axis) to ``path`` (local path or fsspec URI), atomically.

    Each row needs ``layer`` (name), ``sparsity`` (0..1) and ``rel_error`` (≥ 0; zeros are drawn at 1e-12).
    Drawn with matplotlib's Agg canvas directly, so it neither needs a display nor changes pyplot's backend.
    """
    if not rows:
        raise ValueError("plot_layer_report got no rows; pass one dict per layer with keys layer, sparsity, rel_error")
    names: list[str] = []
    sparsity: list[float] = []
    errors: list[float] = []
    for i, row in enumerate(rows):
        missing = [key for key in REPORT_KEYS if key not in row]
        if missing:
            raise ValueError(f"row {i} lacks {missing}; it has keys {sorted(row)}; each row needs {list(REPORT_KEYS)}")
        s, e = float(row["sparsity"]), float(row["rel_error"])
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"row {i} ({row['layer']}): sparsity {s} is outside 0..1")
        if not math.isfinite(e) or e < 0:
            raise ValueError(f"row {i} ({row['layer']}): rel_error {e} must be finite and >= 0")
        names.append(str(row["layer"]))
        sparsity.append(s)
        errors.append(max(e, _MIN_LOG_ERROR))

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = min(max(6.0, 0.35 * len(rows) + 2.0), 60.0)
    figure = Figure(figsize=(width, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    positions = list(range(len(rows)))
    axes.bar(positions, sparsity, color="tab:blue", alpha=0.6, label="sparsity")
    axes.set_ylim(0.0, 1.0)
    axes.set_ylabel("sparsity", color="tab:blue")
    axes.set_xticks(positions)
    axes.set_xticklabels(names, rotation=90, fontsize=7)
    error_axes = axes.twinx()
    error_axes.plot(positions, errors, color="tab:red", marker="o", markersize=3, label="relative error")
    error_axes.set_yscale("log")
    error_axes.set_ylabel("relative output error", color="tab:red")
    axes.set_title(f"per-layer sparsity and relative error ({len(rows)} layers)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(str(path), buffer.getvalue())
