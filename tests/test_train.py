"""The Training Wheels trainer on the tiny task, written once and run for both model families: the
KL-ranked oracle, phases 1 and 2 end to end, the same seed twice, and kill-and-resume.

The oracle is checked against a hand computation that shares nothing with the batched code: each
row alone, unpadded, the teacher decoded greedily by one full forward (no cache) per token on its
own prompt C^(T), the student's distribution from plain full forwards of its LM over the row
(tests/tiny_task.py's ``policy_logits``), KL(teacher ‖ student over V) per position, and the top
⌊l·b⌋ positions (ties: the earlier one).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agents.config import config_to_json
from agents.decoding import teacher_help_decode
from agents.evaluation import encode_budget, evaluate_budgets, seeded_subset
from agents.lagrangian import trailing_fractions
from agents.policy import StudentPolicy
from agents.run import load_tasks
from agents.train import TrainConfig, call_rule_rng, episode_rewards, run
from agents.trajectories import Trajectories, collect_on_policy, oracle_batch
from tests.tiny_task import EOS, only_family, right_padded

ENV_ID = "TrainingWheels-Synthetic-v0"


# --------------------------------------------------------------------------------------------- the oracle

V = 64
MAX_NEW = 7


def random_prompts(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random prompts (ids ≥ 2: no pad, no EOS) of the given lengths."""
    return right_padded(lengths, V, torch.Generator().manual_seed(seed))


def hand_oracle_calls(teacher_logits: torch.Tensor, student_logits: torch.Tensor, budget: float) -> list[int]:
    """The top ⌊l·b⌋ positions by KL(teacher ‖ student), ties to the earlier position, by hand."""
    log_p, log_q = torch.log_softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).tolist()
    k = math.floor(Fraction(str(budget)) * len(kl))
    return sorted(sorted(range(len(kl)), key=lambda i: (-kl[i], i))[:k])


