"""PruneActor: holds a contiguous range of the model's blocks, their calibration statistics, and solves them.

An actor reads only its blocks' weights (ranged safetensors reads, local or from any URI) into a model
skeleton built on the meta device, so no process ever materialises the whole model.  It folds every
calibration batch that passes through into its layers' Hessians, solves its layers with the same core functions
as the local engine (:mod:`cap_dist.core`), and writes each solved layer atomically (weights, mask, stats, recipe hash)
so a rerun or a restarted actor skips what is done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from cap_dist.config import recipe_from_dict
from cap_dist.core import (LayerRecord, Stage, collect_hessians, device_of, loss_curve, model_stages, run_stages,
                           select_layers, solve_layer, solve_stage, take_curvature)
from cap_dist.core.batchnorm import batchnorm_layers, measured_keys, measuring_batchnorm, unchanged_batchnorm
from cap_dist.engines.distributed.memory import StageMemory, map_large_blocks, peak_rss_mb, trim_heap
from cap_dist.models.capture import flattened_weight, set_flattened_weight
from cap_dist.models.source import ModelSource
from cap_dist.solvers import HessianAccumulator
from cap_dist.storage import atomic_write_bytes, read_bytes, safetensors_header_of_bytes

log = logging.getLogger(__name__)


def layer_file(output: str, layer: str) -> str:
    return f"{output.rstrip('/')}/layers/{layer}.safetensors"


def _owned(key: str, member_prefixes: list[str], block_prefixes: list[str], owns_ends: bool) -> bool:
    if any(key == p or key.startswith(p + ".") for p in member_prefixes):
        return True
    in_any_block = any(key == p or key.startswith(p + ".") for p in block_prefixes)
    return owns_ends and not in_any_block


def read_source_tensors(source: ModelSource, keys: list[str]) -> dict[str, torch.Tensor]:
    """The dense model's tensors ``keys`` only: ranged reads of the safetensors file, or, for a source without
    one (PyPI, hub), the whole (small, packaged) model loaded and all but ``keys`` dropped. The others must stay
    on meta in a shard: ``state()`` returns every materialised tensor, and a dense copy of another shard's block
    would overwrite that shard's pruned weights when the driver merges the shards."""
    from cap_dist.shards import load_weight_subset

    if source.ranged_weights is None:
        everything = source.load().state_dict()
        return {k: everything[k] for k in keys}
    return load_weight_subset(source.ranged_weights, keys)      # one file or a sharded output's index


def load_shard(source: ModelSource, stage_names: list[str]) -> nn.Module:
    """The model with only the parameters and buffers of ``stage_names`` materialised (the rest on meta)."""
    from cap_dist.models.families import split_blocks

    model = source.meta_skeleton()
    parts = split_blocks(model)
    owned_blocks = [i for i, (name, _) in enumerate(parts.blocks) if name in stage_names]
    members = [m for i in owned_blocks for m in parts.members(i)]
    all_members = [m for i in range(len(parts.blocks)) for m in parts.members(i)]
    owns_ends = "prefix" in stage_names or "suffix" in stage_names
    keys = [k for k in model.state_dict() if _owned(k, members, all_members, owns_ends)]
    tensors = read_source_tensors(source, keys)
    for key, tensor in tensors.items():
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[attr] = tensor
    return model.eval()


