"""The PPO ablation: the SB3 adapter's autoreset, the LM actor-critic, λ, and `agents.ppo.run`.

Everything runs on tiny random T5s over the synthetic language's word-level tokenizer; nothing is
downloaded or trained beyond a few PPO updates.
"""

from __future__ import annotations

import json
import types

import gymnasium as gym
import numpy as np
import pytest
import torch

import tw_env  # noqa: F401  (registers the tasks)
from agents.policy import StudentPolicy, choose_actions
from agents.sb3_adapter import LagrangeCallback, LMActorCriticPolicy, SB3VecEnvAdapter

MAX_NEW_TOKENS = 6
NUM_ENVS = 4


def _tiny_t5(path, vocab_size: int, seed: int):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, dropout_rate=0.0,
    )
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # soften random T5 v1.1 outputs so that rewards stay inside the clip range
        model.decoder.final_layer_norm.weight.mul_(0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tw_env.synthetic import SyntheticLanguage, build_tokenizer, padded_vocab_size

    root = tmp_path_factory.mktemp("ppo")
    language = SyntheticLanguage(seed=0, n_topics=2, n_words=30, n_target_words=30)
    tokenizer = build_tokenizer(language)
    tokenizer.save_pretrained(root / "tokenizer")
    vocab = padded_vocab_size(tokenizer)
    teacher = _tiny_t5(root / "teacher", vocab, seed=0)
    student = _tiny_t5(root / "student", vocab, seed=1)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in language.sample(12, rng_seed=0)))
    phase1 = root / "phase1"
    StudentPolicy.load(student).save(phase1)
    # A phase-1 policy that asks the teacher almost always: its teacher use exceeds every budget.
    caller = StudentPolicy.load(student)
    with torch.no_grad():
        caller.call_head.bias.fill_(8.0)
    caller.save(root / "phase1-caller")
    return types.SimpleNamespace(
        root=root, vocab=vocab, teacher=str(teacher), student=str(student), tokenizer=str(root / "tokenizer"),
        data=str(data), phase1=str(phase1), caller=str(root / "phase1-caller"),
    )


def env_kwargs(assets) -> dict:
    return dict(teacher=assets.teacher, student=assets.student, tokenizer=assets.tokenizer, data=assets.data,
                max_new_tokens=MAX_NEW_TOKENS)


def make_envs(assets, **kwargs):
    return gym.make_vec("TrainingWheels-Synthetic-v0", num_envs=NUM_ENVS, vectorization_mode="vector_entry_point",
                        **env_kwargs(assets), **kwargs)


def row(obs: dict, i: int) -> dict:
    return {k: v[i] for k, v in obs.items()}


# ---------------------------------------------------------------------------------------------- adapter


def test_adapter_follows_the_sb3_vecenv_contract_and_loses_no_action(assets):
    from stable_baselines3.common.vec_env import VecEnv
    from transformers import T5ForConditionalGeneration

    teacher = T5ForConditionalGeneration.from_pretrained(assets.teacher).eval()
    # The teacher reads the observed prompt Y here, so its scores can be checked from the observation.
    adapter = SB3VecEnvAdapter(make_envs(assets, teacher_prompt=None))
    assert isinstance(adapter, VecEnv) and adapter.num_envs == NUM_ENVS
    V = adapter.action_space.n - 1
    adapter.seed(3)
    obs = adapter.reset()
    assert set(obs) == {"prompt_ids", "prompt_length", "state_ids", "state_length", "budget"}
    assert all(v.shape[0] == NUM_ENVS for v in obs.values())
    assert (obs["state_length"] == 0).all()
    rng = np.random.default_rng(0)
    seen = {"terminated": 0, "truncated": 0, "calls": 0}
    for _ in range(30):
        actions = rng.integers(3, V, size=NUM_ENVS)
        actions[rng.random(NUM_ENVS) < 0.2] = V  # <τ>
        actions[rng.random(NUM_ENVS) < 0.1] = 1  # EOS: terminates
        new_obs, rewards, dones, infos = adapter.step(actions)
        assert isinstance(infos, list) and len(infos) == NUM_ENVS
        assert rewards.shape == (NUM_ENVS,) and dones.dtype == bool
        for i in range(NUM_ENVS):
            before, info = row(obs, i), infos[i]
            length = int(before["state_length"][0])
            assert ("terminal_observation" in info) == bool(dones[i])
            after = info["terminal_observation"] if dones[i] else row(new_obs, i)
            assert adapter.observation_space.contains(after)
            # The action was applied to the episode SB3 chose it for: nothing was lost.
            assert after["state_length"][0] == length + 1
            stored = int(after["state_ids"][length])
            emitted = stored - V if stored >= V else stored
            if actions[i] == V:
                assert stored >= V
                seen["calls"] += 1
            else:
                assert stored == actions[i]
            # ... and scored against the teacher's distribution for exactly that prefix.
            prompt = torch.as_tensor(before["prompt_ids"][: before["prompt_length"][0]])[None]
            prefix = [0] + [t - V if t >= V else t for t in before["state_ids"][:length].tolist()]
            with torch.no_grad():
                logits = teacher(input_ids=prompt, decoder_input_ids=torch.tensor([prefix])).logits[0, -1, :V]
            expected = torch.log_softmax(logits.float(), -1)[emitted].item()
            assert info["teacher_logprob"] == pytest.approx(expected, abs=1e-4)
            if dones[i]:
                terminated = emitted == 1
                assert info["TimeLimit.truncated"] == (not terminated)
                assert terminated or length + 1 == MAX_NEW_TOKENS
                seen["terminated" if terminated else "truncated"] += 1
                assert len(info["output_ids"]) == length + 1 and "teacher_fraction" in info
                assert new_obs["state_length"][i, 0] == 0  # the new episode's first observation
        obs = new_obs
    assert seen["terminated"] and seen["truncated"] and seen["calls"]


