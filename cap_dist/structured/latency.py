"""A measured latency table: what removing one group of each structure saves in wall time, on this device, at a
batch size, and the whole model's latency there, so a target ``keep 60 % of the latency`` becomes seconds to remove.

MACs are a poor proxy for time on the small and medium layers that structured pruning leaves behind. On vit4mnist at
batch 64 on one CPU thread an attention module takes 2.7× the time of the MLP beside it for about the same MACs:
its softmax, reshapes and per-head matmuls cost time that MACs do not count, so the MAC unit under-prices heads.
Every structure's module is therefore timed at several widths on the inputs it sees in the model (a copy shrunk
with :func:`remove_groups`), and one group's saving is the least-squares slope of time against the number of groups.

A structure whose module is a whole residual branch (:func:`~cap_dist.models.structures.branch_norm`) can also be
removed entirely, which saves more than its groups' slope predicts: the module's and its norm's per-call overhead
(kernel launches, reshapes, softmax set-up), which at batch 1 is most of a small ViT's time. Its ``branch`` saving is
the timed norm + module at full width less a :class:`ConstantBranch` call, at least the slope's.

Timing is noisy where other work shares the machine, and a VM's speed drifts within seconds. Each width is timed in
several interleaved rounds and the fastest round kept (contention only ever adds time), and a structure whose time
does not fall with its width saves nothing: the allocation then has no reason to cut it. The whole model is timed
in every structure's rounds too and its fastest pass over all of them kept: timed once, at a slow moment, it made
every structure's share look small (on vit4mnist at batch 1 the removable share swung from 66 % to 37 % between
runs, and a target of 60 % became unreachable in one of them).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.utils.benchmark import Timer

from cap_dist.models.structures import ConstantBranch, Structure, branch_norm, remove_groups
from cap_dist.storage import atomic_write_bytes, read_bytes, storage_errors

log = logging.getLogger(__name__)

WIDTH_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
ROUNDS = 5
MIN_RUN_TIME_S = 0.01


@dataclass(frozen=True)
class LatencyTable:
    """Seconds per forward pass of the whole model at ``batch``, and seconds one group of each structure adds."""

    batch: int
    model_seconds: float
    per_group: dict[str, float]
    points: dict[str, list[tuple[int, float]]]   # structure -> (groups kept, seconds) as measured
    branch: dict[str, float] = field(default_factory=dict)   # structure -> seconds saved by removing it whole

    def savings(self, name: str, groups: int, limit: int) -> torch.Tensor:
        """Seconds saved by removing k = 0 .. ``limit`` of the structure's ``groups`` groups: the slope per group,
        and at k = groups (a removed branch) the timed branch saving where it is larger."""
        saved = self.per_group[name] * torch.arange(limit + 1, dtype=torch.float64)
        if limit == groups and name in self.branch:
            saved[groups] = max(float(saved[groups]), self.branch[name])
        return saved


def time_call(call: Callable[[], object], threads: int) -> float:
    """Median seconds of ``call`` in blocks of runs (``torch.utils.benchmark``, which synchronises CUDA)."""
    timer = Timer("call()", globals={"call": call}, num_threads=threads)
    return float(timer.blocked_autorange(min_run_time=MIN_RUN_TIME_S).median)


def fastest(calls: list[Callable[[], object]], threads: int, rounds: int = ROUNDS) -> list[float]:
    """Each call's fastest median over ``rounds`` interleaved rounds (a burst of other work hits every call)."""
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for i, call in enumerate(calls):
            best[i] = min(best[i], time_call(call, threads))
    return best


def slope_per_group(points: list[tuple[int, float]]) -> float:
    """Seconds saved per removed group: the least-squares slope of time against groups kept, at least 0."""
    if len(points) < 2:
        raise ValueError("a slope needs at least two widths")
    groups = torch.tensor([float(g) for g, _ in points], dtype=torch.float64)
    seconds = torch.tensor([s for _, s in points], dtype=torch.float64)
    centred = groups - groups.mean()
    denom = float(centred.pow(2).sum())
    if denom == 0:
        raise ValueError("a slope needs at least two different widths")
    return max(0.0, float((centred * (seconds - seconds.mean())).sum()) / denom)


def batch_of(inputs: list[torch.Tensor], batch: int) -> torch.Tensor:
    """``batch`` calibration images (repeated when there are fewer)."""
    pool = torch.cat(inputs)
    reps = -(-batch // pool.shape[0])
    return pool.repeat(reps, *([1] * (pool.dim() - 1)))[:batch]


def module_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple[tuple, dict]]:
    """The arguments (positional, keyword) each named module receives in one forward pass of ``x``."""
    seen: dict[str, tuple[tuple, dict]] = {}

    def keep(name: str, args: tuple, kwargs: dict) -> None:
        seen.setdefault(name, (args, kwargs))

    handles = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, kwargs, out, n=n: keep(n, args, kwargs), with_kwargs=True) for n in names]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise ValueError(f"the forward pass never ran {missing[:3]}; exclude them from structured.structures")
    return seen


def shrunk_copies(module: nn.Module, structure: Structure) -> list[tuple[int, nn.Module]]:
    """Copies of ``module`` keeping ``WIDTH_FRACTIONS`` of its groups (at least one each, distinct widths)."""
    widths = sorted({max(1, round(f * structure.groups)) for f in WIDTH_FRACTIONS}, reverse=True)
    copies = []
    for kept in widths:
        clone = copy.deepcopy(module)
        if kept < structure.groups:
            remove_groups(clone, replace(structure, name=""), torch.arange(kept, device="cpu"))
        copies.append((kept, clone.eval()))
    return copies


