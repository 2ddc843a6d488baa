"""``mini-faces``: its training seeds, its training code (resume, export, manifest), and
the shipped model itself (loads, its files are checked, a person can be learned on it)."""

from __future__ import annotations

import csv
import dataclasses
import shutil

import numpy as np
import pytest
import torch

from antipers.data import synthetic
from antipers.models.local import ModelNotFoundError
from antipers.models.mini_faces import SHIPPED, MiniFaces, check_manifest
from antipers.models.train_mini import MiniTrainConfig, train_mini
from antipers.models.training_loop import Loop, run_loop
from antipers.models.training_loop import adamw_cosine as _optimizer

# ---- the seed streams --------------------------------------------------------------------


def test_the_dataset_bounds_its_seeds():
    for bad in ({"seed": -1}, {"seed": synthetic.MAX_DATASET_SEED}):
        with pytest.raises(ValueError, match="seed"):
            synthetic.SyntheticDataset(**bad)
    with pytest.raises(ValueError, match="n_identities"):
        synthetic.SyntheticDataset(n_identities=synthetic.IDENTITY_STRIDE + 1)


def test_torch_keeps_only_32_bits_of_a_seed():
    """Why integer offsets cannot separate seed streams (see ``synthetic``'s header)."""
    low = torch.randn(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.randn(4, generator=torch.Generator().manual_seed(2**62 + 5)), low)


def identity_latents(dataset_seeds: range, count: int) -> torch.Tensor:
    return torch.cat([synthetic.identity_latent(s, i) for s in dataset_seeds for i in range(count)])


def test_no_training_face_is_an_identity():
    """Random 100-d normal latents lie about 14 apart; a shared person is 0 apart. The
    seed-0 dataset is the one torch's 32-bit seeds once folded the pool onto."""
    pool = synthetic.training_latents(0, 256)
    assert torch.cdist(pool, identity_latents(range(5), 256)).min() > 5.0
    assert torch.cdist(pool[:8], identity_latents(range(1), 24576)).min() > 5.0


def test_identity_photos_did_not_change():
    """The refactor into ``identity_seed``/``generate`` keeps every stored dataset valid."""
    gen = torch.Generator().manual_seed(0 * 1_000_003 + 1)
    base = torch.randn(1, synthetic.LATENT_DIM, generator=gen)
    latents = base + 0.15 * torch.randn(12, synthetic.LATENT_DIM, generator=gen)
    expected = synthetic.generate(latents, 32)
    assert torch.equal(synthetic.SyntheticDataset(n_identities=2).faces(1, 32), expected)


# ---- the training code -------------------------------------------------------------------


class _Stop(Exception):
    pass


def _linear_loop(steps):
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 1)
    optimizer, schedule = _optimizer(module, 1e-2, steps, warmup=2)
    return Loop("vae", module, optimizer, schedule, steps)


def _step(loop, stop_at=None):
    def step(i, gen):
        if i == stop_at:
            raise _Stop
        x = torch.randn(8, 4, generator=gen)
        return ((loop.module(x) - x.sum(1, keepdim=True)) ** 2).mean()

    return step


def test_resumed_training_ends_where_an_uninterrupted_one_does(tmp_path):
    config = MiniTrainConfig(checkpoint_every_s=0.0)
    (tmp_path / "a").mkdir()
    whole = _linear_loop(12)
    run_loop(whole, _step(whole), tmp_path / "a", config)

    (tmp_path / "b").mkdir()
    first = _linear_loop(12)
    with pytest.raises(_Stop):
        run_loop(first, _step(first, stop_at=7), tmp_path / "b", config)
    resumed = _linear_loop(12)  # a fresh process: weights from the checkpoint
    run_loop(resumed, _step(resumed), tmp_path / "b", config)

    for a, b in zip(whole.module.parameters(), resumed.module.parameters(), strict=True):
        assert torch.equal(a, b)
    with (tmp_path / "b" / "losses.csv").open() as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert steps == list(range(12)), "the loss log has each step once"