def test_rows_ending_together_with_different_lengths(assets):
    """Two rows end in the same step after 1 and 2 tokens (their output_ids differ in length)."""
    from stable_baselines3.common.vec_env import VecMonitor

    venv = VecMonitor(SB3VecEnvAdapter(make_envs(assets)))
    venv.reset()
    _, _, dones, _ = venv.step(np.array([1, 5, 5, 5]))  # row 0 emits EOS: ends after one token
    assert dones.tolist() == [True, False, False, False]
    obs, _, dones, infos = venv.step(np.array([1, 1, 5, 5]))  # rows 0 and 1 end: 1 and 2 tokens
    assert dones.tolist() == [True, True, False, False]
    assert [len(infos[i]["output_ids"]) for i in (0, 1)] == [1, 2]
    assert [infos[i]["episode"]["l"] for i in (0, 1)] == [1, 2]  # VecMonitor's episode statistics
    assert not infos[0]["TimeLimit.truncated"] and not infos[1]["TimeLimit.truncated"]
    assert [infos[i]["terminal_observation"]["state_ids"][0] for i in (0, 1)] == [1, 5]
    assert obs["state_length"][:, 0].tolist() == [0, 0, 2, 2]
    with pytest.raises(TypeError, match="reset_done_rows"):
        SB3VecEnvAdapter(object())


# ---------------------------------------------------------------------------------------------- policy


def collect_observations(adapter, steps: int) -> dict:
    obs, batches = adapter.reset(), []
    rng = np.random.default_rng(2)
    for _ in range(steps):
        batches.append(obs)
        obs, *_ = adapter.step(rng.integers(3, adapter.action_space.n, size=adapter.num_envs))
    return {k: np.concatenate([b[k] for b in batches]) for k in obs}