def measure_latency(model: nn.Module, structures: list[Structure], inputs: list[torch.Tensor], batch: int,
                    threads: int | None = None, branches: bool = False) -> LatencyTable:
    """The latency table of ``model`` (eval mode, on its device) at ``batch`` calibration images; with
    ``branches``, also what removing each whole residual branch saves."""
    if batch < 1:
        raise ValueError(f"latency batch={batch} must be >= 1")
    threads = threads or torch.get_num_threads()
    x = batch_of(inputs, batch)
    norms = {s.name: n for s in structures if branches and (n := branch_norm(model, s.name)) is not None}
    seen = module_inputs(model, [s.name for s in structures] + list(norms.values()), x)
    with torch.inference_mode():
        whole = lambda: model(x)                  # noqa: E731 - timed with every structure's rounds, see below
        model_seconds = fastest([whole], threads)[0]
        per_group, points, branch = {}, {}, {}
        for s in structures:
            args, kwargs = seen[s.name]
            copies = shrunk_copies(model.get_submodule(s.name), s)
            calls = [lambda m=m: m(*args, **kwargs) for _, m in copies]
            if s.name in norms:
                norm, (norm_args, norm_kwargs) = model.get_submodule(norms[s.name]), seen[norms[s.name]]
                constant = ConstantBranch(torch.zeros(args[0].shape[-1], device=args[0].device), s.kind)
                calls += [lambda: norm(*norm_args, **norm_kwargs), lambda: constant(*args, **kwargs)]
            times = fastest(calls + [whole], threads)
            model_seconds = min(model_seconds, times.pop())
            if s.name in norms:
                norm_s, constant_s = times[-2:]
                times = times[:-2]
                branch[s.name] = max(0.0, times[0] + norm_s - constant_s)
            points[s.name] = [(kept, t) for (kept, _), t in zip(copies, times)]
            per_group[s.name] = slope_per_group(points[s.name])
            if times[-1] > times[0]:
                log.warning("%s at %d of its %d groups took longer (%.3f ms) than whole (%.3f ms): other work on "
                            "this machine is distorting the latency table (time it on a quiet machine, or use "
                            "structured.measure: flops)", s.name, copies[-1][0], s.groups, 1e3 * times[-1],
                            1e3 * times[0])
    if not any(v > 0 for v in [*per_group.values(), *branch.values()]):
        raise ValueError(f"no structure's time falls with its width at batch {batch} (timing noise or a model too "
                         "small for this batch); use structured.measure: flops or a larger structured.latency_batch")
    return LatencyTable(batch, model_seconds, per_group, points, branch)


TABLE_FORMAT = "cap-dist latency table 1"


def save_table(table: LatencyTable, uri: str, structures: list[Structure], threads: int, device: str) -> None:
    """Write ``table`` as JSON to ``uri`` (local or object store; a temporary name, then the final one), with
    what it was timed on, so that other prunes of the same model can be allocated on the very same table."""
    doc = {"format": TABLE_FORMAT, "batch": table.batch, "threads": threads, "device": device,
           "groups": {s.name: s.groups for s in structures}, "model_seconds": table.model_seconds,
           "per_group": table.per_group, "branch": table.branch,
           "points": {n: [list(p) for p in pts] for n, pts in table.points.items()}}
    with storage_errors(uri):
        atomic_write_bytes(uri, json.dumps(doc, indent=1, sort_keys=True).encode())


def load_table(uri: str, structures: list[Structure], batch: int, branches: bool) -> LatencyTable:
    """The table saved at ``uri``, refused with what differs when it was timed for other structures (another
    model or other ``structured.structures``), another batch, or without the whole branches now removable."""
    with storage_errors(uri):
        raw = read_bytes(uri)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"structured.latency_table={uri} is not a latency table (not JSON: {err})") from None
    if not isinstance(doc, dict) or doc.get("format") != TABLE_FORMAT:
        raise ValueError(f"structured.latency_table={uri} is not a cap-dist latency table (format "
                         f"{doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r}, expected "
                         f"{TABLE_FORMAT!r}); delete it to time a new one")
    want = {s.name: s.groups for s in structures}
    if doc["groups"] != want:
        differ = sorted(set(want) ^ set(doc["groups"])) or sorted(n for n in want if want[n] != doc["groups"][n])
        raise ValueError(f"structured.latency_table={uri} was timed for other structures (differs on "
                         f"{differ[:3]}); use a table of this model and structured.structures, or a new path")
    if doc["batch"] != batch:
        raise ValueError(f"structured.latency_table={uri} was timed at batch {doc['batch']}, the recipe asks for "
                         f"structured.latency_batch={batch}; use the same batch or a new path")
    if branches and not doc["branch"]:
        raise ValueError(f"structured.latency_table={uri} was timed without whole branches and "
                         "structured.branches is on; use a new path")
    return LatencyTable(int(doc["batch"]), float(doc["model_seconds"]), dict(doc["per_group"]),
                        {n: [(int(k), float(t)) for k, t in pts] for n, pts in doc["points"].items()},
                        dict(doc["branch"]))
