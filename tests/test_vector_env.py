"""`TeacherAssistedDecodingVectorEnv`: N rows in lock step behave like N single envs.

The vector env is built through ``gym.make_vec(..., vectorization_mode="vector_entry_point")`` and
compared, row by row, with single envs from ``gym.make`` on the same examples and budgets, through
several NEXT_STEP autoresets. Every teacher log-probability is also checked against an independent
full (no-cache) forward of a separately loaded teacher on the row's own teacher prompt C^(T).

The semantic tests run for both model families (``[encoder-decoder]``: the word-level tokenizer's
tiny T5 on WMT19-style pairs, the teacher reading the observed prompt; ``[decoder-only]``: the tiny
causal synthetic task, whose teacher reads its own prompt); the error and bookkeeping tests on the T5.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pytest
import torch

from tests.conftest import EXAMPLES, INSTRUCTION, WORDS
from tests.helpers import assert_obs_equal, row_obs
from tests.tiny_task import FAMILIES
from tw_env import TeacherAssistedDecodingVectorEnv, eq17_reward

W = {w: i for i, w in enumerate(WORDS)}
EOS = 1
CONTENT = [W[w] for w in ("the", "dog", "cat", "house", "is", "big", "small", "red", "tree", "and", "der", "hund")]
MAX_NEW = 6
LAMBDAS = {0.0: 0.0, 0.1: 0.5, 0.2: 0.3, 0.3: 1.0, 0.4: 0.8, 0.5: 0.2}


@dataclass
class VectorTask:
    """A registered task of one family: its env id and ``gym.make`` keywords, its teacher, and the
    tokens a scripted student writes."""

    family: object
    env_id: str
    kwargs: dict
    reference_teacher: object  # a separately loaded copy of the teacher, run without any cache
    content: np.ndarray

    def make_vec(self, num_envs: int, **overrides):
        return gym.make_vec(self.env_id, num_envs=num_envs, vectorization_mode="vector_entry_point",
                            **{**self.kwargs, **overrides})


@pytest.fixture(scope="module")
def vector_task(family, tiny_tasks, word_t5_dir, word_tokenizer_dir, wmt_jsonl) -> VectorTask:
    if family.name == "encoder-decoder":
        kwargs = dict(teacher=str(word_t5_dir), student=str(word_t5_dir), tokenizer=str(word_tokenizer_dir),
                      data=str(wmt_jsonl), max_new_tokens=MAX_NEW, max_prompt_length=32,
                      teacher_prompt=None)  # the teacher reads the observed prompt
        return VectorTask(family, "TrainingWheels-WMT19-v0", kwargs, family.auto_class.from_pretrained(word_t5_dir).eval(),
                          np.array(CONTENT))
    task = tiny_tasks.get(family, n_train=40, n_validation=8)
    reference = family.auto_class.from_pretrained(task.teacher_dir).eval()
    return VectorTask(family, "TrainingWheels-Synthetic-v0", {**task.env_kwargs(), "max_new_tokens": MAX_NEW}, reference,
                      np.arange(3, reference.config.vocab_size))


def make_vector(word_t5_dir, word_tokenizer_dir, num_envs: int, **kwargs) -> TeacherAssistedDecodingVectorEnv:
    defaults = dict(examples=EXAMPLES, instruction=INSTRUCTION, max_new_tokens=MAX_NEW, max_prompt_length=32)
    defaults.update(kwargs)
    return TeacherAssistedDecodingVectorEnv(num_envs, teacher=str(word_t5_dir), tokenizer=str(word_tokenizer_dir), **defaults)


def last_logprobs(family, model, teacher_prompt, outputs: list[int]) -> np.ndarray:
    """log p(· | X^(out)_<i, C^(T)) for the last position i of ``outputs``, from a full forward."""
    logits = family.output_logits(model, [int(t) for t in teacher_prompt], outputs)[-1]
    return torch.log_softmax(logits.float(), dim=-1).numpy()






def choose_actions(rng: np.random.Generator, envs, p_eos: float = 0.2, content=CONTENT) -> np.ndarray:
    """A seeded mix of content tokens, <τ> calls and EOS, so that rows end at different times
    (and sometimes several rows, with different lengths, in the same step)."""
    batch = envs.unwrapped.batch
    n, V = len(batch.done), envs.unwrapped.vocab_size
    draw = rng.random(n)
    actions = np.where(draw < 0.3, V, rng.choice(content, size=n))
    actions[draw > 1 - p_eos] = EOS
    actions[batch.done] = EOS  # ignored: those rows are reset by this step
    return actions.astype(np.int64)


class FullForwardChecker:
    """Checks every acting row's teacher_logprob against a full forward on its current episode (the
    row's teacher prompt C^(T), then its output)."""

    def __init__(self, task: VectorTask, envs):
        self.task, self.core, self.checked = task, envs.unwrapped, 0
        self.V = self.core.vocab_size

    def __call__(self, obs, infos, acting: np.ndarray) -> None:
        for r in acting:
            n = int(obs["state_length"][r, 0])
            state = obs["state_ids"][r, :n]
            outputs = [int(t - self.V if t >= self.V else t) for t in state]
            example = self.core.examples[int(self.core.example_index[r])]
            teacher_prompt = self.core.encode_teacher_prompt(example.source, float(self.core.batch.budget[r]))
            lp = last_logprobs(self.task.family, self.task.reference_teacher, teacher_prompt, outputs)
            assert infos["_teacher_logprob"][r]
            assert infos["teacher_logprob"][r] == pytest.approx(lp[outputs[-1]], abs=1e-4)
            if state[-1] >= self.V:  # a greedy teacher call
                assert outputs[-1] == lp.argmax()
            self.checked += 1


