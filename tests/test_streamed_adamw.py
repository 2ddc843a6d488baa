"""The streamed optimizer: AdamW one parameter at a time, moments on the device, in host
memory or in a scratch file, steps inside backward. It must move the weights exactly as
torch's fused AdamW after ``clip_grad_norm_`` does, while never holding more than one
parameter's gradient in the in-backward mode."""

import glob
import itertools

import pytest
import torch

from antipers.attacks.streamed_adamw import StreamedAdamW
from antipers.attacks.training import TrainConfig, TrainData, finetune


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleDict(
        {
            "a": torch.nn.Linear(6, 8),
            "b": torch.nn.Linear(8, 3),
            "sometimes": torch.nn.Linear(3, 3),  # no gradient at even steps
        }
    )


def _loss(model: torch.nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
    y = model["b"](torch.tanh(model["a"](x)))
    if step % 2:
        y = model["sometimes"](y)
    return (y**2).sum() * 10  # large enough for a clip at 0.05 to act


@pytest.mark.parametrize(
    ("place", "in_backward", "clip"),
    list(itertools.product(["device", "cpu", "disk"], [True, False], [0.05, None])),
)
def test_weights_move_bitwise_as_torchs_adamw(place, in_backward, clip, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTIPERS_SCRATCH", str(tmp_path))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    plain, streamed = _model(), _model()
    reference = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=1e-2, fused=True)
    optimizer = StreamedAdamW(streamed.parameters(), 1e-2, 1e-2, clip, place, total_steps=5)
    # the learning rate comes from a schedule, as in finetune
    schedules = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1 / (k + 1)) for o in (reference, optimizer)
    ]
    with optimizer:
        for step in range(5):
            _loss(plain, x, step).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(list(plain.parameters()), clip, foreach=True)
            reference.step()
            reference.zero_grad()
            loss = _loss(streamed, x, step)
            optimizer.backprop(loss) if in_backward else loss.backward()
            optimizer.step()
            for schedule in schedules:
                schedule.step()
            assert all(p.grad is None for p in streamed.parameters())
            if place == "disk":
                assert len(glob.glob(str(tmp_path / "antipers-moments-*"))) == 1
    moved = [
        not torch.equal(p, q)
        for p, q in zip(plain.parameters(), _model().parameters(), strict=True)
    ]
    assert all(moved)
    for p, q in zip(plain.parameters(), streamed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not glob.glob(str(tmp_path / "antipers-moments-*"))  # removed on close


def test_in_backward_no_two_gradients_exist_at_once():
    model = _model()
    held = []

    def count(_: torch.nn.Parameter) -> None:
        held.append(sum(p.grad is not None for p in model.parameters()))

    for p in model.parameters():  # fires before the optimizer's own hooks
        p.register_post_accumulate_grad_hook(count)
    x = torch.randn(5, 6)
    with StreamedAdamW(model.parameters(), 1e-2, 0.0, 1.0, "cpu") as optimizer:
        optimizer.backprop(_loss(model, x, 1))
        optimizer.step()
    assert len(held) == 2 * 6  # the norms' pass, then the steps' pass, over 6 tensors
    assert max(held) == 1
    # torch's backward holds them all before a step: the counter sees them pile up
    held.clear()
    _loss(model, x, 1).backward()
    assert max(held) == 6


def test_bad_place_is_refused():
    with pytest.raises(ValueError, match="optimizer state place: expected one of"):
        StreamedAdamW(_model().parameters(), 1e-2, 0.0, None, "gpu")


def test_finetune_removes_the_moments_file_when_a_step_fails(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTIPERS_SCRATCH", str(tmp_path))
    params = [p for p in tiny_bundle.unet.parameters()]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    config = TrainConfig(steps=3, lr=1e-3, optimizer_state="disk", steps_in_backward=True)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    seen = []

    def fail_at_second(step: int, loss: float) -> None:
        seen.append(glob.glob(str(tmp_path / "antipers-moments-*")))
        if step == 1:
            raise RuntimeError("a step failed")

    try:
        with pytest.raises(RuntimeError, match="a step failed"):
            finetune(
                tiny_bundle,
                TrainData(images, "a photo"),
                params,
                config,
                torch.Generator().manual_seed(0),
                on_step=fail_at_second,
            )
    finally:
        with torch.no_grad():
            for p, b in zip(params, before, strict=True):
                p.copy_(b)
                p.requires_grad_(False)
    assert [len(files) for files in seen] == [1, 1]
    assert not glob.glob(str(tmp_path / "antipers-moments-*"))
