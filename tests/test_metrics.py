import numpy as np
import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from antipers.data.synthetic import SyntheticDataset
from antipers.images import from_uint8
from antipers.metrics.base import UNAVAILABLE, MetricUnavailable, ScoreInputs, evaluate
from antipers.metrics.budget import PSNR, SSIM, Linf
from antipers.metrics.quality import PIQE, Brisque
from antipers.pipeline import RunContext, run_experiment
from antipers.spec import ExperimentSpec
from tests.conftest import tiny_spec_dict


@pytest.fixture(scope="module")
def faces():
    return SyntheticDataset(n_identities=1, photos_per_set=2).load("synth-0000", 256).set_A


@pytest.fixture(scope="module")
def astronaut():
    """A real, sharp photo of a face that scikit-image ships (public domain)."""
    from skimage.data import astronaut

    return from_uint8(astronaut())


def degraded(images):
    gen = torch.Generator().manual_seed(0)
    blurred = gaussian_blur(images, [9, 9], [3.0, 3.0])
    noised = (images + 0.15 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
    return blurred, noised


@pytest.mark.parametrize("metric", [Brisque(), PIQE()], ids=["brisque", "piqe"])
def test_quality_rates_blurred_and_noised_copies_worse(metric, astronaut):
    def quality(images):
        return metric.score(ScoreInputs(generated=images, references=astronaut)).values

    original = quality(astronaut)
    for worse in degraded(astronaut):
        assert (quality(worse) > original).all()  # higher score = worse quality


def test_brisque_on_a_real_photo(sample_dir):
    from antipers.images import read_images

    photo = read_images(
        [
            sample_dir
            / "n000050"
            / "set_A"
            / sorted(p.name for p in (sample_dir / "n000050" / "set_A").iterdir())[0]
        ],
        512,
    )
    value = Brisque().score(ScoreInputs(generated=photo, references=photo)).values[0]
    assert np.isfinite(value) and -10 < value < 60


def test_budget_metrics(faces):
    shifted = (faces + 4 / 255).clamp(0, 1)
    inputs = ScoreInputs(generated=faces, references=faces, protected=shifted, clean=faces)
    assert Linf().score(inputs).values.tolist() == [4.0, 4.0]
    assert (PSNR().score(inputs).values > 30).all()
    same = ScoreInputs(generated=faces, references=faces, protected=faces, clean=faces)
    assert np.isinf(PSNR().score(same).values).all()
    assert SSIM().score(same).values == pytest.approx([1.0, 1.0])
    assert (SSIM().score(inputs).values < 1).all()


def test_missing_inputs_or_weights_make_unavailable_rows_not_failures(faces):
    inputs = ScoreInputs(generated=faces, references=faces)
    result = evaluate(Linf(), inputs)
    assert result.status == UNAVAILABLE and "protected with clean" in result.reason

    class NeedsWeights:
        name, higher_is_better, unit = "needs-weights", True, "score"

        def score(self, inputs):
            raise MetricUnavailable("weights file /nowhere/model.pth not found: set X")

    result = evaluate(NeedsWeights(), inputs)
    assert result.status == UNAVAILABLE and "/nowhere/model.pth" in result.reason
    assert np.isnan(result.aggregate)


def test_experiment_records_every_metric_family():
    aspl = {"name": "aspl", "iterations": 1, "pgd_steps": 2, "eps": 4.0, "prior_weight": 0}
    spec = ExperimentSpec.from_dict(
        tiny_spec_dict(
            defense=aspl,
            metrics=["fdfr", "linf", "psnr", "brisque", "linkability"],
        )
    )
    rows = run_experiment(spec, RunContext(device=torch.device("cpu")), raise_errors=True)
    agg = {r["metric"]: r for r in rows if r["image_index"] == -1}
    assert 0 < agg["linf"]["value"] <= 4
    assert agg["brisque"]["status"] == "ok" and np.isfinite(agg["brisque"]["value"])
    assert agg["linkability"]["status"] == "ok"
    link, fdfr = agg["linkability"]["value"], agg["fdfr"]["value"]
    # random tiny-model images: linkability is a rate over the faces found, NaN with none
    assert np.isnan(link) if fdfr == 1.0 else 0 <= link <= 1
    assert agg["linkability:gallery_size"]["value"] == 2  # both synthetic identities


def test_linkability_has_a_known_answer():
    """A person's own photos link to them and to nobody else in the gallery."""
    from antipers.data.synthetic import SyntheticDataset
    from antipers.metrics.identity import Linkability

    dataset = SyntheticDataset(n_identities=3)
    people = {name: dataset.load(name, 64) for name in dataset.identities()}
    gallery = {name: person.set_A for name, person in people.items()}
    alice, bob = people["synth-0000"], people["synth-0001"]
    own = evaluate(
        Linkability(), ScoreInputs(alice.set_B, alice.set_A, "synth-0000", gallery=gallery)
    )
    assert own.status == "ok" and own.aggregate == 1.0 and list(own.values) == [1.0] * 4
    claimed = evaluate(
        Linkability(), ScoreInputs(alice.set_B, bob.set_A, "synth-0001", gallery=gallery)
    )
    assert claimed.status == "ok" and claimed.aggregate == 0.0


def test_a_gallery_entry_without_a_face_is_left_out_not_fatal():
    from antipers.data.synthetic import SyntheticDataset
    from antipers.metrics.identity import Linkability

    dataset = SyntheticDataset(n_identities=3)
    people = {name: dataset.load(name, 64) for name in dataset.identities()}
    gallery = {name: person.set_A for name, person in people.items()}
    gallery["synth-0002"] = torch.full_like(gallery["synth-0002"], 0.5)  # grey: no face
    alice = people["synth-0000"]
    inputs = ScoreInputs(alice.set_B, alice.set_A, "synth-0000", gallery=gallery)
    result = Linkability().score(inputs)
    assert result.aggregate == 1.0
    assert result.notes == {"gallery_size": 2.0, "gallery_without_face": 1.0}
    own_blank = dict(gallery, **{"synth-0000": gallery["synth-0002"]})
    with pytest.raises(ValueError, match="gallery photos of 'synth-0000'"):
        Linkability().score(ScoreInputs(alice.set_B, alice.set_A, "synth-0000", gallery=own_blank))


def test_lpips_through_pyiqa_with_random_init_weights(faces, tmp_path, monkeypatch):
    """pyiqa's real LPIPS code path; only the (random, seeded) weights differ."""
    from torchvision.models import alexnet

    from antipers.metrics.budget import ALEXNET_FILE, LPIPS

    inputs = ScoreInputs(generated=faces, references=faces, protected=faces.flip(-1), clean=faces)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("ANTIPERS_LPIPS_WEIGHTS", raising=False)
    result = evaluate(LPIPS(), inputs)
    assert result.status == UNAVAILABLE and "ANTIPERS_LPIPS_WEIGHTS" in result.reason

    torch.manual_seed(0)
    lin = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1)
        for i, c in enumerate([64, 192, 384, 256, 256])
    }
    torch.save(lin, tmp_path / "lin.pth")
    result = evaluate(LPIPS(weights=str(tmp_path / "lin.pth")), inputs)
    assert result.status == UNAVAILABLE and ALEXNET_FILE in result.reason

    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(alexnet(weights=None).state_dict(), checkpoints / ALEXNET_FILE)
    metric = LPIPS(weights=str(tmp_path / "lin.pth"))
    changed = metric.score(inputs).values
    same = metric.score(ScoreInputs(faces, faces, protected=faces, clean=faces)).values
    assert changed.shape == (2,) and (changed > 0).all()
    assert same == pytest.approx([0.0, 0.0], abs=1e-6)
    from antipers.metrics.budget import _lpips_net

    loaded = _lpips_net(str(tmp_path / "lin.pth")).lin0.model[1].weight
    assert torch.equal(loaded, lin["lin0.model.1.weight"])  # our file, not a silent default


