"""An actor writes each solved layer's file in the background while the next layer solves: the files must be
complete when the actor reports results, and a failed write must surface, naming the file, not vanish."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cap_dist.core import LayerRecord
from cap_dist.engines.distributed import actor as actor_module
from cap_dist.engines.distributed.actor import PruneActor, layer_file


def _actor(output: str) -> PruneActor:
    """The writer's state of a PruneActor, without a model to load (no Ray: the methods run in this process)."""
    a = object.__new__(PruneActor)
    a.recipe = SimpleNamespace(output=output, hash="h")
    a.layers = {"fc": nn.Linear(4, 3, bias=False)}
    a._writer = ThreadPoolExecutor(max_workers=1)
    a._pending_write = None
    return a


def _record() -> LayerRecord:
    return LayerRecord(layer="fc", stage="s", rows=3, columns=4, numel=12, target_sparsity=0.5, sparsity=0.5,
                       loss=0.0, rel_error=0.0, seconds=0.0, damp_used=0.01, escalations=0)


def test_layer_files_are_complete_once_writes_are_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    original = actor_module._write_layer_file

    def slow(uri, weight, meta):
        release.wait(5)
        original(uri, weight, meta)

    monkeypatch.setattr(actor_module, "_write_layer_file", slow)
    a = _actor(str(tmp_path))
    expected = a.layers["fc"].weight.detach().clone()
    a._write(_record())
    with torch.no_grad():
        a.layers["fc"].weight.zero_()                     # the module changes after: the file holds the snapshot
    assert not Path(layer_file(str(tmp_path), "fc")).exists()
    release.set()
    a.finish_writes()
    written = load_file(layer_file(str(tmp_path), "fc"))
    assert torch.equal(written["weight"], expected) and torch.equal(written["mask"], expected != 0)


def test_a_failed_layer_write_is_raised_by_the_next_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(uri, weight, meta):
        raise PermissionError(f"cannot write {uri}")

    monkeypatch.setattr(actor_module, "_write_layer_file", fails)
    a = _actor(str(tmp_path))
    a._write(_record())
    with pytest.raises(PermissionError, match="fc"):
        a.finish_writes()
    a._write(_record())
    with pytest.raises(PermissionError, match="fc"):
        a._write(_record())                               # the next layer's write waits for this one first
