"""The student policy π over V ∪ {<τ>} and the value network (issue: the student policy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from agents.policy import StudentPolicy, ValueNetwork, decoder_inputs
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