@pytest.fixture
def oracle_pair(family):
    """(teacher, policy) of the tiny task's kind; the policy's prompt summary is random (the student's
    ranking distribution reads it) and so is β (which it must not read: the oracle reads every token
    as the student's)."""
    teacher = family.teacher_lm(V, seed=5)
    policy = StudentPolicy(family.student_lm(V, seed=6)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        policy.prompt_summary.weight.normal_(std=0.3)
        policy.state_embedding.beta.normal_()
    return teacher, policy


def test_the_oracle_equals_a_hand_computation_with_full_forwards(family, oracle_pair):
    """Rows of different prompt lengths; the teacher reads its own prompts C^(T) (other lengths, other
    tokens), the student its prompts Y; budgets 0.5 and 0.3 give one to three calls per row."""
    teacher, policy = oracle_pair
    prompt_ids, prompt_mask = random_prompts([4, 9, 1, 6], seed=1)
    teacher_ids, teacher_mask = random_prompts([7, 2, 5, 11], seed=2)
    budgets = torch.tensor([0.5, 0.3, 0.5, 0.3])
    oracle = oracle_batch(teacher, policy, prompt_ids, prompt_mask, budgets, MAX_NEW, EOS,
                          teacher_prompts=(teacher_ids, teacher_mask))
    traj = oracle.trajectories
    calls_seen = 0
    for b in range(4):
        prompt = prompt_ids[b, : int(prompt_mask[b].sum())].tolist()
        teacher_prompt = teacher_ids[b, : int(teacher_mask[b].sum())].tolist()
        output = family.greedy(teacher, teacher_prompt, MAX_NEW)
        teacher_logits = family.output_logits(teacher, teacher_prompt, output)[:, :V]
        with torch.no_grad():  # every token the student's own: what the oracle ranks
            student_logits = family.policy_logits(policy, prompt, output)[:, :V]
        calls = hand_oracle_calls(teacher_logits, student_logits, float(budgets[b]))
        n = len(output)
        assert traj.mask[b].tolist() == [True] * n + [False] * (traj.mask.shape[1] - n)
        assert bool(traj.truncated[b]) == (output[-1] != EOS)
        assert torch.nonzero(traj.is_call[b]).flatten().tolist() == calls
        expected_state = [t + V if i in calls else t for i, t in enumerate(output)]
        assert traj.state_ids[b, :n].tolist() == expected_state
        assert traj.actions[b, :n].tolist() == [V if i in calls else t for i, t in enumerate(output)]
        expected_logprob = torch.log_softmax(teacher_logits, -1).gather(1, torch.tensor(output)[:, None]).squeeze(1)
        torch.testing.assert_close(traj.teacher_logprob[b, :n], expected_logprob, atol=1e-4, rtol=0)
        torch.testing.assert_close(oracle.teacher_logits[b, :n], teacher_logits, atol=1e-4, rtol=0)
        calls_seen += len(calls)
    assert calls_seen >= 4
    # The batch's widths: prompts are the student's, the episode as long as the longest row.
    assert torch.equal(traj.prompt_ids, prompt_ids) and traj.state_ids.shape[1] == int(traj.mask.sum(1).max())


# --------------------------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def tiny(family_task):
    return family_task


@pytest.fixture(scope="module")
def early_end_kwargs(family, tiny, tmp_path_factory) -> dict:
    """Env overrides with a student whose sampled episodes end at different times (the autoreset path)."""
    student = family.eager_to_end_student(tiny.student_dir, tmp_path_factory.mktemp("eager") / "student")
    return {**tiny.env_kwargs(), "student": str(student)}


def test_the_early_end_student_ends_rows_at_different_times(early_end_kwargs):
    import gymnasium as gym

    envs = gym.make_vec(ENV_ID, num_envs=6, vectorization_mode="vector_entry_point", max_new_tokens=12,
                        **early_end_kwargs)
    policy = StudentPolicy.load(early_end_kwargs["student"])
    envs.reward_stats.reset()
    lengths, tokens = set(), 0
    for k in range(3):
        batch, ends = collect_on_policy(envs, policy, [0.1] * 6, list(range(6 * k, 6 * k + 6)),
                                        torch.Generator().manual_seed(k))
        lengths |= set(batch.mask.sum(dim=1).tolist())
        tokens += int(batch.mask.sum())
        # The batch is what the env emitted: X^(out) of each row, calls marked as teacher tokens.
        for row, end in enumerate(ends):
            n = int(batch.mask[row].sum())
            assert (batch.state_ids[row, :n] % policy.vocab_size).tolist() == list(end["output_ids"])
    assert len(lengths) >= 3 and min(lengths) < 12, lengths
    # One episode per row: the normalisers saw the batches' tokens and nothing of a discarded episode.
    assert len(envs.reward_stats.state_dict()["teacher"]) == tokens


def test_a_greedy_rollout_under_call_thresholds_is_the_shipped_decoders_output(early_end_kwargs):
    # track_call_rule's greedy passes read the states of this rollout as those the shipped decoder visits.
    import gymnasium as gym

    envs = gym.make_vec(ENV_ID, num_envs=6, vectorization_mode="vector_entry_point", max_new_tokens=12,
                        **early_end_kwargs)
    policy = StudentPolicy.load(early_end_kwargs["student"])
    policy.eval()
    budgets, index = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], [3, 1, 4, 1, 5, 9]
    with torch.no_grad():
        sampled, _ = collect_on_policy(envs, policy, budgets, index, torch.Generator().manual_seed(0))
        states = policy(sampled.prompt_ids, sampled.prompt_mask, sampled.state_ids, sampled.mask.long(),
                        positions=sampled.mask)
    probability = torch.log_softmax(states.float(), dim=-1)[:, -1].exp()
    # Thresholds that call at some states and not at others: quantiles of π(<τ>) at the sampled states.
    thresholds = [float(torch.quantile(probability, q)) for q in (0.9, 0.7, 0.5, 0.3, 0.1, 0.6)]
    with torch.no_grad():
        greedy, ends = collect_on_policy(envs, policy, budgets, index, torch.Generator().manual_seed(1),
                                         call_thresholds=thresholds)
    tasks = load_tasks(ENV_ID, early_end_kwargs, "validation", {}, torch.device("cpu"), max_new_tokens=12)
    called = 0
    for row, (budget, i, c) in enumerate(zip(budgets, index, thresholds, strict=True)):
        prompts = encode_budget(tasks.train, [tasks.train.examples[i].source], budget, torch.device("cpu"))
        with torch.no_grad():
            shipped = teacher_help_decode(policy, tasks.train.teacher, prompts[0], prompts[1], 12,
                                          teacher_input_ids=prompts[2], teacher_attention_mask=prompts[3],
                                          call_threshold=c)
        n = int(greedy.mask[row].sum())
        assert list(ends[row]["output_ids"]) == shipped.output_ids[0]
        assert greedy.is_call[row, :n].tolist() == shipped.from_teacher[0]
        called += sum(shipped.from_teacher[0])
    assert 0 < called < int(greedy.mask.sum())  # the thresholds called at some tokens, not all
    with pytest.raises(ValueError, match=r"one threshold per row of the vector env \(6\), got 2"):
        collect_on_policy(envs, policy, budgets, index, torch.Generator(), call_thresholds=[0.5, 0.5])


