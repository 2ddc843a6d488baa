"""The memory plan: snapshots restore exactly wherever they live, and the lean plan
(disk snapshots, gradient checkpointing, set_A encoded once, PGD in chunks) protects
photos bit for bit as the plain plan does where a surrogate step holds two images (ASPL,
SimAC, CAP); FSMG's larger step is split (tested here to reach training, and in
test_attacks.py for its gradient)."""

import glob
import os

import pytest
import torch

from antipers.attacks.streamed_adamw import StreamedAdamW
from antipers.data.synthetic import SyntheticDataset
from antipers.defenses.snapshots import LEAN_FROM, MemoryPlan, Snapshot
from antipers.images import quantize
from antipers.models import recompute
from antipers.registry import DEFENSES


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.randn(5, generator=g).to(torch.bfloat16),
        "empty": torch.empty(0, 2),
        "c": torch.randint(-5, 5, (2, 2, 2), generator=g),
    }


@pytest.mark.parametrize("place", ["device", "cpu", "disk"])
def test_snapshot_restores_every_tensor_bitwise(place, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTIPERS_SCRATCH", str(tmp_path))
    params = _weights()
    original = {k: v.clone() for k, v in params.items()}
    snap = Snapshot(params, place)
    with torch.no_grad():
        for v in params.values():
            v.add_(1) if v.numel() else None
    assert not torch.equal(params["a"], original["a"])
    assert torch.equal(snap["a"], original["a"])  # readable where it lives
    snap.restore(params)
    for k, v in params.items():
        assert v.dtype == original[k].dtype
        assert torch.equal(v, original[k]), k
    files = glob.glob(str(tmp_path / "antipers-snapshot-*"))
    assert len(files) == (1 if place == "disk" else 0)
    snap.discard()
    assert not glob.glob(str(tmp_path / "antipers-snapshot-*"))  # nothing left behind


def test_disk_snapshot_is_removed_when_the_run_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTIPERS_SCRATCH", str(tmp_path))
    with pytest.raises(RuntimeError), Snapshot(_weights(), "disk"):
        assert glob.glob(str(tmp_path / "antipers-snapshot-*"))
        raise RuntimeError("a step failed")
    assert not glob.glob(str(tmp_path / "antipers-snapshot-*"))


def test_truncated_disk_snapshot_is_an_error_not_silent_garbage(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTIPERS_SCRATCH", str(tmp_path))
    params = _weights()
    snap = Snapshot(params, "disk")
    (path,) = glob.glob(str(tmp_path / "antipers-snapshot-*"))
    os.truncate(path, 10)
    with pytest.raises(OSError, match="ends early"):
        snap.restore(params)
    snap.discard()


def test_plan_chooses_by_size_device_and_environment(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("ANTIPERS_MEMORY", raising=False)
    assert MemoryPlan.choose(cpu, LEAN_FROM - 1) == MemoryPlan("device", False)
    # the moments go where the snapshots go, and each weight steps inside backward
    assert MemoryPlan.choose(cpu, LEAN_FROM) == MemoryPlan("disk", True, 1, 2, "disk", True)
    assert MemoryPlan.choose(gpu, 10) == MemoryPlan("cpu", False)  # offload_snapshots
    assert MemoryPlan.choose(gpu, 10, offload=False) == MemoryPlan("device", False)
    # a GPU keeps its moments unless forced lean: host memory costs copies every step
    assert MemoryPlan.choose(gpu, LEAN_FROM) == MemoryPlan("cpu", True, 1, 2, "device", True)
    # small adapters on a large model: snapshots and moments stay, activations are
    # checkpointed
    assert MemoryPlan.choose(cpu, 10, model_bytes=LEAN_FROM) == MemoryPlan("device", True, 1, 2)
    monkeypatch.setenv("ANTIPERS_MEMORY", "lean")
    assert MemoryPlan.choose(cpu, 10) == MemoryPlan("disk", True, 1, 2, "disk", True)
    assert MemoryPlan.choose(gpu, 10) == MemoryPlan("cpu", True, 1, 2, "cpu", True)
    monkeypatch.setenv("ANTIPERS_MEMORY", "plain")
    assert MemoryPlan.choose(cpu, LEAN_FROM) == MemoryPlan("device", False)
    assert MemoryPlan.choose(cpu, 10, model_bytes=LEAN_FROM) == MemoryPlan("device", False)
    monkeypatch.setenv("ANTIPERS_MEMORY", "tiny")
    with pytest.raises(ValueError, match="ANTIPERS_MEMORY: expected one of auto, plain, lean"):
        MemoryPlan.choose(cpu, 10)


@pytest.fixture(scope="module")
def person():
    person = SyntheticDataset(n_identities=1, photos_per_set=2).load("synth-0000", 32)
    person.set_A, person.set_B = quantize(person.set_A), quantize(person.set_B)
    return person


@pytest.mark.parametrize(
    ("name", "extra"),
    [("aspl", {}), ("simac", {}), ("cap-aspl", {}), ("aspl", {"surrogate": "lora"})],
)
def test_lean_plan_protects_bitwise_as_the_plain_plan(
    name, extra, person, tiny_bundle, tmp_path, monkeypatch
):
    """Disk snapshots, gradient checkpointing, and AdamW's moments on disk with each
    weight stepped inside backward recompute and store the same numbers in another
    place, so nothing may move: equality is exact, not a tolerance. The text encoder
    trains, so both of the surrogate's parts go through the snapshots."""
    settings = {"iterations": 2, "pgd_steps": 2, "surrogate_steps": 2}
    settings |= {"num_class_images": 2, "class_steps": 2, "surrogate_lr": 1e-3, **extra}
    if name == "simac":
        settings |= {"search_every": 1, "search_delta": 300}
    monkeypatch.setenv("ANTIPERS_SCRATCH", str(tmp_path))
    recomputed = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        recomputed.append(getattr(args[0], "__self__", None))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    monkeypatch.setattr(recompute, "checkpoint", counting)  # the VAE encoder's layers
    in_backward = []
    real_backprop = StreamedAdamW.backprop

    def backprop(self, loss):
        in_backward.append(self.max_grad_norm)
        return real_backprop(self, loss)

    monkeypatch.setattr(StreamedAdamW, "backprop", backprop)
    before = {k: v.clone() for k, v in tiny_bundle.unet.state_dict().items()}
    out, checkpoints, steps_in_backward = {}, {}, {}
    for mode in ("plain", "lean"):
        monkeypatch.setenv("ANTIPERS_MEMORY", mode)
        recomputed.clear()
        defense = DEFENSES.build(name, settings)
        out[mode] = defense.protect(person, tiny_bundle, torch.Generator().manual_seed(0)).images
        checkpoints[mode] = list(recomputed)
        steps_in_backward[mode] = list(in_backward)
        in_backward.clear()
    encoder = set(tiny_bundle.vae.encoder.modules())
    assert checkpoints["plain"] == []
    # every surrogate step of the lean run (2 phases of 2 steps, 2 iterations) stepped
    # inside backward, clipping at the surrogate's norm (the two-pass path); none of
    # the plain run's
    assert steps_in_backward == {"plain": [], "lean": [1.0] * 8}
    assert any(m in encoder for m in checkpoints["lean"])  # the VAE encoder, layer by layer
    assert any(m not in encoder for m in checkpoints["lean"])  # the UNet's own blocks
    assert torch.equal(out["plain"], out["lean"])
    assert not torch.equal(out["plain"], person.set_B)
    after = tiny_bundle.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base came back
    assert not glob.glob(str(tmp_path / "antipers-snapshot-*"))
    assert not glob.glob(str(tmp_path / "antipers-moments-*"))


def test_the_lean_plan_splits_fsmgs_surrogate_step(
    person, tiny_bundle, monkeypatch, tmp_path, unet_passes
):
    """FSMG trains its surrogate at batch 2 (two photos, two class images): one pass of
    four under the plain plan, passes of at most two under the lean plan."""
    monkeypatch.setenv("ANTIPERS_SCRATCH", str(tmp_path))
    settings = {"finetune_steps": 2, "pgd_steps": 1, "num_class_images": 2, "class_steps": 2}
    seen = {}
    for mode in ("plain", "lean"):
        monkeypatch.setenv("ANTIPERS_MEMORY", mode)
        unet_passes.clear()
        DEFENSES.build("fsmg", settings).protect(person, tiny_bundle, torch.Generator())
        seen[mode] = list(unet_passes)
    assert seen["plain"] == [4, 4]
    assert seen["lean"] == [2, 2, 2, 2]


def test_aspl_encodes_its_clean_photos_once_per_identity(person, tiny_bundle, monkeypatch):
    calls = []
    real = type(tiny_bundle).posterior

    def spy(self, images):
        calls.append(images.detach().clone())
        return real(self, images)

    monkeypatch.setattr(type(tiny_bundle), "posterior", spy)
    settings = {"iterations": 3, "pgd_steps": 1, "surrogate_steps": 1, "prior_weight": 0}
    DEFENSES.build("aspl", settings).protect(person, tiny_bundle, torch.Generator().manual_seed(0))
    set_a = person.set_A.to(tiny_bundle.device)
    assert sum(c.shape == set_a.shape and torch.equal(c, set_a) for c in calls) == 1
    # the rest change: the perturbed photos once per f phase, and the photos under
    # attack at each PGD step (with gradients)
    assert len(calls) == 1 + 3 + 3


def _aspl_objective(bundle, generator, chunk, clean):
    from antipers.defenses.objectives import denoising_objective

    return denoising_objective(bundle, "a photo of sks person", generator, chunk=chunk)


def _simac_objective(bundle, generator, chunk, clean):
    from antipers.defenses.surrogate_pgd import RunState

    state = RunState(t_range=(0, 600), pgd_chunk=chunk)
    return DEFENSES.build("simac", {}).objective(bundle, clean, generator, state)


@pytest.mark.parametrize("build", [_aspl_objective, _simac_objective], ids=["aspl", "simac"])
def test_pgd_in_chunks_has_the_whole_batch_draws_loss_and_gradient(build, tiny_bundle, monkeypatch):
    """The lean plan's PGD holds one photo's graph at a time: the same random draws
    (the generator ends in the same state), the same loss and gradient as the whole
    batch, to float rounding (a batch of one runs other kernels: 1e-5 relative). SimAC
    adds its up-block feature term, against the clean photos' rows of the chunk."""
    person = SyntheticDataset(n_identities=2, photos_per_set=3).load("synth-0001", 32)
    photos, clean = person.set_B, person.set_A
    sizes = []
    real = type(tiny_bundle).posterior

    def spy(self, images, *args):
        if torch.is_grad_enabled():
            sizes.append(len(images))
        return real(self, images, *args)

    monkeypatch.setattr(type(tiny_bundle), "posterior", spy)
    results = {}
    for chunk in (None, 1, 2):
        gen = torch.Generator().manual_seed(5)
        objective = build(tiny_bundle, gen, chunk, clean)
        x = photos.clone().requires_grad_(True)
        sizes.clear()
        loss = objective(x, 0)
        (grad,) = torch.autograd.grad(loss, x)
        results[chunk] = (float(loss.detach()), grad, gen.get_state(), list(sizes))
    whole = results[None]
    assert whole[3] == [3]
    assert results[1][3] == [1, 1, 1] and results[2][3] == [2, 1]  # chunked for real
    for chunk in (1, 2):
        value, grad, state, _ = results[chunk]
        assert value == pytest.approx(whole[0], rel=1e-5)
        assert torch.allclose(grad, whole[1], rtol=1e-4, atol=1e-9 + 1e-4 * whole[1].abs().max())
        assert torch.equal(state, whole[2])
    assert whole[1].abs().sum() > 0


def test_cap_consistency_in_chunks_is_the_whole_sets(tiny_bundle):
    """CAP's spread around the set's mean Gram matrix, one chunk's features at a time:
    the same value and gradient as the whole set's (the mean is held fixed, which drops
    nothing), to float rounding."""
    from antipers.defenses.features import vae_features
    from antipers.defenses.objectives import consistency_loss

    layers = (0, 1)
    inner = vae_features(tiny_bundle, layers)
    sizes = []

    def extract(x):
        if torch.is_grad_enabled():
            sizes.append(len(x))
        return inner(x)

    photos = SyntheticDataset(n_identities=1, photos_per_set=3).load("synth-0000", 32).set_B
    out = {}
    for chunk in (None, 1, 2):
        x = photos.clone().requires_grad_(True)
        sizes.clear()
        value = consistency_loss(extract, x, chunk)
        (grad,) = torch.autograd.grad(value, x)
        out[chunk] = (float(value.detach()), grad, list(sizes))
    value, grad, whole = out[None]
    assert whole == [3] and out[1][2] == [1, 1, 1] and out[2][2] == [2, 1]
    assert value > 0 and grad.abs().sum() > 0
    for chunk in (1, 2):
        assert out[chunk][0] == pytest.approx(value, rel=1e-5)
        assert torch.allclose(out[chunk][1], grad, rtol=1e-4, atol=1e-4 * grad.abs().max())
