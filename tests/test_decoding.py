"""The test-time decoders of agents.decoding, each test written once and run for both model families
(``[encoder-decoder]``: two tiny random T5s; ``[decoder-only]``: a Llama teacher and a Qwen2 student).

What is checked, and against what (every reference is independent of our incremental decoders: a
plain full forward of the model without a cache per token, or transformers' own ``generate``):
- each model alone against a full-forward greedy loop (a causal LM's right-padded prompts become
  left-padded ``generate`` inputs);
- speculative decoding with lenience 1 against the teacher's greedy output and transformers'
  assisted generation (batch size 1); with lenience 0 against full forwards of both models on the
  output prefix, and the exact positions of the free bonus tokens; lenience 0.5 on full teacher forwards;
- Training Wheels with policies that never / always call against each model's greedy output (and
  the teacher's forwards counted), a hard budget cap at every prefix (rounded up, ⌈b·n⌉, and
  guaranteed, ⌊b·n⌋: every output within b over many short outputs), a teacher catch-up against
  full forwards (the student side a manual full forward of π: Eq. 15, the prompt summary, the three
  <τ> reads), the teacher reading its own prompts C^(T), the call threshold and the KL oracle;
- the confidence fallback at its extremes and in between;
- every batched decoder against the same prompts decoded one at a time (batched = batch size 1);
- the decoders refuse a pair that mixes families.

The models: a teacher and a smaller student with the same vocabulary of 128, pad 0, EOS 1 (T5: d_model
64, 2+2 layers and 32, 1+1, decoder start 0; causal: a Llama of hidden 32, 2 layers and a Qwen2 of
16, 1 layer). Each gets its own random N(0, 1) LM head with the EOS row enlarged, so that greedy
outputs are peaked, differ between the models and some rows stop early (transformers 5.x ties T5's
LM head to the input embedding whatever the config says, and a random tied T5 then just copies its
input token). T5 prompts end in EOS, as a T5 tokenizer's do; causal prompts do not (a causal LM
continues them), and one has a single token (a causal LM then prefills nothing).
"""

from __future__ import annotations

import copy
import math
import weakref
from fractions import Fraction

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from agents.decoding import (
    DecodeResult,
    budget_allowance,
    confidence_fallback_decode,
    decode_text,
    generate_alone,
    speculative_decode,
    teacher_help_decode,
)
from agents.evaluation import (
    ThresholdDecodes,
    calibrate_call_threshold,
    decode_batches,
    training_wheels_decoder,
)
from agents.policy import StudentPolicy
from tests.helpers import assert_same_rows, check_well_formed, per_row, single_rows
from tests.tiny_task import EOS, only_family, right_padded, tiny_causal_lm
from tw_env.synthetic import SyntheticLanguage, build_tokenizer

VOCAB = 128
MAX_NEW = 14
PROMPT_LENGTHS = {"encoder-decoder": [5, 9, 3, 12], "decoder-only": [5, 9, 1, 12]}
# A mix of calls: a <τ> logit w·h + bias that calls at some tokens of a row and not at others (a random
# N(0, 1) head puts the causal pair's token logsumexp around 15).
MIXED = {"encoder-decoder": {"bias": 8.0, "weight_std": 2.0}, "decoder-only": {"bias": 15.0, "weight_std": 1.0}}


def tiny_t5(d_model: int, layers: int, seed: int) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=layers, num_decoder_layers=layers,
        num_heads=d_model // 16, feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=EOS, dropout_rate=0.0,
    )
    model = T5ForConditionalGeneration(config).eval()
    head = torch.nn.Linear(d_model, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0)
        head.weight[EOS] *= 1.5  # EOS wins now and then: rows of one batch end at different steps
    model.lm_head = head
    return model


def causal_lm(arch: str, hidden: int, layers: int, seed: int) -> torch.nn.Module:
    model = tiny_causal_lm(VOCAB, hidden, layers, seed=seed, arch=arch, initializer_range=0.3)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=generator))
        model.lm_head.weight[EOS] *= 1.5
    return model


MODELS = {  # (teacher, student) of each family
    "encoder-decoder": (lambda: tiny_t5(64, 2, seed=0), lambda: tiny_t5(32, 1, seed=1)),
    "decoder-only": (lambda: causal_lm("llama", 32, 2, seed=3), lambda: causal_lm("qwen2", 16, 1, seed=13)),
}


@pytest.fixture(scope="module")
def teacher(family):
    return MODELS[family.name][0]()


@pytest.fixture(scope="module")
def student(family):
    return MODELS[family.name][1]()


@pytest.fixture(scope="module")
def close_drafter(teacher):
    """The teacher with 2% noise on every weight: it agrees often but not always (partial acceptances)."""
    model = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02 * p.std().clamp(min=1e-3))
    return model