def tiny_config(tiny, out: Path, **overrides) -> TrainConfig:
    base = dict(
        env_id=ENV_ID, env_kwargs=tiny.env_kwargs(), output_dir=str(out),
        max_new_tokens=6, bc_batches=4, bc_batch_size=6, pcl_batches=4, num_envs=6, eval_every=0,
        eval_examples=8, checkpoint_every=2, tau=0.1, policy_lr=1e-3, value_lr=1e-3, bc_lr=1e-3,
        replay_per_update=4, threads=1, device="cpu",
    )
    base.update(overrides)
    return TrainConfig(**base)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors")) | load_file(str(directory / "training_wheels.safetensors"))


def test_both_phases_run_and_select_a_policy(family, tiny, tmp_path):
    summary = run(tiny_config(tiny, tmp_path, bc_batches=3, eval_every=2))
    assert summary["phase1"]["batches"] == 3 and summary["phase2"]["batches"] == 4
    assert (tmp_path / "phase1" / "done.json").exists()
    best = summary["phase2"]["selection"]["best"]
    assert best is not None and len(best["results"]) == 6
    assert len(summary["phase2"]["selection"]["evaluations"]) == 3  # steps 0, 2 and 4
    assert (tmp_path / "best" / "selection.json").exists()
    assert not (tmp_path / "phase2-evaluated").exists()  # evaluated policies are not kept by default
    assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())
    # Phase 1 moved the student's LM, phase 2 moved the weights away from the phase-1 policy.
    student = load_file(str(tiny.student_dir / "model.safetensors"))
    phase1, final = weights(tmp_path / "phase1"), weights(tmp_path / "final")
    assert any(not torch.equal(student[k], phase1[k]) for k in student)
    assert any(not torch.equal(phase1[k], final[k]) for k in phase1)
    for name in ("phase1", "final", "best"):
        assert StudentPolicy.load(tmp_path / name, family=family.name).family.name == family.name
    # The shipped call rule: best/'s threshold per budget, calibrated on the same selection rows. At c = ½ it
    # decodes exactly what selection measured; the threshold kept is the closest to b of those tried.
    shipped = summary["call_rule"]
    assert shipped["split"] == "validation" and shipped["examples"] == 8 and len(shipped["budgets"]) == 6
    for entry, selected in zip(shipped["budgets"], best["results"], strict=True):
        assert entry["budget"] == selected["budget"]
        assert entry["own_rule_teacher_fraction"] == selected["teacher_fraction"]
        assert entry["own_rule_quality"] == pytest.approx(selected["quality"])
        assert entry["tried"][0][0] == 0.5 and [entry["threshold"], entry["teacher_fraction"]] in entry["tried"]
        assert abs(entry["teacher_fraction"] - entry["budget"]) == min(abs(f - entry["budget"]) for _, f in entry["tried"])
    assert StudentPolicy.load(tmp_path / "best").call_thresholds == {e["budget"]: e["threshold"] for e in shipped["budgets"]}
    assert StudentPolicy.load(tmp_path / "final").call_thresholds == {}  # the rule ships with best/ only


@only_family("encoder-decoder")  # the stopping rule reads selection records, not the model
def test_phase2_stops_once_settled_and_says_when_and_why(tiny, tmp_path, capsys):
    # δ = 1 meets every budget; a quality gain of 1e9 never counts as improving: settled at the third
    # evaluation (batches 0, 1, 2), four batches before the end.
    config = tiny_config(tiny, tmp_path, bc_batches=2, pcl_batches=6, eval_every=1, delta=1.0,
                         settle_evaluations=2, settle_min_gain=1e9)
    phase2 = run(config)["phase2"]
    assert phase2["batches"] == 2 and phase2["stop"]["step"] == 2
    assert "last 2 evaluations (batches 1, 2)" in phase2["stop"]["reason"]
    assert [e["step"] for e in phase2["selection"]["evaluations"]] == [0, 1, 2]
    assert json.loads((tmp_path / "summary.json").read_text())["phase2"]["stop"] == phase2["stop"]
    assert (tmp_path / "final").exists() and (tmp_path / "best" / "selection.json").exists()
    # Without the rule the same run takes every batch, and says so.
    full_summary = run(tiny_config(tiny, tmp_path / "full", bc_batches=2, pcl_batches=3, eval_every=1, delta=1.0,
                                   calibrate_calls=False))
    full = full_summary["phase2"]
    assert "call_rule" not in full_summary and not (tmp_path / "full" / "best" / "call_rule.json").exists()
    assert full["batches"] == 3 and full["stop"] == {"step": 3, "reason": "ran every batch (pcl_batches)"}
    # The budget-control report reads both runs: 2 (resp. 3) evaluations after the first third, δ = 1 meets all.
    from scripts.budget_control_report import main as report

    capsys.readouterr()  # what the two runs printed as they ended
    report([str(tmp_path), str(tmp_path / "full"), "--tolerance", "1.0", "--figure", str(tmp_path / "control.png")])
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith(f"| {tmp_path.name} | 2 of 2 |") and "| 0 | batch 2: every budget within" in out[2]
    assert out[3].startswith("| full | 2 of 2 |") and out[3].endswith("| 0 | batch 3: ran every batch (pcl_batches) |")
    assert (tmp_path / "control.png").stat().st_size > 0


