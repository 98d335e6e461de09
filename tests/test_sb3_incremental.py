"""The SB3 policy's incremental reads, for both model families (a tiny T5 pair and a Llama/Qwen2 pair).

- Rollouts: one decoder step per env step with per-row restarts; its action logits and values equal
  the old computation (one teacher-forced pass over every observation's whole prefix), through
  autoresets, a weight change between two calls (the cache is rebuilt) and SB3's one-row calls on
  terminal observations (the rollout's cache is left alone).
- Training: one teacher-forced pass per episode of the minibatch; log-probs, values, entropies and
  gradients equal the per-observation passes.
- PPO runs a few updates on the causal pair.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.utils import obs_as_tensor

import tw_env  # noqa: F401  (registers the tasks)
from agents.policy import StudentPolicy
from agents.sb3_adapter import LMActorCriticPolicy, SB3VecEnvAdapter, episode_groups, observation_batch
from tests.tiny_task import only_family

ENV_ID = "TrainingWheels-Synthetic-v0"
MAX_NEW_TOKENS = 6
NUM_ENVS = 4
EOS = 1


@pytest.fixture(scope="module")
def task_and_phase1(family, family_task, tmp_path_factory):
    """(the family's tiny task, phase-1 policy directory); the policy's Training Wheels parts are random."""
    root = tmp_path_factory.mktemp(family.name)
    policy = StudentPolicy.load(family_task.student_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        if family.name == "encoder-decoder":
            # A random T5 puts nearly all its mass on one token: soften it, so that sampled prefixes differ.
            policy.model.decoder.final_layer_norm.weight.mul_(0.1)
        policy.state_embedding.beta.normal_()
        policy.prompt_summary.weight.normal_(std=0.3)
        policy.call_head.weight.normal_()
        policy.call_head.bias.fill_(3.0)  # calls at some steps: teacher tokens (β) in the prefixes
        policy.call_prompt.weight.normal_()
    policy.save(root / "phase1")
    return family_task, root / "phase1"


def make_adapter(task) -> SB3VecEnvAdapter:
    envs = gym.make_vec(ENV_ID, num_envs=NUM_ENVS, vectorization_mode="vector_entry_point",
                        max_new_tokens=MAX_NEW_TOKENS, **task.env_kwargs())
    return SB3VecEnvAdapter(envs)


def make_policy(adapter, phase1, value_model: str = "head") -> LMActorCriticPolicy:
    policy = LMActorCriticPolicy(adapter.observation_space, adapter.action_space, lambda _: 1e-4,
                                 student=str(phase1), value_model=value_model)
    if value_model == "network":
        with torch.no_grad():  # a value head that reads the state (it starts at zero)
            policy.value_network.value_head.weight.normal_()
    return policy


def full_recompute(policy: LMActorCriticPolicy, obs) -> tuple[torch.Tensor, torch.Tensor]:
    """The old computation: one teacher-forced pass over every observation's whole prefix, no grouping."""
    t = observation_batch(obs, policy.device)
    rows, length = torch.arange(len(t["state_length"])), t["state_length"]
    args = (t["prompt_ids"], t["prompt_mask"], t["state_ids"], t["state_mask"])
    with torch.no_grad():
        states, prompt = policy.student.state_features(*args)
        current = states[rows, length]
        logits = policy.student.head(current, prompt).float()
        if policy.value_model == "head":
            values = policy.value_head(current).float()
        else:
            values = policy.value_network(*args)[rows, length].float()[:, None]
    return logits, values


def rollout_observations(adapter, policy, steps: int, seed: int = 0) -> list[dict]:
    """Observations of a rollout in which the policy samples its own actions (calls included)."""
    generator = torch.Generator().manual_seed(seed)
    obs, seen = adapter.reset(), []
    for _ in range(steps):
        seen.append(obs)
        logits, _ = full_recompute(policy, obs_as_tensor(obs, policy.device))
        obs, *_ = adapter.step(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1).numpy())
    return seen


