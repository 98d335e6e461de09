"""The student policy and the test-time decoders on decoder-only (causal LM) pairs: tiny random
Llama / Qwen2 / Qwen3 models built from configs, as tests/test_policy.py and tests/test_decoding.py
check them on T5.

What is checked, and against what (every reference is independent of our incremental decoders: a
plain full forward of the model without a cache, or transformers' own ``generate``):
- each model alone (``generate`` with left padding) against a full-forward greedy loop;
- lossy speculative decoding at lenience 1 against the teacher's greedy output and transformers'
  assisted generation (batch size 1); at lenience 0 and 0.5 against full forwards of both models;
- Training Wheels with policies that never / always call against each model's greedy output, a
  teacher catch-up against full forwards, the teacher reading its own prompts C^(T), the budget cap;
- the confidence fallback at its extremes and in between;
- every batched decoder against the same prompts one at a time (prompts of 1 to 12 tokens);
- the policy's teacher-forced forward against a manual full forward (Eq. 15, the prompt summary,
  the three <τ> reads), its incremental rollout (with a mid-batch restart) against the teacher-forced
  forward, gradients, the value network, save/load and the errors for mixed families.

The decoding models: a Llama teacher (hidden 32, 2 layers) and a Qwen2 student (hidden 16, 1 layer)
with a vocabulary of 128, pad 0, EOS 1. Each gets a random N(0, 1) LM head with the EOS row enlarged
(as the T5 tests do), so that greedy outputs are peaked, differ between the models and some rows stop early.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from agents.decoding import (
    confidence_fallback_decode,
    generate_alone,
    speculative_decode,
    teacher_help_decode,
)
from agents.policy import EXTRA_CONFIG, StudentPolicy, ValueNetwork
from tests.helpers import assert_same_rows, check_well_formed, per_row, single_rows
from tests.tiny_task import tiny_causal_lm, tiny_t5
from tw_env.families import DECODER_ONLY

VOCAB = 128
EOS = 1
MAX_NEW = 14
PROMPT_LENGTHS = [5, 9, 1, 12]  # a one-token prompt: a causal LM then prefills nothing


def causal_lm(arch: str, hidden: int, layers: int, seed: int) -> torch.nn.Module:
    model = tiny_causal_lm(VOCAB, hidden, layers, seed=seed, arch=arch, initializer_range=0.3)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=generator))
        model.lm_head.weight[EOS] *= 1.5  # EOS wins now and then: rows of one batch end at different steps
    return model


@pytest.fixture(scope="module")
def teacher():
    return causal_lm("llama", 32, 2, seed=3)


@pytest.fixture(scope="module")
def student():
    return causal_lm("qwen2", 16, 1, seed=13)


@pytest.fixture(scope="module")
def close_drafter(teacher):
    """The teacher with 2% noise on every weight: it agrees often but not always (partial acceptances)."""
    model = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02 * p.std().clamp(min=1e-3))
    return model


def make_prompts(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random prompts ``(ids, mask)`` of the given lengths (no EOS: a causal LM continues them)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        ids[i, :length] = torch.randint(2, VOCAB, (length,), generator=generator)
        mask[i, :length] = 1
    return ids, mask


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(PROMPT_LENGTHS)










@torch.no_grad()
def full_greedy(model, prompt_ids: torch.Tensor, max_new_tokens: int = MAX_NEW) -> list[int]:
    """Greedy decoding of one unpadded prompt ``[1, L]`` by a full forward (no cache) per token."""
    sequence, out = prompt_ids[0].tolist(), []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax())
        out.append(token)
        sequence.append(token)
        if token == EOS:
            break
    return out


def greedy_rows(model, prompts) -> list[list[int]]:
    return [full_greedy(model, ids) for ids, _ in single_rows(prompts)]


@torch.no_grad()
def full_argmax(model, prompt_ids: torch.Tensor, outputs: list[int]) -> list[int]:
    """Argmax of one full forward over [prompt ; outputs]: entry p predicts output token p."""
    sequence = torch.tensor([prompt_ids[0].tolist() + outputs[:-1]])
    return model(input_ids=sequence).logits[0, prompt_ids.shape[1] - 1 :].argmax(dim=-1).tolist()


def policy_with_call_bias(student, bias: float, weight_std: float = 0.0, seed: int = 0) -> StudentPolicy:
    """A StudentPolicy around the student whose <τ> logit is ``w·h + bias`` (w ~ N(0, weight_std²))."""
    policy = StudentPolicy(student).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        policy.call_head.weight.normal_(0.0, weight_std) if weight_std else policy.call_head.weight.zero_()
        policy.call_head.bias.fill_(bias)
    return policy


# A mix: with a random N(0, 1) head the token logits' logsumexp is around 15, so a <τ> bias of 15
# plus a random read of the state calls at some tokens of a row and not at others.
MIXED = {"bias": 15.0, "weight_std": 1.0}


class ScheduledPolicy(StudentPolicy):
    """Calls the teacher exactly at the given decoding steps, whatever the state (for catch-up checks)."""

    def __init__(self, model, call_steps: set[int]):
        super().__init__(model)
        self.call_steps = call_steps
        self.step = 0

    def head(self, decoder_states, prompt):
        logits = super().head(decoder_states, prompt).clone()
        logits[..., -1] = 1e4 if self.step in self.call_steps else -1e4
        self.step += 1
        return logits


class ForwardCounter:
    """Counts forwards of a causal LM's transformer body (the incremental decoders run it, not the LM's forward)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.base_model.register_forward_hook(lambda *_: self._count())

    def _count(self):
        self.calls += 1

    def remove(self):
        self.handle.remove()


