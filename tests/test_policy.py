"""The student policy π over V ∪ {<τ>} and the value network (issue: the student policy), each test
written once and run for both model families: a T5 (``[encoder-decoder]``), and decoder-only LMs of
three architectures (``[decoder-only-qwen2]``: tied, as the tiny causal task's student; a Llama; a
Qwen3 with q/k norms).

The references are plain full forwards of the LM, one row at a time without padding or a cache
(tests/tiny_task.py's ``policy_logits``: Eq. 15's β on teacher tokens, the prompt summary, the three
<τ> reads), against which the padded teacher-forced forward, its gradients and the incremental
rollout (with a mid-batch restart) are checked; then the value network, save/load and the errors
for mixed families.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from agents.policy import (
    CALL_RULE,
    EXTRA_CONFIG,
    StudentPolicy,
    ValueNetwork,
    choose_actions,
    decoder_inputs,
    read_call_rule,
    write_call_rule,
)
from tests.tiny_task import family_of_model, right_padded, tiny_causal_lm, tiny_t5

V = 64
ARCHS = {"t5": "encoder-decoder", "qwen2": "decoder-only-qwen2", "llama": "decoder-only-llama", "qwen3": "decoder-only-qwen3"}


def tiny_lm(arch: str):
    if arch == "t5":
        model = tiny_t5(V, d_model=32, layers=2, seed=3)
        # A separate random output layer, so that the LM does not just copy its input (tied heads do).
        model.lm_head = torch.nn.Linear(32, V, bias=False)
        return model
    return tiny_causal_lm(V, 16, 2, seed=4, arch=arch, tied=arch == "qwen2", initializer_range=0.2)


@pytest.fixture(params=list(ARCHS), ids=list(ARCHS.values()))
def arch(request):
    return request.param


@pytest.fixture
def policy(arch):
    """A policy with every Training Wheels part random."""
    policy = StudentPolicy(tiny_lm(arch)).eval()
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
    prompt, prompt_mask = right_padded(list(lengths), V, g)
    state = torch.randint(2, 2 * V, (len(lengths), steps), generator=g)
    state_mask = torch.ones_like(state)
    state_mask[1, 3:] = 0  # an episode that ended after three actions (padding after it)
    return prompt, prompt_mask, state, state_mask


def rows(prompt_mask, state_mask):
    """Each row's prompt and X^(in) lengths."""
    return [(int(prompt_mask[b].sum()), int(state_mask[b].sum())) for b in range(prompt_mask.shape[0])]


def test_decoder_inputs_shift_right_with_the_start_token():
    assert decoder_inputs(torch.tensor([[5, 70, 9]]), 0).tolist() == [[0, 5, 70, 9]]


