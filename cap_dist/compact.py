"""Compact export of a pruned (and optionally quantized) model: only the kept values, a packed keep-bitmask,
and — for quantized layers — integer codes with per-group scales, in one safetensors file that restores the
dense-with-zeros state dict bit for bit.

    python -c "from cap_dist.compact import compact_from_output; print(compact_from_output('runs/vit4mnist-75'))"

writes ``runs/vit4mnist-75/model.compact.safetensors`` beside ``model.safetensors`` (the manifest is left
untouched) after checking that it restores every tensor bit-exactly and rebuilds the dense file's sha256. A sharded
output (the Ray engine's) gets one compact file per shard, ``model-00001-of-00004.compact.safetensors``...

Layout (``model.compact.safetensors``, format ``cap-dist-compact`` version 1; also docs/compact-format.md).
For every compact layer ``L`` (module name; its tensor is ``T = L.weight``, any shape, flattened row-major;
``rows = shape[0]``, ``cols = numel / rows``):

* ``T.shape``   int64 ``[ndim]``: the tensor's shape.
* ``T.mask``    uint8 ``[ceil(numel/8)]``: bit i (row-major element i) is 1 where the value is nonzero;
  8 bits per byte, little-endian bit order (element 8k+b is bit b, value 1<<b, of byte k), padding bits 0.
* ``T.negzero`` uint8, only when some zero entry is −0.0: the same packing over the *zero* entries alone
  (in row-major order), 1 where the zero is −0.0 (sign bits matter for bit-exactness; CAP writes none).
* unquantized: ``T.values``, the nonzero values in row-major order, in the tensor's dtype.
* quantized: ``T.codes``, the integer codes of the nonzero values in row-major order — int8 for symmetric
  grids of 5–8 bits, uint8 for asymmetric 5–8 bits, and for 2–4 bits two codes per uint8 byte, code 2k in
  the low nibble (bits 0–3) and code 2k+1 in the high nibble (bits 4–7) of byte k, a final odd code's high
  nibble 0; symmetric nibbles are 4-bit two's complement (0xF = −1), asymmetric ones unsigned.
  ``T.scales`` float32 ``[rows, n_groups]``; ``T.zeros`` uint8 ``[rows, n_groups]`` for asymmetric grids.
  A value is the exact product (c − z)·s rounded once to the tensor's dtype
  (:func:`cap_dist.solvers.quantize.dequantize`), with group = column // group_size.
* every other tensor of the state dict, as-is under its own name.

``__metadata__`` holds one key, ``cap_dist_compact``: a JSON string with ``format``, ``version``, ``layers``
(``{T: {"dtype": "float32", "quant": null | {"bits", "group_size", "symmetric"}}}``) and ``dense``
(``{"sha256", "header"}``: the dense safetensors file's digest and its header verbatim, so
:func:`dense_file_from_compact` can rebuild that exact file and prove the round trip).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from cap_dist.solvers.quantize import dequantize, level_range
from cap_dist.storage import atomic_write_bytes, read_bytes, safetensors_header_of_bytes

FORMAT = "cap-dist-compact"
VERSION = 1
METADATA_KEY = "cap_dist_compact"
COMPACT = "model.compact.safetensors"
PARTS = ("shape", "mask", "negzero", "values", "codes", "scales", "zeros")


class CorruptCompactError(ValueError):
    """A compact file that cannot be read back: truncated, not safetensors, inconsistent, or of another format."""


@dataclass
class Encoding:
    """A layer's grid encoding: ``codes`` ``[rows, cols]`` (0 where the value is 0), ``scales`` float32
    ``[rows, n_groups]``, ``zero_points`` uint8 or None (symmetric).  A
    :class:`cap_dist.solvers.quantize.QuantResult` has the same attributes and can be passed instead."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    bits: int
    group_size: int | None


