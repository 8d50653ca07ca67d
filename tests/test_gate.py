"""The registry gate's policy (kdprune/registry.py) and lineage helpers: pure functions, no MLflow."""

from __future__ import annotations

import math
import subprocess

import pytest
import torch

from conftest import tiny_params_dict
from kdprune import config, lineage, registry
from kdprune.serving import with_normalization


def policy(**changes):
    return config.parse(tiny_params_dict(registry={"model_name": "m", **changes})).registry


def correct(right: int, n: int = 100) -> list[bool]:
    return [i < right for i in range(n)]


def champion(right_images: list[bool], version="3", **tags) -> dict:
    return {"version": version, "correct": right_images, **tags}


def test_mcnemar_exact_tail():
    assert registry.mcnemar_p(0, 0) == 1.0
    assert registry.mcnemar_p(5, 0) == pytest.approx(1 / 32)
    assert registry.mcnemar_p(6, 2) == pytest.approx(sum(math.comb(8, k) for k in (6, 7, 8)) / 256)
    assert registry.mcnemar_p(0, 4) == 1.0


def test_no_champion_promotes():
    decision = registry.decide({"correct": correct(10)}, None, policy())
    assert decision.promote and decision.reason == "no current champion"


def test_one_lucky_image_is_not_a_gain():
    # 81 vs 80 right on the same 100 images: a strict gain the old gate promoted on, but p = 0.5
    decision = registry.decide({"correct": correct(81)}, champion(correct(80)), policy())
    assert not decision.promote and "not significant" in decision.reason
    assert decision.numbers["wins"] == 1 and decision.numbers["losses"] == 0 and decision.numbers["p_value"] == 0.5
    # ...unless the test is switched off
    assert registry.decide({"correct": correct(81)}, champion(correct(80)), policy(max_p_value=1.0)).promote


def test_clear_gain_promotes_and_reports_its_numbers():
    decision = registry.decide({"correct": correct(90), "macs": 100}, champion(correct(80), macs="100"), policy())
    assert decision.promote and "v3" in decision.reason
    assert decision.numbers == {"champion_version": "3", "images": 100, "wins": 10, "losses": 0, "gain": 10,
                                "candidate_accuracy": 0.9, "champion_accuracy": 0.8,
                                "p_value": round(0.5 ** 10, 6)}


def test_champion_from_other_data_is_flagged():
    decision = registry.decide({"correct": correct(90), "dataset_id": "new"},
                               champion(correct(80), dataset_id="old"), policy())
    assert decision.promote and decision.numbers["champion_other_data"] is True and "other data" in decision.reason
    same = registry.decide({"correct": correct(90), "dataset_id": "new"}, champion(correct(80), dataset_id="new"),
                           policy())
    assert "champion_other_data" not in same.numbers and "other data" not in same.reason


def test_min_gain():
    cand, champ = {"correct": correct(90)}, champion(correct(80))
    assert registry.decide(cand, champ, policy(min_gain=10)).promote
    decision = registry.decide(cand, champ, policy(min_gain=11))
    assert not decision.promote and "at least 11" in decision.reason


def test_equal_and_worse_are_not_promoted():
    assert not registry.decide({"correct": correct(80)}, champion(correct(80)), policy(max_p_value=1.0)).promote
    assert not registry.decide({"correct": correct(10)}, champion(correct(80)), policy(max_p_value=1.0)).promote


def test_paired_not_marginal():
    # same accuracy (50 %) but on disjoint images: 50 wins, 50 losses, no gain
    cand = [i % 2 == 0 for i in range(100)]
    champ = [i % 2 == 1 for i in range(100)]
    decision = registry.decide({"correct": cand}, champion(champ), policy(max_p_value=1.0))
    assert not decision.promote and decision.numbers["wins"] == 50 and decision.numbers["losses"] == 50


@pytest.mark.parametrize("ratio, promoted", [(1.1, False), (1.3, True)])
def test_cost_rule_macs(ratio, promoted):
    cand = {"correct": correct(95), "macs": 1200}
    decision = registry.decide(cand, champion(correct(80), macs="1000"), policy(max_macs_ratio=ratio))
    assert decision.promote is promoted
    if not promoted:
        assert "MACs" in decision.reason and "1.1x" in decision.reason


def test_cost_rule_latency_only_when_set():
    cand = {"correct": correct(95), "macs": 10, "cpu_latency_ms_b1": 3.0}
    champ = champion(correct(80), macs="10", cpu_latency_ms_b1="1.0")
    assert registry.decide(cand, champ, policy()).promote  # off by default
    decision = registry.decide(cand, champ, policy(max_latency_ratio=2.0))
    assert not decision.promote and "latency" in decision.reason


