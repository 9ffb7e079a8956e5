"""Record what each prunable layer sees: stream calibration batches through the model and fold every
layer's input into its curvature accumulator (H = 2/N Σ x xᵀ), without keeping the activations.

    layers = find_prunable_layers(model)
    accs = capture_layer_inputs(model, layers, (x for x, _ in loader))
    H = accs["blocks.0.mlp.fc1"].hessian()

:func:`collect_hessians` is the one capture path (the engines call it around a block or an actor's shard);
``capture_layer_inputs`` is the same over whole-model batches, with checks.

Also the one place that knows how a Linear / Conv2d weight maps to the 2-D ``[out, in·kh·kw]`` matrix the
solvers work on, so the columns of the weight line up with the rows/columns of H.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cap_dist.solvers.curvature import HessianAccumulator

try:  # timm's TensorFlow-style "same" convs pad inside forward(), after the pre-hook has seen the input
    from timm.layers import Conv2dSame as _TimmConv2dSame
except ImportError:  # pragma: no cover - timm is a dependency, but capture does not need it
    _TimmConv2dSame = None

AccumulatorFactory = Callable[[int], HessianAccumulator]


def _check_layer(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"layer {name!r} is a grouped Conv2d (groups={module.groups}); only Linear and "
                             "non-grouped Conv2d layers have an input Hessian; leave it out of the layers")
        if module.padding_mode != "zeros":
            raise ValueError(f"layer {name!r} uses padding_mode={module.padding_mode!r}; only zero padding "
                             "is supported")
    elif not isinstance(module, nn.Linear):
        raise ValueError(f"layer {name!r} is a {type(module).__name__}; only nn.Linear and nn.Conv2d are supported")


def layer_columns(module: nn.Module) -> int:
    """Input width of the flattened weight: ``in_features`` (Linear) or ``in_channels/groups·kh·kw`` (Conv2d)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw
    raise ValueError(f"{type(module).__name__} has no flattened weight; only nn.Linear and nn.Conv2d do")


def flattened_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in·kh·kw]`` (a detached view: clone before editing it in place)."""
    layer_columns(module)  # type check with a clear error
    weight = module.weight.detach()
    return weight.reshape(weight.shape[0], -1)


def set_flattened_weight(module: nn.Module, w2d: torch.Tensor) -> None:
    """Write a ``[out, in·kh·kw]`` matrix back into the layer's weight (keeps its dtype and device)."""
    expected = (module.weight.shape[0], layer_columns(module))
    if tuple(w2d.shape) != expected:
        raise ValueError(f"flattened weight for {type(module).__name__} must have shape {expected}, "
                         f"got {tuple(w2d.shape)}")
    with torch.no_grad():
        module.weight.copy_(w2d.reshape(module.weight.shape))


def _dynamic_same_padding(conv: nn.Conv2d) -> bool:
    """True where the conv pads its input inside forward() (timm Conv2dSame / StdConv2dSame)."""
    if _TimmConv2dSame is not None and isinstance(conv, _TimmConv2dSame):
        return True
    return getattr(conv, "same_pad", False) is True