@only_family("encoder-decoder")  # the rule reads π(<τ>) through the one forward both families share
def test_a_tracked_call_rule_is_evaluated_and_shipped_and_leaves_training_unchanged(tiny, early_end_kwargs, tmp_path,
                                                                                     capsys):
    overrides = dict(bc_batches=2, pcl_batches=4, eval_every=2, env_kwargs=early_end_kwargs, max_new_tokens=12,
                     oracle_rounding="stochastic", lagrange_floor=-1.0, lagrange_lr=0.5)
    plain = run(tiny_config(tiny, tmp_path / "plain", calibrate_calls=False, **overrides))
    capsys.readouterr()
    tracked = run(tiny_config(tiny, tmp_path / "tracked", track_call_rule=True, call_rule_episodes=8, **overrides))
    # tw train's end table says which rule its fractions are under, and each budget's threshold.
    table = capsys.readouterr().out.splitlines()
    header = next(line for line in table if line.strip().startswith("budget"))
    assert "teacher fraction (tracked c)" in header and header.rstrip().endswith("tracked c") and "shipped c" not in header
    # Its rollouts draw from their own streams and put the env's normalisers and RNG back: training is the same.
    for key in ("lambdas", "reward_normalisers"):
        assert tracked["phase2"][key] == plain["phase2"][key]
    a, b = weights(tmp_path / "plain" / "final"), weights(tmp_path / "tracked" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Every evaluation set its rule first (8 episodes: two batches of 6 rows; thresholds in [0, 1] per budget).
    evaluations = tracked["phase2"]["selection"]["evaluations"]
    assert [e["step"] for e in evaluations] == [0, 2, 4]
    for record in evaluations:
        rule = record["call_rule"]
        assert rule["episodes"] == 12 and [b for b, _ in rule["thresholds"]] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
        assert all(0.0 <= c <= 1.0 for _, c in rule["thresholds"]) and all(n > 0 for n in rule["states"].values())
    # The selected policy ships with the rule it was evaluated with; no calibration on the selection rows after.
    best = tracked["phase2"]["selection"]["best"]
    shipped = StudentPolicy.load(tmp_path / "tracked" / "best").call_thresholds
    assert shipped == {b: c for b, c in best["call_rule"]["thresholds"]}
    assert tracked["call_rule"]["tracked"].startswith(f"set at PCL batch {best['step']} ")
    assert [e["threshold"] for e in tracked["call_rule"]["budgets"]] == [c for _, c in best["call_rule"]["thresholds"]]
    assert [e["teacher_fraction"] for e in tracked["call_rule"]["budgets"]] == [r["teacher_fraction"] for r in best["results"]]
    # The recorded fractions are what the shipped policy decodes on the selection rows.
    tasks = load_tasks(ENV_ID, early_end_kwargs, "validation", {}, torch.device("cpu"), max_new_tokens=12)
    again = evaluate_budgets(StudentPolicy.load(tmp_path / "tracked" / "best"), tasks.train,
                             seeded_subset(tasks.selection.examples, 8, 0), [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 12)
    assert [r.teacher_fraction for r in again] == [r["teacher_fraction"] for r in best["results"]]
    # A greedy pass starts from the sampled rollouts' thresholds (the same streams: the same values) and
    # re-takes the quantile over greedy states; training is still untouched.
    greedy = run(tiny_config(tiny, tmp_path / "greedy", track_call_rule=True, call_rule_episodes=8,
                             call_rule_greedy_passes=1, **overrides))
    for key in ("lambdas", "reward_normalisers"):
        assert greedy["phase2"][key] == plain["phase2"][key]
    for record, sampled in zip(greedy["phase2"]["selection"]["evaluations"], evaluations, strict=True):
        (one_pass,) = record["call_rule"]["greedy_passes"]
        assert one_pass["start"] == sampled["call_rule"]["thresholds"]
        assert all(0.0 <= f <= 1.0 for f in one_pass["fraction_at_start"].values())
        assert all(0.0 <= c <= 1.0 for _, c in record["call_rule"]["thresholds"])
    # A larger greedy sample (call_rule_greedy_episodes): the sampled pass is the same draws, the greedy pass
    # rolls out more prompts and reads more states; training is still untouched.
    larger = run(tiny_config(tiny, tmp_path / "larger", track_call_rule=True, call_rule_episodes=8,
                             call_rule_greedy_passes=1, call_rule_greedy_episodes=24, **overrides))
    assert larger["phase2"]["lambdas"] == plain["phase2"]["lambdas"]
    rows = 6  # tiny_config's num_envs: the episodes round up to whole batches
    for record, small in zip(larger["phase2"]["selection"]["evaluations"],
                             greedy["phase2"]["selection"]["evaluations"], strict=True):
        assert record["call_rule"]["greedy_passes"][0]["start"] == small["call_rule"]["greedy_passes"][0]["start"]
        assert record["call_rule"]["episodes"] == small["call_rule"]["episodes"]
        assert record["call_rule"]["greedy_episodes"] == -(-24 // rows) * rows > small["call_rule"]["greedy_episodes"]
        assert sum(record["call_rule"]["states"].values()) > sum(small["call_rule"]["states"].values())
    with pytest.raises(ValueError, match="call_rule_greedy_episodes sizes the greedy passes .* got 24"):
        TrainConfig(track_call_rule=True, call_rule_greedy_episodes=24).validate()
    with pytest.raises(ValueError, match="call_rule_greedy_episodes sizes the greedy passes .* got 5"):
        TrainConfig(track_call_rule=True, call_rule_greedy_passes=1, call_rule_greedy_episodes=5).validate()
    with pytest.raises(ValueError, match="call_rule_greedy_passes re-fits the tracked call rule"):
        TrainConfig(call_rule_greedy_passes=1).validate()
    with pytest.raises(ValueError, match="call_rule_greedy_passes"):
        TrainConfig(track_call_rule=True, call_rule_greedy_passes=-1).validate()
    with pytest.raises(ValueError, match="call_rule_corpora narrows the prompts of the tracked call rule"):
        TrainConfig(call_rule_corpora=["multi30k"]).validate()
    with pytest.raises(ValueError, match="call_rule_corpora must be a list of corpus names"):
        TrainConfig(track_call_rule=True, call_rule_corpora=[""]).validate()


def test_fixed_call_rule_prompts_are_the_same_draws_at_every_evaluation_and_fresh_ones_are_not():
    def draws(config: TrainConfig, step: int, rank: int = 0) -> list[int]:
        return call_rule_rng(config, step, rank).integers(1_000_000, size=8).tolist()

    fresh = TrainConfig(track_call_rule=True)
    fixed = TrainConfig(track_call_rule=True, call_rule_fixed_prompts=True)
    fixed.validate()
    assert draws(fixed, 30) == draws(fixed, 0) == draws(fixed, 150)
    assert draws(fixed, 30, rank=1) != draws(fixed, 30, rank=0)  # each rank still draws its own rows
    assert draws(fresh, 30) != draws(fresh, 0)
    assert draws(TrainConfig(track_call_rule=True, call_rule_fixed_prompts=True, seed=1), 0) != draws(fixed, 0)
    with pytest.raises(ValueError, match="call_rule_fixed_prompts fixes the prompts of the tracked call rule"):
        TrainConfig(call_rule_fixed_prompts=True).validate()


@only_family("encoder-decoder")
def test_a_refined_call_rule_starts_from_the_tracked_one_and_ships_what_lands_on_the_selection_rows(
        tiny, early_end_kwargs, tmp_path, capsys):
    overrides = dict(bc_batches=2, pcl_batches=2, eval_every=2, env_kwargs=early_end_kwargs, max_new_tokens=12,
                     oracle_rounding="stochastic", lagrange_floor=-1.0, lagrange_lr=0.5, eval_examples=8)
    summary = run(tiny_config(tiny, tmp_path, track_call_rule=True, call_rule_episodes=8, refine_call_rule=True,
                              calibration_tolerance=0.0, **overrides))
    table = capsys.readouterr().out.splitlines()
    header = next(line for line in table if line.strip().startswith("budget"))
    assert "tracked c" in header and "shipped c" in header
    best = summary["phase2"]["selection"]["best"]
    tracked = {b: c for b, c in best["call_rule"]["thresholds"]}
    refined = summary["call_rule"]["refined"]
    assert refined["examples"] == 8 and refined["split"] == "validation"
    for entry in refined["budgets"]:
        start = min(max(tracked[entry["budget"]], 1e-6), 1 - 1e-6)
        # Each search starts from the tracked threshold (its figures are the evaluation's) ...
        assert entry["tried"][0][0] == start
        if start != 0.5:
            assert entry["start_threshold"] == start
            assert entry["start_teacher_fraction"] == next(r["teacher_fraction"] for r in best["results"]
                                                           if r["budget"] == entry["budget"])
        # ... and ships the threshold closest to its budget of all it tried.
        assert abs(entry["teacher_fraction"] - entry["budget"]) == min(abs(f - entry["budget"]) for _, f in entry["tried"])
    shipped = StudentPolicy.load(tmp_path / "best").call_thresholds
    assert shipped == {e["budget"]: e["threshold"] for e in refined["budgets"]}
    tasks = load_tasks(ENV_ID, early_end_kwargs, "validation", {}, torch.device("cpu"), max_new_tokens=12)
    again = evaluate_budgets(StudentPolicy.load(tmp_path / "best"), tasks.train, seeded_subset(tasks.selection.examples, 8, 0),
                             [e["budget"] for e in refined["budgets"]], 12)
    assert [r.teacher_fraction for r in again] == [e["teacher_fraction"] for e in refined["budgets"]]
    with pytest.raises(ValueError, match="refine_call_rule re-fits the tracked call rule: set track_call_rule true"):
        TrainConfig(refine_call_rule=True).validate()


@only_family("encoder-decoder")
def test_a_policy_trained_to_read_its_prompt_by_attention_learns_its_query(tiny, tmp_path):
    run(tiny_config(tiny, tmp_path, bc_batches=3, pcl_batches=2, calibrate_calls=False, prompt_read="attention"))
    phase1, final = StudentPolicy.load(tmp_path / "phase1"), StudentPolicy.load(tmp_path / "final")
    assert phase1.prompt_query is not None and torch.count_nonzero(phase1.prompt_query) > 0  # learnt from zeros
    assert final.prompt_query is not None and not torch.equal(final.prompt_query, phase1.prompt_query)


@only_family("encoder-decoder")
def test_kept_evaluated_policies_are_the_policies_each_evaluation_scored(tiny, tmp_path):
    summary = run(tiny_config(tiny, tmp_path, eval_every=2, keep_evaluated_policies=True))
    evaluations = summary["phase2"]["selection"]["evaluations"]
    kept = sorted((tmp_path / "phase2-evaluated").glob("step-*"))  # each a link to its atomically published version
    assert [p.name for p in kept] == ["step-000000", "step-000002", "step-000004"] == [
        f"step-{e['step']:06d}" for e in evaluations]
    for folder, record in zip(kept, evaluations, strict=True):
        assert json.loads((folder / "selection.json").read_text()) == record
    # Batch 0 is the phase-1 policy and the last one the final policy, weight for weight.
    assert all(torch.equal(a, b) for a, b in zip(weights(kept[0]).values(), weights(tmp_path / "phase1").values(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(weights(kept[-1]).values(), weights(tmp_path / "final").values(), strict=True))
    # The middle one is the policy of batch 2: neither the phase-1 nor the final one.
    middle = weights(kept[1])
    for other in (weights(tmp_path / "phase1"), weights(tmp_path / "final")):
        assert any(not torch.equal(middle[k], other[k]) for k in middle)


def _lambdas_by_hand(batches: list[Trajectories], budgets, lr: float, floor: float, cap: float,
                     window: int) -> dict[float, float]:
    """λ_b ← clip(λ_b + lr·(f_b − b), floor, cap) after each on-policy batch, from λ = 0, with f_b the
    token-level teacher fraction of budget b over the last ``window`` batches, counted here from
    the batches' actions."""
    lam = {float(b): 0.0 for b in budgets}
    counts: list[dict[float, tuple[int, int]]] = []
    for batch in batches:
        per_budget = {}
        for b in lam:
            rows = (batch.budget - b).abs() < 1e-6
            per_budget[b] = (int((batch.is_call & batch.mask)[rows].sum()), int(batch.mask[rows].sum()))
        counts = (counts + [per_budget])[-window:]
        for b in lam:
            calls, tokens = (sum(c[b][i] for c in counts) for i in (0, 1))
            if tokens:
                lam[b] = min(max(lam[b] + lr * (calls / tokens - b), floor), cap)
    return lam


@only_family("encoder-decoder")
def test_a_negative_lagrange_floor_lets_under_used_budgets_pay_for_calls(tiny, tmp_path, monkeypatch):
    """A fresh student almost never calls: b = 0.5 is under-used, so its λ goes below 0 (down to
    the floor) when the floor allows it, and stays at 0 with the paper's floor.  No budget is below
    zero use, so b = 0's λ never goes below 0, even with the negative floor: it rises as soon as the
    student calls under "no teacher use".  Every λ is checked against the dual step applied by hand
    to the teacher use counted in the on-policy batches."""
    import agents.train as train_module

    collected: list[Trajectories] = []
    real_collect = train_module.collect_on_policy

    def recording_collect(*args, **kwargs):
        batch, infos = real_collect(*args, **kwargs)
        collected.append(batch)
        return batch, infos

    monkeypatch.setattr(train_module, "collect_on_policy", recording_collect)

    def run_phase2(name: str, init: Path, **overrides) -> tuple[dict[float, float], dict[float, float], list[Trajectories]]:
        """(λ at the end of the run, λ by hand from its on-policy batches, those batches)."""
        collected.clear()
        config = tiny_config(tiny, tmp_path / name, phase="pcl", init=str(init), **overrides)
        lambdas = {float(b): v for b, v in run(config)["phase2"]["lambdas"].items()}
        assert len(collected) == config.pcl_batches
        by_hand = _lambdas_by_hand(collected, config.budgets, config.lagrange_lr, config.lagrange_floor,
                                   config.lagrange_cap, config.lagrange_window)
        return lambdas, by_hand, list(collected)

    common = dict(bc_batches=0, pcl_batches=3, lagrange_lr=5.0, oracle_rounding="stochastic", rollout_temperature=1.0)
    run(tiny_config(tiny, tmp_path / "bc", bc_batches=1, pcl_batches=0, phase="bc"))
    init = tmp_path / "bc" / "phase1"
    lam_target, hand_target, _ = run_phase2("target", init, lagrange_floor=-1.0, **common)
    lam_ceiling, hand_ceiling, _ = run_phase2("ceiling", init, **common)
    assert -1.0 <= lam_target[0.5] < 0
    assert lam_ceiling[0.5] == 0.0
    assert lam_target == pytest.approx(hand_target, abs=1e-9)
    assert lam_ceiling == pytest.approx(hand_ceiling, abs=1e-9)

    # The same student with its <τ> logit forced up calls at every budget, b = 0 included: with the
    # negative floor every λ rises (a small dual rate keeps them below the cap).
    caller = StudentPolicy.load(init)
    with torch.no_grad():
        caller.call_head.weight.zero_()
        caller.call_head.bias.fill_(1e4)
    caller.save(tmp_path / "caller-init")
    lam_caller, hand_caller, batches = run_phase2("caller", tmp_path / "caller-init", lagrange_floor=-1.0,
                                                  **{**common, "lagrange_lr": 0.1})
    calls_at_0 = sum(int((b.is_call & b.mask)[b.budget.abs() < 1e-6].sum()) for b in batches)
    assert calls_at_0 > 0
    assert lam_caller == pytest.approx(hand_caller, abs=1e-9)
    assert 0 < lam_caller[0.0] < 2.0


def test_rewards_are_recomputed_with_current_lambda():
    batch = Trajectories(
        prompt_ids=torch.ones(1, 2, dtype=torch.long), prompt_mask=torch.ones(1, 2, dtype=torch.long),
        state_ids=torch.tensor([[3, 4 + 10, 5]]), actions=torch.tensor([[3, 10, 5]]),
        teacher_logprob=torch.tensor([[-1.0, -0.2, -3.0]]), is_call=torch.tensor([[False, True, False]]),
        mask=torch.tensor([[True, True, False]]), budget=torch.tensor([0.3]), truncated=torch.tensor([False]),
    )
    rewards = episode_rewards(batch, {0.3: 0.5, 0.0: 0.0}, mu=-0.5, sigma=2.0)
    # student token: (−1 − (−0.5))/2 + 0.5·0.3 = −0.1; call: 0.5·(0.3 − 1) = −0.35; padding: 0.
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, -0.35, 0.0]]))


def test_trailing_fractions_are_token_level():
    history = [{0.1: (1, 10), 0.3: (3, 9)}, {0.1: (3, 10)}]
    assert trailing_fractions(history) == {0.1: 0.2, 0.3: 1 / 3}


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="phase"):
        TrainConfig(phase="rl").validate()
    with pytest.raises(ValueError, match="budgets"):
        TrainConfig(budgets=[0.1, 1.5]).validate()
    with pytest.raises(ValueError, match="lagrange_rule must be one of .*'pi'"):
        TrainConfig(lagrange_rule="pi").validate()
    with pytest.raises(ValueError, match="gains must be >= 0"):
        TrainConfig(lagrange_rule="pid", pid_kp=-1.0).validate()
    with pytest.raises(ValueError, match="set eval_every > 0"):
        TrainConfig(settle_evaluations=3, eval_every=0).validate()
    with pytest.raises(ValueError, match="prompt_read must be one of \\['mean', 'attention'\\], got 'max'"):
        TrainConfig(prompt_read="max").validate()
    with pytest.raises(ValueError, match="call_rule_episodes must be at least the number of budgets \\(6\\) .* got 5"):
        TrainConfig(track_call_rule=True, call_rule_episodes=5).validate()