def test_a_fresh_policy_is_the_lm_and_starts_all_call_reads_at_zero(arch):
    """With the student writing everything (β plays no part), the token logits are the LM's own, one
    plain forward per row; the <τ> logit starts at zero."""
    model = tiny_lm(arch)
    fresh, family = StudentPolicy(model).eval(), family_of_model(model)
    prompt, prompt_mask, state, state_mask = episode_batch()
    state = state % V
    with torch.no_grad():
        logits = fresh(prompt, prompt_mask, state, state_mask)
    assert logits.shape == (3, 5, V + 1)
    for b, (n, t) in enumerate(rows(prompt_mask, state_mask)):
        reference = family.output_logits(model, prompt[b, :n].tolist(), state[b, :t].tolist())
        torch.testing.assert_close(logits[b, :t, :V], reference, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(logits[..., V]) == 0


def test_policy_forward_equals_a_manual_full_forward(policy):
    """Each row of the padded batch equals plain forwards of the LM over that row alone: Eq. 15 (a
    teacher token t, stored as t + V, reads Embed(t) + β), the prompt summary on every input, and
    z_τ = call_head(h) + call_confidence([max log π_V, entropy of π_V]) + call_prompt(mean prompt state)."""
    prompt, prompt_mask, state, state_mask = episode_batch()
    family = family_of_model(policy.model)
    with torch.no_grad():
        logits = policy(prompt, prompt_mask, state, state_mask)
        assert logits.shape == (3, 5, V + 1)
        for b, (n, t) in enumerate(rows(prompt_mask, state_mask)):
            expected = family.policy_logits(policy, prompt[b, :n].tolist(), state[b, :t].tolist())
            torch.testing.assert_close(logits[b, :t], expected, atol=1e-4, rtol=1e-4)
        # ...β matters: without it the logits differ wherever a teacher token was read.
        assert not torch.allclose(policy(prompt, prompt_mask, state % V, state_mask), logits)
        # Padding of the prompt does not enter the mean: changing a masked-out id changes nothing.
        changed = prompt.clone()
        changed[1, 5] = (changed[1, 5] + 1) % V
        torch.testing.assert_close(policy(changed, prompt_mask, state, state_mask), logits)


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
    """Gradients through the teacher-forced forward equal those of the manual full forward."""
    prompt, prompt_mask, state, state_mask = episode_batch()
    parameters = [policy.state_embedding.beta, policy.prompt_summary.weight, policy.call_prompt.weight,
                  policy.model.get_input_embeddings().weight]
    loss = policy(prompt[:1], prompt_mask[:1], state[:1], state_mask[:1]).logsumexp(-1).sum()
    ours = torch.autograd.grad(loss, parameters)
    reference = family_of_model(policy.model).policy_logits(policy, prompt[0].tolist(), state[0].tolist())
    expected = torch.autograd.grad(reference.logsumexp(-1).sum(), parameters)
    for a, b in zip(ours, expected, strict=True):
        assert torch.count_nonzero(b) > 0
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_value_network_scores_every_state_from_the_policys_states(policy):
    prompt, prompt_mask, state, state_mask = episode_batch()
    value = ValueNetwork.from_policy(policy)
    with torch.no_grad():
        values = value(prompt, prompt_mask, state, state_mask)
        assert values.shape == (3, 6) and torch.count_nonzero(values) == 0  # s_0 .. s_T; the head starts at zero
        value.value_head.weight.normal_()
        states, _ = policy.state_features(prompt, prompt_mask, state, state_mask)
        torch.testing.assert_close(value(prompt, prompt_mask, state, state_mask),
                                   states @ value.value_head.weight[0] + value.value_head.bias, atol=1e-5, rtol=1e-5)
    # Separate parameters: training the value network leaves the policy alone.
    assert not any(p is q for p in value.parameters() for q in policy.parameters())


def test_save_and_load_round_trip_and_plain_transformers(policy, tmp_path):
    prompt, prompt_mask, state, state_mask = episode_batch()
    family = family_of_model(policy.model)
    policy.save(tmp_path / "policy")
    assert (tmp_path / "policy" / "training_wheels.safetensors").exists()
    assert f'"family": "{family.name}"' in (tmp_path / "policy" / EXTRA_CONFIG).read_text()
    loaded = StudentPolicy.load(tmp_path / "policy", family=family.name)
    assert loaded.family.name == family.name
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt, prompt_mask, state, state_mask),
                                   policy(prompt, prompt_mask, state, state_mask))
        torch.testing.assert_close(StudentPolicy.load(tmp_path / "policy")(prompt, prompt_mask, state, state_mask),
                                   policy(prompt, prompt_mask, state, state_mask))
    plain = family.auto_class.from_pretrained(tmp_path / "policy")  # the student without <τ>
    assert plain.config.model_type == policy.model.config.model_type and plain.config.vocab_size == V