# --------------------------------------------------------------------------------------------- alone


def test_the_tiny_causal_models_are_not_trivial(teacher, student, prompts):
    teacher_out, student_out = greedy_rows(teacher, prompts), greedy_rows(student, prompts)
    for out in (teacher_out, student_out):
        assert len({len(o) for o in out}) > 1  # rows end at different steps
        assert sum(EOS in o for o in out) >= 1 and any(len(set(o)) > 3 for o in out)
    assert teacher_out != student_out


def test_generate_alone_left_pads_a_causal_lm(teacher, student, prompts):
    """Right-padded prompts become left-padded generate inputs: each row is the model's greedy output alone."""
    alone = generate_alone(teacher, *prompts, MAX_NEW, is_teacher=True)
    check_well_formed(alone, MAX_NEW)
    assert alone.output_ids == greedy_rows(teacher, prompts)
    assert all(all(f) for f in alone.from_teacher) and alone.teacher_forwards == max(alone.lengths)
    student_alone = generate_alone(student, *prompts, MAX_NEW)
    assert student_alone.output_ids == greedy_rows(student, prompts)
    assert student_alone.teacher_calls == [0] * 4 and student_alone.teacher_forwards == 0
    # A StudentPolicy decodes over V through its LM: the same as the bare student.
    assert generate_alone(StudentPolicy(student), *prompts, MAX_NEW).output_ids == student_alone.output_ids


# --------------------------------------------------------------------------------------------- speculative


@pytest.mark.parametrize("drafter_name", ["student", "close_drafter"])
@pytest.mark.parametrize("draft_length", [1, 3, 5])
def test_speculative_lenience_one_is_the_teacher_greedy_output(request, teacher, prompts, drafter_name, draft_length):
    drafter = request.getfixturevalue(drafter_name)
    batched = speculative_decode(drafter, teacher, *prompts, MAX_NEW, lenience=1.0, draft_length=draft_length)
    check_well_formed(batched, MAX_NEW)
    assert batched.output_ids == greedy_rows(teacher, prompts)
    single = per_row(
        lambda i, m: speculative_decode(drafter, teacher, i, m, MAX_NEW, lenience=1.0, draft_length=draft_length),
        prompts,
    )
    assert_same_rows(batched, single)
    if drafter_name == "student":
        assert sum(batched.wasted_tokens) > 0  # a different model: most drafts are rejected
    else:  # partial acceptances: per-row rollbacks of different lengths in one batch
        assert any(0 < c < len(o) for c, o in zip(batched.teacher_calls, batched.output_ids, strict=True))


