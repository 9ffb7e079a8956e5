"""The model as stages: prefix -> blocks -> suffix, each a function of the previous stage's outputs, with every
prunable layer given to the stage that runs it. Sequential pruning walks the stages; the Ray engine shards them.

Also which layers a recipe prunes (``model.targets`` / ``model.ignore``, else the family's defaults) and the
check, before any calibration, that every one of them fits the recipe's N:M pattern and quantization group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from cap_dist.models.capture import layer_columns
from cap_dist.models.families import select_prunable_layers, split_blocks

if TYPE_CHECKING:
    from cap_dist.config import ModelConfig, PruneConfig


@dataclass
class Stage:
    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    layers: dict[str, nn.Module]


def select_layers(model: nn.Module, model_cfg: "ModelConfig") -> dict[str, nn.Module]:
    """The layers a recipe's ``model`` section prunes: its ``targets`` (fnmatch patterns) minus ``ignore``, or
    the model family's defaults."""
    return select_prunable_layers(model, model_cfg.targets, model_cfg.ignore)


def check_layers_fit(cfg: "PruneConfig", layers: dict[str, nn.Module]) -> None:
    """Refuse, before any calibration, a pattern or quantization group that some layer's input width does not
    fit (otherwise the run fails only when it reaches that layer, after minutes or hours of work)."""
    for what, width, key in ((f"pattern {cfg.pattern}", cfg.pattern.m if cfg.pattern.structured else 0,
                              "prune.pattern"),
                             (f"quantize.group_size={cfg.quantize.group_size}",
                              cfg.quantize.group_size if cfg.quantize.bits else 0, "prune.quantize.group_size")):
        if not width:
            continue
        bad = [f"{name} ({layer_columns(m)} inputs)" for name, m in layers.items() if layer_columns(m) % width]
        if bad:
            raise ValueError(f"{what} needs every pruned layer's input width to be a multiple of {width}, but "
                             f"{len(bad)} layer(s) are not: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; "
                             f"add them to model.ignore or change {key}")


def model_stages(model: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor | None) -> list[Stage]:
    """Split the model into prefix -> blocks -> suffix and give every prunable layer to the stage that runs it.

    Layers outside every block (a stem conv in the prefix, a head conv in the suffix) are placed by
    watching which stage runs them on ``example`` (one calibration input, batch of 1); without an example
    (a meta skeleton, where nothing can run) such layers are an error.
    """
    parts = split_blocks(model)
    stages = [Stage("prefix", parts.prefix, {})]
    stages += [Stage(name, block, {}) for name, block in parts.blocks]
    stages.append(Stage("suffix", parts.suffix, {}))
    rest: dict[str, nn.Module] = {}
    for name, module in layers.items():
        try:
            stages[1 + parts.block_of(name)].layers[name] = module
        except ValueError:
            rest[name] = module
    if rest and example is None:
        raise ValueError(f"layers {sorted(rest)[:5]} lie outside the model's blocks; the distributed engine shards "
                         "blocks only: drop them from model.targets or use engine=local")
    if rest:
        seen: dict[str, str] = {}
        current = ["prefix"]
        handles = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, current[0]))
                   for n, m in rest.items()]
        try:
            with torch.no_grad():
                h = example
                for stage in stages:
                    current[0] = stage.name
                    h = stage.run(h)
        finally:
            for handle in handles:
                handle.remove()
        for stage in stages:
            stage.layers.update({n: rest[n] for n, s in seen.items() if s == stage.name})
        missing = sorted(set(rest) - set(seen))
        if missing:
            raise ValueError(f"layers {missing[:5]} never run in the model's forward pass; remove them from targets")
    return stages


def run_stages(stages: list[Stage], x: torch.Tensor) -> torch.Tensor:
    """One batch through consecutive stages (an actor's shard, or the whole model)."""
    for stage in stages:
        x = stage.run(x)
    return x


def run_stage_over(stage: Stage, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A stage's outputs for every batch of its inputs (no grad)."""
    with torch.no_grad():
        return [stage.run(h) for h in inputs]


def device_of(choice: str) -> torch.device:
    """The recipe's ``device`` (cpu, cuda, auto) as a torch device; ``cuda`` where none is visible is an input
    error. In a Ray actor, a GPU reserved with ``distributed.num_gpus`` is the one visible."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)