def _launch(config: TrainConfig, config_path: Path) -> subprocess.Popen:
    config_path.write_text(config_to_json(config))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "scripts.cli", "train", "--config", str(config_path)],
        cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def test_same_seed_twice_gives_identical_phase2(tiny, early_end_kwargs, tmp_path):
    """Rows end at different times (the early-end path); two runs of one config agree exactly."""
    overrides = dict(env_kwargs=early_end_kwargs, max_new_tokens=12, bc_batches=2, pcl_batches=3, eval_every=2,
                     oracle_rounding="stochastic", lagrange_floor=-1.0, lagrange_lr=0.5)
    first = run(tiny_config(tiny, tmp_path / "first", **overrides))["phase2"]
    second = run(tiny_config(tiny, tmp_path / "second", **overrides))["phase2"]
    assert first["lambdas"] == second["lambdas"]
    assert first["reward_normalisers"] == second["reward_normalisers"]
    assert first["selection"]["evaluations"] == second["selection"]["evaluations"]
    a, b = weights(tmp_path / "first" / "final"), weights(tmp_path / "second" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_run_resumes_exactly(tiny, early_end_kwargs, tmp_path):
    """SIGKILL a run right after its first phase-2 checkpoint; the resumed run ends bit-identical.

    The student ends its episodes at different times, so the early-end path is exercised."""
    _check_killed_run_resumes_exactly(tiny, early_end_kwargs, tmp_path)


@only_family("encoder-decoder")  # the dual reads no model: one family shows its state resumes
def test_killed_run_with_the_pid_dual_resumes_exactly(tiny, early_end_kwargs, tmp_path):
    """The same with the PID dual: its integral, moving averages and previous fraction are checkpointed."""
    _check_killed_run_resumes_exactly(tiny, early_end_kwargs, tmp_path, lagrange_rule="pid", pid_kd=0.5)


def _check_killed_run_resumes_exactly(tiny, early_end_kwargs, tmp_path, **extra) -> None:
    overrides = dict(bc_batches=2, pcl_batches=6, checkpoint_every=2, oracle_rounding="stochastic", lagrange_floor=-1.0,
                     env_kwargs=early_end_kwargs, max_new_tokens=12, **extra)
    reference = tiny_config(tiny, tmp_path / "reference", **overrides)
    proc = _launch(reference, tmp_path / "reference.json")
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]

    interrupted = tiny_config(tiny, tmp_path / "interrupted", **overrides)
    proc = _launch(interrupted, tmp_path / "interrupted.json")
    pointer = tmp_path / "interrupted" / "phase2-checkpoints" / "latest"
    deadline = time.time() + 600
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "interrupted" / "final").exists()
    proc = _launch(interrupted, tmp_path / "interrupted.json")
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]

    a, b = weights(tmp_path / "reference" / "final"), weights(tmp_path / "interrupted" / "final")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    summary_a = json.loads((tmp_path / "reference" / "summary.json").read_text())["phase2"]
    summary_b = json.loads((tmp_path / "interrupted" / "summary.json").read_text())["phase2"]
    assert summary_a["lambdas"] == summary_b["lambdas"]
    assert summary_a["reward_normalisers"] == summary_b["reward_normalisers"]


def test_policy_lr_factor_by_hand():
    from agents.train import TrainConfig, policy_lr_factor

    # 300 batches, decay from batch 100 (a third) to 0.1 at the last batch, linearly.
    assert [policy_lr_factor(s, 300, 1 / 3, 0.1) for s in (0, 99, 100, 299)] == [1.0, 1.0, 1.0, pytest.approx(0.1)]
    assert policy_lr_factor(199, 300, 1 / 3, 0.1) == pytest.approx(1 - 0.9 * 99 / 199)
    assert all(policy_lr_factor(s, 300, 1.0, 0.1) == 1.0 for s in range(300))  # the default: constant
    with pytest.raises(ValueError, match="policy_lr_final"):
        TrainConfig(policy_lr_final=1.5).validate()
