"""``compare --preset paper`` without variants: the paper's released checkpoints, one hub revision
per saved step. No hub is reachable here: revisions come from a stand-in ``list_repo_refs`` or are
named explicitly, and an unreachable hub is one line that names the fix."""

from __future__ import annotations

import pytest
from huggingface_hub import GitRefInfo, GitRefs

from mechinterp.errors import UserError
from mechinterp.study.paper_release import PAPER_BASE, PAPER_RUNS, paper_variants, step_revisions
from mechinterp.study.presets import PAPER_RELEASE_PLAN, PLANS


def _refs(branches, tags=()):
    info = [GitRefInfo(name=n, ref=f"refs/heads/{n}", target_commit="0" * 40) for n in branches]
    tag = [GitRefInfo(name=n, ref=f"refs/tags/{n}", target_commit="1" * 40) for n in tags]
    return GitRefs(branches=info, converts=[], tags=tag)


HUB = {PAPER_RUNS["grpo"]: _refs(["main", "v01.14-step-000000058", "v01.14-step-000000029",
                                  "scratch"], tags=["v01.14-step-000000571"]),
       PAPER_RUNS["sft"]: _refs(["main", "v02.08-step-000000462", "v02.08-step-000000023"])}
asked: list[str] = []


def fake_list_refs(repo):
    asked.append(repo)
    return HUB[repo]


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """The real hub client in offline mode: a test that reaches it fails fast, never downloads."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_step_revisions_are_the_step_branches_and_tags_in_step_order():
    assert step_revisions(PAPER_RUNS["grpo"], fake_list_refs) == [
        "v01.14-step-000000029", "v01.14-step-000000058", "v01.14-step-000000571"]
    with pytest.raises(UserError, match="no revision named for a training step"):
        step_revisions("x/y", lambda repo: _refs(["main", "dev"]))


def test_paper_variants_list_every_step_as_a_checkpoint_spec():
    from mechinterp.models.modelset import _checkpoint_label
    from mechinterp.paths import checkpoint_step

    info = paper_variants(list_refs=fake_list_refs)
    assert list(info) == ["sft", "grpo"] and set(asked) >= set(PAPER_RUNS.values())
    grpo = info["grpo"]
    assert grpo.final == PAPER_RUNS["grpo"] and grpo.kind == "grpo" and info["sft"].kind == "sft"
    assert grpo.checkpoints == [f"{PAPER_RUNS['grpo']}@v01.14-step-{s:09d}" for s in (29, 58, 571)]
    # the names the ModelSet gives these checkpoints carry the step the figures plot against
    names = [f"grpo@{_checkpoint_label(s, i)}" for i, s in enumerate(grpo.checkpoints)]
    assert [checkpoint_step(n) for n in names] == [29, 58, 571]


def test_explicit_revisions_need_no_hub_for_their_run():
    asked.clear()
    info = paper_variants({"sft": ["v02.08-step-000000462", "v02.08-step-000000023"]},
                          list_refs=fake_list_refs)
    assert asked == [PAPER_RUNS["grpo"]]  # only the run without explicit revisions was listed
    assert [c.rsplit("@", 1)[1] for c in info["sft"].checkpoints] == [
        "v02.08-step-000000023", "v02.08-step-000000462"]  # put in step order
    both = {"sft": ["v02.08-step-000000023"], "grpo": ["v01.14-step-000000029"]}
    asked.clear()
    assert len(paper_variants(both, list_refs=fake_list_refs)["grpo"].checkpoints) == 1
    assert asked == []
    with pytest.raises(UserError, match="no run dpo"):
        paper_variants({"dpo": ["x"]}, list_refs=fake_list_refs)
    with pytest.raises(UserError, match="twice"):
        paper_variants({"sft": ["a-step-1", "a-step-1"]}, list_refs=fake_list_refs)


def test_unreachable_hub_is_a_user_error_naming_the_fix():
    with pytest.raises(UserError, match=r"--revisions RUN=REV1,REV2") as err:
        step_revisions(PAPER_RUNS["grpo"])  # the real huggingface_hub client, offline
    assert PAPER_RUNS["grpo"] in str(err.value) and "\n" not in str(err.value)


def test_release_plan_is_the_paper_plan_on_gsm8k_and_every_option_is_valid():
    from mechinterp.core.options import make_config
    from mechinterp.core.registry import get_probe

    assert [s.probe for s in PAPER_RELEASE_PLAN] == [s.probe for s in PLANS["paper"]]
    by = {s.probe: s for s in PAPER_RELEASE_PLAN}
    assert by["kl-drift"].options == {"items": "gsm8k", "limit": 500} and by["kl-drift"].checkpoints
    assert by["task-accuracy"].options["items"] == "gsm8k"
    assert by["weight-change"].checkpoints and by["mmlu"].checkpoints
    for step in PAPER_RELEASE_PLAN:
        cfg = make_config(get_probe(step.probe),
                          {k: v for k, v in step.options.items() if v is not None})
        for key, value in step.options.items():
            if value is not None:
                assert getattr(cfg, key) == value or str(getattr(cfg, key)) == str(value)
    # the other presets keep their arithmetic task (the demo's paper preset trains on it)
    assert {s.options["items"] for s in PLANS["paper"] if "items" in s.options} == {"arithmetic"}


def test_cli_paper_preset_offline_fails_in_one_line_and_writes_nothing(tmp_path, capsys):
    from mechinterp.cli import main

    out = tmp_path / "paper"
    assert main(["compare", "--preset", "paper", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--revisions" in err and PAPER_RUNS["sft"] in err
    assert not out.exists()
    assert main(["compare", "--preset", "paper", "--variant", "sft=tiny-random-llama",
                 "--revisions", "sft=v02.08-step-000000023", "--out", str(out)]) == 2
    assert "no --variant" in capsys.readouterr().err
    assert not out.exists()


def test_paper_base_is_olmo():
    assert PAPER_BASE == "allenai/OLMo-2-1124-7B-Instruct"
    assert PAPER_RUNS == {"sft": "Neelectric/OLMo-2-1124-7B-Instruct_SFTv02.08",
                          "grpo": "Neelectric/OLMo-2-1124-7B-Instruct_GRPOv01.14"}
