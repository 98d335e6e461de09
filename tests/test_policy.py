"""The student policy π over V ∪ {<τ>} and the value network (issue: the student policy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from agents.policy import StudentPolicy, ValueNetwork, choose_actions, decoder_inputs
from tests.tiny_task import tiny_t5

V = 64


@pytest.fixture
def policy():
    torch.manual_seed(0)
    model = tiny_t5(V, d_model=32, layers=2, seed=3)
    # A separate random output layer, so that the LM does not just copy its input (tied heads do).
    model.lm_head = torch.nn.Linear(32, V, bias=False)
    policy = StudentPolicy(model).eval()
    with torch.no_grad():
        policy.state_embedding.beta.normal_()
        policy.call_head.weight.normal_()
        policy.call_head.bias.fill_(0.5)
        policy.call_confidence.weight.normal_()
        policy.call_prompt.weight.normal_()
    return policy


def batch():
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, V, (2, 6), generator=g)
    prompt_mask = torch.ones(2, 6, dtype=torch.long)
    prompt_mask[1, 4:] = 0
    state = torch.randint(2, 2 * V, (2, 5), generator=g)  # ids >= V are teacher tokens
    return prompt, prompt_mask, state, torch.ones(2, 5, dtype=torch.long)


def test_decoder_inputs_shift_right_with_the_start_token():
    assert decoder_inputs(torch.tensor([[5, 70, 9]]), 0).tolist() == [[0, 5, 70, 9]]


def test_vocabulary_logits_are_the_lms_own_when_the_student_wrote_everything(policy):
    prompt, prompt_mask, state, mask = batch()
    state = state % V
    logits = policy(prompt, prompt_mask, state, mask)
    assert logits.shape == (2, 5, V + 1)
    shifted = decoder_inputs(state, 0)[:, :-1]
    reference = policy.model(input_ids=prompt, attention_mask=prompt_mask, decoder_input_ids=shifted).logits
    torch.testing.assert_close(logits[..., :V], reference, atol=1e-5, rtol=1e-5)


def test_teacher_tokens_are_embedded_with_beta(policy):
    """Eq. 15: a teacher token t (stored as t + V) reads Embed(t) + β."""
    prompt, prompt_mask, state, mask = batch()
    logits = policy(prompt, prompt_mask, state, mask)
    inputs = decoder_inputs(state, 0)[:, :-1]
    embed = policy.model.get_input_embeddings()
    manual = embed(inputs % V) + (inputs >= V).unsqueeze(-1).float() * policy.state_embedding.beta
    reference = policy.model(input_ids=prompt, attention_mask=prompt_mask, decoder_inputs_embeds=manual).logits
    torch.testing.assert_close(logits[..., :V], reference, atol=1e-5, rtol=1e-5)
    # ...and β matters: without it the logits differ wherever a teacher token was read.
    plain = policy(prompt, prompt_mask, state % V, mask)
    assert not torch.allclose(plain, logits)


def test_incremental_rollout_equals_the_full_forward(policy):
    with torch.no_grad():  # a trained prompt summary, so that its incremental path is exercised too
        policy.prompt_summary.weight.normal_(std=0.3)
    prompt, prompt_mask, state, mask = batch()
    full = policy(prompt, prompt_mask, state, mask)
    rollout = policy.rollout(2, 5)
    steps = []
    for t in range(5):
        obs = {
            "prompt_ids": prompt.numpy(), "prompt_length": prompt_mask.sum(1, keepdim=True).numpy(),
            "state_ids": np.where(np.arange(5)[None] < t, state.numpy(), 0), "state_length": np.full((2, 1), t),
        }
        steps.append(rollout.logits(obs))
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_save_and_load_round_trip_and_plain_transformers(policy, tmp_path):
    prompt, prompt_mask, state, mask = batch()
    policy.save(tmp_path / "policy")
    loaded = StudentPolicy.load(tmp_path / "policy")
    torch.testing.assert_close(loaded(prompt, prompt_mask, state, mask), policy(prompt, prompt_mask, state, mask))
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "policy")  # the student without <τ>
    assert plain.config.vocab_size == V
    assert (tmp_path / "policy" / "training_wheels.safetensors").exists()


def test_value_network_scores_every_state(policy):
    prompt, prompt_mask, state, mask = batch()
    value = ValueNetwork.from_policy(policy)
    values = value(prompt, prompt_mask, state, mask)
    assert values.shape == (2, 6)  # s_0 .. s_T
    assert torch.count_nonzero(values) == 0  # the head starts at zero
    # Separate parameters: training the value network leaves the policy alone.
    assert not any(p is q for p in value.parameters() for q in policy.parameters())


def test_call_logit_is_the_sum_of_its_three_reads(policy):
    """z_τ = call_head(h) + call_confidence([max log π_V, entropy of π_V]) + call_prompt(mean encoder state)."""
    prompt, prompt_mask, state, mask = batch()
    logits = policy(prompt, prompt_mask, state, mask)
    encoded = policy.encode(prompt, prompt_mask)
    h = policy.decoder_states(prompt, prompt_mask, state, mask, encoded)[:, :-1]
    log_pi_v = torch.log_softmax(logits[..., :V], dim=-1)
    confidence = torch.stack([log_pi_v.max(-1).values, -(log_pi_v.exp() * log_pi_v).sum(-1)], -1)
    weights = prompt_mask.unsqueeze(-1).float()
    mean = (encoded * weights).sum(1) / weights.sum(1)
    expected = (
        h @ policy.call_head.weight[0] + policy.call_head.bias
        + confidence @ policy.call_confidence.weight[0] + (mean @ policy.call_prompt.weight[0])[:, None]
    )
    torch.testing.assert_close(logits[..., V], expected, atol=1e-5, rtol=1e-5)
    # Padding of the prompt does not enter the mean: changing a masked-out id changes nothing.
    changed = prompt.clone()
    changed[1, 5] = (changed[1, 5] + 1) % V
    torch.testing.assert_close(policy(changed, prompt_mask, state, mask), logits)


def test_a_fresh_policy_keeps_the_lm_and_starts_all_call_reads_at_zero():
    model = tiny_t5(V, d_model=32, layers=2, seed=3)
    fresh = StudentPolicy(model).eval()
    prompt, prompt_mask, state, mask = batch()
    logits = fresh(prompt, prompt_mask, state % V, mask)
    assert torch.count_nonzero(logits[..., V]) == 0


def test_a_policy_saved_without_the_newer_call_reads_loads_with_them_at_zero(policy, tmp_path):
    from safetensors.torch import load_file, save_file

    policy.save(tmp_path / "p")
    extra = load_file(str(tmp_path / "p" / "training_wheels.safetensors"))
    old = {k: v for k, v in extra.items() if k in ("beta", "call_head.weight", "call_head.bias")}
    save_file(old, str(tmp_path / "p" / "training_wheels.safetensors"))
    loaded = StudentPolicy.load(tmp_path / "p")
    assert torch.count_nonzero(loaded.call_confidence.weight) == 0
    assert torch.count_nonzero(loaded.call_prompt.weight) == 0
    torch.testing.assert_close(loaded.call_head.weight, policy.call_head.weight)


# choose_actions ---------------------------------------------------------------------------------
def test_greedy_calls_only_when_the_call_probability_exceeds_one_half():
    # Row 0: <τ> is the single largest logit but π(<τ>) = e^1 / (e^1 + 4·e^0.9) < ½ → the top token.
    # Row 1: π(<τ>) = e^2 / (e^2 + 2) > ½ → call.  Row 2: exactly ½ → no call.
    logits = torch.tensor([
        [0.9, 0.9, 0.9, 0.95, 1.0],
        [0.0, 0.0, -50.0, -50.0, 2.0],
        [0.0, -1e9, -1e9, -1e9, 0.0],
    ])
    assert choose_actions(logits).tolist() == [3, 4, 0]
    assert logits.argmax(-1).tolist()[0] == 4  # plain argmax would have called in row 0


def test_greedy_call_threshold_moves_the_decision_and_is_checked():
    # π(<τ>) of the rows: 0.2, 0.5 and e^2 / (e^2 + 2) ≈ 0.787 (the call logit is last).
    logits = torch.tensor([
        [math.log(4.0), -1e9, 0.0],
        [0.0, -1e9, 0.0],
        [0.0, 0.0, 2.0],
    ])
    assert choose_actions(logits, call_threshold=0.5).tolist() == [0, 0, 2]  # the default rule
    assert choose_actions(logits, call_threshold=0.1).tolist() == [2, 2, 2]
    assert choose_actions(logits, call_threshold=0.3).tolist() == [0, 2, 2]
    assert choose_actions(logits, call_threshold=0.8).tolist() == [0, 0, 0]
    assert choose_actions(logits, call_threshold=1.0).tolist() == [0, 0, 0]  # never calls
    assert choose_actions(logits, call_threshold=0.0).tolist() == [2, 2, 2]  # calls wherever π(<τ>) > 0
    capped = logits.clone()
    capped[:, -1] = -math.inf
    assert choose_actions(capped, call_threshold=0.0).tolist() == [0, 0, 0]  # a −inf call logit never calls
    with pytest.raises(ValueError, match="call_threshold"):
        choose_actions(logits, call_threshold=1.5)


def test_sampling_at_temperature_one_is_the_softmax_over_all_actions():
    logits = torch.tensor([[0.2, -0.5, 1.0, 0.3]]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(choose_actions(logits, 1.0, g), minlength=4).float() / len(logits)
    torch.testing.assert_close(counts, torch.softmax(logits[0], -1), atol=0.01, rtol=0)


def test_sampling_sharpens_towards_greedy_as_temperature_falls():
    logits = torch.tensor([[0.0, 0.3, 0.5]]).repeat(20000, 1)  # π(<τ>) ≈ 0.41, top token 1
    g = torch.Generator().manual_seed(0)
    cold = choose_actions(logits, 0.05, g)
    assert (cold == 1).float().mean() > 0.95
    warm = choose_actions(logits, 1.0, g)
    assert 0.35 < (warm == 2).float().mean() < 0.47


@pytest.mark.parametrize("logits, temperature", [(torch.zeros(3), 0.0), (torch.zeros(2, 1), 0.0), (torch.zeros(2, 3), -1.0)])
def test_choose_actions_rejects_bad_input(logits, temperature):
    with pytest.raises(ValueError, match="logits must be|temperature"):
        choose_actions(logits, temperature, torch.Generator())


def test_sampling_needs_a_generator():
    with pytest.raises(ValueError, match="Generator"):
        choose_actions(torch.zeros(2, 3), 0.5)

