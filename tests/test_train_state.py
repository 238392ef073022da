"""Train states: a resumed run is bit-identical to an uninterrupted one; bad states fail by name; no pickle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import Tensor, nn

from trainer.errors import TrainStateError
from trainer.runs.train_state import (
    list_states,
    load_train_state,
    newest_state,
    prune_states,
    save_train_state,
)
from trainer.training.optimizers import ParamGroup, build_optimizer, build_scheduler

TOTAL_STEPS, SAVE_AT = 12, 5
LRS = {"adamw": (1e-2, 3e-3), "adafactor": (1e-2, 3e-3), "prodigy": (1.0, 1.0)}  # Prodigy: one lr for all


class TinyModel(nn.Module):
    """Stands in for adapters: a 'unet' Linear with a DoRA-like magnitude, and a 'text encoder' Linear."""

    def __init__(self, seed: int, hidden: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.unet = nn.Linear(6, hidden)
        self.magnitude = nn.Parameter(torch.rand(hidden) + 0.5)
        self.text_encoder = nn.Linear(hidden, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.text_encoder(torch.tanh(self.unet(x)) * self.magnitude)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {name.replace(".", "/"): p for name, p in self.named_parameters()}


def setup(optimizer_name: str, seed: int, hidden: int = 8):
    model = TinyModel(seed, hidden)
    unet_lr, te_lr = LRS[optimizer_name]
    groups = [
        ParamGroup("unet", [*model.unet.parameters(), model.magnitude], unet_lr),
        ParamGroup("text_encoder_1", list(model.text_encoder.parameters()), te_lr),
    ]
    optimizer = build_optimizer(
        optimizer_name, groups, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8, no_decay=lambda p: p is model.magnitude
    )
    scheduler = build_scheduler("cosine", optimizer, warmup_steps=3, total_steps=TOTAL_STEPS)
    return model, optimizer, scheduler


def train(model: TinyModel, optimizer, scheduler, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)  # the batch depends on the step only, as after a resume
        x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def assert_identical(a, b) -> None:
    """Same structure, same python types, tensors equal bit for bit with the same dtype."""
    assert type(a) is type(b)
    if isinstance(a, Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_identical(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("optimizer_name", ["adamw", "adafactor", "prodigy"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, optimizer_name):
    straight = setup(optimizer_name, seed=0)
    train(*straight, range(TOTAL_STEPS))

    first = setup(optimizer_name, seed=0)
    train(*first, range(SAVE_AT))
    progress = {"step": SAVE_AT, "epoch": 1, "config": {"optimizer": optimizer_name}}
    state_dir = save_train_state(
        tmp_path, SAVE_AT, trainable=first[0].trainable(), optimizer=first[1], lr_scheduler=first[2], progress=progress
    )
    assert state_dir == tmp_path / "step-00000005"

    resumed = setup(optimizer_name, seed=1)  # different start: the load must overwrite everything
    loaded = load_train_state(
        state_dir, trainable=resumed[0].trainable(), optimizer=resumed[1], lr_scheduler=resumed[2]
    )
    assert loaded == {"progress": progress, "extra": None}
    assert_identical(resumed[1].state_dict(), first[1].state_dict())
    assert_identical(resumed[2].state_dict(), first[2].state_dict())
    train(*resumed, range(SAVE_AT, TOTAL_STEPS))

    assert_identical(resumed[0].trainable(), straight[0].trainable())
    assert_identical(resumed[1].state_dict(), straight[1].state_dict())
    assert resumed[2].get_last_lr() == straight[2].get_last_lr()
    assert [g["lr"] for g in resumed[1].param_groups] == [g["lr"] for g in straight[1].param_groups]
    assert resumed[1].param_groups[1]["name"] == "unet/no_decay" and resumed[1].param_groups[1]["weight_decay"] == 0


def save(root: Path, step: int, optimizer_name: str = "adamw", **kwargs) -> Path:
    model, optimizer, scheduler = setup(optimizer_name, seed=0)
    train(model, optimizer, scheduler, range(2))
    kwargs.setdefault("progress", {"step": step})
    return save_train_state(
        root, step, trainable=model.trainable(), optimizer=optimizer, lr_scheduler=scheduler, **kwargs
    )


def test_files_are_safetensors_and_plain_json(tmp_path):
    state_dir = save(tmp_path, 3)
    assert sorted(p.name for p in state_dir.iterdir()) == ["state.json", "tensors.safetensors"]
    tensors = safetensors.torch.load_file(state_dir / "tensors.safetensors")
    assert {"params/unet/weight", "params/magnitude", "optimizer/state/0/exp_avg"} <= tensors.keys()
    assert tensors["optimizer/state/0/step"].shape == () and tensors["optimizer/state/0/step"].dtype == torch.float32
    state = json.loads((state_dir / "state.json").read_text())
    assert state["optimizer"]["param_groups"][0]["betas"] == {"__tuple__": [0.9, 0.99]}
    assert state["optimizer_params"][0] == ["unet/weight", "unet/bias"]
    assert not any(name.startswith(".tmp-") for name in map(str, tmp_path.iterdir()))


def test_extra_keeps_tuples_tensor_dtypes_and_non_finite_floats(tmp_path):
    extra = {
        "rng": torch.get_rng_state(),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "n": torch.tensor(7),
        "flag": torch.tensor(True),
        "pair": (1, 2.5),
        "inf": float("inf"),
        "nan": float("nan"),
        "none": None,
    }
    state_dir = save(tmp_path, 3, extra=extra)
    model, optimizer, scheduler = setup("adamw", seed=0)
    loaded = load_train_state(state_dir, trainable=model.trainable(), optimizer=optimizer, lr_scheduler=scheduler)
    assert_identical(loaded["extra"], extra)


def test_unsaveable_values_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(TypeError, match="progress/path: a PosixPath is neither a tensor nor JSON"):
        save(tmp_path, 3, progress={"path": tmp_path})
    with pytest.raises(TypeError, match="dict key 1"):
        save(tmp_path, 3, extra={1: "int keys do not survive JSON"})
    assert list(tmp_path.iterdir()) == []


def test_every_optimizer_parameter_must_be_named(tmp_path):
    model, optimizer, scheduler = setup("adamw", seed=0)
    trainable = model.trainable()
    del trainable["magnitude"]
    with pytest.raises(ValueError, match="'unet/no_decay' holds a parameter that is not in `trainable`"):
        save_train_state(tmp_path, 1, trainable=trainable, optimizer=optimizer, lr_scheduler=scheduler, progress={})


def test_mismatched_states_name_the_problem(tmp_path):
    state_dir = save(tmp_path, 3)

    model, optimizer, scheduler = setup("adamw", seed=0)
    renamed = {("lora/" + k if k.startswith("unet") else k): p for k, p in model.trainable().items()}
    with pytest.raises(
        TrainStateError,
        match=r"step-00000003: parameter names differ: not in the state "
        r"lora/unet/bias, lora/unet/weight; only in the state unet/bias",
    ):
        load_train_state(state_dir, trainable=renamed, optimizer=optimizer, lr_scheduler=scheduler)

    model, optimizer, scheduler = setup("adamw", seed=0, hidden=5)
    with pytest.raises(TrainStateError, match=r"'magnitude' is \(8,\) float32 in the state but \(5,\) float32 here"):
        load_train_state(state_dir, trainable=model.trainable(), optimizer=optimizer, lr_scheduler=scheduler)

    model, optimizer, scheduler = setup("adafactor", seed=0)
    with pytest.raises(TrainStateError, match="optimizer kind differs: torch.optim.adamw.AdamW in the state"):
        load_train_state(state_dir, trainable=model.trainable(), optimizer=optimizer, lr_scheduler=scheduler)

    model, optimizer, scheduler = setup("adamw", seed=0)
    optimizer.param_groups.reverse()
    before = {k: p.detach().clone() for k, p in model.trainable().items()}
    with pytest.raises(TrainStateError, match="parameter groups or their order differ"):
        load_train_state(state_dir, trainable=model.trainable(), optimizer=optimizer, lr_scheduler=scheduler)
    assert_identical({k: p.detach() for k, p in model.trainable().items()}, before)  # checked before any change


def test_incomplete_and_corrupt_states(tmp_path):
    model, optimizer, scheduler = setup("adamw", seed=0)
    kwargs = {"trainable": model.trainable(), "optimizer": optimizer, "lr_scheduler": scheduler}
    state_dir = save(tmp_path, 3)
    (state_dir / "tensors.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(TrainStateError, match="step-00000003: unreadable"):
        load_train_state(state_dir, **kwargs)
    (state_dir / "state.json").unlink()
    with pytest.raises(TrainStateError, match="incomplete, needs both state.json and tensors.safetensors"):
        load_train_state(state_dir, **kwargs)


def test_only_complete_states_are_listed_and_pruning_keeps_the_newest(tmp_path):
    assert newest_state(tmp_path / "none yet") is None and prune_states(tmp_path / "none yet", 2) == []
    for step in (2, 10, 1, 3):
        save(tmp_path, step)
    crashed = tmp_path / ".tmp-step-00000099-0a1b2c"  # a save that died before its rename
    crashed.mkdir()
    (crashed / "tensors.safetensors").write_bytes(b"")
    incomplete = tmp_path / "step-00000050"
    incomplete.mkdir()
    (incomplete / "tensors.safetensors").write_bytes(b"")
    (tmp_path / "step-00000060").write_text("a file, not a folder")

    assert [p.name for p in list_states(tmp_path)] == [f"step-{n:08d}" for n in (1, 2, 3, 10)]
    assert newest_state(tmp_path) == tmp_path / "step-00000010"
    assert prune_states(tmp_path, 0) == [crashed] and not crashed.exists()
    assert len(list_states(tmp_path)) == 4
    assert prune_states(tmp_path, 2) == [tmp_path / "step-00000001", tmp_path / "step-00000002"]
    assert [p.name for p in list_states(tmp_path)] == ["step-00000003", "step-00000010"]
    assert incomplete.exists()  # not ours to judge: never listed, never deleted


def test_saving_a_step_again_replaces_it(tmp_path):
    save(tmp_path, 4, progress={"run": 1})
    state_dir = save(tmp_path, 4, progress={"run": 2})
    assert json.loads((state_dir / "state.json").read_text())["progress"] == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]
