"""The streamed optimizer: AdamW one parameter at a time, moments on the device, in host
memory or in a scratch file, steps inside backward. It must move the weights exactly as
torch's fused AdamW after ``clip_grad_norm_`` does, while never holding more than one
parameter's gradient in the in-backward mode."""

import glob
import itertools
import os

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


def test_a_channels_last_weight_keeps_its_layout_on_disk(tmp_path, monkeypatch):
    """The fused kernel pairs a weight's and its moments' elements in storage order."""
    monkeypatch.setenv("ANTIPERS_SCRATCH", str(tmp_path))
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    convs = []
    for _ in range(2):
        torch.manual_seed(0)
        convs.append(torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last))
    plain, streamed = convs
    assert not plain.weight.is_contiguous()  # the case under test
    reference = torch.optim.AdamW(plain.parameters(), lr=1e-2, fused=True)
    with StreamedAdamW(streamed.parameters(), 1e-2, 1e-2, None, "disk") as optimizer:
        for _ in range(3):
            plain(x).square().sum().backward()
            reference.step()
            reference.zero_grad()
            streamed(x).square().sum().backward()
            optimizer.step()
    for p, q in zip(plain.parameters(), streamed.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("clip", [1.0, None])
def test_a_graph_that_reads_an_updated_weight_raises(clip):
    """A weight saved through ``.detach()`` before its own use is read after its update:
    autograd must refuse, not compute with the new value."""
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)  # not the optimizer's: its gradient needs W
    loss = lin(x @ lin.weight.detach().T).sum()
    with (
        StreamedAdamW(lin.parameters(), 1e-2, 0.0, clip, "device") as optimizer,
        pytest.raises(RuntimeError, match="modified by an inplace operation"),
    ):
        optimizer.backprop(loss)


@pytest.mark.parametrize("in_backward", [True, False])
def test_stepping_past_the_planned_steps_is_refused(in_backward):
    model = _model()
    x = torch.randn(5, 6)
    with StreamedAdamW(model.parameters(), 1e-2, 0.0, None, "cpu", total_steps=1) as optimizer:

        def one_step() -> None:
            loss = _loss(model, x, 0)
            optimizer.backprop(loss) if in_backward else loss.backward()
            optimizer.step()

        one_step()
        with pytest.raises(RuntimeError, match="1 steps were planned"):
            one_step()


def test_the_moments_room_is_reserved_when_built(tmp_path, monkeypatch):
    """A full disk must be an error before the first weight moves, not midway."""
    monkeypatch.setenv("ANTIPERS_SCRATCH", str(tmp_path))
    model = _model()
    with StreamedAdamW(model.parameters(), 1e-2, 0.0, None, "disk"):
        (path,) = glob.glob(str(tmp_path / "antipers-moments-*"))
        size = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
        stat = os.stat(path)
        assert stat.st_size == size
        assert stat.st_blocks * 512 >= size  # allocated, not a sparse hole


def test_one_optimizer_state_and_group_only():
    optimizer = StreamedAdamW(_model().parameters(), 1e-2, 0.0, None, "cpu")
    for call in (
        optimizer.state_dict,
        lambda: optimizer.load_state_dict({}),
        lambda: optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]}),
    ):
        with pytest.raises(NotImplementedError, match="StreamedAdamW"):
            call()


@pytest.mark.parametrize(
    ("config", "streamed"),
    [
        ({"optimizer_state": "device", "steps_in_backward": True}, True),
        ({"optimizer_state": "device", "steps_in_backward": True, "grad_accum": 2}, False),
        ({"optimizer_state": "disk", "steps_in_backward": True, "grad_accum": 2}, True),
        ({"optimizer_state": "device", "steps_in_backward": False}, False),
    ],
)
def test_moments_on_the_device_without_a_step_in_backward_use_torchs_adamw(config, streamed):
    from antipers.attacks.training import _optimizer

    params = list(_model().parameters())
    full = TrainConfig(steps=2, lr=1e-3, **config)
    one_pass = full.grad_accum == 1
    chosen, _ = _optimizer(params, full, one_pass)
    assert isinstance(chosen, StreamedAdamW) == streamed
    if not streamed:
        assert type(chosen) is torch.optim.AdamW


@pytest.fixture
def unet_params(tiny_bundle):
    """The tiny UNet's weights, trainable for one test and restored after."""
    params = list(tiny_bundle.unet.parameters())
    before = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    yield params
    with torch.no_grad():
        for p, b in zip(params, before, strict=True):
            p.copy_(b)
            p.grad = None
            p.requires_grad_(False)


def _finetune(bundle, params, config, on_step=None):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    data = TrainData(images, "a photo")
    return finetune(bundle, data, params, config, torch.Generator().manual_seed(0), on_step=on_step)