def test_the_call_rule_is_saved_with_the_policy_and_read_back(policy, tmp_path):
    assert policy.call_thresholds == {} and policy.call_threshold_for(0.3) == 0.5  # no rule: the raw ½
    policy.call_thresholds = {0.1: 0.62, 0.3: 0.41}
    policy.save(tmp_path / "p")
    assert json.loads((tmp_path / "p" / CALL_RULE).read_text())["thresholds"] == [[0.1, 0.62], [0.3, 0.41]]
    loaded = StudentPolicy.load(tmp_path / "p")
    assert loaded.call_thresholds == {0.1: 0.62, 0.3: 0.41}
    assert loaded.call_threshold_for(0.3) == 0.41 and loaded.call_threshold_for(0.1 + 0.2) == 0.41  # float noise
    assert loaded.call_threshold_for(None) == 0.5 and loaded.call_threshold_for(0.05) == 0.5  # outside the rule
    assert loaded.call_threshold_for(0.4) == 0.5
    # Between two calibrated budgets: linear in log-odds (at the midpoint, the log-odds' mean).
    mean_log_odds = (math.log(0.62 / 0.38) + math.log(0.41 / 0.59)) / 2
    assert loaded.call_threshold_for(0.2) == pytest.approx(1 / (1 + math.exp(-mean_log_odds)), abs=1e-12)
    assert 0.41 < loaded.call_threshold_for(0.25) < loaded.call_threshold_for(0.15) < 0.62


@pytest.mark.parametrize("text, what", [
    ('{"thresholds": [[0.1, 1.5]]}', "probabilities in \\[0, 1\\], got 0.1 -> 1.5"),
    ('{"rule": "x"}', "is not a call rule"),
    ('{"thresholds": [["a", 0.5]]}', "is not a call rule"),
])
def test_a_bad_call_rule_is_refused_by_name(text, what, tmp_path):
    (tmp_path / CALL_RULE).write_text(text)
    with pytest.raises(ValueError, match=what):
        read_call_rule(tmp_path)
    with pytest.raises(ValueError, match="thresholds in \\[0, 1\\]"):
        write_call_rule(tmp_path / "w", {0.2: -0.1})
    assert not (tmp_path / "w" / CALL_RULE).exists()


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