def make_prompts(family, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return right_padded(lengths, VOCAB, torch.Generator().manual_seed(seed), eos=family.prompt_ends_with_eos)


@pytest.fixture(scope="module")
def prompts(family):
    """Four right-padded prompts of different lengths: ``(ids, mask)`` ``[4, 12]``."""
    return make_prompts(family, PROMPT_LENGTHS[family.name], seed=0)


_GREEDY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {prompts: outputs}


def greedy(family, model, prompts) -> list[list[int]]:
    """Each row's greedy output, decoded alone by one full forward (no cache) per token (kept per model
    and prompts: the models do not change)."""
    key = tuple(tuple(ids[0].tolist()) for ids, _ in single_rows(prompts))
    known = _GREEDY.setdefault(model, {})
    if key not in known:
        known[key] = [family.greedy(model, list(ids), MAX_NEW) for ids in key]
    return [list(out) for out in known[key]]


def full_argmax(family, model, prompt_ids: torch.Tensor, outputs: list[int]) -> list[int]:
    """Argmax of one full forward at every position: entry p predicts output token p from outputs[:p]."""
    return family.output_logits(model, prompt_ids[0].tolist(), outputs).argmax(dim=-1).tolist()


def full_probs(family, model, prompt_ids: torch.Tensor, outputs: list[int]) -> torch.Tensor:
    return family.output_logits(model, prompt_ids[0].tolist(), outputs).softmax(-1)


def policy_with_call_bias(student, bias: float, weight_std: float = 0.0, seed: int = 0) -> StudentPolicy:
    """A StudentPolicy around the student whose <τ> logit is ``w·h + bias`` (w ~ N(0, weight_std²))."""
    policy = StudentPolicy(student).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        policy.call_head.weight.normal_(0.0, weight_std) if weight_std else policy.call_head.weight.zero_()
        policy.call_head.bias.fill_(bias)
    return policy


def mixed_policy(family, student) -> StudentPolicy:
    return policy_with_call_bias(student, **MIXED[family.name])


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
    """Counts forwards of the teacher's modules, through hooks (T5: its encoder and decoder; a causal
    LM: its transformer body, which the incremental decoders run rather than the LM's forward)."""

    def __init__(self, family, model):
        modules = family.counted_modules(model)
        self.calls = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_hook(lambda *_, name=name: self._count(name)) for name, m in modules.items()]

    def _count(self, name):
        self.calls[name] += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def counted_teacher_help(family, policy, teacher, prompts) -> tuple[DecodeResult, dict[str, int]]:
    """Training Wheels decoding, with the teacher's forwards counted."""
    counter = ForwardCounter(family, teacher)
    try:
        result = teacher_help_decode(policy, teacher, *prompts, MAX_NEW)
    finally:
        counter.remove()
    return result, counter.calls


# --------------------------------------------------------------------------------------------- alone


def test_the_tiny_models_are_not_trivial(family, teacher, student, prompts):
    teacher_out, student_out = greedy(family, teacher, prompts), greedy(family, student, prompts)
    for out in (teacher_out, student_out):
        assert len({len(o) for o in out}) > 1  # rows end at different steps
        assert sum(EOS in o for o in out) >= 1 and any(len(set(o)) > 3 for o in out)
    assert teacher_out != student_out


def test_generate_alone(family, teacher, student, prompts):
    """Each row is the model's greedy output alone (a causal LM's right-padded prompts become left-padded generate inputs)."""
    alone = generate_alone(teacher, *prompts, MAX_NEW, is_teacher=True)
    check_well_formed(alone, MAX_NEW)
    assert alone.output_ids == greedy(family, teacher, prompts)
    assert all(all(f) for f in alone.from_teacher) and alone.teacher_fraction == [1.0] * 4
    assert alone.teacher_forwards == max(alone.lengths)
    student_alone = generate_alone(student, *prompts, MAX_NEW)
    check_well_formed(student_alone, MAX_NEW)
    assert student_alone.output_ids == greedy(family, student, prompts)
    assert student_alone.teacher_calls == [0] * 4 and student_alone.teacher_forwards == 0
    # A StudentPolicy decodes over V through its LM: the same as the bare student.
    assert generate_alone(StudentPolicy(student), *prompts, MAX_NEW).output_ids == student_alone.output_ids


def test_decode_text_skips_special_tokens():
    class Tokenizer:
        def batch_decode(self, ids, skip_special_tokens=False):
            return [
                " ".join(str(t) for t in row if not (skip_special_tokens and t in (0, EOS))) for row in ids
            ]

    result = DecodeResult([[5, 6, EOS], [7]], [[False] * 3, [True]], [0, 1], 1, [0, 0])
    assert decode_text(result, Tokenizer()) == ["5 6", "7"]