def test_policy_distribution_is_the_students_log_softmax(assets):
    from stable_baselines3.common.utils import obs_as_tensor

    adapter = SB3VecEnvAdapter(make_envs(assets))
    policy = LMActorCriticPolicy(adapter.observation_space, adapter.action_space, lambda _: 1e-4,
                                 student=assets.phase1)
    assert not hasattr(policy, "action_net") and not hasattr(policy, "mlp_extractor")
    reference = StudentPolicy.load(assets.phase1).eval()
    obs = collect_observations(adapter, 5)
    lengths = obs["state_length"][:, 0]
    assert len(set(lengths.tolist())) > 2  # a mix of prefixes
    with torch.no_grad():
        prompt_ids = torch.as_tensor(obs["prompt_ids"])
        prompt_mask = (torch.arange(prompt_ids.shape[1])[None] < torch.as_tensor(obs["prompt_length"])).long()
        state_ids = torch.as_tensor(obs["state_ids"])
        state_mask = (torch.arange(state_ids.shape[1])[None] < torch.as_tensor(obs["state_length"])).long()
        expected = torch.log_softmax(reference(prompt_ids, prompt_mask, state_ids, state_mask).float(), -1)
        expected = expected[torch.arange(len(lengths)), torch.as_tensor(lengths)]
        for as_float in (False, True):  # SB3's preprocessing casts Box observations to float
            tensors = obs_as_tensor(obs, policy.device)
            if as_float:
                tensors = {k: v.float() for k, v in tensors.items()}
            dist = policy.get_distribution(tensors)
            assert dist.distribution.logits.shape == (len(lengths), assets.vocab + 1)
            torch.testing.assert_close(dist.distribution.logits, expected, atol=1e-5, rtol=1e-5)
        actions = torch.as_tensor(np.random.default_rng(0).integers(0, assets.vocab + 1, size=len(lengths)))
        values, log_prob, entropy = policy.evaluate_actions(tensors, actions)
        torch.testing.assert_close(log_prob, expected.gather(1, actions[:, None]).squeeze(1), atol=1e-5, rtol=1e-5)
        assert values.shape == (len(lengths), 1) and entropy.shape == (len(lengths),)
        assert policy.predict_values(tensors).shape == (len(lengths), 1)
        # Deterministic actions follow the decoders' greedy rule (call iff π(<τ>) > ½), in both paths.
        greedy = choose_actions(expected)
        assert torch.equal(policy._predict(tensors, deterministic=True), greedy)
        assert torch.equal(policy(tensors, deterministic=True)[0], greedy)

    # With a separate ValueNetwork (a copy of the student) the distribution is the same.
    network = LMActorCriticPolicy(adapter.observation_space, adapter.action_space, lambda _: 1e-4,
                                  student=assets.phase1, value_model="network", value_lr_scale=0.1)
    with torch.no_grad():
        values, log_prob, _ = network.evaluate_actions(tensors, actions)
    torch.testing.assert_close(log_prob, expected.gather(1, actions[:, None]).squeeze(1), atol=1e-5, rtol=1e-5)
    assert values.shape == (len(lengths), 1)
    assert [g["lr_scale"] for g in network.optimizer.param_groups] == [1.0, 0.1]


# ---------------------------------------------------------------------------------------------- PPO and λ


def test_ppo_learn_updates_the_lm_and_raises_lambda(assets):
    from stable_baselines3 import PPO

    budgets = [0.1, 0.5]
    adapter = SB3VecEnvAdapter(make_envs(assets, budgets=budgets))
    model = PPO(
        LMActorCriticPolicy, adapter, n_steps=MAX_NEW_TOKENS, batch_size=12, n_epochs=2, learning_rate=1e-3,
        gamma=1.0, policy_kwargs={"student": assets.caller}, seed=0, device="cpu",
    )
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    callback = LagrangeCallback(budgets, lr=1e-2, cap=2.0)
    model.learn(2 * MAX_NEW_TOKENS * NUM_ENVS, callback=callback)
    after = model.policy.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("student.model.") for k in changed)
    assert "student.call_head.bias" in changed and any(k.startswith("value_head.") for k in changed)
    assert all(f > 0.5 for f in callback.fractions.values()) and callback.fractions
    for b in budgets:
        assert callback.lambdas[b] > 0
    assert adapter.lagrange_multipliers == pytest.approx(callback.lambdas)


def test_lagrange_callback_raises_lambda_only_where_use_exceeds_the_budget(assets):
    from stable_baselines3.common.logger import Logger

    adapter = SB3VecEnvAdapter(make_envs(assets, budgets=[0.1, 0.5]))
    callback = LagrangeCallback([0.1, 0.5], lr=0.1, cap=2.0, window=2)
    callback.init_callback(types.SimpleNamespace(get_env=lambda: adapter, logger=Logger(None, []), num_timesteps=0))
    ended = [
        {"budget": 0.1, "teacher_fraction": 0.5, "output_ids": np.zeros(4)},  # 2 calls / 4 tokens
        {"budget": 0.1, "teacher_fraction": 0.0, "output_ids": np.zeros(4)},  # 0 / 4
        {"budget": 0.5, "teacher_fraction": 0.25, "output_ids": np.zeros(4)},  # 1 / 4
        {"budget": 0.5, "teacher_fraction": 1.0, "output_ids": np.zeros(2)},  # not ended: ignored
    ]
    callback.on_rollout_start()
    callback.update_locals({"dones": np.array([True, True, True, False]), "infos": ended})
    callback.on_step()
    callback.on_rollout_end()
    assert callback.fractions == pytest.approx({0.1: 0.25, 0.5: 0.25})
    assert callback.lambdas[0.1] == pytest.approx(0.1 * (0.25 - 0.1))  # f > b: λ rises
    assert callback.lambdas[0.5] == 0.0  # f < b: λ stays clipped at 0
    assert adapter.lagrange_multipliers[0.1] == pytest.approx(0.015)
    state = callback.state_dict()
    restored = LagrangeCallback([0.1, 0.5], window=2)
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.lambdas == callback.lambdas and list(restored.history) == list(callback.history)


