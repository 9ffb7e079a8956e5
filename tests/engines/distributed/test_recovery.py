"""What lets the Ray engine replace only a lost actor, checked on PruneActor itself (no Ray): a calibration or
BatchNorm batch streamed again is passed on without being counted twice, a survivor can stream its dense weights
again and go back to its pruned ones, and a replacement takes the layers already written instead of solving them;
plus the driver's routing of such a stream and the resource check's phrases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from cap_dist.engines.distributed.actor import PruneActor
from cap_dist.engines.distributed.driver import stream_route
from cap_dist.engines.distributed.resources import actor_bundle, shortfall
from cap_dist.models.source import ModelSource

INPUT = {"size": 32, "resize_short_side": 32, "center_crop": 32, "interpolation": "bilinear",
         "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
MODELS = {"vit": ("timm:VisionTransformer", {"img_size": 32, "patch_size": 8, "num_classes": 4, "embed_dim": 32,
                                              "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}),
          "effnet": ("timm:test_efficientnet", {"num_classes": 4})}


@pytest.fixture(autouse=True)
def _threads_restored():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _actor(tmp_path: Path, model: str, out: str = "out") -> PruneActor:
    arch, kwargs = MODELS[model]
    folder = tmp_path / model
    if not folder.exists():
        torch.manual_seed(0)
        name = arch.removeprefix("timm:")
        net = timm.create_model(name, **kwargs) if name.startswith("test_") else \
            getattr(timm.models, name)(**kwargs)
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / "model.safetensors")
        (folder / "model.json").write_text(json.dumps({"architecture": arch, "create_kwargs": kwargs,
                                                       "input": INPUT}))
    recipe = {"model": {"source": str(folder)}, "calibration": {"uri": str(tmp_path), "samples": 4},
              "prune": {"method": "sparsegpt", "sparsity": 0.5, "mode": "independent"},
              "output": str(tmp_path / out), "device": "cpu", "engine": "ray"}
    source = ModelSource.parse(str(folder))
    from cap_dist.models.families import split_blocks

    stages = ["prefix", *[n for n, _ in split_blocks(source.meta_skeleton()).blocks], "suffix"]
    from cap_dist.config import recipe_from_dict

    return PruneActor(recipe_from_dict(recipe).model_dump(mode="json"), source, stages, 0)


def _batches(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 32, 32, generator=generator) for _ in range(n)]


def test_a_batch_streamed_again_passes_through_without_being_folded_twice(tmp_path: Path) -> None:
    once, twice = _actor(tmp_path, "vit"), _actor(tmp_path, "vit")
    batches = _batches(3)
    for i, x in enumerate(batches[:2]):
        once.forward(x, i)
        twice.forward(x, i)
    assert twice.needs(3) == [2]
    outputs = [twice.forward(x, i) for i, x in enumerate(batches[:2])]           # streamed again
    assert all(torch.equal(a, once.forward(x, i)) for a, (i, x) in zip(outputs, enumerate(batches[:2])))
    for x, i in ((batches[2], 2),):
        once.forward(x, i)
        twice.forward(x, i)
    assert twice.needs(3) == []
    for name, acc in once.accs.items():
        assert torch.equal(acc.hessian(), twice.accs[name].hessian()), name


def test_survivor_streams_dense_weights_again_and_goes_back_to_pruned(tmp_path: Path) -> None:
    actor = _actor(tmp_path, "vit")
    x = _batches(1)[0]
    dense_out = actor.forward(x, 0)
    name = next(iter(actor.layers))
    actor.solve_layer(name, 0.5)
    pruned = actor.layers[name].weight.detach().clone()
    assert float((pruned == 0).float().mean()) >= 0.5
    actor.dense_view(True)
    assert torch.equal(actor.forward(x, 0), dense_out)                          # the first pass's activations
    actor.dense_view(False)
    assert torch.equal(actor.layers[name].weight, pruned)


def test_replacement_takes_written_layers_and_calibrates_only_the_rest(tmp_path: Path) -> None:
    first = _actor(tmp_path, "vit")
    x = _batches(1)[0]
    first.forward(x, 0)
    names = list(first.layers)
    first.solve_layer(names[0], 0.5)
    replacement = _actor(tmp_path, "vit")
    left = replacement.prepare({n: 0.5 for n in names})
    assert left == names[1:] and replacement.needs(1) == [0]
    assert torch.equal(replacement.layers[names[0]].weight, first.layers[names[0]].weight)
    replacement.forward(x, 0)
    assert names[0] not in replacement.accs
    assert replacement.solve_layer(names[0], 0.5)["resumed"]


def test_batchnorm_batch_measured_again_leaves_the_statistics(tmp_path: Path) -> None:
    once, twice = _actor(tmp_path, "effnet"), _actor(tmp_path, "effnet")
    batches = _batches(2)
    for actor in (once, twice):
        actor.batchnorm_begin()
        for i, x in enumerate(batches):
            actor.batchnorm_forward(x, i)
    assert twice.batchnorm_needs(2) == []
    again = twice.batchnorm_forward(batches[0], 0)
    twice.batchnorm_begin()                                          # asked again after a lost actor: no reset
    fresh = _actor(tmp_path, "effnet")
    fresh.batchnorm_begin()
    assert torch.equal(again, fresh.batchnorm_forward(batches[0], 0))          # normalised by its own statistics
    for actor in (once, twice):
        actor.batchnorm_end()
    for key, value in once.model.state_dict().items():
        if "running" in key or "num_batches" in key:
            assert torch.equal(value, twice.model.state_dict()[key]), key


def test_stream_route_stops_each_batch_at_the_last_actor_that_needs_it() -> None:
    assert stream_route([[], [0, 1, 2], []], 3) == {0: 1, 1: 1, 2: 1}            # a replacement in the middle
    assert stream_route([[0, 1, 2, 3], [2, 3], []], 4) == {0: 0, 1: 0, 2: 1, 3: 1}
    assert stream_route([[], []], 2) == {}


def test_shortfall_says_what_is_missing() -> None:
    bundle = actor_bundle(2, 1, 1.5)
    assert bundle == {"CPU": 2.0, "GPU": 1.0, "memory": float(int(1.5 * 2**30))}
    assert shortfall(bundle, 2, {"CPU": 4, "GPU": 1, "memory": 8 * 2**30}, "the cluster now") == [
        "2 actors × 1 GPU = 2 GPU, but the cluster now has 1"]
    assert shortfall(bundle, 1, {"CPU": 1}, "x")[0] == "1 actors × 2 CPU = 2 CPU, but x has 1"