def test_a_failing_metric_is_an_error_row_for_itself_only(faces):
    from antipers.metrics.identity import ISM

    noise = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    inputs = ScoreInputs(generated=noise, references=noise, protected=noise, clean=noise)
    failed = evaluate(ISM(), inputs)  # no face in any reference
    assert failed.status == "error" and "no face found" in failed.reason
    assert evaluate(Linf(), inputs).status == "ok"


@pytest.mark.parametrize(
    "name,params",
    [("clipiqa", {}), ("liqe", {}), ("topiq-face", {}), ("brisque", {"implementation": "pyiqa"})],
)
def test_pyiqa_weighted_metrics_are_unavailable_without_local_weights(name, params, faces):
    from antipers.registry import METRICS

    result = evaluate(METRICS.build(name, params), ScoreInputs(faces[:1], faces[:1]))
    assert result.status == UNAVAILABLE  # these weights are not on this machine
    assert result.reason.startswith("pyiqa ")
    assert "antipers never downloads" in result.reason or "is not cached" in result.reason


def test_refuse_downloads_stops_a_fetch_before_the_network():
    import torch.hub

    from antipers.metrics.offline import refuse_downloads

    original = torch.hub.download_url_to_file
    with pytest.raises(MetricUnavailable, match="never downloads"), refuse_downloads("test"):
        torch.hub.download_url_to_file("https://example.invalid/w.pth", "/tmp/w.pth")
    assert torch.hub.download_url_to_file is original  # hooks are put back


def test_embedder_ism_tells_the_person_from_another_with_the_shipped_embedder():
    """The shipped mini-faces embedder (trained on other generator people) puts a
    person's photos close to their own references and far from another person's."""
    from antipers.metrics.base import ScoreInputs
    from antipers.registry import METRICS

    data = SyntheticDataset(n_identities=2, seed=5)
    me, other = data.load("synth-0000", 64), data.load("synth-0001", 64)
    metric = METRICS.build("embedder-ism")
    own = metric.score(ScoreInputs(generated=me.set_B, references=me.set_A))
    stranger = metric.score(ScoreInputs(generated=other.set_B, references=me.set_A))
    assert own.aggregate > 0.5 > stranger.aggregate
    assert own.backend.startswith("iresnet-mini:backbone.pth@") and own.unit == "cosine"
    missing = METRICS.build("embedder-ism", {"embedder": "/no/such/backbone.pth"})
    result = evaluate(missing, ScoreInputs(generated=me.set_B, references=me.set_A))
    assert result.status == "unavailable" and "/no/such/backbone.pth" in result.reason
