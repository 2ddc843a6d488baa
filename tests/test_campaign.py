import pytest

from antipers.campaign import CampaignError, load_campaign

GOOD = """\
suite: grid
base_model: tiny
resolution: 64
datasets:
  - {name: synthetic, n_identities: 3, identities: {first: 2}}
defenses:
  - none
  - {name: aspl, eps: [4, 8], iterations: 1, eot: [jpeg, blur]}
countermeasures: [none, [{name: jpeg, quality: 75}, flip]]
attacks:
  - {name: lora, steps: 5, prior_weight: 0}
sampling: {name: cfg, steps: 2, images_per_prompt: 1}
metrics: [fdfr, ism]
seeds: [0, 1]
"""


def write(tmp_path, text, name="campaign.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_expands_into_distinct_validated_specs(tmp_path):
    campaign = load_campaign(write(tmp_path, GOOD))
    # 2 identities x (none + aspl at 2 budgets) x 2 chains x 1 attack x 2 seeds
    assert len(campaign.specs) == 24 and len(set(campaign.spec_ids)) == 24
    budgets = {s.defense.kwargs.get("eps") for s in campaign.specs}
    assert budgets == {None, 4.0, 8.0}
    assert {s.defense.kwargs.get("eot") for s in campaign.specs} == {None, ("jpeg", "blur")}
    assert {s.countermeasure_name for s in campaign.specs} == {"none", "jpeg+flip"}
    assert {s.identity for s in campaign.specs} == {"synth-0000", "synth-0001"}
    assert load_campaign(write(tmp_path, GOOD)).spec_ids == campaign.spec_ids  # stable


@pytest.mark.parametrize(
    "change,expected",
    [
        (("  - none\n", "  - nonee\n"), ":7: defenses.0: defense: unknown defense 'nonee'"),
        (
            ("iterations: 1", "iterations: 1, epss: 3"),
            ":8: defenses.1: defense 'aspl' has no parameter 'epss'",
        ),
        (("seeds: [0, 1]", "seeds: []"), ":14: seeds: an empty list gives no experiments"),
        (("eps: [4, 8]", "eps: []"), ":8: defenses.1: eps: an empty list"),
        (
            (
                "{name: synthetic, n_identities: 3, identities: {first: 2}}",
                "{name: vggface2, root: /nowhere/vggface2}",
            ),
            ":5: datasets.0: dataset folder:",
        ),
        (("suite: grid", "suite: grid\nbudgets: [1]"), ":2: budgets: unknown campaign field"),
        (("identities: {first: 2}", "identities: [synth-0009]"), "are not in this dataset"),
    ],
)
def test_bad_campaigns_are_refused_naming_line_and_field(tmp_path, change, expected):
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(CampaignError) as err:
        load_campaign(path)
    assert expected in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "name",
    [
        "demo",
        "validity",
        "validity-model",
        "validity-apdm-budget",
        "validity-iddm",
        "validity-iddm-more",
        "validity-iddm-noise",
        "validity-persguard",
        "validity-persguard-kinds",
    ],
)
def test_shipped_campaigns_load_with_the_sizes_their_headers_state(name):
    from pathlib import Path

    import antipers

    path = Path(antipers.__file__).parent / "campaigns" / f"{name}.yaml"
    campaign = load_campaign(path)
    specs = campaign.specs
    people = {(s.dataset.kwargs.get("seed", 0), s.identity) for s in specs}
    expected = {"demo": 3, "validity": 144, "validity-iddm-more": 120}
    expected |= {"validity-iddm": 24, "validity-iddm-noise": 24}
    expected = expected.get(name, 8)
    assert len(people) == expected
    if name == "validity-model":  # APDM against both attackers, on the model track
        assert {s.track for s in specs} == {"model"}
        assert {(s.defense.name, s.attack.name) for s in specs} == {
            (d, a) for d in ("none", "apdm") for a in ("dreambooth", "lora")
        }
    if name == "validity-apdm-budget":  # its undefended rows are validity-model's
        shared = {s.spec_id for s in load_campaign(path.with_name("validity-model.yaml")).specs}
        undefended = [s for s in specs if s.defense.name == "none"]
        assert undefended and all(s.spec_id in shared for s in undefended)
        assert all(s.spec_id not in shared for s in specs if s.defense.name == "apdm")
    if name == "validity-persguard-kinds":  # pattern with its control, and erasure
        backdoors = {(s.defense.name, s.defense.kwargs.get("backdoor")) for s in specs}
        assert backdoors == {("none", None), ("persguard", "pattern"), ("persguard", "erasure")}
        controls = {s.defense["backdoor"] for s in specs if s.defense.kwargs.get("iterations") == 0}
        assert controls == {"pattern"}
    if name == "validity-iddm-noise":  # validity-iddm's baseline, and it on noised photos
        main = {s.spec_id for s in load_campaign(path.with_name("validity-iddm.yaml")).specs}
        clean = [s for s in specs if not s.countermeasure]
        assert len(clean) == 24 and all(s.spec_id in main for s in clean)
        assert {c.name for s in specs for c in s.countermeasure} == {"noise"}
    if name == "validity-iddm-more":  # the same experiments as validity-iddm, more people
        main = load_campaign(path.with_name("validity-iddm.yaml")).specs
        ids = {s.spec_id for s in main}
        assert all(s.override({"dataset.seed": 0}).spec_id in ids for s in specs)


@pytest.mark.parametrize(
    "changes,expected",
    [
        (  # the same defense twice, the second one wrong: its own line is blamed
            [
                ("  - none\n", "  - {name: aspl, eps: 4, iterations: 1}\n"),
                ("iterations: 1, eot", "iterations: 1, epss: 3, eot"),
            ],
            ":8: defenses.1: defense 'aspl' has no parameter 'epss'",
        ),
        ([("seeds: [0, 1]", "seeds: [0, lots]")], ":14: seeds.1: seed: expected"),
    ],
)
def test_a_spec_error_blames_the_entry_it_came_from(tmp_path, changes, expected):
    text = GOOD
    for old, new in changes:
        assert old in text
        text = text.replace(old, new)
    with pytest.raises(CampaignError) as err:
        load_campaign(write(tmp_path, text))
    assert expected in str(err.value)
