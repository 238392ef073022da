"""Training state for resume (trainable weights, optimizer, lr schedule, progress) with no pickle anywhere.

A state is a folder ``step-00000120/`` holding ``tensors.safetensors`` (every tensor) and ``state.json``
(everything else, tensors replaced by ``{"__tensor__": key}``, tuples by ``{"__tuple__": [...]}`` so
torch gets back exactly what it saved). The folder is written whole (``trainer.files.atomic_folder``),
so a ``step-*`` folder is always complete. Loading checks names, shapes, dtypes
and the optimizer's kind and parameter order before touching anything, so a wrong state fails with
``TrainStateError`` instead of resuming into silently different training.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch.optim.lr_scheduler import LRScheduler

from trainer.errors import TrainStateError
from trainer.files import atomic_folder, remove_staging_folders

TENSORS_FILE, JSON_FILE = "tensors.safetensors", "state.json"
_FORMAT, _VERSION = "dora-studio/train-state", 1
_STATE_DIR = re.compile(r"step-(\d+)")
_TENSOR, _TUPLE = "__tensor__", "__tuple__"  # the only keys a JSON object may have to mean "not a dict"


def save_train_state(
    states_root: Path,
    step: int,
    *,
    trainable: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: LRScheduler,
    progress: dict,
    extra: dict | None = None,
) -> Path:
    """Write ``states_root/step-<step>`` atomically and return it; an existing state of that step is replaced.

    ``trainable`` must hold every parameter the optimizer updates (the same tensor objects): that is
    how optimizer state is tied to names, and a parameter left out could not be restored.
    ``progress`` and ``extra`` may hold JSON values, tuples and tensors; anything else is refused.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "format": _FORMAT,
        "version": _VERSION,
        "step": step,
        "optimizer_class": _class_name(optimizer),
        "optimizer_params": _optimizer_param_names(optimizer, trainable),
        "optimizer": _encode_optimizer(optimizer.state_dict(), tensors),
        "lr_scheduler_class": _class_name(lr_scheduler),
        # diffusers' schedules are LambdaLR over plain functions, which LambdaLR.state_dict stores as
        # None: only the counters and lrs are saved; build_scheduler rebuilds the functions from config.
        "lr_scheduler": _encode(lr_scheduler.state_dict(), "lr_scheduler", tensors),
        "progress": _encode(progress, "progress", tensors),
        "extra": _encode(extra, "extra", tensors),
    }
    for name, tensor in trainable.items():
        _encode(tensor, f"params/{name}", tensors)
    text = json.dumps(state, indent=1)  # before any file exists: a refused value leaves nothing behind
    final = Path(states_root) / f"step-{step:08d}"
    with atomic_folder(final, if_exists="replace") as staging:
        safetensors.torch.save_file(tensors, staging / TENSORS_FILE)
        (staging / JSON_FILE).write_text(text, encoding="utf-8")
    return final


def load_train_state(
    state_dir: Path,
    *,
    trainable: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: LRScheduler,
) -> dict:
    """Fill ``trainable`` in place and restore optimizer and schedule; return ``{"progress", "extra"}``.

    The optimizer and schedule must be built the same way as for the saved run (kind, groups, order).
    """
    state_dir = Path(state_dir)
    state, tensors = _read(state_dir)

    def fail(problem: str) -> TrainStateError:
        return TrainStateError.at(f"train state {state_dir}", problem)

    saved = {key.removeprefix("params/"): t for key, t in tensors.items() if key.startswith("params/")}
    missing, unexpected = sorted(trainable.keys() - saved.keys()), sorted(saved.keys() - trainable.keys())
    if missing or unexpected:
        raise fail(f"parameter names differ: not in the state {_few(missing)}; only in the state {_few(unexpected)}")
    for name, param in trainable.items():
        if saved[name].shape != param.shape or saved[name].dtype != param.dtype:
            raise fail(f"parameter {name!r} is {_describe(saved[name])} in the state but {_describe(param)} here")
    for key, here in (("optimizer_class", _class_name(optimizer)), ("lr_scheduler_class", _class_name(lr_scheduler))):
        if state.get(key) != here:
            raise fail(f"{key.removesuffix('_class')} kind differs: {state.get(key)} in the state, {here} here")
    try:
        order = _optimizer_param_names(optimizer, trainable)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if state.get("optimizer_params") != order:
        raise fail("the optimizer's parameter groups or their order differ from the saved run's")
    try:
        optimizer_state = _decode_optimizer(state["optimizer"], tensors)
        scheduler_state = _decode(state["lr_scheduler"], tensors)
        result = {"progress": _decode(state["progress"], tensors), "extra": _decode(state["extra"], tensors)}
    except (KeyError, TypeError, ValueError) as exc:
        raise fail(f"state.json is malformed ({exc})") from None

    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name])
    optimizer.load_state_dict(optimizer_state)
    lr_scheduler.load_state_dict(scheduler_state)
    return result