def _padded_conv_input(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor | None:
    """The zero-padded input the convolution really sees, or None when ``conv.padding`` already says it."""
    if _dynamic_same_padding(conv):
        padding = []
        for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(conv.kernel_size), reversed(conv.stride),
                                 reversed(conv.dilation)):  # F.pad order: (w_left, w_right, h_top, h_bottom)
            total = max((-(size // -s) - 1) * s + (k - 1) * d + 1 - size, 0)  # TensorFlow SAME
            padding += [total // 2, total - total // 2]
        x = F.pad(x, padding)
        if not isinstance(conv.padding, str) and any(conv.padding):  # StdConv2dSame may add static padding
            x = F.pad(x, [p for p in reversed(conv.padding) for _ in (0, 1)])
        return x
    if conv.padding == "same":
        padding = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):  # PyTorch's 'same' split
            total = d * (k - 1)
            padding += [total // 2, total - total // 2]
        return F.pad(x, padding)
    if conv.padding == "valid":
        return x
    return None


def fold_layer_input(acc: HessianAccumulator, module: nn.Module, x: torch.Tensor) -> None:
    """Fold one input of a Linear (every token a row) or Conv2d (every patch it multiplies, padding as the
    convolution really applies it) into the layer's accumulator."""
    if isinstance(module, nn.Conv2d):
        _fold_conv_input(acc, x, module)
    else:
        acc.add_linear_input(x)


def _fold_conv_input(acc: HessianAccumulator, x: torch.Tensor, conv: nn.Conv2d) -> None:
    padded = _padded_conv_input(x, conv)
    if padded is None:
        acc.add_conv2d_input(x, conv)
        return
    patches = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, padding=0, stride=conv.stride)
    acc.add_rows(patches.transpose(1, 2).reshape(-1, patches.shape[1]))  # [B·L, C·kh·kw]


def collect_hessians(run: Callable[[], object], layers: Mapping[str, nn.Module], float64: bool = True,
                     accs: dict[str, HessianAccumulator] | None = None, *,
                     float32_products: bool = False) -> dict[str, HessianAccumulator]:
    """Call ``run`` (any forward passes: a whole model, one block, an actor's shard) with forward pre-hooks that
    fold each layer's input into its accumulator, without keeping the activations. The one capture path of
    cap-dist: both engines and :func:`capture_layer_inputs` go through it.

    Args:
        run: runs the forward passes (no grad is set around it).
        layers: ``{name: module}`` of Linear / non-grouped Conv2d layers that ``run`` executes.
        float64: accumulate in float64 (new accumulators only).
        float32_products: form each chunk's X Xᵀ in float32 before adding it to a float64 sum (new
            accumulators only; ``prune.hessian_products``).
        accs: accumulators to keep adding to (calls in sequence then equal one long run); new ones otherwise,
            on each layer's device, so on a GPU the inputs never cross to the host.
    """
    if accs is None:
        accs = {name: HessianAccumulator(layer_columns(m), float64=float64, device=m.weight.device,
                                         float32_products=float32_products)
                for name, m in layers.items()}
    run_with_input_hooks(run, {name: (module, lambda mod, x, acc=accs[name]: fold_layer_input(acc, mod, x))
                               for name, module in layers.items()})
    return accs


def run_with_input_hooks(run: Callable[[], object],
                         hooks: Mapping[str, tuple[nn.Module, Callable[[nn.Module, torch.Tensor], None]]]) -> None:
    """Call ``run`` (no grad) with a forward pre-hook on each named module that hands ``fn(module, input)`` the
    module's first input, detached; the hooks are removed afterwards, also when ``run`` raises."""
    handles = [module.register_forward_pre_hook(lambda mod, args, fn=fn: fn(mod, args[0].detach()))
               for module, fn in hooks.values()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()


def _float64_accumulator(columns: int) -> HessianAccumulator:
    return HessianAccumulator(columns, float64=True)


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    return None


def capture_layer_inputs(model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[torch.Tensor],
                         make_accumulator: AccumulatorFactory | None = None) -> dict[str, HessianAccumulator]:
    """Run ``batches`` through ``model`` (no grad) and accumulate each layer's input Hessian.

    Args:
        model: the full model; its mode (eval/train) is left as it is.
        layers: ``{name: module}`` of Linear / non-grouped Conv2d submodules of ``model``
            (e.g. from :func:`find_prunable_layers`).
        batches: input tensors, or ``(inputs, labels, ...)`` tuples whose first entry is the input;
            moved to the model's device.
        make_accumulator: builds an empty accumulator from the layer's column count; default
            ``HessianAccumulator(columns, float64=True)``.

    Returns:
        ``{name: accumulator}`` with H = 2/N Σ x xᵀ over every token (Linear) or patch (Conv2d).

    Raises:
        ValueError: a layer is not a supported submodule of ``model``, no batch was given, or a layer
            never ran during the forward passes.
    """
    factory = make_accumulator or _float64_accumulator
    members = {id(m) for m in model.modules()}
    for name, module in layers.items():
        _check_layer(name, module)
        if id(module) not in members:
            raise ValueError(f"layer {name!r} is not a submodule of the model, so its hook would never run; "
                             "pass layers found in this model instance")
    accumulators = {name: factory(layer_columns(module)) for name, module in layers.items()}
    device = _model_device(model)
    n_batches = 0

    def run() -> None:
        nonlocal n_batches
        for batch in batches:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(inputs.to(device) if device is not None else inputs)
            n_batches += 1

    collect_hessians(run, layers, accs=accumulators)
    if n_batches == 0:
        raise ValueError("no calibration batches were given; pass a non-empty iterable of input tensors")
    silent = [name for name, acc in accumulators.items() if acc.count == 0]
    if silent:
        raise ValueError(f"{len(silent)} layer(s) never ran in the forward pass: {', '.join(silent[:5])}; "
                         "leave them out of the layers to capture")
    return accumulators


def input_means(run: Callable[[], object], layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Call ``run`` with forward pre-hooks that average each Linear layer's input over every token, in float64
    (``run`` may itself capture more, e.g. :func:`collect_hessians`, so one pass serves both)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for name, layer in layers.items():
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{name}: a whole branch can be removed only where its consumer is a Linear layer, "
                            f"not {type(layer).__name__}")

    def add(name: str, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).double()
        sums[name] = sums.get(name, 0) + rows.sum(0)
        counts[name] = counts.get(name, 0) + rows.shape[0]

    run_with_input_hooks(run, {n: (layer, lambda mod, x, n=n: add(n, x)) for n, layer in layers.items()})
    missing = [n for n in layers if n not in sums]
    if missing:
        raise ValueError(f"the calibration pass never ran {missing[:3]}")
    return {n: sums[n] / counts[n] for n in layers}