def test_the_prompt_pool_by_attention_by_hand():
    model = StudentPolicy(tiny_lm("t5"))  # d = 32
    states = torch.zeros(2, 3, 32)
    states[..., :4] = torch.tensor([[[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 0.0], [3.0, 1.0, 0.0, 1.0]],
                                    [[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0], [9.0, 9.0, 9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1's last state is padding: never read
    torch.testing.assert_close(model.prompt_pool(states, mask), model.prompt_mean(states, mask))  # no query: the mean
    model.read_prompt_by_attention()
    torch.testing.assert_close(model.prompt_pool(states, mask), model.prompt_mean(states, mask))  # zero query: the mean
    with torch.no_grad():
        model.prompt_query[0] = math.sqrt(32)  # q·h / √d is then h's first entry
    # By hand: row 0's scores 1, 0, 3; row 1's 2, 0 (its padding left out).
    def by_hand(rows, scores):
        weights = [math.exp(x) for x in scores]
        return [sum(w * r[k] for w, r in zip(weights, rows, strict=True)) / sum(weights) for k in range(4)]
    with torch.no_grad():
        pooled = model.prompt_pool(states, mask)
    torch.testing.assert_close(pooled[0, :4], torch.tensor(by_hand(states[0, :, :4].tolist(), [1.0, 0.0, 3.0])))
    torch.testing.assert_close(pooled[1, :4], torch.tensor(by_hand(states[1, :2, :4].tolist(), [2.0, 0.0])))
    assert torch.count_nonzero(pooled[:, 4:]) == 0


def test_a_policy_that_reads_its_prompt_by_attention(policy, tmp_path):
    prompt, prompt_mask, state, state_mask = episode_batch()
    with torch.no_grad():
        before = policy(prompt, prompt_mask, state, state_mask)
        policy.read_prompt_by_attention()
        torch.testing.assert_close(policy(prompt, prompt_mask, state, state_mask), before, atol=1e-5, rtol=1e-5)
        policy.prompt_query.normal_(std=3.0)
        after = policy(prompt, prompt_mask, state, state_mask)
    assert not torch.allclose(after, before, atol=1e-3)  # the query now weighs the prompt's states
    # Acting incrementally reads the prompt as the teacher-forced forward does, restarts included.
    test_incremental_rollout_equals_the_teacher_forced_forward_with_a_restart(policy)
    # The query is saved, said and read back; the value network starts from the same read.
    policy.save(tmp_path / "p")
    assert json.loads((tmp_path / "p" / EXTRA_CONFIG).read_text())["prompt_read"] == "attention"
    loaded = StudentPolicy.load(tmp_path / "p")
    torch.testing.assert_close(loaded.prompt_query, policy.prompt_query)
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt, prompt_mask, state, state_mask), after)
    value = ValueNetwork.from_policy(policy)
    torch.testing.assert_close(value.prompt_query, policy.prompt_query)
    assert value.prompt_query is not policy.prompt_query
    # A policy saved without a query reads the mean, as before.
    plain = StudentPolicy(tiny_lm("t5"))
    plain.save(tmp_path / "plain")
    assert StudentPolicy.load(tmp_path / "plain").prompt_query is None
    assert json.loads((tmp_path / "plain" / EXTRA_CONFIG).read_text())["prompt_read"] == "mean"


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


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
def test_a_decoder_only_policy_says_what_it_lacks(policy):
    with pytest.raises(TypeError, match="no start token shared by every prompt"):
        _ = policy.start_token_id
    with pytest.raises(TypeError, match="decoder-only"):
        policy.encode(*episode_batch()[:2])


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


def test_greedy_call_thresholds_per_row_act_as_each_rows_own_threshold():
    # π(<τ>) of the rows: 0.2, 0.5, ≈ 0.787; row thresholds 0.1, 0.6, 0.0 → call, no call, call.
    logits = torch.tensor([
        [math.log(4.0), -1e9, 0.0],
        [0.0, -1e9, 0.0],
        [0.0, 0.0, 2.0],
    ])
    assert choose_actions(logits, call_threshold=torch.tensor([0.1, 0.6, 0.0])).tolist() == [2, 0, 2]
    for scalar in (0.1, 0.3, 0.5, 0.8):  # a constant tensor decides as the scalar does
        assert choose_actions(logits, call_threshold=torch.full((3,), scalar)).tolist() == \
            choose_actions(logits, call_threshold=scalar).tolist()
    with pytest.raises(ValueError, match=r"one threshold per row, shape \(3,\), got \(2,\)"):
        choose_actions(logits, call_threshold=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="call_threshold must be a probability"):
        choose_actions(logits, call_threshold=torch.tensor([0.1, 1.2, 0.3]))


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



def test_token_logits_and_positions_are_the_forward_pass_read_differently(policy):
    """What the trainers call to skip work: the oracle's token logits, and the head at valid positions only."""
    prompt_ids, prompt_mask, state_ids, state_mask = episode_batch()
    with torch.no_grad():
        full = policy(prompt_ids, prompt_mask, state_ids, state_mask)
    vocab = policy.vocab_size
    # token_logits is forward's first V columns, bit for bit (the oracle ranks by it).
    assert torch.equal(policy.token_logits(prompt_ids, prompt_mask, state_ids, state_mask), full[..., :vocab])
    positions = state_mask.bool()
    with torch.no_grad():
        some = policy(prompt_ids, prompt_mask, state_ids, state_mask, positions=positions)
    assert some.shape == (int(positions.sum()), vocab + 1)
    assert torch.allclose(some, full[positions], atol=1e-6)
    with pytest.raises(ValueError, match="positions must be a bool mask"):
        policy(prompt_ids, prompt_mask, state_ids, state_mask, positions=state_mask)