class PruneActor:
    """One shard of the model.  Created by the driver with ``ray.remote(PruneActor).options(...)``."""

    def __init__(self, recipe: dict[str, Any], source: ModelSource, stage_names: list[str], index: int) -> None:
        self.memory = StageMemory()                       # baseline: the runtime alone (torch, numba, ray)
        self.source = source
        map_large_blocks()                                # temporaries go back to the kernel when freed
        self.recipe = recipe_from_dict(recipe)
        from cap_dist import storage

        storage.configure(self.recipe.storage)             # endpoint from the recipe or the driver's env_vars
        self.index = index
        self.threads = max(1, int(self.recipe.distributed.num_cpus))
        torch.set_num_threads(self.threads)              # one thread pool per reserved CPU, for torch and numba
        import numba

        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        start = time.perf_counter()
        with self.memory.stage("load"):
            self.model = load_shard(source, stage_names)
        # A GPU reserved with distributed.num_gpus is visible here (Ray sets CUDA_VISIBLE_DEVICES); recipe.device
        # auto/cuda then puts the shard, its Hessians and its solves on it. Activations travel between actors
        # and the driver on the host.
        self.device = device_of(self.recipe.device)
        _materialised_to(self.model, self.device)
        self.load_seconds = time.perf_counter() - start
        layers = select_layers(self.model, self.recipe.model)
        self.stages: list[Stage] = [s for s in model_stages(self.model, layers, None) if s.name in stage_names]
        self.layers = {n: m for s in self.stages for n, m in s.layers.items()}
        self.accs: dict[str, HessianAccumulator] | None = None
        # Layers whose Hessians this actor still collects: all of them, less those a replacement actor finds
        # already written (``prepare``). Batch indices already folded into them: a batch streamed again after a
        # lost actor (for that actor's replacement) passes through without being counted twice.
        self.pending: dict[str, nn.Module] = dict(self.layers)
        self.folded: set[int] = set()
        self.batchnorm_seen: set[int] = set()
        self._solved_weights: dict[str, torch.Tensor] = {}
        self.records: dict[str, LayerRecord] = {}
        self.calibrate_seconds = 0.0
        self.solve_seconds = 0.0
        # A solved layer's file is written while the next layer solves (one write in flight at most, so one layer's
        # bytes are the only extra memory); every call that reports or reads results waits for it first.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-writer")
        self._pending_write: Future | None = None

    # -- calibration ---------------------------------------------------------------------------------

    def ready(self) -> int:
        """Answers once the actor is placed and has loaded its shard (the driver's bounded wait)."""
        return self.index

    def forward(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Dense pass of calibration batch ``index`` through this shard, folding every pending layer's input into
        its Hessian once: a batch this actor has folded already (streamed again for a lost actor's replacement)
        only passes through. An actor runs its calls in order, so the batches it folds are always 0, 1, ... in
        the order of an undisturbed run, and its Hessians are the same sums."""
        start = time.perf_counter()
        out: list[torch.Tensor] = []
        with self.memory.stage("calibrate"):
            if index in self.folded or not self.pending:
                with torch.no_grad():
                    out.append(run_stages(self.stages, x.to(self.device)))
            else:
                self.accs = collect_hessians(lambda: out.append(run_stages(self.stages, x.to(self.device))),
                                             self.pending, self.recipe.prune.float64_hessians, self.accs,
                                             float32_products=self.recipe.prune.hessian_products == "float32")
                self.folded.add(index)
            trim_heap()
        self.calibrate_seconds += time.perf_counter() - start
        return out[0].cpu()

    def needs(self, batches: int) -> list[int]:
        """The calibration batches (of ``batches``) this actor has still to fold: all of them for a fresh actor,
        none once its Hessians are complete or its layers solved."""
        return [] if not self.pending else [i for i in range(batches) if i not in self.folded]

    def prepare(self, levels: dict[str, float]) -> list[str]:
        """A replacement actor takes the layers an earlier actor already wrote (weights read back, not solved
        again) and collects Hessians only for the rest; returns the layers it still has to solve."""
        for name in list(self.pending):
            record = self._resume(name, levels[name])
            if record is not None:
                self.records[name] = record
                del self.pending[name]
        return list(self.pending)

    def dense_view(self, on: bool) -> None:
        """Swap the dense weights of this actor's solved layers in (``on``) or the pruned ones back: a survivor
        ahead of a replacement streams the dense activations the replacement's Hessians need, as in the first
        pass. The dense weights are read again from the model source (ranged reads), only for the solved
        layers, and dropped when the stream ends."""
        with torch.no_grad():
            solved = [n for n in self.records if n in self.layers]
            if on and solved and not self._solved_weights:          # (nothing solved: nothing to read)
                dense = read_source_tensors(self.source, [f"{n}.weight" for n in solved])
                for name in solved:
                    weight = self.layers[name].weight
                    self._solved_weights[name] = weight.detach().clone()
                    weight.copy_(dense[f"{name}.weight"].to(weight.device, weight.dtype))
            elif not on:
                for name, pruned in self._solved_weights.items():
                    self.layers[name].weight.copy_(pruned)
                self._solved_weights = {}

    def layer_names(self) -> list[str]:
        return list(self.layers)

    def loss_curves(self, depth: float) -> dict[str, Any]:
        """Per-layer removal-loss curves from the dense Hessians (for the driver's global allocation)."""
        with self.memory.stage("allocate"):
            return {name: loss_curve(module, self.accs[name].hessian(), self.recipe.prune, depth)
                    for name, module in self.layers.items()}

    # -- solving -------------------------------------------------------------------------------------

    def _written(self, name: str, level: float) -> tuple[LayerRecord, torch.Tensor] | None:
        """A layer written by an earlier run of the same recipe (or the actor this one replaces), if there is one:
        its record and its flattened weights, not yet set."""
        try:
            data = read_bytes(layer_file(self.recipe.output, name))
        except FileNotFoundError:
            return None
        meta = json.loads(_metadata(data, layer_file(self.recipe.output, name))["record"])
        if meta.get("recipe_hash") != self.recipe.hash or abs(meta["target_sparsity"] - level) > 1e-12:
            return None
        return LayerRecord(**{k: v for k, v in meta.items() if k != "recipe_hash"}), safetensors_load(data)["weight"]

    def _resume(self, name: str, level: float) -> LayerRecord | None:
        """Load a layer written by an earlier run of the same recipe, if there is one (its weights set)."""
        written = self._written(name, level)
        if written is None:
            return None
        set_flattened_weight(self.layers[name], written[1])
        return written[0]

    def _write(self, record: LayerRecord) -> None:
        """Write a solved layer's file in the background (after the previous one is done: its error, if any, is
        raised here)."""
        module = self.layers[record.layer]
        w = flattened_weight(module).detach().cpu().clone()          # a snapshot: the module may change later
        meta = {"record": json.dumps({**dataclasses.asdict(record), "recipe_hash": self.recipe.hash})}
        self._finish_writes()
        self._pending_write = self._writer.submit(_write_layer_file, layer_file(self.recipe.output, record.layer),
                                                  w, meta)

    def _finish_writes(self) -> None:
        """Wait for the layer file being written; its failure is raised here, naming the file."""
        pending, self._pending_write = self._pending_write, None
        if pending is not None:
            pending.result()

    def finish_writes(self) -> None:
        """Every solved layer's file is on storage when this returns (the driver calls it after solving)."""
        self._finish_writes()

    def solve_layer(self, name: str, level: float) -> dict[str, Any]:
        """Independent mode: solve one layer on its dense Hessian (or reuse a written result)."""
        start = time.perf_counter()
        # Each Hessian serves one solve: hand it over and let it go, so the actor's memory falls as layers
        # finish and a solve never holds the running float64 sum next to a scaled copy.
        acc = self.accs.pop(name, None) if self.accs is not None else None
        self.pending.pop(name, None)
        record = self.records.get(name) or self._resume(name, level)
        resumed = record is not None
        if record is None:
            with self.memory.stage("solve"):
                # The solvers work in float32 (as the local pipeline does); the float64 sum goes when the
                # float32 copy exists.
                hessian = take_curvature(acc, torch.float32)
                del acc
                record = solve_layer(name, "independent", self.layers[name], hessian, self.recipe.prune, level)
                del hessian
                trim_heap()
            self._write(record)
        self.records[name] = record
        self.solve_seconds += time.perf_counter() - start
        return {"record": dataclasses.asdict(record), "resumed": resumed}

    def sequential(self, inputs: list[torch.Tensor], levels: dict[str, float]) -> list[torch.Tensor]:
        """Sequential mode: solve this shard's stages in order on the (pruned) upstream outputs, then return
        this shard's pruned outputs for the next actor."""
        import ray

        # The first actor gets the driver's list of batch references (nested refs are not resolved for us).
        hidden = [(ray.get(x) if isinstance(x, ray.ObjectRef) else x).to(self.device) for x in inputs]
        timings = {"calibrate": 0.0, "solve": 0.0}
        with self.memory.stage("solve"):
            hidden = self._sequential(hidden, levels, timings)
            self._finish_writes()
        self.calibrate_seconds += timings["calibrate"]
        self.solve_seconds += timings["solve"]
        return [h.cpu() for h in hidden]

    def _sequential(self, hidden: list[torch.Tensor], levels: dict[str, float],
                    timings: dict[str, float]) -> list[torch.Tensor]:
        def written(name: str) -> LayerRecord | None:
            record = self.records.get(name) or self._resume(name, levels[name])
            if record is not None:
                self.records[name] = record
            return record

        for stage in self.stages:
            found = {n: self._written(n, levels[n]) for n in stage.layers if n not in self.records}
            if all(w is not None for w in found.values()):   # a stage done before: nothing to calibrate
                for name, (record, weight) in found.items():
                    set_flattened_weight(self.layers[name], weight)
                    self.records[name] = record
            else:
                # Some layers written (by the actor this one replaces, stopped mid-stage): those are read back
                # where their solve would run, after the calibration it would have used; not solved again.
                for rec in solve_stage(stage, hidden, self.recipe.prune, levels, timings, resume=written):
                    if rec.layer not in self.records:
                        self._write(rec)
                        self.records[rec.layer] = rec
            with torch.no_grad():
                hidden = [stage.run(h) for h in hidden]
        return hidden

    # -- BatchNorm re-estimation (after every layer is solved) ----------------------------------------

    def batchnorm_layers(self) -> int:
        """How many BatchNorm layers with running statistics this shard holds."""
        return len(batchnorm_layers(self.model))

    def batchnorm_begin(self) -> None:
        """Start measuring: this shard's BatchNorm statistics restart empty and average the batches to come
        (once: a survivor asked again after a lost actor keeps measuring where it was)."""
        if getattr(self, "_measuring", None) is None and not self.batchnorm_seen:
            self._measuring = measuring_batchnorm(self.model)
            self._measured = self._measuring.__enter__()

    def batchnorm_forward(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Calibration batch ``index`` through the pruned shard while its BatchNorm layers measure (same stages,
        same order as the local engine's pass: :func:`cap_dist.core.batchnorm.reestimate_batchnorm`). A batch
        measured already (streamed again for a lost actor's replacement) gives the same output, normalised by
        its own statistics, and leaves the running statistics as they were."""
        with torch.no_grad():
            if index not in self.batchnorm_seen:
                self.batchnorm_seen.add(index)
                return run_stages(self.stages, x.to(self.device)).cpu()
            with unchanged_batchnorm(self.model):
                return run_stages(self.stages, x.to(self.device)).cpu()

    def batchnorm_needs(self, batches: int) -> list[int]:
        """The batches this actor's BatchNorm layers have still to measure (none if it holds none)."""
        if not batchnorm_layers(self.model):
            return []
        return [i for i in range(batches) if i not in self.batchnorm_seen]

    def batchnorm_end(self) -> None:
        """Stop measuring: BatchNorm layers back to eval mode with their new statistics."""
        if getattr(self, "_measuring", None) is not None:
            self._measuring.__exit__(None, None, None)
            self._measuring = None

    def batchnorm_measured(self) -> list[str]:
        """State-dict keys of the statistics this shard re-estimated: reassembly takes them from this actor (the
        first and last actors both hold the modules outside the blocks; only the one that runs them measures)."""
        return measured_keys(getattr(self, "_measured", None) or {})

    # -- results -------------------------------------------------------------------------------------

    def release(self) -> None:
        """Drop the calibration statistics once every layer is solved (writing the shard needs the memory)."""
        self._finish_writes()
        self.accs = None
        import gc

        gc.collect()

    def tensor_names(self) -> list[str]:
        """Names of the parameters and buffers this shard holds; the rest of the model stays on the meta device (other
        shards' blocks, never read here)."""
        self._finish_writes()
        return [k for k, v in self.model.state_dict().items() if v.device.type != "meta"]

    def write_shard(self, keys: list[str], name: str) -> dict[str, Any]:
        """Write ``keys`` of this shard's final state (pruned layers, the rest of its blocks, whatever of the
        prefix/suffix and re-estimated BatchNorm statistics the driver assigns it) straight into the output as
        the safetensors shard ``name``, atomically; returns the file's name, sha256, size and keys for the
        index and the manifest. Nothing of the model goes back to the driver."""
        from cap_dist.models.source import state_dict_for_save
        from cap_dist.shards import write_safetensors

        with self.memory.stage("output"):
            tensors = state_dict_for_save(self.model, keys)
            written = write_safetensors(f"{self.recipe.output.rstrip('/')}/{name}", tensors)
            del tensors
            trim_heap()
        return dataclasses.asdict(written)

    def stats(self) -> dict[str, Any]:
        self._finish_writes()
        return {"index": self.index, "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": self.memory.baseline_mb,
                "stage_peak_rss_mb": dict(self.memory.peaks),
                "load_seconds": self.load_seconds, "calibrate_seconds": self.calibrate_seconds,
                "solve_seconds": self.solve_seconds, "layers": len(self.layers)}

    def get_records(self) -> list[dict[str, Any]]:
        self._finish_writes()
        return [dataclasses.asdict(self.records[n]) for n in self.layers if n in self.records]


def _materialised_to(model: nn.Module, device: torch.device) -> None:
    """Move the parameters and buffers this shard holds to ``device``; the meta tensors that stand for other
    shards' blocks stay where they are (a meta tensor has no data to copy)."""
    if device.type == "cpu":
        return
    with torch.no_grad():
        for module in model.modules():
            for key, param in module._parameters.items():
                if param is not None and not param.is_meta:
                    module._parameters[key] = nn.Parameter(param.to(device), requires_grad=param.requires_grad)
            for key, buf in module._buffers.items():
                if buf is not None and not buf.is_meta:
                    module._buffers[key] = buf.to(device)


def _write_layer_file(uri: str, weight: torch.Tensor, meta: dict[str, str]) -> None:
    atomic_write_bytes(uri, safetensors_save({"weight": weight, "mask": (weight != 0)}, meta))


def _metadata(data: bytes, where: str) -> dict[str, str]:
    return safetensors_header_of_bytes(data, where).get("__metadata__", {})
