"""The kohya ``.safetensors`` adapter file of ``docs/adapter-format.md`` (sections 1, 5, 6): write, read.

The writer is deterministic (sorted header, sorted metadata), so save -> load -> save is bit-exact;
safetensors' own writer orders metadata at random. The reader never unpickles anything, reports the
keys it does not understand by name, and raises ``AdapterFileError`` with the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from trainer.adapters.dora_norm import DORA_AXES, DoraAxis
from trainer.adapters.weights import AdapterWeights, dora_axis_from_shape
from trainer.errors import AdapterFileError
from trainer.files import PICKLE_SUFFIXES, write_bytes_atomically

DOWN, UP, ALPHA, DORA_SCALE = ".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale"
# PEFT / diffusers names map one to one onto kohya's (A = down, B = up).
_PART_SUFFIXES = {
    DOWN: DOWN,
    UP: UP,
    ALPHA: ALPHA,
    DORA_SCALE: DORA_SCALE,
    ".lora_A.weight": DOWN,
    ".lora_B.weight": UP,
}
# Keys of a stem we cannot merge (PEFT's output-axis magnitude, LoCon's Tucker mid): their stem is
# reported unknown as a whole rather than merged without them.
_FOREIGN_STEM_SUFFIXES = (".lora_magnitude_vector.weight", ".lora_magnitude_vector", ".lora_mid.weight")
_PEFT_PREFIXES = (("unet.", "lora_unet_"), ("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te1_"))
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
# The precisions a file may store, by the names the settings use (saving.save_dtype, training.mixed_precision).
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class LoadedAdapter:
    """What ``load_adapter`` found: adapters by kohya stem, metadata, and what it left out, by name."""

    adapters: dict[str, AdapterWeights]
    metadata: dict[str, str]
    unknown_keys: list[str]
    dtypes: dict[str, str]  # tensor key (normalised for adapter keys) -> "float16", "float32", ...


# ---------------------------------------------------------------- writing


def save_adapter(
    path: Path,
    adapters: Mapping[str, AdapterWeights],
    metadata: Mapping[str, str],
    dtype: torch.dtype = torch.float16,
) -> None:
    """Write ``adapters`` as a kohya file, atomically, with ``sshs_model_hash`` added to the metadata."""
    path = Path(path)
    if dtype not in DTYPES.values():
        raise ValueError(f"save dtype must be one of {list(DTYPES.values())}, got {dtype}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata {key!r}: keys and values must be str, got {type(value).__name__}")
    tensors = {key: t for stem in sorted(adapters) for key, t in _file_tensors(path, stem, adapters[stem], dtype)}
    blob = safetensors.torch.save(tensors)
    header_len = int.from_bytes(blob[:8], "little")
    entries = json.loads(blob[8 : 8 + header_len])
    data = memoryview(blob)[8 + header_len :]
    # kohya's precalculate_safetensors_hashes: sha256 of the bytes after the header (the tensor data).
    full_metadata = {**metadata, "sshs_model_hash": hashlib.sha256(data).hexdigest()}
    header = {"__metadata__": dict(sorted(full_metadata.items())), **{k: entries[k] for k in sorted(entries)}}
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep the data 8-byte aligned, as safetensors does
    write_bytes_atomically(path, (len(header_bytes).to_bytes(8, "little"), header_bytes, data))


def _file_tensors(path: Path, stem: str, weights: AdapterWeights, dtype: torch.dtype) -> list[tuple[str, Tensor]]:
    """The tensors of one stem in file layout and dtypes, checked."""
    if not stem or "." in stem:
        raise ValueError(f"stem {stem!r} must be non-empty and contain no dots")
    where = f"saving {path}"
    _check_pair(where, stem, weights.down, weights.up)
    tensors = [
        # Copies: safetensors refuses tensors that share storage (e.g. one tensor used by two stems).
        (stem + DOWN, _file_copy(weights.down, dtype)),
        (stem + UP, _file_copy(weights.up, dtype)),
        # alpha in fp32: fp16/bf16 would round a non-integer alpha and change gamma from what was trained.
        (stem + ALPHA, torch.tensor(float(weights.alpha), dtype=torch.float32)),
    ]
    if weights.dora_scale is not None:
        # Never 1-D, never a shape that fits neither axis (docs/adapter-format.md section 1).
        _check_scale_shape(
            where, stem, weights.dora_scale, weights.up.shape[0], weights.down.shape[1], weights.down.dim()
        )
        # bf16 keeps 8 bits of mantissa: rounding m rescales whole columns by up to 0.4 %, so bf16
        # saves store it in fp32 (exact for a bf16-trained m, and what every loader reads).
        scale_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        tensors.append((stem + DORA_SCALE, _file_copy(weights.dora_scale, scale_dtype)))
    _check_finite(where, stem, (t for _, t in tensors))
    return tensors


def as_saved(weights: AdapterWeights, dtype: torch.dtype) -> AdapterWeights:
    """The layer exactly as ``save_adapter(..., dtype)`` stores it and ``load_adapter`` reads it back: what a
    tool reports its errors on, before it writes the file."""
    tensors = dict(_file_tensors(Path("<memory>"), "stem", weights, dtype))
    return AdapterWeights(
        down=tensors["stem" + DOWN],
        up=tensors["stem" + UP],
        alpha=float(tensors["stem" + ALPHA]),
        dora_scale=tensors.get("stem" + DORA_SCALE),
    )


def factor_dtype(loaded: LoadedAdapter) -> torch.dtype:
    """The dtype a file's factors are stored in, to write a derived file the same way (fp16 when mixed)."""
    found = {dtype for key, dtype in loaded.dtypes.items() if key.endswith(DOWN)}
    names = {str(dtype).removeprefix("torch."): dtype for dtype in DTYPES.values()}
    return names.get(found.pop(), torch.float16) if len(found) == 1 else torch.float16