# ---------------------------------------------------------------------------------------------- run


def test_run_trains_evaluates_saves_and_resumes(assets, tmp_path, capsys):
    from agents.checkpoint import latest_checkpoint, load_json, save_json
    from agents.ppo import CHECKPOINTS, PPOConfig, run

    out = tmp_path / "ppo"
    rollout = MAX_NEW_TOKENS * 2
    config = PPOConfig(
        env_kwargs=env_kwargs(assets), init=assets.caller, output_dir=str(out), device="cpu", num_envs=2,
        n_steps=MAX_NEW_TOKENS, batch_size=rollout, n_epochs=1, total_timesteps=rollout,
        checkpoint_every=rollout, budgets=[0.1, 0.5], eval_examples=3, eval_batch_size=2,
    )
    summary = run(config)
    assert summary["timesteps"] == rollout and not summary["stopped_by_wall_time"]
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert len(summary["eval"]["results"]) == 2
    printed = capsys.readouterr().out.splitlines()  # a short ending: the table per budget, then the files
    assert printed[0].startswith(f"tw train --algo ppo: {rollout} timesteps")
    r, shipped = summary["eval"]["results"][1], summary["call_rule"]["budgets"][1]
    assert printed[3].split() == ["0.5", f"{r['teacher_fraction']:.3f}", f"{r['quality']:.2f}", f"{summary['lambdas']['0.5']:+.3f}",
                                  f"{shipped['threshold']:.3g}", f"{shipped['teacher_fraction']:.3f}", f"{shipped['quality']:.2f}"]
    assert any(line.split() == ["summary", str(out / "summary.json")] for line in printed) and len(printed) < 15
    assert (out / "final" / "training_wheels.safetensors").exists()
    # The final policy ships the call rule calibrated on the same selection rows as the raw evaluation
    # beside it (as tw train's best/ does): the raw rule's figures are the evaluation's, and the shipped
    # thresholds decode to the recorded fractions.
    final = StudentPolicy.load(out / "final")
    assert final.call_thresholds == {e["budget"]: e["threshold"] for e in summary["call_rule"]["budgets"]}
    assert [(e["own_rule_teacher_fraction"], e["own_rule_quality"]) for e in summary["call_rule"]["budgets"]] == [
        (x["teacher_fraction"], x["quality"]) for x in summary["eval"]["results"]]
    assert summary["call_rule"]["examples"] == 3 and summary["call_rule"]["split"] == "validation"
    from agents.evaluation import evaluate_budgets, seeded_subset
    from agents.run import load_tasks

    tasks = load_tasks(config.env_id, config.env_kwargs, "validation", {}, torch.device("cpu"), budgets=config.budgets,
                       max_new_tokens=config.max_new_tokens)
    again = evaluate_budgets(final, tasks.selection, seeded_subset(tasks.selection.examples, 3, config.seed),
                             config.budgets, tasks.train.max_new_tokens, batch_size=2)
    assert [x.teacher_fraction for x in again] == [e["teacher_fraction"] for e in summary["call_rule"]["budgets"]]
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
    first = latest_checkpoint(out / CHECKPOINTS)
    state = load_json(first / "state.json")
    first_lambdas = summary["lambdas"]
    assert state["num_timesteps"] == rollout and (first / "model.zip").exists()

    assert max(first_lambdas.values()) > 0  # the caller's teacher use exceeds the budgets

    # A longer run in the same OUTPUT_DIR resumes from the checkpoint, λ included: mark the saved λ.
    state["lagrange"]["lambdas"] = [[b, 1.0] for b, _ in state["lagrange"]["lambdas"]]
    save_json(first / "state.json", state)
    config.total_timesteps = 2 * rollout
    summary = run(config)
    assert summary["timesteps"] == 2 * rollout
    second = latest_checkpoint(out / CHECKPOINTS)
    assert second != first and load_json(second / "state.json")["num_timesteps"] == 2 * rollout
    # One more rollout after the marked λ = 1: at most one step of 1e-2·(1 − b) up.
    assert all(1.0 <= v <= 1.0 + 1e-2 for v in summary["lambdas"].values())
    assert max(summary["lambdas"].values()) > 1.0

    # A wall-time budget stops training early and still evaluates and saves.
    config.total_timesteps, config.wall_time_seconds = 10 * rollout, 1e-6
    summary = run(config)
    assert summary["stopped_by_wall_time"] and summary["timesteps"] < 4 * rollout
