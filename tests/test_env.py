"""`TeacherAssistedDecodingEnv`: dynamics (Eq. 13–14), rewards (Eq. 17) and the Gymnasium contract.

Rewards and teacher log-probabilities are checked against an independent, full (no-cache) forward
of a separately loaded copy of the teacher. Most tests use the word-level tokenizer and its tiny T5
so that they run without ../shared; the tests about the real T5 tokenizer need it. The tests of the
last section run for both model families, on the tiny synthetic task of each (tests/tiny_task.py):
the env's rewards against a full forward of the teacher on its own prompt C^(T) followed by X^(out).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import T5ForConditionalGeneration

import tw_env
from tests.conftest import EXAMPLES, INSTRUCTION, WORD_MODEL_VOCAB, WORDS, make_env
from tests.helpers import check_env_quietly
from tests.tiny_task import only_family, tiny_causal_lm
from tw_env import TeacherAssistedDecodingEnv, TeacherAssistedDecodingVectorEnv, eq17_reward
from tw_env.families import check_same_family
from tw_env.prompts import BUDGET_KEYWORDS, BUDGETS, check_budget, keyword_for, make_prompt
from tw_env.tasks import Example

W = {w: i for i, w in enumerate(WORDS)}  # word -> id
EOS = 1


# ------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def reference_teacher(word_t5_dir):
    """A separately loaded copy of the teacher, run without any cache."""
    return T5ForConditionalGeneration.from_pretrained(word_t5_dir).eval()


@pytest.fixture
def env(word_t5_dir, word_tokenizer_dir):
    return make_env(str(word_t5_dir), str(word_tokenizer_dir))


@torch.no_grad()
def full_logprobs(model, prompt: np.ndarray, output_ids: np.ndarray) -> np.ndarray:
    """log p(· | X^(out)_<i, Y) for every i, from one full forward on (Y, X^(out) shifted right)."""
    ids = torch.as_tensor(np.asarray(prompt), dtype=torch.long)[None]
    dec = torch.as_tensor([model.config.decoder_start_token_id, *np.asarray(output_ids)[:-1]], dtype=torch.long)[None]
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def play(env, actions, stop: bool = True):
    """Step through ``actions``; returns the list of (obs, reward, terminated, truncated, info)."""
    steps = []
    for a in actions:
        steps.append(env.step(a))
        if stop and (steps[-1][2] or steps[-1][3]):
            break
    return steps


def prompt_of(obs) -> np.ndarray:
    return obs["prompt_ids"][: int(obs["prompt_length"][0])]


def snapshot(env) -> dict:
    b = env.batch
    return {
        "prompt_ids": b.prompt_ids.copy(), "prompt_length": b.prompt_length.copy(), "state_ids": b.state_ids.copy(),
        "output_ids": b.output_ids.copy(), "length": b.length.copy(), "budget": b.budget.copy(),
        "calls": b.calls.copy(), "done": b.done.copy(), "clock": b.decoder.clock,
        "logprobs": None if b.teacher_logprobs is None else b.teacher_logprobs.clone(),
        "rng": copy.deepcopy(env.np_random.bit_generator.state), "lagrange": dict(env.lagrange_multipliers),
        "stats": env.reward_stats.state_dict(), "example_index": env.example_index.copy(),
        "observation": env._observation(0),
    }


def assert_same(a, b, path="") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=path)
    else:
        assert a == b, path


def assert_steps_equal(s1, s2) -> None:
    assert len(s1) == len(s2)
    for (o1, r1, te1, tr1, i1), (o2, r2, te2, tr2, i2) in zip(s1, s2, strict=True):
        assert_same(o1, o2)
        assert (r1, te1, tr1) == (r2, te2, tr2)
        assert_same(i1, i2)


# ------------------------------------------------------------------------------------- Eq. 17 vs full forward
# Student tokens (never EOS) and calls; repeating a word is something the (copying) random teacher
# likes, so that some student rewards fall inside the clipping range.
SCRIPT = ["dog", "dog", "tau", "cat", "cat", "tau", "tau", "is"]


def script_actions(env) -> list[int]:
    return [env.unwrapped.teacher_action if w == "tau" else W[w] for w in SCRIPT]


def test_rewards_and_teacher_logprobs_match_an_independent_full_forward(env, reference_teacher):
    V = env.vocab_size
    assert V == WORD_MODEL_VOCAB and env.action_space.n == V + 1
    env.set_lagrange_multipliers({0.3: 0.7})
    obs, info = env.reset(seed=123, options={"budget": 0.3, "index": 1})
    assert info == {"budget": 0.3, "example_index": 1}
    assert (env.reward_stats.mu, env.reward_stats.sigma) == (0.0, 1.0)
    actions = script_actions(env)
    steps = play(env, actions)
    assert len(steps) == len(actions) and steps[-1][3] and not steps[-1][2]  # truncated at max_new_tokens
    out = steps[-1][4]["output_ids"]
    lp = full_logprobs(reference_teacher, prompt_of(obs), out)
    calls = np.array([a == V for a in actions])
    for i, (a, (*_, inf)) in enumerate(zip(actions, steps, strict=True)):
        assert inf["teacher_call"] == (a == V) and inf["budget"] == 0.3
        if a == V:
            assert out[i] == lp[i].argmax()  # greedy teacher token
        else:
            assert out[i] == a
        assert inf["teacher_logprob"] == pytest.approx(lp[i, out[i]], abs=1e-4)
    expected = eq17_reward(lp[np.arange(len(out)), out], calls, 0.3, 0.7, mu=0.0, sigma=1.0)
    rewards = np.array([s[1] for s in steps])
    np.testing.assert_allclose(rewards, expected, atol=1e-4)
    np.testing.assert_allclose(rewards[calls], 0.7 * (0.3 - 1), atol=1e-9)
    assert (np.abs(rewards[~calls]) < 2 - 1e-3).sum() >= 2  # some student rewards are not clipped
    # the normalisers now hold this episode: the teacher's own (greedy) token log-probs at every step,
    # and the log-probs of the student's tokens
    state = env.reward_stats.state_dict()
    np.testing.assert_allclose(state["teacher"], lp.max(axis=-1), atol=1e-4)
    np.testing.assert_allclose(state["student"], lp[np.flatnonzero(~calls), out[~calls]], atol=1e-4)


def test_rewards_use_the_running_normalisers_after_enough_episodes(env, reference_teacher):
    env.set_lagrange_multipliers({0.1: 0.4, 0.5: 1.1})
    env.reset(seed=5, options={"budget": 0.1, "index": 0})
    actions = script_actions(env)
    for episode in range(5):
        mu, sigma = env.reward_stats.mu, env.reward_stats.sigma  # fixed within an episode
        budget = (0.1, 0.5)[episode % 2]
        obs, _ = env.reset(options={"budget": budget, "index": episode % len(EXAMPLES)})
        steps = play(env, actions)
        out = steps[-1][4]["output_ids"]
        lp = full_logprobs(reference_teacher, prompt_of(obs), out)
        calls = np.array([s[4]["teacher_call"] for s in steps])
        lam = env.lagrange_multipliers[budget]
        expected = eq17_reward(lp[np.arange(len(out)), out], calls, budget, lam, mu=mu, sigma=sigma)
        np.testing.assert_allclose([s[1] for s in steps], expected, atol=1e-4)
    # by now the normalisers are active (16 values each) and are mean/std of what they were fed
    state = env.reward_stats.state_dict()
    assert len(state["student"]) >= 16
    assert env.reward_stats.mu == pytest.approx(np.mean(state["teacher"])) and env.reward_stats.mu < -0.05
    assert env.reward_stats.sigma == pytest.approx(np.std(state["student"])) and env.reward_stats.sigma != 1.0
    # a seeded reset clears them
    env.reset(seed=5)
    assert (env.reward_stats.mu, env.reward_stats.sigma) == (0.0, 1.0)


# ------------------------------------------------------------------------------------- Eq. 13–14, prompts, budgets
def test_state_and_output_sequences_follow_eq13_and_eq14(env, word_tokenizer):
    V = env.vocab_size
    obs, _ = env.reset(seed=0, options={"budget": 0.2, "index": 2})
    assert obs["state_length"][0] == 0 and not obs["state_ids"].any()
    actions = [W["a"], V, W["tree"], V, V]
    steps = play(env, actions)
    obs = steps[-1][0]
    n = len(actions)
    assert obs["state_length"][0] == n
    state = obs["state_ids"][:n]
    out = env.batch.output_ids[0, :n]
    calls = np.array([a == V for a in actions])
    np.testing.assert_array_equal(state[~calls], np.array(actions)[~calls])  # student tokens as is
    np.testing.assert_array_equal(state[calls], out[calls] + V)  # teacher tokens as t + V
    assert (state[calls] >= V).all() and (state[~calls] < V).all()
    assert (obs["state_ids"][n:] == 0).all()
    # observations of every step: X^(in) grows by one token at a time
    for i, (o, *_rest) in enumerate(steps):
        assert o["state_length"][0] == i + 1
        np.testing.assert_array_equal(o["state_ids"][: i + 1], state[: i + 1])
    # the prompt Y
    text = word_tokenizer.decode(prompt_of(obs), skip_special_tokens=True)
    assert text == f"With moderate-light teacher use, {INSTRUCTION}: {EXAMPLES[2][0]}"
    assert text == make_prompt(INSTRUCTION, EXAMPLES[2][0], 0.2)
    assert prompt_of(obs)[-1] == EOS and (obs["prompt_ids"][obs["prompt_length"][0]:] == 0).all()
    assert obs["budget"].dtype == np.float32 and obs["budget"][0] == pytest.approx(0.2)
    assert env.observation_space.contains(obs)


def test_budget_and_example_are_drawn_from_the_envs_budgets(word_t5_dir, word_tokenizer_dir, word_tokenizer):
    env = make_env(str(word_t5_dir), str(word_tokenizer_dir), budgets=(0.1, 0.4))
    seen_budgets, seen_examples = set(), set()
    for seed in range(16):
        obs, info = env.reset(seed=seed)
        budget, index = info["budget"], info["example_index"]
        seen_budgets.add(budget)
        seen_examples.add(index)
        assert obs["budget"][0] == pytest.approx(budget) and env.batch.budget[0] == budget
        expected = f"With {BUDGET_KEYWORDS[budget]} teacher use, {INSTRUCTION}: {EXAMPLES[index][0]}"
        assert word_tokenizer.decode(prompt_of(obs), skip_special_tokens=True) == expected
    assert seen_budgets == {0.1, 0.4}
    assert len(seen_examples) >= 3
    # options override the draw; a float32 budget (as observations carry it) snaps to the env's own value
    obs, info = env.reset(options={"budget": np.float32(0.4), "index": 4})
    assert info == {"budget": 0.4, "example_index": 4} and type(info["budget"]) is float
    assert env.batch.budget[0] == 0.4
    assert word_tokenizer.decode(prompt_of(obs), skip_special_tokens=True).startswith("With high teacher use,")
    # a Table 1 budget that is not one of this env's budgets is refused
    with pytest.raises(ValueError, match=r"budget 0.5 is not one of this env's budgets \[0.1, 0.4\]"):
        env.reset(options={"budget": 0.5})


def test_long_prompts_are_truncated_to_max_prompt_length(word_t5_dir, word_tokenizer_dir):
    long_source = " ".join(["der hund läuft und"] * 20)
    env = make_env(str(word_t5_dir), str(word_tokenizer_dir), examples=[(long_source, "x")], max_prompt_length=24)
    obs, _ = env.reset(seed=0)
    assert obs["prompt_length"][0] == 24 and obs["prompt_ids"].shape == (24,)
    assert obs["prompt_ids"][-1] == EOS
    env.step(W["dog"])  # and the episode runs


# ------------------------------------------------------------------------------------- episode ends
def test_student_eos_terminates_with_end_of_episode_info(env, word_tokenizer):
    V = env.vocab_size
    env.reset(seed=0, options={"budget": 0.3, "index": 0})
    steps = play(env, [W["the"], V, W["dog"], EOS, W["runs"]])
    assert len(steps) == 4
    for _, _, terminated, truncated, info in steps[:3]:
        assert not terminated and not truncated
        assert not {"teacher_fraction", "output_ids", "output_text", "reference"} & set(info)
    obs, reward, terminated, truncated, info = steps[-1]
    assert terminated and not truncated
    assert not info["teacher_call"] and np.isfinite(reward) and reward != 0.0
    out = info["output_ids"]
    assert out.tolist()[0] == W["the"] and out.tolist()[2:] == [W["dog"], EOS]
    assert info["teacher_fraction"] == pytest.approx(0.25)
    assert info["output_text"] == word_tokenizer.decode(out, skip_special_tokens=True)
    assert info["output_text"].split()[0] == "the" and info["output_text"].split()[-1] == "dog"
    assert info["reference"] == EXAMPLES[0][1]
    assert obs["state_length"][0] == 4


def eos_teacher(path) -> T5ForConditionalGeneration:
    """A T5 whose greedy token is EOS whatever it reads.

    The decoder blocks' output projections are zeroed, so the final decoder state is the input token's
    embedding e(x), RMS-normalised; the final norm keeps only dimension 0, which is positive for every
    token, and the (tied) output row of EOS is five times larger there than any other row.
    """
    model = T5ForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        for block in model.decoder.block:
            block.layer[0].SelfAttention.o.weight.zero_()
            block.layer[1].EncDecAttention.o.weight.zero_()
            block.layer[2].DenseReluDense.wo.weight.zero_()
        model.shared.weight[:, 0] = 1.0
        model.shared.weight[EOS, 0] = 5.0
        model.decoder.final_layer_norm.weight.zero_()
        model.decoder.final_layer_norm.weight[0] = 1.0
    return model


def test_teacher_eos_terminates(word_t5_dir, word_tokenizer_dir):
    env = make_env(eos_teacher(word_t5_dir), str(word_tokenizer_dir))
    V = env.vocab_size
    env.reset(seed=0, options={"budget": 0.5, "index": 3})
    steps = play(env, [W["the"], W["cat"], V, W["is"]])
    assert len(steps) == 3
    obs, reward, terminated, truncated, info = steps[-1]
    assert terminated and not truncated and info["teacher_call"]
    assert info["output_ids"].tolist() == [W["the"], W["cat"], EOS]
    assert obs["state_ids"][:3].tolist() == [W["the"], W["cat"], EOS + V]
    assert info["teacher_fraction"] == pytest.approx(1 / 3)
    assert reward == 0.0  # λ = 0: a call earns λ(b−1) = 0
    assert info["output_text"] == "the cat"


def test_truncation_at_max_new_tokens(word_t5_dir, word_tokenizer_dir):
    env = make_env(str(word_t5_dir), str(word_tokenizer_dir), max_new_tokens=5)
    V = env.vocab_size
    env.reset(seed=0, options={"budget": 0.0, "index": 1})
    steps = play(env, [W["a"], W["big"], V, W["red"], W["house"], W["dog"]])
    assert len(steps) == 5
    assert all(not s[2] and not s[3] for s in steps[:4])
    obs, _, terminated, truncated, info = steps[-1]
    assert truncated and not terminated
    assert obs["state_length"][0] == 5 and len(info["output_ids"]) == 5
    assert info["teacher_fraction"] == pytest.approx(0.2)
    assert info["reference"] == EXAMPLES[1][1]


# ------------------------------------------------------------------------------------- determinism
def test_seeded_reset_and_same_actions_reproduce_everything(word_t5_dir, word_tokenizer_dir):
    a = make_env(str(word_t5_dir), str(word_tokenizer_dir))
    b = make_env(str(word_t5_dir), str(word_tokenizer_dir))
    actions = script_actions(a)
    a.set_lagrange_multipliers({bud: 0.5 for bud in BUDGETS})
    b.set_lagrange_multipliers({bud: 0.5 for bud in BUDGETS})
    runs = []
    for env in (a, b, a):  # two envs, and the first one again after it has played
        obs, info = env.reset(seed=11)
        runs.append(((obs, info), play(env, actions)))
    for (reset, steps) in runs[1:]:
        assert_same(reset[0], runs[0][0][0])
        assert reset[1] == runs[0][0][1]
        assert_steps_equal(steps, runs[0][1])


def sample_calls(env, seed: int) -> list[int]:
    env.reset(seed=seed, options={"budget": 0.5, "index": 0})
    steps = play(env, [env.teacher_action] * env.max_new_tokens)
    return steps[-1][4]["output_ids"].tolist()


def test_teacher_sampling_is_seeded(word_t5_dir, word_tokenizer_dir, reference_teacher):
    env = make_env(str(word_t5_dir), str(word_tokenizer_dir), teacher_sampling=True, teacher_temperature=50.0)
    first = sample_calls(env, 0)
    assert sample_calls(env, 0) == first
    assert sample_calls(env, 1) != first
    assert len(set(first)) >= 4  # near-uniform sampling, not the greedy token
    # the reported log-probability is the teacher's own (temperature 1) one of the sampled token
    env.reset(seed=3, options={"budget": 0.5, "index": 0})
    steps = play(env, [env.teacher_action] * env.max_new_tokens)
    out = steps[-1][4]["output_ids"]
    lp = full_logprobs(reference_teacher, prompt_of(steps[0][0]), out)
    np.testing.assert_allclose([s[4]["teacher_logprob"] for s in steps], lp[np.arange(len(out)), out], atol=1e-4)
    greedy = make_env(str(word_t5_dir), str(word_tokenizer_dir))
    assert sample_calls(greedy, 0) == sample_calls(greedy, 1)


# ------------------------------------------------------------------------------------- checkers
def test_gymnasium_and_sb3_env_checkers_on_a_direct_env(env):
    check_env_quietly(env, spec_less=True)


@pytest.mark.parametrize(
    "env_id, data_fixture", [("TrainingWheels-WMT19-v0", "wmt_jsonl"), ("TrainingWheels-XSum-v0", "xsum_jsonl")]
)
def test_env_checkers_through_gym_make(env_id, data_fixture, request, word_t5_dir, word_tokenizer_dir):
    data = request.getfixturevalue(data_fixture)
    env = gym.make(
        env_id, teacher=str(word_t5_dir), student=str(word_t5_dir), tokenizer=str(word_tokenizer_dir),
        data=str(data), max_new_tokens=6, max_prompt_length=32,
    )
    core = env.unwrapped
    assert isinstance(core, TeacherAssistedDecodingEnv)
    assert core.examples == [Example(s, r) for s, r in EXAMPLES]
    expected = ("translate German to English", "bleu") if "WMT" in env_id else ("summarize", "rouge2")
    assert (core.instruction, core.metric) == expected
    check_env_quietly(core)
    # and the wrapped env plays an episode
    env.reset(seed=0)
    assert not env.step(core.teacher_action)[2]


# ------------------------------------------------------------------------------------- errors
def test_invalid_actions_raise_and_leave_the_env_unchanged(word_t5_dir, word_tokenizer_dir):
    env = make_env(str(word_t5_dir), str(word_tokenizer_dir))
    twin = make_env(str(word_t5_dir), str(word_tokenizer_dir))
    V = env.vocab_size
    for e in (env, twin):
        e.reset(seed=2, options={"budget": 0.3, "index": 1})
        e.step(W["dog"])
        e.step(V)
    before = snapshot(env)
    bad = [
        (V + 1, rf"action {V + 1} is outside \[0, {V}\]"),
        (-1, rf"action -1 is outside \[0, {V}\]"),
        (10**6, rf"outside \[0, {V}\]"),
        (3.5, rf"integer in \[0, {V}\].*got 3.5"),
        (np.float32(2.0), rf"integer in \[0, {V}\]"),
        ("3", rf"integer in \[0, {V}\].*got '3'"),
        (np.array([3, 4]), rf"integer in \[0, {V}\]"),
        (True, rf"integer in \[0, {V}\].*got True"),
        (None, rf"integer in \[0, {V}\].*got None"),
    ]
    for action, message in bad:
        with pytest.raises(ValueError, match=message):
            env.step(action)
        assert_same(snapshot(env), before)
    # the episode goes on exactly as in a twin env that never saw the errors
    assert_steps_equal(play(env, [W["cat"], V, np.int64(W["is"]), np.array([V])]), play(twin, [W["cat"], V, W["is"], V]))


def test_step_before_reset_and_after_the_end_raise(word_t5_dir, word_tokenizer_dir):
    env = make_env(str(word_t5_dir), str(word_tokenizer_dir))
    with pytest.raises(RuntimeError, match=r"before reset\(\)"):
        env.step(W["dog"])
    env.reset(seed=0)
    play(env, [W["dog"], EOS])
    before = snapshot(env)
    with pytest.raises(RuntimeError, match=r"after the episode ended; call env.reset\(\)"):
        env.step(W["dog"])
    assert_same(snapshot(env), before)
    env.reset()
    assert env.step(W["dog"])[4]["teacher_call"] is False


@pytest.mark.parametrize(
    "options, message",
    [
        ({"budget": 1.5}, r"budget must be a teacher-use fraction in \[0, 1\], got 1.5"),
        ({"budget": -0.1}, r"in \[0, 1\], got -0.1"),
        ({"budget": "high"}, r"budget must be a number in \[0, 1\], got 'high'"),
        ({"budget": 0.25}, r"budget 0.25 is not one of this env's budgets \[0.0, 0.1, 0.2, 0.3, 0.4, 0.5\]"),
        ({"index": 5}, r"example index 5 out of range; expected 0 <= index < 5"),
        ({"index": -1}, r"example index -1 out of range"),
        ({"temperature": 2}, r"unknown reset options \['temperature'\]"),
    ],
)
def test_invalid_reset_options_raise_and_leave_the_env_unchanged(options, message, word_t5_dir, word_tokenizer_dir):
    env = make_env(str(word_t5_dir), str(word_tokenizer_dir))
    twin = make_env(str(word_t5_dir), str(word_tokenizer_dir))
    for e in (env, twin):
        e.reset(seed=4)
        e.step(W["dog"])
    before = snapshot(env)
    with pytest.raises(ValueError, match=message):
        env.reset(seed=99, options=options)
    assert_same(snapshot(env), before)  # neither the episode nor the RNG moved
    assert_steps_equal(play(env, [env.teacher_action, W["cat"]]), play(twin, [twin.teacher_action, W["cat"]]))
    assert env.reset()[1] == twin.reset()[1]  # the next unseeded draw is the same too


def test_set_lagrange_multipliers_validates_everything_before_changing_anything(env):
    env.set_lagrange_multipliers({0.1: 0.5, 0.3000000001: 1.0})
    assert env.lagrange_multipliers[0.1] == 0.5 and env.lagrange_multipliers[0.3] == 1.0
    before = dict(env.lagrange_multipliers)
    with pytest.raises(ValueError, match=r"no budget 0.7 in this env; expected one of \[0.0, 0.1"):
        env.set_lagrange_multipliers({0.1: 2.0, 0.7: 1.0})
    with pytest.raises(ValueError, match=r"multiplier for budget 0.3 must be a finite number, got inf"):
        env.set_lagrange_multipliers({0.1: 2.0, 0.3: float("inf")})
    with pytest.raises(ValueError, match="finite"):
        env.set_lagrange_multipliers({0.2: float("nan")})
    with pytest.raises(ValueError, match="finite"):
        env.set_lagrange_multipliers({0.2: float("inf")})
    assert env.lagrange_multipliers == before
    env.set_lagrange_multipliers({0.3: -0.5})  # a negative λ (budget as a target) is allowed
    assert env.lagrange_multipliers[0.3] == -0.5


def test_missing_model_directory_names_the_path(tmp_path, word_t5_dir, word_tokenizer_dir):
    missing = tmp_path / "models" / "teacher-xl"
    with pytest.raises(FileNotFoundError, match=r"teacher not found: no directory or file at '.*teacher-xl'.*local directory"):
        make_env(str(missing), str(word_tokenizer_dir))
    with pytest.raises(FileNotFoundError, match=r"student not found.*'.*teacher-xl'.*local directory"):
        make_env(str(word_t5_dir), str(word_tokenizer_dir), student=str(missing))
    with pytest.raises(FileNotFoundError, match=r"tokenizer not found.*'.*teacher-xl'"):
        make_env(str(word_t5_dir), str(missing))


def test_missing_data_file_names_the_path(tmp_path, word_t5_dir, word_tokenizer_dir):
    missing = tmp_path / "missing-pairs.jsonl"
    with pytest.raises(FileNotFoundError, match=r"no file or folder at '.*missing-pairs\.jsonl'"):
        gym.make(
            "TrainingWheels-WMT19-v0", teacher=str(word_t5_dir), tokenizer=str(word_tokenizer_dir), data=str(missing)
        )


@pytest.mark.parametrize(
    "examples, error, message",
    [
        ([("der hund",)], TypeError, r"example 0 is \('der hund',\); expected an Example, a \(source, reference\) pair"),
        ([("a", "b"), "der hund the dog"], TypeError, r"example 1 is 'der hund the dog'"),
        ([{"src": "a", "tgt": "b"}], TypeError, r"dict with 'source' and 'reference'"),
        ([], ValueError, r"no examples; expected at least one"),
    ],
)
def test_examples_in_a_wrong_format_are_refused(examples, error, message, word_t5_dir, word_tokenizer_dir):
    with pytest.raises(error, match=message):
        make_env(str(word_t5_dir), str(word_tokenizer_dir), examples=examples)


def test_examples_in_the_accepted_formats(word_t5_dir, word_tokenizer_dir):
    forms = [Example("ein baum", "a tree"), ("ein baum", "a tree"), ["ein baum", "a tree"],
             {"source": "ein baum", "reference": "a tree", "id": 3}]
    env = make_env(str(word_t5_dir), str(word_tokenizer_dir), examples=forms)
    assert env.examples == [Example("ein baum", "a tree")] * 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"render_mode": "human"}, r"render_mode must be one of \['ansi'\] or None, got 'human'"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be >= 1"),
        ({"teacher_temperature": 0.0}, r"teacher_temperature must be positive"),
        ({"budgets": (0.1, 0.25)}, r"budget 0.25 has no prompt keyword"),
        ({"budgets": (0.1, 2.0)}, r"in \[0, 1\], got 2.0"),
        ({"budgets": ()}, r"at least one"),
    ],
)
def test_invalid_constructor_arguments(kwargs, message, word_t5_dir, word_tokenizer_dir):
    with pytest.raises(ValueError, match=message):
        make_env(str(word_t5_dir), str(word_tokenizer_dir), **kwargs)


# ------------------------------------------------------------------------------------- render
def test_ansi_render_marks_teacher_tokens(word_t5_dir, word_tokenizer_dir, word_tokenizer):
    env = make_env(str(word_t5_dir), str(word_tokenizer_dir), render_mode="ansi")
    V = env.vocab_size
    env.reset(seed=0, options={"budget": 0.3, "index": 0})
    assert env.render() == ""
    steps = play(env, [W["the"], V, W["dog"]])
    teacher_token = int(steps[1][4]["output_ids"][1]) if "output_ids" in steps[1][4] else int(env.batch.output_ids[0, 1])
    shown = word_tokenizer.convert_ids_to_tokens(teacher_token)
    assert env.render() == f"the [[{shown}]] dog"
    plain = make_env(str(word_t5_dir), str(word_tokenizer_dir))
    plain.reset(seed=0)
    assert plain.render() is None


# ------------------------------------------------------------------------------------- registration
def test_registered_ids_and_entry_points_resolve():
    from gymnasium.envs.registration import load_env_creator

    from tw_env import registration

    for env_id, name in [
        ("TrainingWheels-XSum-v0", "xsum"), ("TrainingWheels-WMT19-v0", "wmt19"),
        ("TrainingWheels-Synthetic-v0", "synthetic"),
    ]:
        spec = gym.spec(env_id)
        assert load_env_creator(spec.entry_point) is getattr(registration, f"make_{name}_env")
        assert load_env_creator(spec.vector_entry_point) is getattr(registration, f"make_{name}_vector_env")
    import importlib

    importlib.reload(tw_env)  # registering twice is harmless
    assert gym.spec("TrainingWheels-WMT19-v0").entry_point == "tw_env.registration:make_wmt19_env"
    assert registration.make_wmt19_env.__doc__ and "google/flan-t5-xl" in registration.make_wmt19_env.__doc__


def test_gym_make_vec_builds_the_native_vector_env(word_t5_dir, word_tokenizer_dir, wmt_jsonl):
    envs = gym.make_vec(
        "TrainingWheels-WMT19-v0", num_envs=2, vectorization_mode="vector_entry_point", teacher=str(word_t5_dir),
        student=str(word_t5_dir), tokenizer=str(word_tokenizer_dir), data=str(wmt_jsonl), max_new_tokens=6, max_prompt_length=32,
    )
    assert isinstance(envs.unwrapped, TeacherAssistedDecodingVectorEnv) and envs.num_envs == 2
    assert envs.unwrapped.instruction == "translate German to English"


def test_import_downloads_and_trains_nothing(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        import gymnasium as gym
        import tw_env
        assert "TrainingWheels-Synthetic-v0" in gym.registry
        heavy = [m for m in ("tw_env.synthetic", "datasets", "sacrebleu", "stable_baselines3") if m in sys.modules]
        print("HEAVY", heavy)
        """
    )
    hf_home = tmp_path / "hf"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(hf_home))
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout  # the synthetic task (which trains) and the data libraries are not imported
    assert not hf_home.exists() or not any(hf_home.rglob("*"))  # nothing was written to a cache
    assert not any(tmp_path.iterdir()) or list(tmp_path.iterdir()) == [hf_home]