# ------------------------------------------------------------------------------------- semantics
def test_same_semantics_as_single_envs_through_autoresets(vector_task):
    n = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        envs = vector_task.make_vec(n)
    core = envs.unwrapped
    assert isinstance(core, TeacherAssistedDecodingVectorEnv) and envs.num_envs == n
    assert core.task.family.name == vector_task.family.name
    singles = [gym.make(vector_task.env_id, **vector_task.kwargs) for _ in range(n)]
    V = core.vocab_size
    for e in [envs.unwrapped, *(s.unwrapped for s in singles)]:
        e.set_lagrange_multipliers(LAMBDAS)
    budgets, indices = [0.0, 0.1, 0.3, 0.5], [3, 1, 0, 2]
    obs, info = envs.reset(seed=0, options={"budget": budgets, "index": indices})
    np.testing.assert_array_equal(info["budget"], budgets)
    np.testing.assert_array_equal(info["example_index"], indices)
    for r, single in enumerate(singles):
        s_obs, s_info = single.reset(seed=r, options={"budget": budgets[r], "index": indices[r]})
        assert s_info == {"budget": budgets[r], "example_index": indices[r]}
        assert_obs_equal(row_obs(obs, r), s_obs)

    check = FullForwardChecker(vector_task, envs)
    rng = np.random.default_rng(0)
    episodes_done = np.zeros(n, dtype=int)
    active_stats = False
    same_step_ends = 0
    for _ in range(26):
        resetting = core.batch.done.copy()
        actions = choose_actions(rng, envs, content=vector_task.content)
        mu, sigma = core.reward_stats.mu, core.reward_stats.sigma  # what this step's rewards use
        active_stats |= (mu, sigma) != (0.0, 1.0)
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        acting = np.flatnonzero(~resetting)
        check(obs, infos, acting)
        same_step_ends += (terminated | truncated).sum() > 1
        for r, single in enumerate(singles):
            if resetting[r]:
                # NEXT_STEP autoreset: the action was ignored, the row holds a fresh episode
                assert rewards[r] == 0.0 and not terminated[r] and not truncated[r]
                assert obs["state_length"][r, 0] == 0
                assert not infos.get("_teacher_logprob", np.zeros(n, bool))[r]
                options = {"budget": float(obs["budget"][r, 0]), "index": int(core.example_index[r])}
                s_obs, s_info = single.reset(options=options)
                assert s_info["budget"] == core.batch.budget[r]  # the float32 observation snapped back
                assert_obs_equal(row_obs(obs, r), s_obs)
                continue
            s_obs, s_reward, s_term, s_trunc, s_info = single.step(int(actions[r]))
            assert_obs_equal(row_obs(obs, r), s_obs)
            assert (terminated[r], truncated[r]) == (s_term, s_trunc)
            assert infos["teacher_logprob"][r] == pytest.approx(s_info["teacher_logprob"], abs=1e-4)
            assert infos["teacher_call"][r] == s_info["teacher_call"] == (actions[r] == V)
            assert infos["budget"][r] == s_info["budget"] == core.batch.budget[r]
            # the reward is Eq. 17 with the env's own normalisers (shared by the rows of the vector env)
            expected = eq17_reward(s_info["teacher_logprob"], actions[r] == V, s_info["budget"],
                                   LAMBDAS[s_info["budget"]], mu, sigma)
            assert rewards[r] == pytest.approx(float(expected), abs=1e-4)
            if (mu, sigma) == (0.0, 1.0):
                assert rewards[r] == pytest.approx(s_reward, abs=1e-4)  # the single env's normalisers too
            ended = s_term or s_trunc
            assert infos.get("_output_ids", np.zeros(n, bool))[r] == ended
            if ended:
                episodes_done[r] += 1
                np.testing.assert_array_equal(infos["output_ids"][r], s_info["output_ids"])
                assert infos["teacher_fraction"][r] == pytest.approx(s_info["teacher_fraction"])
                assert infos["output_text"][r] == s_info["output_text"]
                assert infos["reference"][r] == s_info["reference"]
    assert (episodes_done >= 2).all(), episodes_done  # every row went through at least one autoreset
    assert active_stats  # rewards were also checked with non-trivial normalisers
    assert same_step_ends >= 1  # several rows ended in one step at least once
    assert check.checked >= 70