def _file_copy(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor.detach().to("cpu", dtype, copy=True).contiguous()


# ---------------------------------------------------------------- reading


def load_adapter(path: Path) -> LoadedAdapter:
    """Read a kohya / LyCORIS / OneTrainer / PEFT-named LoRA or DoRA file without unpickling anything."""
    path = Path(path)
    metadata = _read_metadata(path)
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise AdapterFileError.at(
            path, f"the tensors cannot be read ({err}); the file is corrupt: download or export it again"
        ) from None
    parts, unknown_keys = _group_by_stem(path, tensors)
    axis_hint = _axis_hint(metadata)
    adapters: dict[str, AdapterWeights] = {}
    dtypes: dict[str, str] = {key: _dtype_name(tensors[key]) for key in unknown_keys}
    for stem, found in sorted(parts.items()):
        adapters[stem] = _stem_weights(path, stem, {part: tensors[key] for part, key in found.items()}, axis_hint)
        dtypes |= {stem + part: _dtype_name(tensors[key]) for part, key in found.items()}
    if not adapters:
        detail = (
            (
                f"its {len(unknown_keys)} keys (e.g. {unknown_keys[:3]}) are of a kind this tool does not "
                "read (LoHa, LoKr, full diff, embeddings...)"
            )
            if unknown_keys
            else "it holds no tensors"
        )
        raise AdapterFileError.at(path, f"contains no LoRA/DoRA layers: {detail}; choose a LoRA or DoRA file")
    return LoadedAdapter(adapters, metadata, sorted(unknown_keys), dtypes)


def rename_stems(loaded: LoadedAdapter, aliases: Mapping[str, str]) -> LoadedAdapter:
    """Apply a stem mapping (e.g. diffusers-underscore -> SGM from ``trainer.sdxl.naming``), leaving others."""
    renamed: dict[str, str] = {}  # new stem -> old stem
    for stem in loaded.adapters:
        new = aliases.get(stem, stem)
        if new in renamed:
            raise AdapterFileError.at(
                stem,
                f"{renamed[new]!r} and {stem!r} both become {new!r}: the file "
                "holds the same layer twice; keep one of them",
            )
        renamed[new] = stem

    def rename_key(key: str) -> str:
        stem, dot, rest = key.partition(".")
        return aliases.get(stem, stem) + dot + rest if stem in loaded.adapters else key

    return replace(
        loaded,
        adapters={new: loaded.adapters[old] for new, old in renamed.items()},
        dtypes={rename_key(key): dtype for key, dtype in loaded.dtypes.items()},
    )


def _read_metadata(path: Path) -> dict[str, str]:
    """Check the container by hand before safetensors sees it, so every failure gets a clear message."""
    if not path.is_file():
        raise AdapterFileError.at(path, "no such adapter file; check the path and its spelling")
    size = path.stat().st_size
    if size == 0:
        raise AdapterFileError.at(
            path, "the file is empty (0 bytes): the export or download was interrupted; do it again"
        )
    with path.open("rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        raw = f.read(header_len) if 2 <= header_len <= min(_MAX_HEADER_BYTES, size - 8) else b""
    try:
        header = json.loads(raw) if raw[:1] == b"{" else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        if prefix[:1] == b"\x80" or prefix[:4] == b"PK\x03\x04" or path.suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterFileError.at(
                path,
                "a pickle / PyTorch checkpoint, not a safetensors file. It was not opened, because "
                "unpickling can run arbitrary code; get the .safetensors version or convert it with a tool you trust",
            )
        raise AdapterFileError.at(
            path, "not a safetensors file, or its header is truncated or corrupt; download or export it again"
        )
    try:
        data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise AdapterFileError.at(path, "corrupt safetensors header; download or export it again") from None
    if 8 + header_len + data_end > size:
        raise AdapterFileError.at(
            path,
            f"the file is truncated: its header describes {data_end} bytes of tensor data but "
            f"only {size - 8 - header_len} are there; download or export it again",
        )
    metadata = header.get("__metadata__") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise AdapterFileError.at(path, "metadata values must be strings; the file is corrupt")
    return dict(metadata)


def _normalise_stem(raw: str) -> str:
    """Kohya stem of a key prefix: PEFT/diffusers dotted paths to ``lora_unet_`` / ``lora_teN_`` stems."""
    for prefix, kohya in _PEFT_PREFIXES:
        if raw.startswith(prefix):
            raw = kohya + raw[len(prefix) :]
            break
    # transformers >= 5.6 dropped text_model from CLIP paths; kohya stems keep it (docs/adapter-format.md section 2).
    return re.sub(r"^(lora_te[12]_)(encoder_layers_)", r"\1text_model_\2", raw.replace(".", "_"))


def _group_by_stem(path: Path, tensors: Mapping[str, Tensor]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Stem -> {part suffix: original key} for stems we can merge; every other key by name."""
    parts: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    foreign_stems: set[str] = set()
    for key in tensors:
        suffix = next((s for s in _PART_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            foreign = next((s for s in _FOREIGN_STEM_SUFFIXES if key.endswith(s)), None)
            foreign_stems.add(_normalise_stem(key[: -len(foreign)] if foreign else key.partition(".")[0]))
            continue
        stem, part = _normalise_stem(key[: -len(suffix)]), _PART_SUFFIXES[suffix]
        found = parts.setdefault(stem, {})
        if part in found:
            raise AdapterFileError.at(
                path,
                f"keys {found[part]!r} and {key!r} are the same tensor of stem "
                f"{stem!r}; the file mixes two formats of one layer: keep one",
            )
        found[part] = key
    for stem in list(parts):
        if stem in foreign_stems or not ({DOWN, UP} & parts[stem].keys()):
            unknown += parts.pop(stem).values()
        elif len({DOWN, UP} & parts[stem].keys()) == 1:
            missing = UP if DOWN in parts[stem] else DOWN
            raise AdapterFileError.at(
                path, f"stem {stem!r} has no {missing.lstrip('.')} tensor; the file is incomplete: export it again"
            )
    return parts, unknown


def _axis_hint(metadata: Mapping[str, str]) -> DoraAxis:
    """Axis for a 1-D dora_scale on a square layer: our key, else kohya/LyCORIS ``wd_on_output``, else input."""
    if metadata.get("dora_studio.dora_axis") in DORA_AXES:
        return metadata["dora_studio.dora_axis"]  # type: ignore[return-value]
    try:
        network_args = json.loads(metadata.get("ss_network_args", "{}"))
    except json.JSONDecodeError:
        network_args = None
    args = network_args if isinstance(network_args, dict) else {}
    return "output" if str(args.get("wd_on_output", metadata.get("wd_on_output"))).lower() == "true" else "input"


def _stem_weights(path: Path, stem: str, found: Mapping[str, Tensor], axis_hint: DoraAxis) -> AdapterWeights:
    """One stem's tensors, checked, with alpha defaulted and a 1-D dora_scale given its file shape."""
    down, up = found[DOWN], found[UP]
    where = str(path)
    _check_pair(where, stem, down, up)
    _check_finite(where, stem, found.values())
    alpha = found.get(ALPHA)
    if alpha is not None and alpha.numel() != 1:
        raise AdapterFileError.at(
            where, f"{stem}.alpha has shape {tuple(alpha.shape)}, not a scalar; the file is corrupt"
        )
    dora_scale = found.get(DORA_SCALE)
    if dora_scale is not None:
        dora_scale = _dora_scale_layout(where, stem, dora_scale, up.shape[0], down.shape[1], down.dim(), axis_hint)
    # A missing alpha means gamma = 1 in every loader (docs/adapter-format.md section 1).
    return AdapterWeights(down, up, float(alpha.item()) if alpha is not None else float(down.shape[0]), dora_scale)


def _dora_scale_layout(
    where: str, stem: str, scale: Tensor, out_features: int, in_features: int, dims: int, axis_hint: DoraAxis
) -> Tensor:
    """Give a 1-D magnitude (written by some buggy tools) the (1, in, ..) / (out, 1, ..) shape; check others."""
    if scale.dim() == 1:
        n = scale.shape[0]
        if n not in (in_features, out_features):
            raise AdapterFileError.at(
                where,
                f"{stem}.dora_scale has {n} values but the layer has in={in_features}, "
                f"out={out_features}; the file is corrupt",
            )
        axis = axis_hint if in_features == out_features else ("input" if n == in_features else "output")
        shape = (1, in_features) if axis == "input" else (out_features, 1)
        scale = scale.reshape(*shape, *[1] * (dims - 2))
    _check_scale_shape(where, stem, scale, out_features, in_features, dims)
    return scale


def _check_scale_shape(where: str, stem: str, scale: Tensor, out_features: int, in_features: int, dims: int) -> None:
    """dora_scale must be (1, in[, 1, 1]) or (out, 1[, 1, 1]) with the layer's number of dims."""
    try:
        dora_axis_from_shape(tuple(scale.shape), out_features, in_features)
    except ValueError as err:
        raise AdapterFileError.at(where, f"{stem}: {err}; export the file again") from None
    if scale.dim() != dims:
        raise AdapterFileError.at(
            where, f"{stem}.dora_scale has shape {tuple(scale.shape)} for a {dims}-D layer; export the file again"
        )


def _check_pair(where: str, stem: str, down: Tensor, up: Tensor) -> None:
    """down (r, in[, kh, kw]) and up (out, r[, 1, 1]) must fit together (docs/adapter-format.md section 1)."""
    fits = (
        down.dim() in (2, 4)
        and up.dim() == down.dim()
        and up.shape[1] == down.shape[0]
        and all(k == 1 for k in up.shape[2:])
    )
    if not fits:
        raise AdapterFileError.at(
            where,
            f"stem {stem!r}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} do not fit "
            "(expected down (r, in[, kh, kw]) and up (out, r[, 1, 1])); the file is damaged: export it again",
        )


def _check_finite(where: str, stem: str, tensors: Iterable[Tensor]) -> None:
    """Refuse NaN/Inf: every front end would merge them into the model silently."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise AdapterFileError.at(
            where,
            f"stem {stem!r} has NaN or Inf values (training diverged, or fp16 "
            "overflow); use an earlier checkpoint or save in float32 / bfloat16",
        )


def _dtype_name(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")
