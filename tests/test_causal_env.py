"""Decoder-only (causal LM) teachers: the incremental decoder, the env, the vector env and the checks.

Everything is compared with independent full (no-cache) forwards of the same model: the causal
incremental decoder's logits per row, whatever the rows did (contexts of different lengths, one of
them empty, staggered restarts, multi-token steps, rollbacks, buffer growth and trimming); the env's
Eq. 17 rewards recomputed from a full forward of the teacher on C^(T) followed by X^(out); and the
vector env row by row against single envs.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

from tests.helpers import assert_obs_equal, row_obs
from tests.tiny_task import make_tiny_causal_task, tiny_causal_lm
from tw_env import TeacherAssistedDecodingEnv, TeacherAssistedDecodingVectorEnv, eq17_reward
from tw_env.causal_incremental import CausalIncrementalDecoder, check_supported_causal_lm
from tw_env.families import DECODER_ONLY, ENCODER_DECODER, check_same_family, family_of
from tw_env.models import UnsupportedModelError

ATOL = 1e-5
# float32 rounding: a cached step and a full forward sum in different orders, so logits near 1
# differ by a few ulps (1.07e-5 seen on a loaded machine); torch's float32 rtol covers that, while a
# cache bug moves logits by orders of magnitude more.
RTOL = 1.3e-6
VOCAB = 256
ENV_ID = "TrainingWheels-Synthetic-v0"
EOS = 1
MAX_NEW = 6


# ------------------------------------------------------------------------------------- the decoder
MODELS = {
    # peaked distributions (wide weights), untied head, SDPA
    "llama": dict(arch="llama", initializer_range=0.3),
    # tied embeddings (the head applied as is: no T5 rescaling) and eager attention
    "llama-tied-eager": dict(arch="llama", tied=True, attn="eager"),
    # layer 0 full attention, layer 1 a 3-token sliding window: one mask per layer type
    "qwen2-sliding": dict(arch="qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1),
    # q/k norms
    "qwen3": dict(arch="qwen3", initializer_range=0.1),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    spec = dict(MODELS[request.param])
    attn = spec.pop("attn", None)
    m = tiny_causal_lm(VOCAB, 32, 2, seed=len(request.param), **spec)
    if attn is not None:
        m.set_attn_implementation(attn)
    return m


@torch.no_grad()
def full_logits(model, sequence: list[int]) -> torch.Tensor:
    """Logits at every position of one unpadded sequence, from one forward without any cache."""
    return model(input_ids=torch.tensor([sequence])).logits[0]


def padded(contexts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, contexts))
    ids = torch.zeros(len(contexts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(contexts):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1
    return ids, mask


class Tracker:
    """Drives a CausalIncrementalDecoder and keeps, per row, its context and what it read since."""

    def __init__(self, model, batch_size: int, max_episode_len: int, seed: int = 0):
        self.model = model
        self.dec = CausalIncrementalDecoder(model, batch_size, max_episode_len)
        self.rng = np.random.default_rng(seed)
        self.sequences: list[list[int]] = [[] for _ in range(batch_size)]
        self.read = [0] * batch_size
        self.checked = 0

    def restart(self, rows: list[int], lengths: list[int]) -> None:
        contexts = [[int(t) for t in self.rng.integers(2, VOCAB, size=n)] for n in lengths]
        with torch.no_grad():
            self.dec.restart(rows, *padded(contexts))
        for row, c in zip(rows, contexts, strict=True):
            self.sequences[row], self.read[row] = list(c), 0

    def step(self, width: int | None = None, embeds: bool = False) -> None:
        k = 1 if width is None else width
        block = torch.as_tensor(self.rng.integers(0, VOCAB, size=(self.dec.batch_size, k)))
        for row, tokens in enumerate(block.tolist()):
            self.sequences[row].extend(tokens)
            self.read[row] += k
        inputs = block[:, 0] if width is None else block
        with torch.no_grad():
            if embeds:
                states = self.dec.step(inputs_embeds=self.model.get_input_embeddings()(inputs))
            else:
                states = self.dec.step(input_ids=inputs)
            logits = self.dec.logits(states)
        logits = logits[:, None] if width is None else logits
        assert logits.shape == (self.dec.batch_size, k, VOCAB)
        for row in range(self.dec.batch_size):
            expected = full_logits(self.model, self.sequences[row])[-k:]
            torch.testing.assert_close(logits[row], expected, atol=ATOL, rtol=RTOL)
            self.checked += k

    def rollback(self, discard: list[int]) -> None:
        with torch.no_grad():
            self.dec.rollback(torch.tensor(discard))
        for row, d in enumerate(discard):
            if d:
                del self.sequences[row][-d:]
                self.read[row] -= d


def test_rows_with_different_context_lengths_match_full_forwards(model):
    tr = Tracker(model, batch_size=4, max_episode_len=8)
    tr.restart([2, 0, 3, 1], [5, 11, 0, 1])  # any order; row 3 has an empty context (a one-token prompt)
    assert [len(s) for s in tr.sequences] == [11, 1, 5, 0]
    for _ in range(5):
        tr.step()
    assert tr.dec.clock == 16 and tr.dec.length.tolist() == [16, 6, 10, 5]  # each row's own positions
    assert tr.checked == 20


def test_staggered_restarts_blocks_and_rollbacks_match_full_forwards(model):
    tr = Tracker(model, batch_size=3, max_episode_len=6, seed=1)
    tr.restart([0, 1, 2], [3, 8, 5])
    rng = np.random.default_rng(2)
    restarts = 0
    for i in range(24):
        tr.step(width=int(rng.integers(2, 4)) if rng.random() < 0.4 else None, embeds=i % 5 == 4)
        tr.rollback([int(rng.integers(0, min(2, r) + 1)) for r in tr.read])  # rejected drafts, per row
        due = [row for row in range(3) if tr.read[row] >= 5]
        if due:  # rows restart on their own, with contexts longer and shorter than before
            tr.restart(due, [int(rng.integers(0, 14)) for _ in due])
            restarts += len(due)
    assert restarts >= 4
    assert tr.checked >= 90


def test_buffers_grow_for_long_contexts_and_are_trimmed_after(model):
    tr = Tracker(model, batch_size=2, max_episode_len=4, seed=3)
    tr.restart([0, 1], [2, 3])
    tr.step()
    small = tr.dec.capacity
    tr.restart([1], [30])  # a long context: the buffers grow
    tr.step(width=2)
    assert tr.dec.capacity >= 33 > small
    tr.restart([1], [1])  # gone again: the buffers are trimmed, and the rows' keys survive the trim
    assert tr.dec.capacity < 33
    for _ in range(3):
        tr.step()
    assert tr.dec.capacity <= 2 * (tr.dec.clock + 4 + 1)


def test_gradients_through_the_decoder_equal_a_full_forwards(model):
    """With grad enabled (a training forward), the buffers are written out of place: the loss and its
    gradient are a full forward's."""
    contexts, steps = [[5, 6, 7, 8], [9]], [[10, 11], [12, 13]]
    dec = CausalIncrementalDecoder(model, 2, 4)
    dec.restart([0, 1], *padded(contexts))
    first = dec.logits(dec.step(input_ids=torch.tensor([s[0] for s in steps])))
    second = dec.logits(dec.step(input_ids=torch.tensor([s[1] for s in steps])))
    loss = first.logsumexp(-1).sum() + second.logsumexp(-1).sum()
    weight = model.get_input_embeddings().weight
    (incremental,) = torch.autograd.grad(loss, weight)
    full_loss = sum(model(input_ids=torch.tensor([c + s])).logits[0, -2:].logsumexp(-1).sum()
                    for c, s in zip(contexts, steps, strict=True))
    (full,) = torch.autograd.grad(full_loss, weight)
    torch.testing.assert_close(loss, full_loss, atol=1e-4, rtol=0)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-4)