# ------------------------------------------------------------------------------------- Table 1
def test_budgets_and_prompts_follow_table_1():
    table = {0.0: "no", 0.1: "light", 0.2: "moderate-light", 0.3: "moderate", 0.4: "high", 0.5: "very high"}
    assert BUDGET_KEYWORDS == table and BUDGETS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    for b, word in table.items():
        assert keyword_for(b) == word
        assert make_prompt("summarize", "A text.", b) == f"With {word} teacher use, summarize: A text."
    assert make_prompt("translate German to English", "Hallo Welt", 0.0) == (
        "With no teacher use, translate German to English: Hallo Welt"
    )
    assert keyword_for(0.1 + 0.2) == "moderate"  # 0.30000000000000004
    assert keyword_for(np.float32(0.4)) == "high"
    for b in (0.25, 0.6, 1.0, -0.1):
        with pytest.raises(ValueError, match=rf"budget {b!r} has no prompt keyword"):
            keyword_for(b)
    assert check_budget("0.3") == 0.3 and check_budget(1) == 1.0
    for b in (1.5, -0.1, "x", None):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            check_budget(b)


# ------------------------------------------------------------------------------------- the T5 path (../shared)
@pytest.mark.shared
def test_real_tokenizer_t5_env_matches_a_full_forward(t5_tokenizer_dir, tiny_t5_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(t5_tokenizer_dir)
    examples = [("Ein Hund läuft im Park.", "A dog runs in the park."), ("Guten Morgen!", "Good morning!")]
    env = TeacherAssistedDecodingEnv(
        teacher=str(tiny_t5_dir), tokenizer=str(t5_tokenizer_dir), student=str(tiny_t5_dir), examples=examples,
        instruction="translate German to English", max_new_tokens=6, max_prompt_length=48, render_mode="ansi",
    )
    V = env.vocab_size
    assert V == 32128 and env.action_space.n == 32129 and len(env.tokenizer) == 32100
    env.set_lagrange_multipliers({0.4: 0.3})
    obs, _ = env.reset(seed=0, options={"budget": 0.4, "index": 0})
    text = tok.decode(prompt_of(obs), skip_special_tokens=True)
    assert text == "With high teacher use, translate German to English: Ein Hund läuft im Park."
    dog = tok("dog", add_special_tokens=False)["input_ids"][0]
    actions = [dog, V, dog, V, 32110, V]  # 32110: an output row without a tokenizer entry, still a valid action
    steps = play(env, actions)
    out = steps[-1][4]["output_ids"]
    model = T5ForConditionalGeneration.from_pretrained(tiny_t5_dir).eval()
    lp = full_logprobs(model, prompt_of(obs), out)
    calls = np.array([a == V for a in actions[: len(out)]])
    np.testing.assert_allclose([s[4]["teacher_logprob"] for s in steps], lp[np.arange(len(out)), out], atol=1e-4)
    np.testing.assert_allclose([s[1] for s in steps], eq17_reward(lp[np.arange(len(out)), out], calls, 0.4, 0.3), atol=1e-4)
    assert all(out[calls] == lp[calls].argmax(-1))
    assert "[[" in env.render()


@pytest.mark.shared
def test_tokenizer_larger_than_the_teacher_vocabulary_is_refused(t5_tokenizer_dir, word_t5_dir):
    with pytest.raises(ValueError, match=r"tokenizer has 32100 entries but the teacher's output layer only 64 rows"):
        make_env(str(word_t5_dir), str(t5_tokenizer_dir))


# ------------------------------------------------------------------------------------- teacher prompt C^(T)
def test_the_teacher_reads_its_own_prompt_when_given_one(word_t5_dir, word_tokenizer_dir, word_tokenizer, reference_teacher):
    """With ``teacher_prompt`` the teacher scores and produces tokens given C^(T), the student still observes Y."""
    template = "{instruction}: {source}"
    env = make_env(str(word_t5_dir), str(word_tokenizer_dir), teacher_prompt=template)
    obs, _ = env.reset(seed=0, options={"budget": 0.3, "index": 1})
    source = EXAMPLES[1][0]
    assert prompt_of(obs).tolist() == word_tokenizer(make_prompt(INSTRUCTION, source, 0.3))["input_ids"]
    teacher_ids = word_tokenizer(template.format(instruction=INSTRUCTION, source=source))["input_ids"]
    assert env.encode_teacher_prompt(source, 0.3) == teacher_ids
    steps = play(env, script_actions(env))
    out = steps[-1][4]["output_ids"]
    lp = full_logprobs(reference_teacher, np.array(teacher_ids), out)
    np.testing.assert_allclose([s[4]["teacher_logprob"] for s in steps], lp[np.arange(len(out)), out], atol=1e-4)
    calls = [i for i, a in enumerate(script_actions(env)) if a == env.teacher_action]
    assert all(out[i] == lp[i].argmax() for i in calls)  # a call gives the teacher's token under C^(T)
    # ... and C^(T) matters: under Y the same tokens score differently.
    lp_y = full_logprobs(reference_teacher, prompt_of(obs), out)
    assert not np.allclose(lp[np.arange(len(out)), out], lp_y[np.arange(len(out)), out], atol=1e-3)


def test_without_a_teacher_prompt_the_teacher_reads_the_students_prompt(env):
    assert env.teacher_prompt is None
    assert env.encode_teacher_prompt("der hund", 0.2) == env.encode_prompt("der hund", 0.2)


@pytest.mark.parametrize("template", ["{instruction}: text", "{source} {budget}", "{source", 42])
def test_a_bad_teacher_prompt_is_refused(word_t5_dir, word_tokenizer_dir, template):
    with pytest.raises(ValueError, match="teacher_prompt .* is not usable.*expected None or a template"):
        make_env(str(word_t5_dir), str(word_tokenizer_dir), teacher_prompt=template)


def test_registered_tasks_give_the_teacher_a_budget_free_prompt():
    import inspect

    from tw_env import registration
    from tw_env.registration import HUB_TEACHER_PROMPT, SYNTHETIC_TEACHER_PROMPT

    for env_id in ("TrainingWheels-XSum-v0", "TrainingWheels-WMT19-v0"):
        assert gym.spec(env_id).entry_point is not None
    # The one factory (make_task) behind every entry point holds the defaults.
    for env_id in ("TrainingWheels-XSum-v0", "TrainingWheels-WMT19-v0"):
        assert registration.REGISTERED[env_id].teacher_prompt == HUB_TEACHER_PROMPT
    assert registration.REGISTERED["TrainingWheels-Synthetic-v0"].teacher_prompt == SYNTHETIC_TEACHER_PROMPT
    assert inspect.signature(registration.make_task).parameters["teacher_prompt"].default is not None
    assert "teacher use" not in HUB_TEACHER_PROMPT.format(instruction="summarize", source="x")
    # The embedded teacher was trained on budget prompts only: it reads the fixed "no" one.
    assert SYNTHETIC_TEACHER_PROMPT.format(instruction="i", source="s") == make_prompt("i", "s", 0.0)
    # ...and the numeric-budget teacher on numeric ones: it reads b = 0 as a number.
    numeric_teacher_prompt = registration.REGISTERED["TrainingWheels-SyntheticNumeric-v0"].teacher_prompt
    assert numeric_teacher_prompt.format(instruction="i", source="s") == make_prompt("i", "s", 0.0, "numeric")


# ------------------------------------------------------------------------------------- both families
SYNTHETIC = "TrainingWheels-Synthetic-v0"
MAX_NEW = 6


@pytest.fixture(scope="module")
def synthetic(family, tiny_tasks):
    """The family's tiny synthetic task (a teacher, a student, the synthetic tokenizer and data)."""
    return tiny_tasks.get(family, n_train=40, n_validation=8)


@pytest.fixture(scope="module")
def synthetic_teacher(family, synthetic):
    """A separately loaded copy of the synthetic task's teacher, run without any cache."""
    return family.auto_class.from_pretrained(synthetic.teacher_dir).eval()


def make_synthetic(task, **kwargs) -> TeacherAssistedDecodingEnv:
    return gym.make(SYNTHETIC, **task.env_kwargs(), max_new_tokens=MAX_NEW, **kwargs).unwrapped


def teacher_logprobs(family, model, teacher_prompt: list[int], output_ids) -> np.ndarray:
    """log p(· | C^(T), X^(out)_<i) for every i, from one full forward on C^(T) and X^(out)."""
    logits = family.output_logits(model, list(teacher_prompt), [int(t) for t in output_ids])
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def test_the_synthetic_task_reads_the_familys_pair(family, synthetic, synthetic_teacher):
    env = make_synthetic(synthetic)
    assert env.task.family.name == family.name
    assert type(env.teacher) is type(synthetic_teacher)  # T5ForConditionalGeneration, LlamaForCausalLM
    assert env.vocab_size == env.teacher.lm_head.weight.shape[0] and env.action_space.n == env.vocab_size + 1


def test_rewards_match_a_full_forward_of_the_teacher_on_its_prompt_and_the_output(family, synthetic, synthetic_teacher):
    env = make_synthetic(synthetic)
    V = env.vocab_size
    lambdas = {0.1: 0.4, 0.3: 0.7, 0.5: 1.1}
    env.set_lagrange_multipliers(lambdas)
    env.reset(seed=11)
    rng = np.random.default_rng(0)
    unclipped = 0
    for episode in range(5):
        mu, sigma = env.reward_stats.mu, env.reward_stats.sigma  # fixed within an episode
        budget, index = (0.1, 0.3, 0.5)[episode % 3], episode
        obs, _ = env.reset(options={"budget": budget, "index": index})
        source = env.examples[index].source
        c_t = env.encode_teacher_prompt(source, budget)
        assert c_t != env.encode_prompt(source, budget)  # the teacher reads its own prompt C^(T), not Y
        steps, actions = [], []
        while not steps or not (steps[-1][2] or steps[-1][3]):
            draw = rng.random()
            greedy = int(env.batch.teacher_logprobs[0].argmax())  # a student that sometimes agrees
            action = V if draw < 0.3 else greedy if draw < 0.6 else int(rng.integers(3, V))
            if action == EOS:
                action = V
            actions.append(action)
            steps.append(env.step(action))
        out = steps[-1][4]["output_ids"]
        lp = teacher_logprobs(family, synthetic_teacher, c_t, out)
        calls = np.array(actions) == V
        np.testing.assert_array_equal(out[~calls], np.array(actions)[~calls])
        np.testing.assert_array_equal(out[calls], lp[calls].argmax(axis=-1))  # greedy teacher tokens
        np.testing.assert_allclose([s[4]["teacher_logprob"] for s in steps], lp[np.arange(len(out)), out], atol=1e-4)
        expected = eq17_reward(lp[np.arange(len(out)), out], calls, budget, lambdas[budget], mu=mu, sigma=sigma)
        rewards = np.array([s[1] for s in steps])
        np.testing.assert_allclose(rewards, expected, atol=1e-4)
        unclipped += int((np.abs(rewards[~calls]) < 2 - 1e-3).sum())
        np.testing.assert_array_equal(obs["prompt_ids"][: obs["prompt_length"][0]], env.encode_prompt(source, budget))
    assert unclipped >= 3  # the comparison is not only of clipped values
    assert (env.reward_stats.mu, env.reward_stats.sigma) != (0.0, 1.0)  # later episodes used live normalisers


def test_synthetic_state_and_output_sequences_follow_eq13_and_eq14(synthetic):
    env = make_synthetic(synthetic)
    V = env.vocab_size
    env.reset(seed=0, options={"budget": 0.2, "index": 2})
    actions = [7, V, 9, V, V]
    for a in actions:
        obs, *_ = env.step(a)
    state, out = obs["state_ids"][: len(actions)], env.batch.output_ids[0, : len(actions)]
    calls = np.array(actions) == V
    np.testing.assert_array_equal(state[~calls], np.array(actions)[~calls])
    np.testing.assert_array_equal(state[calls], out[calls] + V)
    assert env.observation_space.contains(obs)


def test_synthetic_invalid_actions_raise(synthetic):
    env = make_synthetic(synthetic)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(0)
    env.reset(seed=0)
    for bad in (env.vocab_size + 1, -1, 1.5, [1, 2]):
        with pytest.raises(ValueError, match="action"):
            env.step(bad)


def test_env_checkers_on_the_synthetic_env(synthetic):
    core = make_synthetic(synthetic)
    assert isinstance(core, TeacherAssistedDecodingEnv)
    check_env_quietly(core)


def test_a_pair_with_different_vocabularies_is_refused_naming_both_sizes(family, synthetic, tmp_path):
    teacher_v = family.auto_class.from_pretrained(synthetic.teacher_dir).lm_head.weight.shape[0]
    other = family.student_lm(teacher_v + 8, seed=5)
    other.save_pretrained(tmp_path / "student")
    for student in (str(tmp_path / "student"), other):
        with pytest.raises(ValueError, match=rf"vocabularies differ.*{teacher_v} rows, the student has {teacher_v + 8}"):
            gym.make(SYNTHETIC, **{**synthetic.env_kwargs(), "student": student})
    # the same vocabulary is accepted
    env = make_synthetic(synthetic)
    assert env.action_space.n == teacher_v + 1 and env.teacher_action == teacher_v


@only_family("decoder-only")
def test_a_pair_that_mixes_families_is_refused(synthetic, word_t5_dir, word_tokenizer_dir):
    with pytest.raises(ValueError, match="the teacher is decoder-only but the student is encoder-decoder"):
        gym.make(SYNTHETIC, **{**synthetic.env_kwargs(), "student": str(word_t5_dir)})
    with pytest.raises(ValueError, match="the teacher is encoder-decoder but the student is decoder-only"):
        gym.make(SYNTHETIC, **{**synthetic.env_kwargs(), "teacher": str(word_t5_dir), "tokenizer": str(word_tokenizer_dir),
                               "student": str(synthetic.student_dir)})
    assert check_same_family(tiny_causal_lm(64, 16, 1, seed=0), tiny_causal_lm(64, 16, 1, seed=1, arch="qwen3"))