def test_speculative_with_the_teacher_as_drafter_accepts_everything(teacher, prompts):
    """Every draft accepted: the draft model's two-token catch-up (last draft + bonus) every cycle."""
    draft_length = 3
    result = speculative_decode(teacher, teacher, *prompts, MAX_NEW, lenience=1.0, draft_length=draft_length)
    assert result.output_ids == greedy_rows(teacher, prompts)
    assert result.wasted_tokens == [0] * 4
    for flags in result.from_teacher:
        assert flags == [p % (draft_length + 1) == draft_length for p in range(len(flags))]
    assert result.teacher_forwards == math.ceil(max(result.lengths) / (draft_length + 1))


@pytest.mark.parametrize("drafter_name", ["student", "close_drafter"])
def test_speculative_matches_transformers_assisted_generation(request, teacher, prompts, drafter_name):
    drafter = request.getfixturevalue(drafter_name)
    for ids, mask in single_rows(prompts):
        assisted = teacher.generate(
            ids, attention_mask=mask, assistant_model=drafter, do_sample=False, max_new_tokens=MAX_NEW
        )
        ours = speculative_decode(drafter, teacher, ids, mask, MAX_NEW, lenience=1.0, draft_length=3)
        # A causal generate returns the prompt, then the new tokens; at batch size 1 it stops at EOS.
        assert ours.output_ids[0] == assisted[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("draft_length", [2, 4])
def test_speculative_lenience_zero_accepts_every_draft(teacher, student, prompts, draft_length):
    result = speculative_decode(student, teacher, *prompts, MAX_NEW, lenience=0.0, draft_length=draft_length)
    check_well_formed(result, MAX_NEW)
    assert result.wasted_tokens == [0] * 4
    for (ids, _), out, flags in zip(single_rows(prompts), result.output_ids, result.from_teacher, strict=True):
        # Bonus teacher tokens exactly after every K drafts; every token the argmax of its model.
        assert flags == [p % (draft_length + 1) == draft_length for p in range(len(out))]
        student_argmax, teacher_argmax = full_argmax(student, ids, out), full_argmax(teacher, ids, out)
        assert all(t == (teacher_argmax[p] if flags[p] else student_argmax[p]) for p, t in enumerate(out))


@pytest.mark.parametrize("drafter_name", ["student", "close_drafter"])
def test_speculative_batched_equals_batch_size_one(request, teacher, prompts, drafter_name):
    drafter = request.getfixturevalue(drafter_name)
    batched = speculative_decode(drafter, teacher, *prompts, MAX_NEW, lenience=0.5, draft_length=3)
    check_well_formed(batched, MAX_NEW)
    single = per_row(
        lambda i, m: speculative_decode(drafter, teacher, i, m, MAX_NEW, lenience=0.5, draft_length=3), prompts
    )
    assert_same_rows(batched, single)
    # Lossy acceptance, checked on full teacher forwards: a draft kept has p ≥ 0.5·max p.
    for (ids, _), out, flags in zip(single_rows(prompts), batched.output_ids, batched.from_teacher, strict=True):
        with torch.no_grad():
            sequence = torch.tensor([ids[0].tolist() + out[:-1]])
            probs = teacher(input_ids=sequence).logits[0, ids.shape[1] - 1 :].softmax(-1)
        for p, token in enumerate(out):
            if flags[p]:
                assert token == int(probs[p].argmax())
            else:
                assert probs[p, token] >= 0.5 * probs[p].max() * (1 - 1e-5)


# --------------------------------------------------------------------------------------------- Training Wheels


def test_teacher_help_never_calling_is_the_student_and_never_runs_the_teacher(teacher, student, prompts):
    policy = policy_with_call_bias(student, -1e4)
    counter = ForwardCounter(teacher)
    try:
        result = teacher_help_decode(policy, teacher, *prompts, MAX_NEW)
    finally:
        counter.remove()
    assert counter.calls == 0  # not even its prompt's prefill
    assert result.output_ids == greedy_rows(student, prompts)
    assert result.teacher_forwards == 0 and result.teacher_calls == [0] * 4
    assert result.student_forwards == max(result.lengths)


def test_teacher_help_always_calling_is_the_teacher(teacher, student, prompts):
    policy = policy_with_call_bias(student, 1e4)
    counter = ForwardCounter(teacher)
    try:
        result = teacher_help_decode(policy, teacher, *prompts, MAX_NEW)
    finally:
        counter.remove()
    assert result.output_ids == greedy_rows(teacher, prompts)
    assert all(all(f) for f in result.from_teacher) and result.wasted_tokens == [0] * 4
    # One catch-up forward per token, plus the one prefill of the teacher's prompts for the batch.
    assert result.teacher_forwards == max(result.lengths) == counter.calls - 1


def test_teacher_help_batched_equals_batch_size_one(teacher, student, prompts):
    policy = policy_with_call_bias(student, **MIXED)
    batched = teacher_help_decode(policy, teacher, *prompts, MAX_NEW)
    check_well_formed(batched, MAX_NEW)
    assert any(0 < c < len(o) for c, o in zip(batched.teacher_calls, batched.output_ids, strict=True))  # a real mix
    single = per_row(lambda i, m: teacher_help_decode(policy, teacher, i, m, MAX_NEW), prompts)
    assert_same_rows(batched, single)


def manual_policy_logits(policy: StudentPolicy, prompt: list[int], x_in: list[int]) -> torch.Tensor:
    """π's logits ``[T, V+1]`` for one episode by one plain full forward of the LM (no cache, no padding).

    The sequence is Y then X^(in)'s stream ``[Y_last ; x_1 … x_{T-1}]``: Y minus its last token as plain
    embeddings, the stream with Eq. 15's β on teacher tokens (ids ≥ V) and the prompt summary, a
    projection of the mean final state of Y minus its last token.
    """
    model, vocab = policy.model, policy.vocab_size
    embed = model.get_input_embeddings()
    context = torch.tensor(prompt[:-1], dtype=torch.long)
    hidden = model.config.hidden_size
    mean = model.base_model(input_ids=context[None]).last_hidden_state[0].mean(0) if len(context) else torch.zeros(hidden)
    summary = mean @ policy.prompt_summary.weight.T
    stream = torch.tensor([prompt[-1], *x_in[:-1]])
    stream_embeds = embed(stream % vocab) + (stream >= vocab).float()[:, None] * policy.state_embedding.beta + summary
    embeds = torch.cat([embed(context), stream_embeds])[None]
    states = model.base_model(inputs_embeds=embeds).last_hidden_state[0, len(context) :]
    token_logits = model.lm_head(states)
    log_pi_v = torch.log_softmax(token_logits.detach(), dim=-1)  # the confidence read is not trained through the LM
    confidence = torch.stack([log_pi_v.max(-1).values, -(log_pi_v.exp() * log_pi_v).sum(-1)], -1)
    call = (
        states @ policy.call_head.weight[0] + policy.call_head.bias
        + confidence @ policy.call_confidence.weight[0] + mean @ policy.call_prompt.weight[0]
    )
    return torch.cat([token_logits, call[:, None]], dim=-1)


def test_teacher_catch_up_equals_full_forwards(teacher, student, prompts):
    """Calls at steps 3 and 7 only: one teacher forward per call over every unseen token (plus its
    prefill); the teacher's tokens are its full-forward argmax, the student's π's full-forward argmax."""
    policy = ScheduledPolicy(student, {3, 7}).eval()
    with torch.no_grad():  # Eq. 15 and the summary matter: teacher tokens are read as t + V
        policy.state_embedding.beta.normal_(std=0.5)
        policy.prompt_summary.weight.normal_(std=0.3)
    counter = ForwardCounter(teacher)
    try:
        result = teacher_help_decode(policy, teacher, *prompts, MAX_NEW)
    finally:
        counter.remove()
    assert result.teacher_forwards == 2 and counter.calls == 3
    vocab = policy.vocab_size
    for (ids, _), out, flags in zip(single_rows(prompts), result.output_ids, result.from_teacher, strict=True):
        assert flags == [p in (3, 7) for p in range(len(out))]
        teacher_argmax = full_argmax(teacher, ids, out)
        x_in = [t + vocab if f else t for t, f in zip(out, flags, strict=True)]
        with torch.no_grad():
            student_argmax = manual_policy_logits(policy, ids[0].tolist(), x_in)[:, :vocab].argmax(-1).tolist()
        assert all(t == (teacher_argmax[p] if flags[p] else student_argmax[p]) for p, t in enumerate(out))


def test_teacher_help_gives_a_causal_teacher_its_own_prompts(teacher, student, prompts):
    """C^(T) of other lengths than Y: always calling is the teacher's greedy output for C^(T)."""
    teacher_prompts = make_prompts([7, 2, 11, 4], seed=9)
    always = teacher_help_decode(policy_with_call_bias(student, 1e4), teacher, *prompts, MAX_NEW,
                                 teacher_input_ids=teacher_prompts[0], teacher_attention_mask=teacher_prompts[1])
    assert always.output_ids == greedy_rows(teacher, teacher_prompts)
    never = teacher_help_decode(policy_with_call_bias(student, -1e4), teacher, *prompts, MAX_NEW,
                                teacher_input_ids=teacher_prompts[0], teacher_attention_mask=teacher_prompts[1])
    assert never.output_ids == greedy_rows(student, prompts)


@pytest.mark.parametrize("budget", [0.1, 0.3])
def test_teacher_help_budget_cap_holds_at_every_prefix(teacher, student, prompts, budget):
    result = teacher_help_decode(policy_with_call_bias(student, 1e4), teacher, *prompts, MAX_NEW, budget_cap=budget)
    check_well_formed(result, MAX_NEW)
    for flags in result.from_teacher:  # an always-calling policy gets exactly ⌈b·n⌉ at every prefix
        assert [sum(flags[:n]) for n in range(1, len(flags) + 1)] == [
            math.ceil(Fraction(str(budget)) * n) for n in range(1, len(flags) + 1)
        ]


# --------------------------------------------------------------------------------------------- fallback


def test_confidence_fallback_extremes(teacher, student, prompts):
    never = confidence_fallback_decode(student, teacher, *prompts, MAX_NEW, threshold=0.0)
    assert never.output_ids == greedy_rows(student, prompts) and never.teacher_forwards == 0
    always = confidence_fallback_decode(student, teacher, *prompts, MAX_NEW, threshold=1.01)
    assert always.output_ids == greedy_rows(teacher, prompts)
    assert all(all(f) for f in always.from_teacher)


def test_confidence_fallback_batched_equals_batch_size_one(teacher, student, prompts):
    batched = confidence_fallback_decode(student, teacher, *prompts, MAX_NEW, threshold=0.6)
    check_well_formed(batched, MAX_NEW)
    assert any(0 < c < len(o) for c, o in zip(batched.teacher_calls, batched.output_ids, strict=True))
    single = per_row(lambda i, m: confidence_fallback_decode(student, teacher, i, m, MAX_NEW, threshold=0.6), prompts)
    assert_same_rows(batched, single)
    for (ids, _), out, flags in zip(single_rows(prompts), batched.output_ids, batched.from_teacher, strict=True):
        with torch.no_grad():
            probs = student(input_ids=torch.tensor([ids[0].tolist() + out[:-1]])).logits[0, ids.shape[1] - 1 :].softmax(-1)
        assert flags == (probs.max(dim=-1).values < 0.6).tolist()
        teacher_argmax = full_argmax(teacher, ids, out)
        assert all(t == (teacher_argmax[p] if f else int(probs[p].argmax())) for p, (t, f) in enumerate(zip(out, flags, strict=True)))


# --------------------------------------------------------------------------------------------- mixed pairs


def test_decoders_refuse_a_pair_that_mixes_families(student, prompts):
    t5 = tiny_t5(VOCAB, 16, 1, seed=0)  # the same vocabulary size: only the family differs
    causal_policy = policy_with_call_bias(student, 0.0)
    message = "the teacher is encoder-decoder but the (student|draft model) is decoder-only"
    with pytest.raises(ValueError, match=message):
        teacher_help_decode(causal_policy, t5, *prompts, MAX_NEW)
    with pytest.raises(ValueError, match=message):
        speculative_decode(student, t5, *prompts, MAX_NEW, lenience=1.0, draft_length=2)
    with pytest.raises(ValueError, match=message):
        confidence_fallback_decode(student, t5, *prompts, MAX_NEW, threshold=0.5)
    with pytest.raises(ValueError, match="the teacher is decoder-only but the student is encoder-decoder"):
        teacher_help_decode(StudentPolicy(t5), student, *prompts, MAX_NEW)


# --------------------------------------------------------------------------------------------- the policy

V = 64


@pytest.fixture(params=["qwen2", "llama", "qwen3"])
def policy(request):
    """A causal policy with every Training Wheels part random (a tied Qwen2, as the tiny causal task's student)."""
    model = tiny_causal_lm(V, 16, 2, seed=4, arch=request.param, tied=request.param == "qwen2", initializer_range=0.2)
    policy = StudentPolicy(model).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        policy.state_embedding.beta.normal_()
        policy.prompt_summary.weight.normal_(std=0.3)
        policy.call_head.weight.normal_()
        policy.call_head.bias.fill_(0.5)
        policy.call_confidence.weight.normal_()
        policy.call_prompt.weight.normal_()
    return policy


def episode_batch(lengths=(6, 3, 1), steps=5, seed=1):
    """Right-padded prompts of different lengths and X^(in) with teacher tokens (ids ≥ V) and a shorter row."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt)
    for i, n in enumerate(lengths):
        prompt[i, :n] = torch.randint(2, V, (n,), generator=g)
        prompt_mask[i, :n] = 1
    state = torch.randint(2, 2 * V, (len(lengths), steps), generator=g)
    state_mask = torch.ones_like(state)
    state_mask[1, 3:] = 0  # an episode that ended after three actions (padding after it)
    return prompt, prompt_mask, state, state_mask


def test_policy_forward_equals_a_manual_full_forward(policy):
    """Each row of the padded batch equals one plain forward of the LM over that row alone."""
    prompt, prompt_mask, state, state_mask = episode_batch()
    with torch.no_grad():
        logits = policy(prompt, prompt_mask, state, state_mask)
    assert logits.shape == (3, 5, V + 1)
    for b in range(3):
        n, t = int(prompt_mask[b].sum()), int(state_mask[b].sum())
        with torch.no_grad():
            expected = manual_policy_logits(policy, prompt[b, :n].tolist(), state[b, :t].tolist())
        torch.testing.assert_close(logits[b, :t], expected, atol=1e-4, rtol=1e-4)


def test_a_fresh_causal_policy_is_the_lm_and_starts_its_call_logit_at_zero():
    model = tiny_causal_lm(V, 16, 2, seed=4, arch="llama")
    fresh = StudentPolicy(model).eval()
    prompt, prompt_mask, state, state_mask = episode_batch()
    state = state % V  # the student wrote everything: β plays no part
    with torch.no_grad():
        logits = fresh(prompt, prompt_mask, state, state_mask)
        for b in range(3):
            n = int(prompt_mask[b].sum())
            reference = model(input_ids=torch.cat([prompt[b, :n], state[b, :-1]])[None]).logits[0, n - 1 :]
            torch.testing.assert_close(logits[b, :, :V], reference, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(logits[..., V]) == 0


def test_incremental_rollout_equals_the_teacher_forced_forward_with_a_restart(policy):
    """Rows of different prompt lengths; row 1 restarts mid-batch (an autoreset) while the others go on."""
    prompt, prompt_mask, state, state_mask = episode_batch(steps=6)
    second = episode_batch(lengths=(2, 8, 4), steps=6, seed=2)  # row 1's next episode: a longer prompt
    with torch.no_grad():
        full = policy(prompt, prompt_mask, state, torch.ones_like(state))
        full_second = policy(*second[:3], torch.ones_like(second[2]))
    rollout = policy.rollout(3, 6)
    width = 8
    prompt_ids = np.zeros((3, width), dtype=np.int64)
    prompt_ids[:, : prompt.shape[1]] = prompt.numpy()
    prompt_length = prompt_mask.sum(1).numpy()
    state_ids, state_length = np.zeros((3, 6), dtype=np.int64), np.zeros(3, dtype=np.int64)
    for step in range(6):
        if step == 3:  # row 1 begins its next episode with the second prompt
            prompt_ids[1] = second[0][1].numpy()
            prompt_length[1] = int(second[1][1].sum())
            state_ids[1], state_length[1] = 0, 0
        obs = {"prompt_ids": prompt_ids.copy(), "prompt_length": prompt_length[:, None].copy(),
               "state_ids": state_ids.copy(), "state_length": state_length[:, None].copy()}
        logits = rollout.logits(obs)
        for b in range(3):
            t = int(state_length[b])
            expected = full_second[1, t] if (b == 1 and step >= 3) else full[b, t]
            torch.testing.assert_close(logits[b], expected, atol=1e-4, rtol=1e-4)
            source = second[2][1] if (b == 1 and step >= 3) else state[b]
            state_ids[b, t] = int(source[t])
        state_length += 1


def test_the_teacher_forced_forward_trains_like_a_full_forward(policy):
    """Gradients through the prefill and the k-token step equal those of the manual full forward."""
    prompt, prompt_mask, state, state_mask = episode_batch()
    loss = policy(prompt[:1], prompt_mask[:1], state[:1], state_mask[:1]).logsumexp(-1).sum()
    ours = torch.autograd.grad(loss, [policy.state_embedding.beta, policy.prompt_summary.weight, policy.call_prompt.weight,
                                      policy.model.get_input_embeddings().weight])
    reference = manual_policy_logits(policy, prompt[0].tolist(), state[0].tolist()).logsumexp(-1).sum()
    expected = torch.autograd.grad(reference, [policy.state_embedding.beta, policy.prompt_summary.weight,
                                               policy.call_prompt.weight, policy.model.get_input_embeddings().weight])
    for a, b in zip(ours, expected, strict=True):
        assert torch.count_nonzero(b) > 0
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_causal_value_network_scores_every_state_from_the_policys_states(policy):
    prompt, prompt_mask, state, state_mask = episode_batch()
    value = ValueNetwork.from_policy(policy)
    with torch.no_grad():
        values = value(prompt, prompt_mask, state, state_mask)
        assert values.shape == (3, 6) and torch.count_nonzero(values) == 0  # s_0 .. s_T; the head starts at zero
        value.value_head.weight.normal_()
        states, _ = policy.state_features(prompt, prompt_mask, state, state_mask)
        torch.testing.assert_close(value(prompt, prompt_mask, state, state_mask),
                                   states @ value.value_head.weight[0] + value.value_head.bias, atol=1e-5, rtol=1e-5)
    assert not any(p is q for p in value.parameters() for q in policy.parameters())


def test_causal_save_and_load_round_trip_and_plain_transformers(policy, tmp_path):
    prompt, prompt_mask, state, state_mask = episode_batch()
    policy.save(tmp_path / "policy")
    assert '"family": "decoder-only"' in (tmp_path / "policy" / EXTRA_CONFIG).read_text()
    loaded = StudentPolicy.load(tmp_path / "policy", family="decoder-only")
    assert loaded.family is DECODER_ONLY
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt, prompt_mask, state, state_mask),
                                   policy(prompt, prompt_mask, state, state_mask))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")  # the student without <τ>
    assert plain.config.model_type == policy.model.config.model_type


def test_load_refuses_a_policy_of_another_family(tmp_path):
    t5_policy = StudentPolicy(tiny_t5(V, 16, 1, seed=0))
    t5_policy.save(tmp_path / "t5")
    with pytest.raises(ValueError, match=r"is encoder-decoder \(t5\); expected a decoder-only policy"):
        StudentPolicy.load(tmp_path / "t5", family="decoder-only")
    with pytest.raises(ValueError, match="family must be one of"):
        StudentPolicy.load(tmp_path / "t5", family="causal")
    # A causal LM written over a saved T5 policy's directory: the recorded family says so.
    tiny_causal_lm(V, 16, 1, seed=0).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match=r"is decoder-only \(llama\), but it was saved as encoder-decoder"):
        StudentPolicy.load(tmp_path / "t5")


def test_causal_policy_says_what_it_lacks(policy):
    with pytest.raises(TypeError, match="no start token shared by every prompt"):
        _ = policy.start_token_id
    with pytest.raises(TypeError, match="decoder-only"):
        policy.encode(*episode_batch()[:2])