def test_rows_reset_by_reset_done_rows_act_at_once(vector_task):
    """reset_done_rows starts a subset of rows at once: the other rows (a causal teacher: a placeholder
    rolled back per row) keep exact distributions."""
    envs = vector_task.make_vec(3).unwrapped
    check = FullForwardChecker(vector_task, envs)
    with pytest.raises(RuntimeError, match="before reset"):
        envs.reset_done_rows()
    envs.reset(seed=1, options={"index": [0, 1, 2]})
    rng = np.random.default_rng(1)
    restarted = 0
    for _ in range(20):
        actions = choose_actions(rng, envs, content=vector_task.content)
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        check(obs, infos, np.arange(3))  # every row acts: none is left for a NEXT_STEP reset
        ended = terminated | truncated
        obs = envs.reset_done_rows()
        restarted += ended.sum()
        assert not envs.batch.done.any()
        assert (obs["state_length"][ended, 0] == 0).all()
        assert (obs["state_length"][~ended, 0] > 0).all()
    assert restarted >= 5
    assert check.checked == 60


def test_rows_ending_in_the_same_step_with_different_lengths(word_t5_dir, word_tokenizer_dir):
    """Regression: the end-of-episode output_ids of rows ending together used to be batched into one
    fixed-shape array, which crashed when their lengths differed."""
    envs = make_vector(word_t5_dir, word_tokenizer_dir, 2, max_new_tokens=4)
    envs.reset(seed=0)
    dog, cat = W["dog"], W["cat"]
    envs.step(np.array([dog, dog]))
    envs.step(np.array([EOS, dog]))  # row 0 ends (2 tokens)
    envs.step(np.array([cat, dog]))  # row 0 restarts; row 1 has 3 tokens
    _, _, terminated, truncated, infos = envs.step(np.array([EOS, cat]))  # row 0: 1 token (EOS), row 1: truncated at 4
    assert terminated.tolist() == [True, False] and truncated.tolist() == [False, True]
    assert infos["output_ids"][0].tolist() == [EOS]
    assert infos["output_ids"][1].tolist() == [dog, dog, dog, cat]


def test_without_autoreset_ended_rows_wait_and_feed_nothing(word_t5_dir, word_tokenizer_dir):
    """reset(options={"autoreset": False}): one episode per row. A row that ended early stays ended
    (reward 0, no flags, unchanged observation), starts no episode, draws nothing from the env's RNG,
    and only the episodes of the batch reach the reward normalisers."""
    envs = make_vector(word_t5_dir, word_tokenizer_dir, 3, max_new_tokens=4)
    envs.reset(seed=0)  # seeded once; the batch below passes its own budgets and examples
    envs.reward_stats.reset()
    rng_before = copy.deepcopy(envs.np_random.bit_generator.state)
    obs, _ = envs.reset(options={"budget": [0.1, 0.2, 0.3], "index": [0, 1, 2], "autoreset": False})
    dog = W["dog"]
    envs.step(np.array([EOS, dog, dog]))  # row 0 ends after 1 token
    obs_after_end, rewards, terminated, truncated, _ = envs.step(np.array([dog, EOS, dog]))  # row 1 ends (2 tokens)
    assert terminated.tolist() == [False, True, False]
    assert rewards[0] == 0.0 and obs_after_end["state_length"][0, 0] == 1  # row 0 waits: not restarted
    for _ in range(2):  # row 2 is truncated at 4 tokens; rows 0 and 1 keep waiting
        obs, rewards, terminated, truncated, infos = envs.step(np.array([dog, dog, dog]))
        assert rewards[:2].tolist() == [0.0, 0.0] and not terminated[:2].any() and not truncated[:2].any()
    assert truncated.tolist() == [False, False, True]
    assert obs["state_length"][:, 0].tolist() == [1, 2, 4]
    assert envs.np_random.bit_generator.state == rng_before  # no autoreset drew an example or a budget
    # The normalisers saw exactly the 1 + 2 + 4 tokens of the three episodes, nothing else.
    assert len(envs.reward_stats.state_dict()["teacher"]) == 7
    with pytest.raises(ValueError, match="autoreset"):
        envs.reset(options={"autoreset": "no"})
    # A plain reset brings NEXT_STEP autoreset back.
    envs.reset(options={"index": 0})
    envs.step(np.array([EOS, dog, dog]))
    obs, *_ = envs.step(np.array([dog, dog, dog]))
    assert obs["state_length"][0, 0] == 0  # row 0 was reset by this step