# ----------------------------------------------------------------------------------------------------
# Bits and nibbles


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Bool tensor (flattened row-major) -> uint8, 8 per byte, little-endian bit order, padding bits 0."""
    return torch.from_numpy(np.packbits(flags.reshape(-1).cpu().numpy(), bitorder="little"))


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` flags as a bool tensor."""
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count, bitorder="little").astype(bool))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes in [−8, 15] -> uint8, code 2k in the low nibble and 2k+1 in the high nibble of byte k
    (negative codes as 4-bit two's complement)."""
    low4 = (codes.reshape(-1).to(torch.int16) & 0xF).to(torch.uint8)
    if low4.numel() % 2:
        low4 = torch.cat([low4, torch.zeros(1, dtype=torch.uint8)])
    return low4[0::2] | (low4[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, count: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``count`` codes as int16 (sign-extended when ``signed``)."""
    both = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:count].to(torch.int16)
    return torch.where(both >= 8, both - 16, both) if signed else both


# ----------------------------------------------------------------------------------------------------
# Export


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_of(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CorruptCompactError(f"{where}: dtype {name!r} is not a floating-point torch dtype")
    return dtype


def _matrix_shape(tensor: torch.Tensor) -> tuple[int, int]:
    rows = tensor.shape[0] if tensor.ndim else 1
    return rows, tensor.numel() // max(rows, 1)


def _encode_layer(key: str, tensor: torch.Tensor, enc: Any | None) -> tuple[dict[str, torch.Tensor], dict]:
    """The compact parts of one tensor and its metadata entry."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    nonzero = flat != 0
    parts = {f"{key}.shape": torch.tensor(list(tensor.shape), dtype=torch.int64), f"{key}.mask": pack_bits(nonzero)}
    zeros = flat[~nonzero]
    if bool(torch.signbit(zeros).any()):
        parts[f"{key}.negzero"] = pack_bits(torch.signbit(zeros))
    entry: dict[str, Any] = {"dtype": _dtype_name(tensor.dtype), "quant": None}
    if enc is None:
        parts[f"{key}.values"] = flat[nonzero].clone()
        return parts, entry
    rows, cols = _matrix_shape(tensor)
    codes = enc.codes.detach().cpu().reshape(-1)
    if codes.numel() != flat.numel():
        raise ValueError(f"{key}: the quantization has {codes.numel()} codes for {flat.numel()} weights")
    symmetric = enc.zero_points is None
    kept = codes[nonzero]
    if enc.bits <= 4:
        parts[f"{key}.codes"] = pack_nibbles(kept)
    else:
        parts[f"{key}.codes"] = kept.to(torch.int8 if symmetric else torch.uint8)
    parts[f"{key}.scales"] = enc.scales.detach().cpu().to(torch.float32).reshape(rows, -1).contiguous()
    if not symmetric:
        parts[f"{key}.zeros"] = enc.zero_points.detach().cpu().to(torch.uint8).reshape(rows, -1).contiguous()
    entry["quant"] = {"bits": int(enc.bits), "group_size": enc.group_size, "symmetric": symmetric}
    return parts, entry


def _dense_identity(state: dict[str, torch.Tensor], dense: bytes | None) -> dict[str, str]:
    """The dense file's sha256 and verbatim header (of ``dense``, or of the state serialized as safetensors)."""
    if dense is None:
        dense = safetensors_save({k: v.contiguous() for k, v in state.items()})
    size = struct.unpack("<Q", dense[:8])[0]
    return {"sha256": hashlib.sha256(dense).hexdigest(), "header": dense[8:8 + size].decode("utf-8")}


def export_compact(state: dict[str, torch.Tensor], layers: list[str], quant: dict[str, Any] | None = None, *,
                   dense: bytes | None = None) -> bytes:
    """The compact file's bytes for a dense-with-zeros state dict.

    Args:
        state: the pruned model's state dict (``L.weight`` of every layer in ``layers`` among them).
        layers: module names of the pruned layers to store compactly.
        quant: ``{layer: encoding}`` for quantized layers (a QuantResult or :class:`Encoding` whose
            dequantized weight is the state's tensor bit for bit).
        dense: the dense safetensors file's bytes, when it exists (its sha256 and header go in the metadata,
            so the exact file can be rebuilt); otherwise the state is serialized once for them.

    Raises:
        ValueError: a layer is missing, a part name collides with a state key, or a layer would not round-trip
            bit-exactly (e.g. its tensor is not its quantization's dequantized weight).
    """
    quant = quant or {}
    unknown = sorted(set(quant) - set(layers))
    if unknown:
        raise ValueError(f"quantizations given for layers not in `layers`: {unknown[:5]}")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for layer in layers:
        key = f"{layer}.weight"
        if key not in state:
            raise ValueError(f"layer {layer!r}: the state dict has no tensor {key!r}")
        tensor = state[key]
        if not tensor.is_floating_point():
            raise ValueError(f"{key} is {tensor.dtype}; only floating-point weights are stored compactly")
        parts, entry = _encode_layer(key, tensor, quant.get(layer))
        clash = sorted(set(parts) & set(state))
        if clash:
            raise ValueError(f"the compact part names {clash} are also tensors of the state dict")
        if not _same_bits(_decode_layer(key, parts, entry, "export"), tensor.detach().cpu()):
            raise ValueError(f"{key} would not round-trip bit-exactly: its tensor is not the dequantized weight of "
                             "the quantization given for it (pass the QuantResult computed for this tensor)")
        tensors.update(parts)
        entries[key] = entry
    compact = set(entries)
    tensors.update({k: v.detach().cpu().contiguous() for k, v in state.items() if k not in compact})
    meta = {"format": FORMAT, "version": VERSION, "layers": entries, "dense": _dense_identity(state, dense)}
    return safetensors_save(tensors, {METADATA_KEY: json.dumps(meta)})


# ----------------------------------------------------------------------------------------------------
# Load


def _part(parts: dict[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
    if name not in parts:
        raise CorruptCompactError(f"{where}: tensor {name!r} is missing")
    return parts[name]


def _decode_layer(key: str, parts: dict[str, torch.Tensor], entry: dict, where: str) -> torch.Tensor:
    """Rebuild one dense tensor from its compact parts (the exact inverse of :func:`_encode_layer`)."""
    dtype = _dtype_of(entry.get("dtype"), where)
    shape = [int(s) for s in _part(parts, f"{key}.shape", where).tolist()]
    numel = int(np.prod(shape)) if shape else 1
    packed = _part(parts, f"{key}.mask", where)
    if packed.dtype != torch.uint8 or packed.numel() != -(-numel // 8):
        raise CorruptCompactError(f"{where}: {key}.mask holds {packed.numel()} bytes, {key} needs {-(-numel // 8)}")
    nonzero = unpack_bits(packed, numel)
    kept = int(nonzero.sum())
    quant = entry.get("quant")
    if quant is None:
        values = _part(parts, f"{key}.values", where)
        if values.dtype != dtype or values.numel() != kept:
            raise CorruptCompactError(f"{where}: {key}.values has {values.numel()} {values.dtype} values; the mask "
                                      f"keeps {kept} and the layer is {dtype}")
        flat = torch.zeros(numel, dtype=dtype)
        flat[nonzero] = values.reshape(-1)
    else:
        flat = _dequantized(key, parts, quant, shape, nonzero, kept, dtype, where)
    if f"{key}.negzero" in parts:
        zero_idx = torch.nonzero(~nonzero).reshape(-1)
        negative = unpack_bits(parts[f"{key}.negzero"], zero_idx.numel())
        flat[zero_idx[negative]] = -0.0
    return flat.reshape(shape)


def _dequantized(key: str, parts: dict[str, torch.Tensor], quant: dict, shape: list[int], nonzero: torch.Tensor,
                 kept: int, dtype: torch.dtype, where: str) -> torch.Tensor:
    """The flat dense tensor of a quantized layer: codes scattered to their positions, then (c − z)·s."""
    bits, symmetric = int(quant["bits"]), bool(quant["symmetric"])
    rows = shape[0] if shape else 1
    cols = nonzero.numel() // max(rows, 1)
    packed = _part(parts, f"{key}.codes", where)
    if bits <= 4:
        codes = unpack_nibbles(packed, kept, signed=symmetric) if packed.numel() == -(-kept // 2) else None
    else:
        codes = packed.to(torch.int16) if packed.numel() == kept else None
    if codes is None:
        raise CorruptCompactError(f"{where}: {key}.codes does not hold the {kept} codes the mask keeps")
    scales = _part(parts, f"{key}.scales", where)
    group = quant.get("group_size") or cols
    if tuple(scales.shape) != (rows, cols // group) or cols % group:
        raise CorruptCompactError(f"{where}: {key}.scales has shape {tuple(scales.shape)}; a {rows}x{cols} layer "
                                  f"in groups of {group} needs [{rows}, {cols // group}]")
    zeros = None if symmetric else _part(parts, f"{key}.zeros", where)
    dense_codes = torch.zeros(nonzero.numel(), dtype=torch.int16)
    dense_codes[nonzero] = codes
    values = dequantize(dense_codes.reshape(rows, cols), scales, zeros, dtype).reshape(-1)
    return torch.where(nonzero, values, torch.zeros_like(values))


def _header(data: bytes, where: str) -> dict[str, Any]:
    """The compact metadata of a safetensors file, checked for format and version."""
    if len(data) < 8:
        raise CorruptCompactError(f"{where} is not a compact model file: {len(data)} bytes (truncated?)")
    try:
        header = safetensors_header_of_bytes(data, where)
        meta = json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError):
        raise CorruptCompactError(f"{where} is not a {FORMAT} file: its safetensors header is unreadable or "
                                  f"has no {METADATA_KEY!r} metadata (truncated or corrupt?)") from None
    if meta.get("format") != FORMAT:
        raise CorruptCompactError(f"{where} has format {meta.get('format')!r}, not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise CorruptCompactError(f"{where} is {FORMAT} version {meta.get('version')!r}; this cap-dist reads "
                                  f"version {VERSION} only (upgrade cap-dist, or re-export the model)")
    return meta


def _read(source: bytes | str) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "the compact bytes"
    return read_bytes(source), str(source)


def _load(source: bytes | str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    data, where = _read(source)
    meta = _header(data, where)
    try:
        tensors = safetensors_load(data)
    except Exception as err:  # safetensors raises its own error types for malformed or truncated files
        raise CorruptCompactError(f"{where} is corrupt or truncated: {err}") from None
    state: dict[str, torch.Tensor] = {}
    for key, entry in meta.get("layers", {}).items():
        state[key] = _decode_layer(key, tensors, entry, where)
    parts = {f"{key}.{part}" for key in meta.get("layers", {}) for part in PARTS}
    state.update({k: v for k, v in tensors.items() if k not in parts})
    return state, meta, where


def load_compact(source: bytes | str) -> dict[str, torch.Tensor]:
    """The dense-with-zeros state dict of a compact file (bytes, path or URI), bit-exact.

    Raises:
        CorruptCompactError: the file is truncated, not safetensors, not this format, of an unknown
            version, or its parts disagree (the message names the file).
    """
    return _load(source)[0]


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def dense_file_from_compact(source: bytes | str) -> bytes:
    """Rebuild the dense safetensors file the compact file came from, byte for byte, and check its sha256.

    Raises:
        CorruptCompactError: the rebuilt file's sha256 differs from the one recorded at export.
    """
    state, meta, where = _load(source)
    try:
        text, digest = meta["dense"]["header"], meta["dense"]["sha256"]
        header = json.loads(text)
    except (KeyError, TypeError, ValueError):
        raise CorruptCompactError(f"{where}: its metadata does not record the dense file's header and sha256") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if set(tensors) != set(state):
        raise CorruptCompactError(f"{where}: its tensors differ from the dense file's "
                                  f"({sorted(set(tensors) ^ set(state))[:5]})")
    body = bytearray(max((info["data_offsets"][1] for info in tensors.values()), default=0))
    for name, info in tensors.items():
        begin, end = info["data_offsets"]
        body[begin:end] = _tensor_bytes(state[name])
    raw = text.encode("utf-8")
    dense = struct.pack("<Q", len(raw)) + raw + bytes(body)
    if hashlib.sha256(dense).hexdigest() != digest:
        raise CorruptCompactError(f"{where}: the rebuilt dense file does not match the sha256 recorded at export")
    return dense


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so −0.0 ≠ +0.0 and NaN payloads count, unlike ``torch.equal``)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


# ----------------------------------------------------------------------------------------------------
# From a pruning output


def encode_on_grid(weight: torch.Tensor, bits: int, group_size: int | None) -> Encoding | None:
    """Recover a symmetric grid encoding (codes and float32 scales) of a quantized ``[rows, cols]`` weight, or None.

    An output folder holds the dequantized weights, not the scales.  In every group whose largest code is c,
    the scale is max|w|/c up to one float32 rounding, so the candidates c = qmax, qmax−1, … (with the float32
    neighbours of each quotient) are tried for the groups still unsolved until each group reproduces its
    weights exactly.  Any scale that does is a valid encoding, so nothing rests on finding the original one;
    a weight not on such a grid (no group solves at c = qmax) returns None and is stored as values.
    """
    rows, cols = weight.shape
    width = group_size or cols
    if cols % width:
        return None
    _, qmax = level_range(bits, symmetric=True)
    groups = weight.detach().cpu().reshape(rows * (cols // width), width)
    wide = groups.to(torch.float64)
    amax = wide.abs().amax(dim=1)
    scales = torch.ones(groups.shape[0], dtype=torch.float32)
    codes = torch.zeros(groups.shape, dtype=torch.int16)
    todo = amax > 0
    for top in range(qmax, 0, -1):
        if not bool(todo.any()):
            break
        idx = torch.nonzero(todo).reshape(-1)
        base = (amax[idx] / top).to(torch.float32)
        solved_any = False
        for cand in (base, torch.nextafter(base, torch.zeros_like(base)), torch.nextafter(base, base * 2)):
            live = todo[idx]
            sub, s = wide[idx[live]], cand[live]
            c = torch.round(sub / s.to(torch.float64).unsqueeze(1))
            ok = (c.abs() <= qmax).all(1) & (dequantize(c, s.unsqueeze(1), None, groups.dtype)
                                             == groups[idx[live]]).all(1)
            hit = idx[live][ok]
            scales[hit], codes[hit] = s[ok], c[ok].to(torch.int16)
            todo[hit] = False
            solved_any |= bool(ok.any())
        if top == qmax and not solved_any:
            return None
    if bool(todo.any()):
        return None
    return Encoding(codes=codes.reshape(rows, cols), scales=scales.reshape(rows, cols // width), zero_points=None,
                    bits=bits, group_size=group_size)


def _layer_encodings(state: dict[str, torch.Tensor], rows: list[dict], manifest: dict) -> dict[str, Encoding]:
    """Encodings of the output's quantized layers (symmetric grids; others are stored as values)."""
    qcfg = (manifest.get("recipe", {}).get("prune", {}) or {}).get("quantize") or {}
    if not qcfg.get("symmetric", True):
        return {}
    found: dict[str, Encoding] = {}
    for row in rows:
        bits = row.get("quant_bits")
        if not bits:
            continue
        tensor = state[f"{row['layer']}.weight"]
        enc = encode_on_grid(tensor.reshape(tensor.shape[0], -1), int(bits), row.get("quant_group_size"))
        if enc is not None:
            found[row["layer"]] = enc
    return found


def compact_name(weights_file: str) -> str:
    """The compact file beside a dense weights file: ``model.compact.safetensors`` for ``model.safetensors``,
    ``model-00001-of-00004.compact.safetensors`` for that shard of a sharded output."""
    return weights_file.removesuffix(".safetensors") + ".compact.safetensors"


def compact_from_output(output_uri: str) -> dict[str, Any]:
    """Write the compact file(s) into a pruning output folder (or URI) and report their size.

    One compact file per dense weights file: ``model.compact.safetensors`` for a single ``model.safetensors``,
    one per shard for a sharded output (``model-00001-of-00004.compact.safetensors``...), so a sharded model is
    exported one shard at a time and never held whole. The pruned layers are the manifest's ``layers`` rows;
    layers the pipeline quantized (rows with ``quant_bits``) are stored as codes and scales when a symmetric grid
    reproduces them exactly.  Each file is checked before it is written: every restored tensor equals the dense
    file's bit for bit and the rebuilt dense file has the manifest's sha256.  The manifest is not changed.

    Returns:
        ``{"path", "paths", "dense_bytes", "compact_bytes", "ratio", "layers", "quantized_layers"}`` (``path``:
        the single compact file, or a pattern naming the shards' ones).
    """
    from cap_dist.output import INDEX, read_manifest, read_verified, weights_of
    from cap_dist.shards import open_weights

    manifest = read_manifest(output_uri)
    root = output_uri.rstrip("/")
    rows = manifest.get("layers", [])
    location = weights_of(root, manifest)
    if location.endswith(INDEX):
        read_verified(root, INDEX, manifest)                  # checked before it says which shards to read
        names = open_weights(location).names
    else:
        names = [location.rpartition("/")[2]]                 # checked below, with its bytes
    totals = {"dense_bytes": 0, "compact_bytes": 0, "layers": 0, "quantized_layers": 0}
    paths = []
    for name in names:
        dense = read_verified(root, name, manifest)
        state = safetensors_load(dense)
        here = [row for row in rows if f"{row['layer']}.weight" in state]
        layers = [row["layer"] for row in here]
        quant = _layer_encodings(state, here, manifest)
        blob = export_compact(state, layers, quant, dense=dense)
        restored = load_compact(blob)
        if set(restored) != set(state) or not all(_same_bits(restored[k], state[k]) for k in state):
            raise RuntimeError(f"the compact file of {root}/{name} does not restore its dense weights bit-exactly; "
                               "this is a bug in cap-dist, please report it")
        if dense_file_from_compact(blob) != dense:
            raise RuntimeError(f"the compact file of {root} does not rebuild {name}; this is a bug in cap-dist")
        path = f"{root}/{compact_name(name)}"
        atomic_write_bytes(path, blob)
        paths.append(path)
        for key, value in (("dense_bytes", len(dense)), ("compact_bytes", len(blob)), ("layers", len(layers)),
                           ("quantized_layers", len(quant))):
            totals[key] += value
        del dense, state, blob, restored
    pattern = paths[0] if len(paths) == 1 else f"{root}/model-*-of-{len(paths):05d}.compact.safetensors"
    return {"path": pattern, "paths": paths, **totals, "ratio": totals["compact_bytes"] / totals["dense_bytes"]}


def write_compact(output_uri: str, state: dict[str, torch.Tensor], layers: list[str],
                  quant: dict[str, Any] | None = None, *, dense: bytes | None = None) -> int:
    """Atomically write :func:`export_compact`'s bytes to ``output_uri`` (a file path or URI); returns their size."""
    blob = export_compact(state, layers, quant, dense=dense)
    atomic_write_bytes(output_uri, blob)
    return len(blob)