def two_rollouts(adapter, policy, steps: int) -> tuple[dict, np.ndarray]:
    """Two rollouts from one env seed (the same first prompts) with different action draws, concatenated,
    and each observation's episode by hand: (rollout, row, how many times the row restarted so far)."""
    parts, episodes = [], []
    for rollout in range(2):
        adapter.seed(7)
        batches = rollout_observations(adapter, policy, steps, seed=rollout)
        parts += batches
        restarts = np.cumsum([b["state_length"][:, 0] == 0 for b in batches], axis=0)
        episodes += [(rollout, row, int(restarts[k, row])) for k in range(steps) for row in range(NUM_ENVS)]
    obs = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    return obs, np.array([hash(e) for e in episodes])


@pytest.mark.parametrize("value_model", ["head", "network"])
def test_incremental_rollout_equals_a_full_recompute(task_and_phase1, value_model):
    task, phase1 = task_and_phase1
    adapter = make_adapter(task)
    adapter.seed(1)
    policy = make_policy(adapter, phase1, value_model)
    generator = torch.Generator().manual_seed(3)
    obs, restarts = adapter.reset(), 0
    for step in range(3 * MAX_NEW_TOKENS):
        tensors = obs_as_tensor(obs, policy.device)
        if step == 7:  # an update between two calls (as PPO's between two rollouts): the cache is stale
            assert len(set(tensors["state_length"].flatten().tolist())) >= 3  # prefixes of three lengths or more
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * 0.01)
        with torch.no_grad():
            actions, values, log_prob = policy(tensors)
            logits = policy.get_distribution(tensors).distribution.logits  # the same batch again: from memory
        expected_logits, expected_values = full_recompute(policy, tensors)
        expected = torch.log_softmax(expected_logits, -1)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(log_prob, expected.gather(1, actions[:, None]).squeeze(1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(values, expected_values, atol=1e-4, rtol=1e-4)
        actions = actions.numpy().copy()
        if step in (2, 4):  # rows 0 and 1 end early: at the rebuild (step 7) the rows' prefixes differ in length
            actions[step // 2 - 1] = EOS
        obs, _, dones, infos = adapter.step(actions)
        for i in np.flatnonzero(dones):  # SB3 reads a one-row value of a terminal observation
            restarts += 1
            terminal = obs_as_tensor({k: v[None] for k, v in infos[i]["terminal_observation"].items()}, policy.device)
            with torch.no_grad():
                torch.testing.assert_close(policy.predict_values(terminal), full_recompute(policy, terminal)[1],
                                           atol=1e-4, rtol=1e-4)
    assert restarts >= NUM_ENVS  # every row restarted at least once on average
    # The first call and the one after the weight change rebuilt the cache; every other step was one decoder step.
    models = [policy.student] + ([policy.value_network] if value_model == "network" else [])
    assert [policy._readers[(id(m), NUM_ENVS)].rebuilds for m in models] == [2] * len(models)


def test_episode_groups_find_each_episode(task_and_phase1):
    task, phase1 = task_and_phase1
    adapter = make_adapter(task)
    policy = make_policy(adapter, phase1)
    obs, episode = two_rollouts(adapter, policy, 2 * MAX_NEW_TOKENS)
    t = observation_batch(obs_as_tensor(obs, policy.device), policy.device)
    representatives, group = episode_groups(t)
    assert len(representatives) <= len(set(episode.tolist())) < len(group)
    for i in range(len(group)):  # every member lies on its representative's sequence
        r = int(representatives[group[i]])
        n = int(t["state_length"][i])
        assert torch.equal(t["prompt_ids"][i], t["prompt_ids"][r]) and int(t["state_length"][r]) >= n
        assert torch.equal(t["state_ids"][i, :n], t["state_ids"][r, :n])
    # One group per maximal sequence, by hand: the distinct (prompt, prefix) pairs that no other one extends.
    pairs = {(tuple(t["prompt_ids"][i].tolist()), tuple(t["state_ids"][i, : int(t["state_length"][i])].tolist()))
             for i in range(len(group))}
    maximal = [(p, x) for p, x in pairs if not any(q == p and len(y) > len(x) and y[: len(x)] == x for q, y in pairs)]
    assert len(representatives) == len(maximal)
    # The two rollouts' first episodes (same prompts, other actions) are told apart by their prefixes.
    first = [i for i in range(len(group)) if int(t["state_length"][i]) >= 2]
    split = [(i, j) for i in first for j in first
             if torch.equal(t["prompt_ids"][i], t["prompt_ids"][j]) and group[i] != group[j]]
    assert split


@pytest.mark.parametrize("value_model", ["head", "network"])
def test_training_forward_is_one_pass_per_episode_and_equals_per_observation_passes(task_and_phase1, value_model):
    task, phase1 = task_and_phase1
    adapter = make_adapter(task)
    policy = make_policy(adapter, phase1, value_model)
    obs = obs_as_tensor(two_rollouts(adapter, policy, 2 * MAX_NEW_TOKENS)[0], policy.device)
    actions = torch.as_tensor(np.random.default_rng(0).integers(0, adapter.action_space.n, size=len(obs["state_length"])))
    groups = len(episode_groups(observation_batch(obs, policy.device))[0])

    body = policy.student.model.get_decoder() if policy.student.model.config.is_encoder_decoder else policy.student.model.base_model
    rows_read: list[int] = []
    hook = body.register_forward_pre_hook(
        lambda _, args, kwargs: rows_read.append(next(v for v in (kwargs.get("inputs_embeds"), kwargs.get("input_ids"))
                                                      if v is not None).shape[0]), with_kwargs=True)
    values, log_prob, entropy = policy.evaluate_actions(obs, actions)
    hook.remove()
    assert rows_read and set(rows_read) == {groups} and groups < len(actions)  # one row per episode, not per step
    loss = log_prob.sum() + values.sum() + entropy.sum()
    ours = torch.autograd.grad(loss, [p for p in policy.parameters() if p.requires_grad], allow_unused=True)

    # The per-observation passes, as before: the same losses and gradients.
    t = observation_batch(obs, policy.device)
    rows, length = torch.arange(len(actions)), t["state_length"]
    args = (t["prompt_ids"], t["prompt_mask"], t["state_ids"], t["state_mask"])
    states, prompt = policy.student.state_features(*args)
    current = states[rows, length]
    distribution = torch.distributions.Categorical(logits=policy.student.head(current, prompt).float())
    if value_model == "head":
        expected_values = policy.value_head(current.detach()).float()
    else:
        expected_values = policy.value_network(*args)[rows, length].float()[:, None]
    torch.testing.assert_close(log_prob, distribution.log_prob(actions), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values, expected_values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy, distribution.entropy(), atol=1e-4, rtol=1e-4)
    reference = distribution.log_prob(actions).sum() + expected_values.sum() + distribution.entropy().sum()
    expected = torch.autograd.grad(reference, [p for p in policy.parameters() if p.requires_grad], allow_unused=True)
    checked = 0
    for a, b in zip(ours, expected, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
            checked += int(torch.count_nonzero(b) > 0)
    assert checked > 5


@only_family("decoder-only")
def test_ppo_runs_a_few_updates_on_a_causal_pair(family_task, tmp_path):
    from stable_baselines3 import PPO

    from agents.sb3_adapter import LagrangeCallback

    task = family_task
    caller = StudentPolicy.load(task.student_dir)
    with torch.no_grad():
        caller.call_head.bias.fill_(8.0)  # teacher use above every budget: λ rises
    caller.save(tmp_path / "phase1")
    budgets = [0.1, 0.5]
    adapter = SB3VecEnvAdapter(gym.make_vec(ENV_ID, num_envs=NUM_ENVS, vectorization_mode="vector_entry_point",
                                            max_new_tokens=MAX_NEW_TOKENS, budgets=budgets, **task.env_kwargs()))
    model = PPO(LMActorCriticPolicy, adapter, n_steps=MAX_NEW_TOKENS, batch_size=12, n_epochs=2, learning_rate=1e-3,
                gamma=1.0, policy_kwargs={"student": str(tmp_path / "phase1")}, seed=0, device="cpu")
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    callback = LagrangeCallback(budgets, lr=1e-2, cap=2.0)
    model.learn(3 * MAX_NEW_TOKENS * NUM_ENVS, callback=callback)
    after = model.policy.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("student.model.") for k in changed) and any(k.startswith("value_head.") for k in changed)
    assert callback.fractions and all(f > 0.5 for f in callback.fractions.values())
    assert all(callback.lambdas[b] > 0 for b in budgets)
    # Each rollout after the first starts from a rebuilt cache (the update changed the weights), then steps.
    assert model.policy._readers[(id(model.policy.student), NUM_ENVS)].rebuilds == 3