def test_champion_without_cost_tags_is_still_compared():
    assert registry.decide({"correct": correct(95), "macs": 10}, champion(correct(80)), policy()).promote


def test_incompatible_champion():
    cand = {"classes": ["a", "b"], "input_shape": [1, 8, 8]}
    assert registry.incompatibility(cand, {"version": "2", "classes": ["a", "b"], "input_shape": [1, 8, 8]}) is None
    assert registry.incompatibility(cand, {"version": "2"}) is None
    why = registry.incompatibility(cand, {"version": "2", "classes": ["a", "c"], "input_shape": [1, 8, 8]})
    assert "v2" in why and "classes" in why and "\n" not in why
    why = registry.incompatibility(cand, {"version": "2", "classes": ["a", "b"], "input_shape": [3, 32, 32]})
    assert "input shape" in why


@pytest.mark.parametrize("field, value", [("min_gain", 0), ("max_p_value", 0), ("max_p_value", 1.5),
                                          ("max_macs_ratio", 0), ("max_latency_ratio", -1)])
def test_gate_params_validated(field, value):
    from kdprune.errors import KdpruneError

    with pytest.raises(KdpruneError, match=f"registry.{field}"):
        policy(**{field: value})


# ------------------------------------------------------------------------------------------ serving
def test_served_model_does_the_flip_average_only_with_tta():
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    x = torch.rand(4, 1, 6, 6)
    inner(x)
    plain, tta = with_normalization(inner, [0.5], [0.25]), with_normalization(inner, [0.5], [0.25], tta=True)
    z = (x - 0.5) / 0.25
    with torch.no_grad():
        assert torch.allclose(plain(x), inner(z))
        assert torch.allclose(tta(x), (inner(z) + inner(z.flip(-1))) / 2)
        assert not torch.allclose(tta(x), plain(x))


# ------------------------------------------------------------------------------------------ lineage
def test_lineage_tags(tmp_path):
    params = config.parse(tiny_params_dict())
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f.txt").write_text("a")
    subprocess.run(["git", "add", "f.txt"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()

    tags = lineage.lineage_tags(params, tmp_path, "abc", {"teacher": "r1", "prune": None})
    assert tags["lineage.git_commit"] == head and tags["lineage.git_dirty"] == "false"
    assert tags["lineage.dataset_id"] == "abc" and tags["lineage.run.teacher"] == "r1"
    assert "lineage.run.prune" not in tags and "lineage.dvc_lock_sha256" not in tags
    assert tags["lineage.torch_version"] == torch.__version__

    (tmp_path / "f.txt").write_text("b")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    tags = lineage.lineage_tags(params, tmp_path, "abc", {})
    assert tags["lineage.git_dirty"] == "true" and len(tags["lineage.dvc_lock_sha256"]) == 64
    outside = tmp_path.parent / f"{tmp_path.name}-not-git"
    outside.mkdir()
    assert lineage.git_state(outside) == {"git_commit": "unknown", "git_dirty": "unknown"}


def test_params_hash_tracks_every_value():
    a = config.parse(tiny_params_dict())
    b = config.parse(tiny_params_dict(seed=1))
    assert lineage.params_hash(a) == lineage.params_hash(config.parse(tiny_params_dict()))
    assert lineage.params_hash(a) != lineage.params_hash(b)


def test_dvc_context_and_invocation_key():
    assert lineage.dvc_context({}) == {} and lineage.dvc_invocation({}) is None
    env = {"DVC_STAGE": "teacher", "DVC_EXP_NAME": "bushy-pint", "DVC_EXP_BASELINE_REV": "abc123"}
    assert lineage.dvc_context(env) == {"kdprune.dvc_stage": "teacher", "kdprune.dvc_exp": "bushy-pint",
                                        "kdprune.dvc_exp_baseline": "abc123"}
    assert lineage.dvc_invocation(env) == "exp:abc123:bushy-pint"


# ------------------------------------------------------------------- a served model slower than its parent
def test_the_slower_of_the_two_batches_names_itself():
    assert registry.slower_than_parent({"served_speedup_b1": 1.4, "served_speedup_batch": 2.1}, 256) is None
    why = registry.slower_than_parent({"served_speedup_b1": 1.2, "served_speedup_batch": 0.84}, 256)
    assert why.startswith("not registered") and "batch 256 (0.84x" in why
    assert "batch 1 (0.90x" in registry.slower_than_parent({"served_speedup_b1": 0.9, "served_speedup_batch": 3}, 8)
    assert registry.slower_than_parent({"served_speedup_b1": 0.95, "served_speedup_batch": 3}, 8, 0.1) is None
    assert "allows 0.90x" in registry.slower_than_parent({"served_speedup_b1": 0.85, "served_speedup_batch": 3}, 8, 0.1)