def test_decoder_errors(model):
    dec = CausalIncrementalDecoder(model, 3, 8)
    with pytest.raises(RuntimeError, match="restart"):
        dec.step(input_ids=torch.zeros(3, dtype=torch.long))
    ids, mask = padded([[5, 6], [7]])
    with pytest.raises(ValueError, match="all 3 rows"):
        dec.restart([0, 1], ids, mask)
    ids, mask = padded([[5, 6], [7], [8, 9]])
    with pytest.raises(ValueError, match="right-padded"):
        dec.restart([0, 1, 2], ids, mask.flip(1))
    with torch.no_grad():
        dec.restart([0, 1, 2], ids, mask)
        dec.step(input_ids=torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match=r"rollback discards \[0, 2, 0\] tokens, but the rows read \[1, 1, 1\]"):
        dec.rollback(torch.tensor([0, 2, 0]))


def test_models_the_decoder_cannot_run_exactly_are_refused():
    gemma = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0,
    ))
    with pytest.raises(UnsupportedModelError, match="final_logit_softcapping=30.0"):
        CausalIncrementalDecoder(gemma, 2, 4)
    llama = tiny_causal_lm(64, 16, 1, seed=0)
    llama.config._attn_implementation = "flash_attention_2"  # refused before anything runs
    with pytest.raises(UnsupportedModelError, match="attn_implementation='flash_attention_2'.*'eager', 'sdpa'"):
        check_supported_causal_lm(llama)