@pytest.fixture(scope="module")
def trained_small(tmp_path_factory):
    """train-mini end to end at a toy size: pool, VAE, latents, UNet, evaluation, export."""
    out = tmp_path_factory.mktemp("mini")
    config = MiniTrainConfig(
        pool=16,
        vae_steps=2,
        vae_batch=2,
        unet_steps=2,
        unet_batch=2,
        warmup_steps=1,
        eval_identities=2,
        eval_samples=2,
    )
    return train_mini(out, config), config


def test_train_mini_writes_a_checked_diffusers_folder(trained_small):
    folder, config = trained_small
    for name in ("model_index.json", "README.md", "loss.png", "training.json", "manifest.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.parent.glob(".*staging")), "no staging folder left behind"
    bundle = MiniFaces(path=str(folder)).load(torch.device("cpu"))
    assert bundle.source.startswith("mini-faces@")
    assert bundle.latent_factor == 4 and bundle.unet.config.sample_size == 16
    latents = bundle.encode(torch.rand(1, 3, 64, 64))
    assert latents.shape == (1, 4, 16, 16)
    card = (folder / "README.md").read_text()
    assert f"{config.unet_steps} steps" in card and "PSNR" in card


def test_damaged_or_missing_file_is_named(trained_small, tmp_path):
    folder, _ = trained_small
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelNotFoundError, match="diffusion_pytorch_model.safetensors is damaged"):
        check_manifest(copy)
    weights.unlink()
    with pytest.raises(ModelNotFoundError, match="safetensors is missing"):
        MiniFaces(path=str(copy)).load(torch.device("cpu"))
    (copy / "manifest.json").unlink()
    with pytest.raises(ModelNotFoundError, match="manifest.json is missing"):
        check_manifest(copy)


def test_resuming_under_other_settings_is_refused(trained_small):
    folder, config = trained_small
    from antipers.errors import UserError

    with pytest.raises(UserError, match=r"unet_steps: 2 -> 3"):  # one line, exit 2
        train_mini(folder.parent, dataclasses.replace(config, unet_steps=3))


def test_bad_training_settings_are_refused():
    with pytest.raises(ValueError, match="unet_steps"):
        MiniTrainConfig(unet_steps=0)
    with pytest.raises(ValueError, match="prompt_dropout"):
        MiniTrainConfig(prompt_dropout=1.0)


# ---- the shipped model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def mini():
    return MiniFaces().load(torch.device("cpu"))


def test_shipped_model_is_registered_and_checked(mini):
    from antipers.registry import BASE_MODELS

    assert BASE_MODELS.get("mini-faces") is MiniFaces
    check_manifest(SHIPPED)
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size <= 60 * 2**20, f"shipped mini-faces is {size / 2**20:.1f} MiB"
    assert mini.scaling_factor != 1.0  # set from the latents' spread at training time


def test_short_personalization_learns_that_person(mini):
    """80 DreamBooth steps on one person's photos (the demo's attacker): the generations
    move towards that person more than towards another one (offline face backend)."""
    from antipers.attacks.dreambooth import DreamBooth
    from antipers.attacks.sampling import generate
    from antipers.metrics.faces import face_backend

    dataset = synthetic.SyntheticDataset(n_identities=2)
    person, other = (dataset.load(f"synth-000{i}", 64) for i in (0, 1))
    backend = face_backend("offline")

    def mean_face(images):
        emb = backend.embed(images)
        emb = emb[~np.isnan(emb).any(axis=1)]
        m = emb.mean(axis=0)
        return m / np.linalg.norm(m)

    def similarity(bundle, prompt):
        images = generate(
            bundle, prompt, 8, 64, torch.Generator().manual_seed(0), steps=20, guidance=5.0
        )
        emb = backend.embed(images)
        emb = emb[~np.isnan(emb).any(axis=1)]
        assert len(emb) >= 4, "most generations must be faces"
        return float((emb @ mean_face(person.set_A)).mean()), float(
            (emb @ mean_face(other.set_A)).mean()
        )

    attack = DreamBooth(steps=80, lr=4e-4, batch_size=2, prior_weight=0.0, train_text_encoder=False)
    tuned = attack.personalize(person.set_B, mini, torch.Generator().manual_seed(0))
    before_person, before_other = similarity(mini, "a photo of sks person")
    after_person, after_other = similarity(tuned, "a photo of sks person")
    assert after_person - before_person > after_other - before_other + 0.01
    assert after_person > after_other