@pytest.mark.parametrize(
    "split",
    [{"grad_accum": 2}, {"batch_size": 2, "step_images": 1}],
    ids=["accumulation", "split-step"],
)
def test_finetune_falls_back_to_one_step_after_backward_and_matches_torch(
    split, tiny_bundle, unet_params, tmp_path, monkeypatch
):
    """Several backward passes per step: the gradients accumulate, then the streamed step
    clips and updates as torch does."""
    monkeypatch.setenv("ANTIPERS_SCRATCH", str(tmp_path))
    initial = [p.detach().clone() for p in unet_params]
    out = {}
    for streamed in (False, True):
        with torch.no_grad():
            for p, b in zip(unet_params, initial, strict=True):
                p.copy_(b)
        extra = {"optimizer_state": "disk", "steps_in_backward": True} if streamed else {}
        config = TrainConfig(steps=3, lr=1e-3, max_grad_norm=0.01, **split, **extra)
        losses = _finetune(tiny_bundle, unet_params, config)
        out[streamed] = (losses, [p.detach().clone() for p in unet_params])
    assert out[True][0] == out[False][0]
    assert all(torch.equal(a, b) for a, b in zip(out[True][1], out[False][1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(out[True][1], initial, strict=True))


def test_a_split_step_with_moments_on_the_device_uses_torchs_adamw(
    tiny_bundle, unet_params, monkeypatch
):
    built = []
    real = StreamedAdamW.__init__

    def spy(self, *args, **kwargs):
        built.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(StreamedAdamW, "__init__", spy)
    for step_images, expected in ((1, []), (2, [1])):  # 2 photos a step: split, then one pass
        built.clear()
        config = TrainConfig(
            steps=1, lr=1e-3, batch_size=2, step_images=step_images, steps_in_backward=True
        )
        _finetune(tiny_bundle, unet_params, config)
        assert built == expected


def test_finetune_removes_the_moments_file_when_a_step_fails(
    tiny_bundle, unet_params, tmp_path, monkeypatch
):
    monkeypatch.setenv("ANTIPERS_SCRATCH", str(tmp_path))
    config = TrainConfig(steps=3, lr=1e-3, optimizer_state="disk", steps_in_backward=True)
    seen = []

    def fail_at_second(step: int, loss: float) -> None:
        seen.append(glob.glob(str(tmp_path / "antipers-moments-*")))
        if step == 1:
            raise RuntimeError("a step failed")

    with pytest.raises(RuntimeError, match="a step failed"):
        _finetune(tiny_bundle, unet_params, config, on_step=fail_at_second)
    assert [len(files) for files in seen] == [1, 1]
    assert not glob.glob(str(tmp_path / "antipers-moments-*"))


@pytest.mark.parametrize("failing_pass", [1, 2], ids=["norms-pass", "update-pass"])
def test_a_failure_inside_backward_leaves_no_hooks_and_no_file(
    failing_pass, tiny_bundle, unet_params, tmp_path, monkeypatch
):
    monkeypatch.setenv("ANTIPERS_SCRATCH", str(tmp_path))
    calls = []

    def fail_once(grad: torch.Tensor) -> None:
        calls.append(1)
        if len(calls) == failing_pass:
            raise RuntimeError("backward failed")

    def watch(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.register_hook(fail_once)  # the UNet's first layer's output raises on its way back

    handle = tiny_bundle.unet.conv_in.register_forward_hook(watch)
    config = TrainConfig(steps=2, lr=1e-3, optimizer_state="disk", steps_in_backward=True)
    try:
        with pytest.raises(RuntimeError, match="backward failed"):
            _finetune(tiny_bundle, unet_params, config)
    finally:
        handle.remove()
    assert not glob.glob(str(tmp_path / "antipers-moments-*"))
    # the optimizer's hooks are gone: a plain backward leaves every gradient in place
    latents = torch.randn(1, 4, 2, 2)
    cond = tiny_bundle.prompt_embeds(["a photo"])
    tiny_bundle.unet(
        latents, torch.tensor([10]), encoder_hidden_states=cond
    ).sample.sum().backward()
    assert all(p.grad is not None for p in unet_params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("place", ["cpu", "device"])
def test_on_a_gpu_moments_in_host_memory_move_weights_as_torchs_adamw(place):
    """The lean plan's GPU path: moments copied to host buffers and back every step."""
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1)).cuda()
    plain, streamed = _model().cuda(), _model().cuda()
    reference = torch.optim.AdamW(plain.parameters(), lr=1e-2, fused=True)
    with StreamedAdamW(streamed.parameters(), 1e-2, 1e-2, 0.05, place, total_steps=4) as opt:
        for step in range(4):
            _loss(plain, x, step).backward()
            torch.nn.utils.clip_grad_norm_(list(plain.parameters()), 0.05, foreach=True)
            reference.step()
            reference.zero_grad()
            opt.backprop(_loss(streamed, x, step))
            opt.step()
    for p, q in zip(plain.parameters(), streamed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)  # backward kernels may differ