def read_state_extra(state_dir: Path) -> dict:
    """The caller's ``extra`` alone (e.g. the run's settings), to check a resume before loading anything."""
    state, tensors = _read(Path(state_dir))
    return _decode(state["extra"], tensors)


def list_states(states_root: Path) -> list[Path]:
    """Complete state folders under ``states_root``, oldest (lowest step) first."""
    states_root = Path(states_root)
    if not states_root.is_dir():
        return []
    found = []
    for path in states_root.iterdir():
        match = _STATE_DIR.fullmatch(path.name)
        if match and (path / JSON_FILE).is_file() and (path / TENSORS_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def newest_state(states_root: Path) -> Path | None:
    """The complete state with the highest step, or None when there is none to resume from."""
    states = list_states(states_root)
    return states[-1] if states else None


def prune_states(states_root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` states (``<= 0`` keeps all) and leftover temp folders.

    Returns the deleted paths. Only this trainer writes ``states_root``, so a ``.tmp-*`` folder seen
    here was left by a crashed save.
    """
    states = list_states(states_root)
    doomed = states[:-keep_last] if keep_last > 0 else []
    for path in doomed:
        shutil.rmtree(path)
    return doomed + remove_staging_folders(Path(states_root))


# ---------------------------------------------------------------- encoding


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, its tensors moved to ``tensors`` under ``path``-derived keys; refuses the rest."""
    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two tensors would be stored under the key {path!r}")
        # A contiguous CPU copy: safetensors needs contiguous, unshared storage and the caller keeps training.
        tensors[path] = value.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
        return {_TENSOR: path}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, f"{path}/{i}", tensors) for i, item in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or key in (_TENSOR, _TUPLE):
                raise TypeError(
                    f"{path}: dict key {key!r} cannot be saved (keys must be strings other than "
                    f"{_TENSOR!r} and {_TUPLE!r})"
                )
            out[key] = _encode(item, f"{path}/{key}", tensors)
        return out
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return float(value)  # Infinity and NaN included: the json module writes and reads them
    raise TypeError(f"{path}: a {type(value).__qualname__} is neither a tensor nor JSON; refusing to pickle it")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if isinstance(value, dict):
        if value.keys() == {_TENSOR}:
            return tensors[value[_TENSOR]]
        if value.keys() == {_TUPLE}:
            return tuple(_decode(item, tensors) for item in value[_TUPLE])
        return {key: _decode(item, tensors) for key, item in value.items()}
    return value


def _encode_optimizer(state_dict: dict, tensors: dict[str, torch.Tensor]) -> dict:
    # Per-parameter state is keyed by int index, which JSON cannot hold as a key: stored as "0", "1", ...
    per_param = {
        str(index): _encode(s, f"optimizer/state/{index}", tensors) for index, s in state_dict["state"].items()
    }
    rest = {key: value for key, value in state_dict.items() if key != "state"}
    return {"state": per_param, **_encode(rest, "optimizer", tensors)}


def _decode_optimizer(encoded: dict, tensors: Mapping[str, torch.Tensor]) -> dict:
    per_param = {int(index): _decode(s, tensors) for index, s in encoded["state"].items()}
    rest = {key: _decode(value, tensors) for key, value in encoded.items() if key != "state"}
    return {"state": per_param, **rest}


# ---------------------------------------------------------------- helpers


def _read(state_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not (state_dir / JSON_FILE).is_file() or not (state_dir / TENSORS_FILE).is_file():
        raise TrainStateError.at(f"train state {state_dir}", f"incomplete, needs both {JSON_FILE} and {TENSORS_FILE}")
    try:
        state = json.loads((state_dir / JSON_FILE).read_text(encoding="utf-8"))
        tensors = safetensors.torch.load_file(state_dir / TENSORS_FILE)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as exc:
        raise TrainStateError.at(f"train state {state_dir}", f"unreadable ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT or state.get("version") != _VERSION:
        raise TrainStateError.at(f"train state {state_dir}", f"not a {_FORMAT} version {_VERSION} state.json")
    return state, tensors


def _optimizer_param_names(optimizer: torch.optim.Optimizer, trainable: Mapping[str, torch.Tensor]) -> list:
    """Names of the optimizer's parameters, per group in order: what its int-indexed state refers to."""
    names = {id(tensor): name for name, tensor in trainable.items()}
    order = []
    for group in optimizer.param_groups:
        if any(id(p) not in names for p in group["params"]):
            raise ValueError(
                f"optimizer group {group.get('name', len(order))!r} holds a parameter that is not "
                "in `trainable`; a resume could not restore it"
            )
        order.append([names[id(p)] for p in group["params"]])
    return order


def _class_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "(none)"
    shown = ", ".join(names[:limit])
    return f"{shown} (+{len(names) - limit} more)" if len(names) > limit else shown