# ------------------------------------------------------------------------------------- errors
def snapshot(envs) -> dict:
    b = envs.batch
    return {
        "obs": envs._observations(), "done": b.done.copy(), "length": b.length.copy(), "output_ids": b.output_ids.copy(),
        "budget": b.budget.copy(), "clock": b.decoder.clock, "logprobs": b.teacher_logprobs.clone(),
        "rng": copy.deepcopy(envs.np_random.bit_generator.state), "example_index": envs.example_index.copy(),
        "stats": envs.reward_stats.state_dict(),
    }


def assert_snapshots_equal(a: dict, b: dict) -> None:
    for k in a:
        if isinstance(a[k], dict) and k == "obs":
            assert_obs_equal(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def test_invalid_actions_raise_and_leave_the_vector_env_unchanged(word_t5_dir, word_tokenizer_dir):
    envs = make_vector(word_t5_dir, word_tokenizer_dir, 3)
    twin = make_vector(word_t5_dir, word_tokenizer_dir, 3)
    V = envs.vocab_size
    with pytest.raises(RuntimeError, match=r"before reset\(\); call envs.reset\(\)"):
        envs.step(np.array([1, 2, 3]))
    for e in (envs, twin):
        e.reset(seed=3)
        e.step(np.array([W["dog"], V, EOS]))  # row 2 ended: the next step resets it
    before = snapshot(envs)
    bad = [
        (np.array([1, 2]), r"actions must be 3 integers in \[0, 64\], got shape \(2,\)"),
        (np.array([[1, 2, 3]]), r"got shape \(1, 3\)"),
        (np.array([1.0, 2.0, 3.0]), r"dtype float64"),
        (np.array([1, V + 1, 3]), rf"actions \[{V + 1}\] are outside \[0, {V}\]"),
        (np.array([-1, 2, -5]), rf"actions \[-1, -5\] are outside \[0, {V}\]"),
        ([W["dog"], V, "x"], r"actions must be 3 integers"),
        (5, r"got shape \(\)"),
    ]
    for actions, message in bad:
        with pytest.raises(ValueError, match=message):
            envs.step(actions)
        assert_snapshots_equal(snapshot(envs), before)
    for step in ([W["cat"], W["cat"], W["dog"]], [V, V, V], [W["is"], EOS, V]):
        a, b = envs.step(np.array(step)), twin.step(np.array(step))
        assert_obs_equal(a[0], b[0])
        for x, y in zip(a[1:4], b[1:4], strict=True):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(a[4]["teacher_logprob"], b[4]["teacher_logprob"])


def test_invalid_reset_options_raise_and_leave_the_vector_env_unchanged(word_t5_dir, word_tokenizer_dir):
    envs = make_vector(word_t5_dir, word_tokenizer_dir, 3)
    envs.reset(seed=0)
    envs.step(np.array([W["dog"], W["cat"], envs.vocab_size]))
    before = snapshot(envs)
    bad = [
        ({"budget": [0.1, 0.2]}, r"reset option 'budget' has 2 entries; expected 3"),
        ({"index": [0, 1, 2, 3]}, r"reset option 'index' has 4 entries; expected 3"),
        ({"budget": [0.1, 1.5, 0.2]}, r"in \[0, 1\], got 1.5"),
        ({"budget": 0.25}, r"budget 0.25 is not one of this env's budgets"),
        ({"index": [0, 9, 1]}, r"example index 9 out of range"),
        ({"seed": 3}, r"unknown reset options \['seed'\]"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            envs.reset(seed=5, options=options)
        assert_snapshots_equal(snapshot(envs), before)


def test_seeded_reset_is_reproducible_and_scalar_options_broadcast(word_t5_dir, word_tokenizer_dir):
    envs = make_vector(word_t5_dir, word_tokenizer_dir, 3)
    first = envs.reset(seed=8)
    envs.step(np.array([W["dog"], EOS, envs.vocab_size]))
    again = envs.reset(seed=8)
    assert_obs_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1]["budget"], again[1]["budget"])
    np.testing.assert_array_equal(first[1]["example_index"], again[1]["example_index"])
    obs, info = envs.reset(options={"budget": 0.2, "index": 4})
    assert (info["budget"] == 0.2).all() and (info["example_index"] == 4).all()
    assert (obs["budget"] == np.float32(0.2)).all()
    assert envs.observation_space.contains(obs)


def test_cache_stays_bounded_across_many_autoresets(word_t5_dir, word_tokenizer_dir):
    max_new = 4
    envs = make_vector(word_t5_dir, word_tokenizer_dir, 3, max_new_tokens=max_new)
    envs.reset(seed=0)
    rng = np.random.default_rng(5)
    V = envs.vocab_size
    resets, clocks = 0, []
    for _ in range(80):
        batch = envs.batch
        resets += batch.done.sum()
        actions = np.where(rng.random(3) < 0.3, V, rng.choice(CONTENT, size=3))
        actions[rng.random(3) < 0.25] = EOS
        envs.step(actions.astype(np.int64))
        clocks.append(envs.batch.decoder.clock)
        assert envs.batch.decoder.clock <= 2 * max_new + 2
    assert resets >= 30
    assert len(set(clocks)) > 3  # the rows are out of step: the cache is shared and compacted, not rebuilt


def test_render_ansi_per_row(word_t5_dir, word_tokenizer_dir):
    envs = make_vector(word_t5_dir, word_tokenizer_dir, 2, render_mode="ansi")
    envs.reset(seed=0)
    V = envs.vocab_size
    envs.step(np.array([W["dog"], V]))
    shown = envs.render()
    assert isinstance(shown, tuple) and len(shown) == 2
    assert shown[0] == "dog"
    assert shown[1].startswith("[[") and shown[1].endswith("]]")
    assert make_vector(word_t5_dir, word_tokenizer_dir, 1).render() is None


def test_every_row_scores_against_its_own_teacher_prompt(word_t5, word_t5_dir, word_tokenizer_dir, word_tokenizer):
    template = "{instruction}: {source}"
    envs = make_vector(word_t5_dir, word_tokenizer_dir, 3, teacher_prompt=template)
    envs.reset(seed=2, options={"index": [0, 1, 2], "budget": [0.0, 0.3, 0.5]})
    teacher_prompts = [
        np.array(word_tokenizer(template.format(instruction=INSTRUCTION, source=EXAMPLES[i][0]))["input_ids"])
        for i in range(3)
    ]
    rng = np.random.default_rng(0)
    outputs: list[list[int]] = [[], [], []]
    for _ in range(3):  # no EOS, fewer steps than MAX_NEW: every row stays in its first episode
        obs, _, terminated, truncated, infos = envs.step(choose_actions(rng, envs, p_eos=0.0))
        assert not (terminated | truncated).any()
        for row in range(3):
            outputs[row].append(int(obs["state_ids"][row, obs["state_length"][row, 0] - 1]) % envs.vocab_size)
            expected = last_logprobs(FAMILIES["encoder-decoder"], word_t5, teacher_prompts[row], outputs[row])[outputs[row][-1]]
            assert infos["teacher_logprob"][row] == pytest.approx(expected, abs=1e-4)


def test_vector_env_checks(vector_task):
    """What gymnasium checks of a single env, for the vector env: batched spaces contain what reset and
    step return, a seeded reset and the same actions reproduce everything, and nothing warns."""
    from gymnasium.utils.env_checker import data_equivalence

    def run(seed: int) -> list:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            envs = vector_task.make_vec(2, max_new_tokens=3)
            envs.action_space.seed(seed)
            out = [envs.reset(seed=seed)]
            for _ in range(5):
                actions = envs.action_space.sample()
                assert envs.action_space.contains(actions)
                out.append(envs.step(actions))
                assert envs.observation_space.contains(out[-1][0])
                assert out[-1][1].dtype == np.float64 and out[-1][2].dtype == bool and out[-1][3].dtype == bool
        return out

    first, again = run(4), run(4)
    assert first[0][0].keys() == again[0][0].keys()
    assert data_equivalence(first, again)
    assert not data_equivalence(first, run(5))