# --------------------------------------------------------------------------------------------- speculative


@pytest.mark.parametrize("drafter_name", ["student", "close_drafter"])
@pytest.mark.parametrize("draft_length", [1, 2, 3, 5, 8])
def test_speculative_lenience_one_is_the_teacher_greedy_output(
    request, family, teacher, prompts, drafter_name, draft_length
):
    drafter = request.getfixturevalue(drafter_name)
    batched = speculative_decode(drafter, teacher, *prompts, MAX_NEW, lenience=1.0, draft_length=draft_length)
    check_well_formed(batched, MAX_NEW)
    assert batched.output_ids == greedy(family, teacher, prompts)
    single = per_row(
        lambda i, m: speculative_decode(drafter, teacher, i, m, MAX_NEW, lenience=1.0, draft_length=draft_length),
        prompts,
    )
    assert_same_rows(batched, single)
    if drafter_name == "student":
        assert sum(batched.wasted_tokens) > 0  # a different model: most drafts are rejected
    else:  # partial acceptances: per-row rollbacks of different lengths in one batch
        assert any(0 < c < len(o) for c, o in zip(batched.teacher_calls, batched.output_ids, strict=True))


def test_speculative_with_the_teacher_as_drafter_accepts_everything(family, teacher, prompts):
    """Every draft accepted: the two-token catch-up of the draft model (last draft + bonus) each cycle."""
    draft_length = 3
    result = speculative_decode(teacher, teacher, *prompts, MAX_NEW, lenience=1.0, draft_length=draft_length)
    assert result.output_ids == greedy(family, teacher, prompts)
    assert result.wasted_tokens == [0] * 4
    for flags in result.from_teacher:
        assert flags == [p % (draft_length + 1) == draft_length for p in range(len(flags))]
    assert result.teacher_forwards == math.ceil(max(result.lengths) / (draft_length + 1))


@pytest.mark.parametrize("drafter_name", ["student", "close_drafter"])
def test_speculative_matches_transformers_assisted_generation(request, family, teacher, prompts, drafter_name):
    drafter = request.getfixturevalue(drafter_name)
    for ids, mask in single_rows(prompts):
        assisted = teacher.generate(
            ids, attention_mask=mask, assistant_model=drafter, do_sample=False, max_new_tokens=MAX_NEW
        )
        ours = speculative_decode(drafter, teacher, ids, mask, MAX_NEW, lenience=1.0, draft_length=3)
        # generate stops at EOS at batch size 1
        assert ours.output_ids[0] == family.generated_tokens(assisted, ids.shape[1])[0].tolist()


@pytest.mark.parametrize("draft_length", [2, 3, 4])
def test_speculative_lenience_zero_accepts_every_draft(family, teacher, student, prompts, draft_length):
    result = speculative_decode(student, teacher, *prompts, MAX_NEW, lenience=0.0, draft_length=draft_length)
    check_well_formed(result, MAX_NEW)
    assert result.wasted_tokens == [0] * 4
    student_alone = greedy(family, student, prompts)
    for (ids, _), out, flags, alone in zip(
        single_rows(prompts), result.output_ids, result.from_teacher, student_alone, strict=True
    ):
        # Bonus teacher tokens exactly at positions K, 2K+1, 3K+2, … (0-based): after every K drafts.
        assert flags == [p % (draft_length + 1) == draft_length for p in range(len(out))]
        # Before the first bonus token the output is the student's own greedy output.
        assert out[:draft_length] == alone[:draft_length]
        # Every token is the argmax of the model that produced it, given the output prefix.
        student_argmax, teacher_argmax = full_argmax(family, student, ids, out), full_argmax(family, teacher, ids, out)
        for p, token in enumerate(out):
            assert token == (teacher_argmax[p] if flags[p] else student_argmax[p])


@pytest.mark.parametrize("drafter_name", ["student", "close_drafter"])
def test_speculative_batched_equals_batch_size_one(request, family, teacher, prompts, drafter_name):
    drafter = request.getfixturevalue(drafter_name)
    batched = speculative_decode(drafter, teacher, *prompts, MAX_NEW, lenience=0.5, draft_length=3)
    check_well_formed(batched, MAX_NEW)
    single = per_row(
        lambda i, m: speculative_decode(drafter, teacher, i, m, MAX_NEW, lenience=0.5, draft_length=3), prompts
    )
    assert_same_rows(batched, single)
    # Lossy acceptance, checked on full teacher forwards: every drafted token has p ≥ 0.5·max p under the teacher.
    for (ids, _), out, flags in zip(single_rows(prompts), batched.output_ids, batched.from_teacher, strict=True):
        probs = full_probs(family, teacher, ids, out)
        for p, token in enumerate(out):
            if flags[p]:
                assert token == int(probs[p].argmax())
            else:
                assert probs[p, token] >= 0.5 * probs[p].max() * (1 - 1e-5)