# ------------------------------------------------------------------------------------- families
def test_family_is_read_from_the_config(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, T5Config

    llama = tiny_causal_lm(64, 16, 1, seed=0)
    assert family_of(llama) is DECODER_ONLY and family_of(llama.config) is DECODER_ONLY
    assert family_of(T5Config()) is ENCODER_DECODER
    with pytest.raises(UnsupportedModelError, match=r"model type 'bert' is neither an encoder-decoder nor a causal"):
        family_of(BertConfig())
    assert family_of(BertConfig(is_decoder=True)) is DECODER_ONLY  # BERT configured as a causal LM
    # load_model refuses an encoder with the family's message, not as a loading failure
    bert = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    bert.save_pretrained(tmp_path / "bert")
    from tw_env.models import load_model

    with pytest.raises(UnsupportedModelError, match="'bert' is neither"):
        load_model(str(tmp_path / "bert"))


def test_restart_inputs_and_generation_inputs_of_the_decoder_only_family():
    llama = tiny_causal_lm(64, 16, 1, seed=0)
    context, first = DECODER_ONLY.restart_inputs(llama, [[5, 6, 7], [8]])
    assert context == [[5, 6], []] and first.tolist() == [7, 8]
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        DECODER_ONLY.restart_inputs(llama, [[5], []])
    with pytest.raises(TypeError, match="restart_inputs"):
        DECODER_ONLY.start_token_id(llama)
    ids, mask = padded([[5, 6, 7], [8]])
    left_ids, left_mask = DECODER_ONLY.generation_inputs(ids, mask)
    assert left_ids.tolist() == [[5, 6, 7], [0, 0, 8]] and left_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    sequences = torch.tensor([[5, 6, 7, 9, 1], [0, 0, 8, 3, 4]])
    assert DECODER_ONLY.generated_tokens(sequences, 3).tolist() == [[9, 1], [3, 4]]


# ------------------------------------------------------------------------------------- the env
@pytest.fixture(scope="module")
def causal_task(tmp_path_factory):
    return make_tiny_causal_task(tmp_path_factory.mktemp("tiny_causal"), n_train=40, n_validation=8)


@pytest.fixture(scope="module")
def reference_teacher(causal_task):
    """A separately loaded copy of the teacher, run without any cache."""
    return AutoModelForCausalLM.from_pretrained(causal_task.teacher_dir).eval()


def make_single(causal_task, **kwargs) -> TeacherAssistedDecodingEnv:
    env = gym.make(ENV_ID, **causal_task.env_kwargs(), max_new_tokens=MAX_NEW, **kwargs)
    return env.unwrapped


@torch.no_grad()
def teacher_logprobs(model, teacher_prompt: list[int], output_ids) -> np.ndarray:
    """log p(· | C^(T), X^(out)_<i) for every i, from one full forward on C^(T) followed by X^(out)."""
    sequence = [*teacher_prompt, *(int(t) for t in output_ids)]
    logits = model(input_ids=torch.tensor([sequence])).logits[0, len(teacher_prompt) - 1 : len(sequence) - 1]
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def test_the_task_reads_a_causal_pair(causal_task):
    env = make_single(causal_task)
    assert env.task.family is DECODER_ONLY
    assert type(env.teacher).__name__ == "LlamaForCausalLM"
    assert env.vocab_size == env.teacher.lm_head.weight.shape[0] and env.action_space.n == env.vocab_size + 1


def test_rewards_match_a_full_forward_of_the_teacher_on_its_prompt_and_the_output(causal_task, reference_teacher):
    env = make_single(causal_task)
    V = env.vocab_size
    lambdas = {0.1: 0.4, 0.3: 0.7, 0.5: 1.1}
    env.set_lagrange_multipliers(lambdas)
    env.reset(seed=11)
    rng = np.random.default_rng(0)
    unclipped = episodes = 0
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
        lp = teacher_logprobs(reference_teacher, c_t, out)
        calls = np.array(actions) == V
        np.testing.assert_array_equal(out[~calls], np.array(actions)[~calls])
        np.testing.assert_array_equal(out[calls], lp[calls].argmax(axis=-1))  # greedy teacher tokens
        np.testing.assert_allclose([s[4]["teacher_logprob"] for s in steps], lp[np.arange(len(out)), out], atol=1e-4)
        expected = eq17_reward(lp[np.arange(len(out)), out], calls, budget, lambdas[budget], mu=mu, sigma=sigma)
        rewards = np.array([s[1] for s in steps])
        np.testing.assert_allclose(rewards, expected, atol=1e-4)
        unclipped += int((np.abs(rewards[~calls]) < 2 - 1e-3).sum())
        episodes += 1
        np.testing.assert_array_equal(obs["prompt_ids"][: obs["prompt_length"][0]], env.encode_prompt(source, budget))
    assert unclipped >= 3  # the comparison is not only of clipped values
    assert (env.reward_stats.mu, env.reward_stats.sigma) != (0.0, 1.0)  # later episodes used live normalisers


def test_state_and_output_sequences_follow_eq13_and_eq14(causal_task):
    env = make_single(causal_task)
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


def test_invalid_actions_raise(causal_task):
    env = make_single(causal_task)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(0)
    env.reset(seed=0)
    for bad in (env.vocab_size + 1, -1, 1.5, [1, 2]):
        with pytest.raises(ValueError, match="action"):
            env.step(bad)


def test_env_checkers_on_the_causal_env(causal_task):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    core = make_single(causal_task)
    assert isinstance(core, TeacherAssistedDecodingEnv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(core)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sb3_check_env(core, warn=True)


# ------------------------------------------------------------------------------------- the vector env




def random_actions(rng: np.random.Generator, envs, p_eos: float = 0.2) -> np.ndarray:
    batch = envs.unwrapped.batch
    n, V = len(batch.done), envs.unwrapped.vocab_size
    draw = rng.random(n)
    actions = np.where(draw < 0.3, V, rng.integers(3, V, size=n))
    actions[draw > 1 - p_eos] = EOS
    actions[batch.done] = EOS
    return actions.astype(np.int64)


def test_vector_env_matches_single_envs_through_autoresets(causal_task, reference_teacher):
    n = 3
    lambdas = {0.0: 0.0, 0.1: 0.5, 0.2: 0.3, 0.3: 1.0, 0.4: 0.8, 0.5: 0.2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        envs = gym.make_vec(ENV_ID, num_envs=n, vectorization_mode="vector_entry_point",
                            **causal_task.env_kwargs(), max_new_tokens=MAX_NEW)
    core = envs.unwrapped
    assert isinstance(core, TeacherAssistedDecodingVectorEnv) and core.task.family is DECODER_ONLY
    singles = [make_single(causal_task) for _ in range(n)]
    V = core.vocab_size
    for e in [core, *singles]:
        e.set_lagrange_multipliers(lambdas)
    budgets, indices = [0.0, 0.3, 0.5], [3, 1, 0]
    obs, _ = envs.reset(seed=0, options={"budget": budgets, "index": indices})
    assert core.observation_space.contains(obs)
    for r, single in enumerate(singles):
        s_obs, _ = single.reset(seed=r, options={"budget": budgets[r], "index": indices[r]})
        assert_obs_equal(row_obs(obs, r), s_obs)
    rng = np.random.default_rng(0)
    episodes, checked = np.zeros(n, dtype=int), 0
    for _ in range(22):
        resetting = core.batch.done.copy()
        mu, sigma = core.reward_stats.mu, core.reward_stats.sigma
        actions = random_actions(rng, envs)
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        assert core.observation_space.contains(obs)
        for r, single in enumerate(singles):
            if resetting[r]:  # NEXT_STEP autoreset: the row holds a fresh episode
                assert rewards[r] == 0.0 and obs["state_length"][r, 0] == 0
                s_obs, _ = single.reset(options={"budget": float(obs["budget"][r, 0]), "index": int(core.example_index[r])})
                assert_obs_equal(row_obs(obs, r), s_obs)
                continue
            s_obs, s_reward, s_term, s_trunc, s_info = single.step(int(actions[r]))
            assert_obs_equal(row_obs(obs, r), s_obs)
            assert (terminated[r], truncated[r]) == (s_term, s_trunc)
            assert infos["teacher_logprob"][r] == pytest.approx(s_info["teacher_logprob"], abs=1e-4)
            expected = eq17_reward(s_info["teacher_logprob"], actions[r] == V, s_info["budget"],
                                   lambdas[s_info["budget"]], mu, sigma)
            assert rewards[r] == pytest.approx(float(expected), abs=1e-4)
            # and against the independent full forward on C^(T) followed by X^(out)
            n_out = int(obs["state_length"][r, 0])
            outputs = [int(t) % V for t in obs["state_ids"][r, :n_out]]
            example = core.examples[int(core.example_index[r])]
            c_t = core.encode_teacher_prompt(example.source, float(core.batch.budget[r]))
            lp = teacher_logprobs(reference_teacher, c_t, outputs)[-1]
            assert infos["teacher_logprob"][r] == pytest.approx(lp[outputs[-1]], abs=1e-4)
            checked += 1
            if s_term or s_trunc:
                episodes[r] += 1
                np.testing.assert_array_equal(infos["output_ids"][r], s_info["output_ids"])
    assert (episodes >= 2).all(), episodes  # every row went through autoresets, at different times
    assert checked >= 40


def test_rows_reset_by_reset_done_rows_act_at_once(causal_task, reference_teacher):
    """reset_done_rows starts a subset of rows at once: the others read a placeholder that is
    rolled back (the causal decoder's per-row rollback), and must keep exact distributions."""
    envs = TeacherAssistedDecodingVectorEnv(3, gym.make(ENV_ID, **causal_task.env_kwargs(), max_new_tokens=4).unwrapped.task)
    envs.reset(seed=1, options={"index": [0, 1, 2]})
    V = envs.vocab_size
    rng = np.random.default_rng(1)
    restarted = checked = 0
    for _ in range(14):
        obs, _, terminated, truncated, infos = envs.step(random_actions(rng, envs))
        for r in range(3):
            n_out = int(obs["state_length"][r, 0])
            outputs = [int(t) % V for t in obs["state_ids"][r, :n_out]]
            example = envs.examples[int(envs.example_index[r])]
            c_t = envs.encode_teacher_prompt(example.source, float(envs.batch.budget[r]))
            lp = teacher_logprobs(reference_teacher, c_t, outputs)[-1]
            assert infos["teacher_logprob"][r] == pytest.approx(lp[outputs[-1]], abs=1e-4)
            checked += 1
        ended = terminated | truncated
        envs.reset_done_rows()
        restarted += int(ended.sum())
        assert not envs.batch.done.any()
    assert restarted >= 4 and checked == 42


def test_vector_env_checks(causal_task):
    """What gymnasium checks of a single env, for the vector env: batched spaces contain what reset and
    step return, a seeded reset and the same actions reproduce everything, and nothing warns."""
    from gymnasium.utils.env_checker import data_equivalence

    def run(seed: int) -> list:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            envs = gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="vector_entry_point",
                                **causal_task.env_kwargs(), max_new_tokens=3)
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


# ------------------------------------------------------------------------------------- refused pairs
def test_a_pair_that_mixes_families_is_refused(causal_task, word_t5_dir, word_tokenizer_dir):
    with pytest.raises(ValueError, match="the teacher is decoder-only but the student is encoder-decoder"):
        gym.make(ENV_ID, **{**causal_task.env_kwargs(), "student": str(word_t5_dir)})
    with pytest.raises(ValueError, match="the teacher is encoder-decoder but the student is decoder-only"):
        gym.make(ENV_ID, **{**causal_task.env_kwargs(), "teacher": str(word_t5_dir), "tokenizer": str(word_tokenizer_dir),
                            "student": str(causal_task.student_dir)})
    assert check_same_family(tiny_causal_lm(64, 16, 1, seed=0), tiny_causal_lm(64, 16, 1, seed=1, arch="qwen3"))


def test_a_causal_pair_with_different_vocabularies_is_refused(causal_task, tmp_path):
    teacher_v = AutoModelForCausalLM.from_pretrained(causal_task.teacher_dir).lm_head.weight.shape[0]
    other = tiny_causal_lm(teacher_v + 8, 16, 1, seed=5, arch="qwen2")
    other.save_pretrained(tmp_path / "student")
    for student in (str(tmp_path / "student"), other):
        with pytest.raises(ValueError, match=rf"vocabularies differ.*{teacher_v} rows, the student has {teacher_v + 8}"):
            gym.make(ENV_ID, **{**causal_task.env_kwargs(), "student": student})