# --------------------------------------------------------------------------------------------- Training Wheels


def test_teacher_help_never_calling_is_the_student_and_never_runs_the_teacher(family, teacher, student, prompts):
    result, calls = counted_teacher_help(family, policy_with_call_bias(student, -1e4), teacher, prompts)
    assert calls == family.forward_counts(steps=0, prompt_reads=0)  # not even its prompt's encoder or prefill
    assert result.output_ids == greedy(family, student, prompts)
    assert (
        result.teacher_forwards == 0 and result.teacher_calls == [0] * 4 and result.wasted_tokens == [0] * 4
    )
    assert result.student_forwards == max(result.lengths)


def test_teacher_help_always_calling_is_the_teacher(family, teacher, student, prompts):
    result, calls = counted_teacher_help(family, policy_with_call_bias(student, 1e4), teacher, prompts)
    assert result.output_ids == greedy(family, teacher, prompts)
    assert all(all(f) for f in result.from_teacher) and result.wasted_tokens == [0] * 4
    # One catch-up per token, each a single forward; the teacher read the batch's prompts once
    # (T5: its encoder; a causal LM: the prefill).
    assert result.teacher_forwards == max(result.lengths)
    assert calls == family.forward_counts(steps=result.teacher_forwards, prompt_reads=1)


def test_teacher_help_gives_the_teacher_its_own_prompts(family, teacher, student, prompts):
    """The teacher reads C^(T) when given (other lengths than Y): always calling is then the teacher's
    greedy output for C^(T), never calling is still the student's for Y, and a mixed policy's teacher
    tokens are the teacher's argmax under C^(T) given the output so far."""
    ids, mask = prompts
    teacher_prompts = make_prompts(family, [7, 2, 11, 4], seed=9)
    with_teacher_prompts = dict(teacher_input_ids=teacher_prompts[0], teacher_attention_mask=teacher_prompts[1])
    always = teacher_help_decode(policy_with_call_bias(student, 1e4), teacher, ids, mask, MAX_NEW, **with_teacher_prompts)
    assert always.output_ids == greedy(family, teacher, teacher_prompts)
    assert always.output_ids != greedy(family, teacher, prompts)
    never = teacher_help_decode(policy_with_call_bias(student, -1e4), teacher, ids, mask, MAX_NEW, **with_teacher_prompts)
    assert never.output_ids == greedy(family, student, prompts)
    mixed = teacher_help_decode(mixed_policy(family, student), teacher, ids, mask, MAX_NEW, **with_teacher_prompts)
    for (t_ids, _), out, flags in zip(single_rows(teacher_prompts), mixed.output_ids, mixed.from_teacher, strict=True):
        teacher_argmax = full_argmax(family, teacher, t_ids, out)
        assert all(out[p] == teacher_argmax[p] for p in range(len(out)) if flags[p])
    with pytest.raises(ValueError, match="both teacher_input_ids and teacher_attention_mask"):
        teacher_help_decode(policy_with_call_bias(student, 0.0), teacher, ids, mask, MAX_NEW, teacher_input_ids=ids)
    with pytest.raises(ValueError, match="teacher prompts have 2 rows, expected 4"):
        teacher_help_decode(policy_with_call_bias(student, 0.0), teacher, ids, mask, MAX_NEW,
                            teacher_input_ids=ids[:2], teacher_attention_mask=mask[:2])


def test_teacher_help_batched_equals_batch_size_one(family, teacher, student, prompts):
    policy = mixed_policy(family, student)
    batched = teacher_help_decode(policy, teacher, *prompts, MAX_NEW)
    check_well_formed(batched, MAX_NEW)
    assert any(0 < c < len(o) for c, o in zip(batched.teacher_calls, batched.output_ids, strict=True))  # a real mix
    single = per_row(lambda i, m: teacher_help_decode(policy, teacher, i, m, MAX_NEW), prompts)
    assert_same_rows(batched, single)


@pytest.mark.parametrize("budget", [0.3, 0.1, 0.5])
def test_teacher_help_budget_cap_holds_at_every_prefix(family, teacher, student, prompts, budget):
    always = teacher_help_decode(policy_with_call_bias(student, 1e4), teacher, *prompts, MAX_NEW, budget_cap=budget)
    moderate = teacher_help_decode(mixed_policy(family, student), teacher, *prompts, MAX_NEW, budget_cap=budget)
    for result in (always, moderate):
        check_well_formed(result, MAX_NEW)
        for flags in result.from_teacher:
            for n in range(1, len(flags) + 1):
                assert sum(flags[:n]) <= math.ceil(Fraction(str(budget)) * n)
    # A policy that always wants the teacher gets exactly the allowance at every prefix.
    for flags in always.from_teacher:
        assert [sum(flags[:n]) for n in range(1, len(flags) + 1)] == [
            math.ceil(Fraction(str(budget)) * n) for n in range(1, len(flags) + 1)
        ]


def test_budget_allowance_is_exact_at_decimal_products():
    for budget in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7):
        for n in range(1, 200):
            assert budget_allowance(budget, n) == math.ceil(Fraction(str(budget)) * n)


def many_prompts(family, count: int = 24, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` right-padded random prompts of 2 to 12 tokens."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 13, (count,), generator=generator).tolist()
    return right_padded(lengths, VOCAB, generator, eos=family.prompt_ends_with_eos)


CAP_BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.5)


@only_family("encoder-decoder")  # 480 decodes: once is enough for the cap rule, which reads no model
def test_guaranteed_cap_keeps_every_short_output_within_b(family, teacher, student):
    """Over many short outputs (max_new_tokens 1..12, EOS ending some earlier), with a policy that
    always wants the teacher and one that often does: under the guaranteed cap every row's teacher
    fraction is ≤ b (exactly, in fractions); under the rounded-up cap some short rows exceed b."""
    prompts = many_prompts(family)
    always, often = policy_with_call_bias(student, 1e4), mixed_policy(family, student)
    rows = 0
    lengths: set[int] = set()
    exceeded_rounded_up: set[float] = set()
    guaranteed_calls = 0
    for budget in CAP_BUDGETS:
        b = Fraction(str(budget))
        for max_new in range(1, 13):
            for policy in (always, often):
                guaranteed = teacher_help_decode(
                    policy, teacher, *prompts, max_new, budget_cap=budget, cap_rule="guaranteed"
                )
                rounded_up = teacher_help_decode(
                    policy, teacher, *prompts, max_new, budget_cap=budget, cap_rule="rounded_up"
                )
                for result in (guaranteed, rounded_up):
                    check_well_formed(result, max_new)
                for flags in guaranteed.from_teacher:
                    rows += 1
                    lengths.add(len(flags))
                    assert Fraction(sum(flags), len(flags)) <= b, (budget, max_new, flags)
                    # Every prefix too: ⌊b·n⌋ calls at most (the decoder cannot know which token is last).
                    assert all(sum(flags[:n]) <= math.floor(b * n) for n in range(1, len(flags) + 1))
                    guaranteed_calls += sum(flags)
                for flags in rounded_up.from_teacher:
                    assert all(sum(flags[:n]) <= math.ceil(b * n) for n in range(1, len(flags) + 1))
                    if Fraction(sum(flags), len(flags)) > b:
                        exceeded_rounded_up.add(budget)
                if policy is always:
                    # The always-calling policy gets exactly the allowance at every prefix: the
                    # guaranteed rule still calls as soon as b·n reaches 1, not never.
                    for result, allowance in ((guaranteed, math.floor), (rounded_up, math.ceil)):
                        for flags in result.from_teacher:
                            assert [sum(flags[:n]) for n in range(1, len(flags) + 1)] == [
                                allowance(b * n) for n in range(1, len(flags) + 1)
                            ]
    assert rows == len(CAP_BUDGETS) * 12 * 2 * prompts[0].shape[0] and lengths == set(range(1, 13))
    # The difference the guarantee makes: the rounded-up cap goes over b on short rows at every budget.
    assert exceeded_rounded_up == set(CAP_BUDGETS)
    assert guaranteed_calls > 0


def test_guaranteed_cap_calls_once_b_times_n_reaches_one(teacher, student, prompts):
    """b = 0.1 and 10 tokens: one call, at token 10; b = 0.5: calls at tokens 2, 4, 6, …"""
    always = policy_with_call_bias(student, 1e4)
    tenth = teacher_help_decode(always, teacher, *prompts, 10, budget_cap=0.1, cap_rule="guaranteed")
    for flags in tenth.from_teacher:
        assert flags == [n == 10 for n in range(1, len(flags) + 1)]
    assert any(len(flags) == 10 for flags in tenth.from_teacher)  # some row gets there
    half = teacher_help_decode(always, teacher, *prompts, MAX_NEW, budget_cap=0.5, cap_rule="guaranteed")
    for flags in half.from_teacher:
        assert flags == [n % 2 == 0 for n in range(1, len(flags) + 1)]
    assert sum(half.teacher_calls) > 0


def test_cap_rule_default_is_rounded_up_and_is_checked(family, teacher, student, prompts):
    policy = mixed_policy(family, student)
    default = teacher_help_decode(policy, teacher, *prompts, MAX_NEW, budget_cap=0.1)
    explicit = teacher_help_decode(policy, teacher, *prompts, MAX_NEW, budget_cap=0.1, cap_rule="rounded_up")
    assert_same_rows(default, explicit)
    # Without a cap the rule changes nothing.
    uncapped = teacher_help_decode(policy, teacher, *prompts, MAX_NEW)
    assert_same_rows(uncapped, teacher_help_decode(policy, teacher, *prompts, MAX_NEW, cap_rule="guaranteed"))
    with pytest.raises(ValueError, match=r"cap_rule must be one of \['rounded_up', 'guaranteed'\], got 'floor'"):
        teacher_help_decode(policy, teacher, *prompts, MAX_NEW, budget_cap=0.1, cap_rule="floor")
    with pytest.raises(ValueError, match="cap_rule"):
        teacher_help_decode(policy, teacher, *prompts, MAX_NEW, cap_rule="ceil")  # checked even uncapped


def test_teacher_catch_up_equals_full_forwards(family, teacher, student, prompts):
    """A policy that calls at steps 3 and 7 only: one teacher forward per call over every unseen token
    (after one read of the prompts); the teacher's tokens are its full-forward argmax, the student's
    π's argmax by a manual full forward over X^(in) (teacher tokens stored as t + V)."""
    policy = ScheduledPolicy(student, {3, 7}).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # Eq. 15 and the summary matter: teacher tokens are read as t + V
        policy.state_embedding.beta.normal_(std=0.5)
        policy.prompt_summary.weight.normal_(std=0.3)
    result, calls = counted_teacher_help(family, policy, teacher, prompts)
    assert result.teacher_forwards == 2 and calls == family.forward_counts(steps=2, prompt_reads=1)
    vocab = policy.vocab_size
    for (ids, _), out, flags in zip(single_rows(prompts), result.output_ids, result.from_teacher, strict=True):
        assert flags == [p in (3, 7) for p in range(len(out))]
        teacher_argmax = full_argmax(family, teacher, ids, out)
        x_in = [t + vocab if f else t for t, f in zip(out, flags, strict=True)]
        with torch.no_grad():
            student_argmax = family.policy_logits(policy, ids[0].tolist(), x_in)[:, :vocab].argmax(-1).tolist()
        for p, token in enumerate(out):
            assert token == (teacher_argmax[p] if flags[p] else student_argmax[p])


class RecordingPolicy(StudentPolicy):
    """Records the [B, V+1] logits of every decoding step (to check the decoder's call rule)."""

    def __init__(self, model, bias: float, weight_std: float):
        super().__init__(model)
        torch.manual_seed(0)
        with torch.no_grad():
            self.call_head.weight.normal_(0.0, weight_std)
            self.call_head.bias.fill_(bias)
        self.steps: list[torch.Tensor] = []

    def step_head(self, decoder, ids, prompt):
        logits = super().step_head(decoder, ids, prompt)
        self.steps.append(logits.detach().float().clone())
        return logits


@pytest.mark.parametrize("threshold", [0.05, 0.5, 0.95])
def test_teacher_help_calls_exactly_where_the_call_probability_exceeds_the_threshold(
    family, teacher, student, prompts, threshold
):
    # A call logit that depends on the state, so π(<τ>) varies over the tokens and the threshold matters.
    policy = RecordingPolicy(student, **MIXED[family.name]).eval()
    result = teacher_help_decode(policy, teacher, *prompts, MAX_NEW, call_threshold=threshold)
    assert 0 < sum(result.teacher_calls) < sum(result.lengths)  # some tokens called, some not
    for row, (out, flags) in enumerate(zip(result.output_ids, result.from_teacher, strict=True)):
        call_probability = [float(step[row].softmax(-1)[-1]) for step in policy.steps[: len(out)]]
        assert flags == [p > threshold for p in call_probability]


def test_teacher_help_call_threshold_spans_student_to_teacher(family, teacher, student, prompts):
    policy = mixed_policy(family, student)

    def decode(**kwargs):
        return teacher_help_decode(policy, teacher, *prompts, MAX_NEW, **kwargs)

    assert decode().output_ids == decode(call_threshold=0.5).output_ids  # ½ is the default rule
    assert decode(call_threshold=0.0).output_ids == greedy(family, teacher, prompts)  # always calls
    assert decode(call_threshold=1.0).output_ids == greedy(family, student, prompts)  # never calls
    with pytest.raises(ValueError, match="call_threshold"):
        decode(call_threshold=-0.1)


@only_family("encoder-decoder")  # the threshold is the T5 pair's
def test_kl_oracle_calls_exactly_where_the_teacher_student_kl_exceeds_its_threshold(family, teacher, student, prompts):
    from agents.objectives import teacher_student_kl

    policy = RecordingPolicy(student, -1e4, weight_std=0.0).eval()  # <τ> never chosen: only the oracle calls
    kls: list[float] = []
    threshold = 13.0  # nats: the tiny random pair's KLs span about 7 to 19
    result = teacher_help_decode(policy, teacher, *prompts, MAX_NEW, kl_oracle_threshold=threshold)
    assert result.teacher_forwards == max(result.lengths)  # the teacher reads every token
    for row, ((ids, _), out, flags) in enumerate(
        zip(single_rows(prompts), result.output_ids, result.from_teacher, strict=True)
    ):
        teacher_logits = family.output_logits(teacher, ids[0].tolist(), out)[None]
        student_logits = torch.stack([step[row] for step in policy.steps[: len(out)]])[None]
        kl = teacher_student_kl(teacher_logits.float(), student_logits)[0]
        kls += kl.tolist()
        assert flags == (kl > threshold).tolist()
        for p, token in enumerate(out):
            source = teacher_logits[0, p] if flags[p] else student_logits[0, p, :-1]
            assert token == int(source.argmax())
    assert min(kls) < threshold < max(kls)  # the threshold splits the tokens: the test can tell the rule apart


def test_kl_oracle_extremes_and_checks(family, teacher, student, prompts):
    policy = policy_with_call_bias(student, -1e4)
    assert teacher_help_decode(policy, teacher, *prompts, MAX_NEW, kl_oracle_threshold=0.0).output_ids == greedy(
        family, teacher, prompts)  # KL > 0 at every token of two different random models
    never = teacher_help_decode(policy, teacher, *prompts, MAX_NEW, kl_oracle_threshold=1e9)
    assert never.output_ids == greedy(family, student, prompts) and sum(never.teacher_calls) == 0
    with pytest.raises(ValueError, match="kl_oracle_threshold"):
        teacher_help_decode(policy, teacher, *prompts, MAX_NEW, kl_oracle_threshold=-1.0)


def test_teacher_help_restores_training_mode_and_checks_arguments(teacher, student, prompts):
    policy = policy_with_call_bias(student, -1e4).train()
    teacher_help_decode(policy, teacher, *prompts, 2)
    assert policy.training and student.training
    policy.eval()
    with pytest.raises(ValueError, match="budget_cap"):
        teacher_help_decode(policy, teacher, *prompts, 2, budget_cap=1.5)
    empty = teacher_help_decode(policy, teacher, *prompts, 0)
    assert empty.output_ids == [[]] * 4 and empty.teacher_fraction == [0.0] * 4


def test_no_new_tokens_decode_nothing(teacher, student, prompts):
    # Speculative decoding once drafted min(K, 0) = 0 tokens here and failed on the empty block.
    for result in (speculative_decode(student, teacher, *prompts, 0, lenience=0.5, draft_length=3),
                   confidence_fallback_decode(student, teacher, *prompts, 0, threshold=0.5)):
        assert result.output_ids == [[]] * 4 and result.teacher_forwards == result.student_forwards == 0


# --------------------------------------------------------------------------------------------- fallback


def test_confidence_fallback_extremes(family, teacher, student, prompts):
    never = confidence_fallback_decode(student, teacher, *prompts, MAX_NEW, threshold=0.0)
    assert never.output_ids == greedy(family, student, prompts) and never.teacher_forwards == 0
    always = confidence_fallback_decode(student, teacher, *prompts, MAX_NEW, threshold=1.01)
    assert always.output_ids == greedy(family, teacher, prompts)
    assert all(all(f) for f in always.from_teacher)


def test_confidence_fallback_batched_equals_batch_size_one(family, teacher, student, prompts):
    batched = confidence_fallback_decode(student, teacher, *prompts, MAX_NEW, threshold=0.6)
    check_well_formed(batched, MAX_NEW)
    assert any(0 < c < len(o) for c, o in zip(batched.teacher_calls, batched.output_ids, strict=True))
    single = per_row(lambda i, m: confidence_fallback_decode(student, teacher, i, m, MAX_NEW, threshold=0.6), prompts)
    assert_same_rows(batched, single)
    # The rule, on full forwards: a token is the teacher's exactly where the student's top probability < 0.6.
    for (ids, _), out, flags in zip(single_rows(prompts), batched.output_ids, batched.from_teacher, strict=True):
        probs = full_probs(family, student, ids, out)
        assert flags == (probs.max(dim=-1).values < 0.6).tolist()
        teacher_argmax = full_argmax(family, teacher, ids, out)
        assert all(t == (teacher_argmax[p] if f else int(probs[p].argmax())) for p, (t, f) in enumerate(zip(out, flags, strict=True)))


# --------------------------------------------------------------------------------------------- mixed pairs


@only_family("decoder-only")
def test_decoders_refuse_a_pair_that_mixes_families(student, prompts):
    t5 = tiny_t5(16, 1, seed=0)  # the same vocabulary size: only the family differs
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


# ------------------------------------------------------------------ reusing decodes across call thresholds
def test_same_decisions_range_repeats_the_decode_inside_and_not_outside(family, teacher, student, prompts):
    """A decode reports the log-threshold range [lo, hi) under which every call decision repeats: a
    threshold inside it gives the identical result, one just past either end changes some call."""
    policy = mixed_policy(family, student)
    base = teacher_help_decode(policy, teacher, *prompts, MAX_NEW, call_threshold=0.5)
    lo, hi = base.same_decisions
    assert lo < math.log(0.5) < hi and 0 < sum(base.teacher_calls) < sum(base.lengths)  # a real mix of calls
    for c in (math.exp(lo) * 1.0001, math.exp((lo + hi) / 2), math.exp(hi) * 0.9999):
        again = teacher_help_decode(policy, teacher, *prompts, MAX_NEW, call_threshold=c)
        assert again.output_ids == base.output_ids and again.from_teacher == base.from_teacher
    lower = teacher_help_decode(policy, teacher, *prompts, MAX_NEW, call_threshold=math.exp(lo) * 0.999)
    higher = teacher_help_decode(policy, teacher, *prompts, MAX_NEW, call_threshold=math.exp(hi) * 1.001)
    assert lower.from_teacher != base.from_teacher and higher.from_teacher != base.from_teacher
    # The first step at which a decision flips: a declined token now calls (lower c), a called one declines (higher c).
    assert sum(lower.teacher_calls) != sum(base.teacher_calls) or lower.output_ids != base.output_ids


def test_threshold_decodes_are_the_plain_decodes_with_fewer_forwards(family, teacher, student):
    """ThresholdDecodes over batches gives exactly what decode_batches gives at every threshold, and
    a threshold search through it finds the same threshold, measuring the same fractions, with fewer
    batch decodes."""
    tokenizer = build_tokenizer(SyntheticLanguage())
    policy = mixed_policy(family, student)
    ids, mask = many_prompts(family, count=16, seed=3)
    batches = [(ids[i:i + 4], mask[i:i + 4], ids[i:i + 4], mask[i:i + 4]) for i in range(0, 16, 4)]

    def decoder(c):
        return training_wheels_decoder(policy, teacher, 10, call_threshold=c)

    reused = ThresholdDecodes(decoder, batches, tokenizer)
    for c in (0.5, 0.3, 0.31, 0.3, 0.9, 0.05):
        plain = decode_batches(decoder(c), batches, tokenizer)
        through = reused.decode(c)
        assert (through.output_ids, through.from_teacher, through.teacher_calls, through.tokens) == (
            plain.output_ids, plain.from_teacher, plain.teacher_calls, plain.tokens)
    assert reused.reused >= 4  # 0.3 a second time reuses every batch at least

    def plain_fraction(c):
        return decode_batches(decoder(c), batches, tokenizer).teacher_fraction

    searches = ThresholdDecodes(decoder, batches, tokenizer)
    for target in (0.1, 0.4):
        expected = calibrate_call_threshold(plain_fraction, target, tolerance=0.0, iterations=6)
        found = calibrate_call_threshold(lambda c: searches.decode(c).teacher_fraction, target, tolerance=0.0,
                                         iterations=6)
        assert (found.threshold, found.teacher_fraction, found.tried) == (
            expected.threshold, expected.teacher_fraction, expected.tried)
    probes = sum(len(calibrate_call_threshold(plain_fraction, t, tolerance=0.0, iterations=6).tried)
                 for t in (0.1, 0.4))
    assert searches.decoded < probes * len(batches)  # the same answers from fewer decodes


def test_the_default_threshold_is_the_checkpoints_own_at_the_named_budget(family, teacher, student, prompts):
    """call_threshold None: the threshold the policy holds for ``budget`` (tw train's call_rule.json), else ½."""
    policy = mixed_policy(family, student)
    half = teacher_help_decode(policy, teacher, *prompts, MAX_NEW, call_threshold=0.5)
    lo, hi = half.same_decisions
    moved = math.exp(hi) * 1.001  # past the lowest call: a different decode
    explicit = teacher_help_decode(policy, teacher, *prompts, MAX_NEW, call_threshold=moved)
    assert explicit.from_teacher != half.from_teacher
    policy.call_thresholds = {0.3: moved}
    for budget, expected in ((0.3, explicit), (0.1, half), (None, half)):
        got = teacher_help_decode(policy, teacher, *prompts, MAX_NEW, budget=budget)
        assert (got.output_ids, got.from_teacher) == (expected.output_ids, expected.from_teacher), budget
    policy.call_thresholds = {}
