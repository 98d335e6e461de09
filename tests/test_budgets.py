"""Any teacher-use budget in [0, 1] (issue 31): the numeric prompt, its parsing and its errors, λ(b) between
trained budgets, and the env asked for a budget it never trained.

The env check uses the real T5 tokenizer from ../shared (it reads digits) with a tiny random T5 of its
vocabulary size; the embedded synthetic tokenizer (whole words, no digits) is refused with a message.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.test_env import full_logprobs, play, prompt_of
from tw_env.env import TeacherAssistedDecodingEnv
from tw_env.prompts import (
    budget_of_prompt,
    check_budget,
    check_budgets_for_style,
    format_budget,
    make_prompt,
)
from tw_env.rewards import eq17_reward, interpolate_multiplier

# ---------------------------------------------------------------------------------------------- prompts


def test_numeric_prompts_write_and_read_any_budget():
    assert [format_budget(b) for b in (0, 0.1, 0.15, 0.025, 0.5, 1)] == ["0", "0.1", "0.15", "0.025", "0.5", "1"]
    assert make_prompt("summarize", "A text.", 0.15, "numeric") == "With teacher use 0.15, summarize: A text."
    assert make_prompt("summarize", "A text.", 0.1) == "With light teacher use, summarize: A text."  # Table 1 stays
    for b in (0.0, 0.05, 0.15, 0.333, 0.5, 1.0):
        assert budget_of_prompt(make_prompt("translate", "x, y", b, "numeric")) == b
    for b in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5):
        assert budget_of_prompt(make_prompt("translate", "x", b)) == b
    assert budget_of_prompt("summarize: no budget here") is None
    assert check_budgets_for_style([0.05, 0.15], "numeric") == (0.05, 0.15)


def test_fixed_width_numeric_prompts_write_every_budget_to_three_places_and_read_back():
    assert [format_budget(b, fixed=True) for b in (0, 0.1, 0.15, 0.025, 0.5, 1)] == [
        "0.000", "0.100", "0.150", "0.025", "0.500", "1.000"]
    assert make_prompt("summarize", "A text.", 0.15, "numeric-fixed") == "With teacher use 0.150, summarize: A text."
    for b in (0.0, 0.05, 0.15, 0.333, 0.5, 1.0):
        assert budget_of_prompt(make_prompt("translate", "x, y", b, "numeric-fixed")) == b
    assert check_budgets_for_style([0.05, 0.15], "numeric-fixed") == (0.05, 0.15)
    with pytest.raises(ValueError, match="more than 3 decimal places"):
        format_budget(0.1234, fixed=True)
    with pytest.raises(ValueError, match=r"budget_style must be one of \['keyword', 'numeric', 'numeric-fixed'\]"):
        make_prompt("i", "s", 0.1, "fixed")


@pytest.mark.parametrize("bad, message", [
    (float("nan"), r"in \[0, 1\], got nan"), (1.5, r"in \[0, 1\], got 1.5"), (-0.1, r"in \[0, 1\], got -0.1"),
    ("abc", r"a number in \[0, 1\], got 'abc'"), (None, r"a number in \[0, 1\], got None"), (True, "got True"),
    (0.1234, "more than 3 decimal places"),
])
def test_bad_budgets_are_refused_naming_the_value_and_the_range(bad, message):
    with pytest.raises(ValueError, match=message):
        format_budget(bad)


def test_keyword_style_refuses_a_budget_without_a_keyword_and_points_to_the_numeric_style():
    with pytest.raises(ValueError, match="no prompt keyword.*budget_style 'numeric'"):
        check_budgets_for_style([0.15], "keyword")
    with pytest.raises(ValueError, match="budget_style must be one of"):
        make_prompt("i", "s", 0.1, "words")
    assert check_budget(np.float32(0.25)) == 0.25


# ---------------------------------------------------------------------------------------------- λ(b) and the call rule


def test_lambda_between_trained_budgets_by_hand():
    knots = {0.1: 1.0, 0.2: 3.0, 0.4: -1.0}
    assert interpolate_multiplier(0.15, knots) == pytest.approx(2.0)
    assert interpolate_multiplier(0.125, knots) == pytest.approx(1.5)
    assert interpolate_multiplier(0.3, knots) == pytest.approx(1.0)
    assert interpolate_multiplier(0.05, knots) == 1.0 and interpolate_multiplier(0.5, knots) == -1.0
    assert interpolate_multiplier(0.2, knots) == 3.0
    with pytest.raises(ValueError, match="no known budgets"):
        interpolate_multiplier(0.1, {})


# ---------------------------------------------------------------------------------------------- the env


@pytest.mark.shared
@pytest.mark.parametrize("style, written", [("numeric", "0.15"), ("numeric-fixed", "0.150")])
def test_env_with_numeric_prompts_takes_a_budget_it_never_trained(t5_tokenizer_dir, tiny_t5_dir, style, written):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(t5_tokenizer_dir)
    env = TeacherAssistedDecodingEnv(
        teacher=str(tiny_t5_dir), tokenizer=str(t5_tokenizer_dir), student=str(tiny_t5_dir),
        examples=[("Ein Hund läuft im Park.", "A dog runs in the park.")], instruction="translate German to English",
        max_new_tokens=4, max_prompt_length=48, budgets=[0.1, 0.2], budget_style=style,
    )
    env.set_lagrange_multipliers({0.1: 1.0, 0.2: 3.0})
    obs, _ = env.reset(seed=0, options={"budget": 0.15, "index": 0})
    assert tok.decode(prompt_of(obs), skip_special_tokens=True) == (
        f"With teacher use {written}, translate German to English: Ein Hund läuft im Park.")
    assert obs["budget"][0] == np.float32(0.15)
    V = env.vocab_size
    steps = play(env, [V, 5, V, 6])
    out = steps[-1][4]["output_ids"]
    lp = full_logprobs(T5ForConditionalGeneration.from_pretrained(tiny_t5_dir).eval(), prompt_of(obs), out)
    calls = np.array([True, False, True, False])[: len(out)]
    # The reward at an unseen budget uses λ(0.15) = 2.0, halfway between the trained budgets' 1.0 and 3.0.
    np.testing.assert_allclose([s[1] for s in steps], eq17_reward(lp[np.arange(len(out)), out], calls, 0.15, 2.0),
                               atol=1e-4)
    for bad, message in ((1.5, r"\[0, 1\], got 1.5"), (float("nan"), "got nan"), (0.1234, "decimal places")):
        with pytest.raises(ValueError, match=message):
            env.reset(options={"budget": bad})


def test_numeric_prompts_need_a_tokenizer_that_reads_digits(family_task):
    """The embedded synthetic tokenizer has whole words and no digits: a numeric budget would be <unk>."""
    with pytest.raises(ValueError, match="needs a tokenizer that reads digits.*budget_style 'keyword'"):
        TeacherAssistedDecodingEnv(teacher=str(family_task.teacher_dir), tokenizer=str(family_task.tokenizer_dir),
                                   examples=[("a b", "c")], instruction="repeat", budgets=[0.15], budget_style="numeric")
    with pytest.raises(ValueError, match="is not one of this env's budgets.*budget_style 'numeric'"):
        env = TeacherAssistedDecodingEnv(teacher=str(family_task.teacher_dir), tokenizer=str(family_task.tokenizer_dir),
                                         examples=[("a b", "c")], instruction="repeat", budgets=[0.1, 0.2])
        env.reset(options={"budget": 0.15})


def test_tw_eval_takes_any_budget_with_numeric_prompts():
    from scripts.evaluate import EvalConfig

    EvalConfig(budgets=[0.05, 0.15, 0.25], env_kwargs={"budget_style": "numeric"}).validate()
    with pytest.raises(ValueError, match="budget 0.15 has no prompt keyword"):
        EvalConfig(budgets=[0.15]).validate()
    with pytest.raises(ValueError, match=r"\[0, 1\], got 1.5"):
        EvalConfig(budgets=[1.5], env_kwargs={"budget_style": "numeric"}).validate()


@pytest.mark.shared
@pytest.mark.parametrize("read_value, hidden", [(False, False), (True, False), (True, True)])
def test_train_on_numeric_budgets_then_decode_an_unseen_one(t5_tokenizer_dir, tiny_t5_dir, tmp_path, read_value, hidden):
    """`tw train` with numeric prompts, each episode's budget drawn from a range, λ on knots; then the
    checkpoint decoded at a budget it never saw, from a prompt that states it."""
    import json

    from agents.evaluation import training_wheels_decoder
    from agents.policy import StudentPolicy
    from agents.train import TrainConfig, run
    from tw_env.registration import make_task

    data = tmp_path / "data"
    data.mkdir()
    rows = "".join(json.dumps({"de": f"Ein Hund {i} läuft.", "en": f"A dog {i} runs."}) + "\n" for i in range(40))
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text(rows)
    env_kwargs = {"teacher": str(tiny_t5_dir), "student": str(tiny_t5_dir), "tokenizer": str(t5_tokenizer_dir),
                  "data": str(data), "budget_style": "numeric", "max_new_tokens": 6}
    budgets = [0.0, 0.05, 0.15, 0.25]
    summary = run(TrainConfig(
        env_id="TrainingWheels-WMT19-v0", env_kwargs=env_kwargs, budgets=budgets, output_dir=str(tmp_path / "run"),
        budget_range=[0.0, 0.3],  # every episode its own budget; λ on the four knots, interpolated between them
        bc_batches=2, bc_batch_size=4, pcl_batches=2, num_envs=4, eval_every=1, eval_examples=8, threads=1,
        device="cpu", lagrange_floor=-1.0, oracle_rounding="stochastic", read_budget_value=read_value,
        hide_budget_from_lm=hidden))
    assert [r["budget"] for r in summary["phase2"]["selection"]["evaluations"][-1]["results"]] == budgets
    assert [b["budget"] for b in summary["call_rule"]["budgets"]] == budgets
    assert sorted(float(b) for b in summary["phase2"]["lambdas"]) == budgets
    task = make_task("TrainingWheels-WMT19-v0", split="validation", **env_kwargs)
    ids, mask = task.prompts([task.examples[0].source], [0.1])
    assert task.tokenizer.decode(ids[0], skip_special_tokens=True).startswith("With teacher use 0.1, translate")
    policy = StudentPolicy.load(tmp_path / "run" / "best")
    # The value read was trained (its weights moved from zero) and travels with the checkpoint.
    assert (policy.budget_tokenizer is not None) == read_value and policy.hide_budget_from_lm == hidden
    if read_value:
        assert policy.call_budget is not None and bool(policy.call_budget.weight.abs().sum() > 0)
    shipped = {b["budget"]: b["threshold"] for b in summary["call_rule"]["budgets"]}
    # Not calibrated at 0.1: between the rule's thresholds at 0.05 and 0.15, in log-odds.
    assert min(shipped[0.05], shipped[0.15]) <= policy.call_threshold_for(0.1) <= max(shipped[0.05], shipped[0.15])
    result = training_wheels_decoder(policy, task.teacher, 6, budget=0.1, budget_cap=0.1)(ids, mask, *task.teacher_prompts(
        [task.examples[0].source], [0.1]))
    assert len(result.output_ids[0]) >= 1 and sum(result.from_teacher[0]) <= math.ceil(0.1 * len(result.output_ids[0]))


# ---------------------------------------------------------------------------------------------- the dual over a range


def test_knot_weights_and_pooled_errors_by_hand():
    from agents.lagrangian import knot_weights, pool_counts

    knots = [0.1, 0.2, 0.4]
    assert knot_weights(0.15, knots) == [(0.1, pytest.approx(0.5)), (0.2, pytest.approx(0.5))]
    assert knot_weights(0.25, knots) == [(0.2, pytest.approx(0.75)), (0.4, pytest.approx(0.25))]
    assert knot_weights(np.float32(0.2), knots) == [(0.2, 1.0)] and knot_weights(0.05, knots) == [(0.1, 1.0)]
    # 0.15 with 5 calls in 20 tokens is 0.1 over its budget: both knots around it see that error.
    pooled = pool_counts({0.15: (5, 20)}, knots)
    assert pooled.keys() == {0.1, 0.2} and pooled[0.1] == pytest.approx((2.0, 10.0)) and pooled[0.2] == pytest.approx((3.0, 10.0))
    assert {k: c / t - k for k, (c, t) in pooled.items()} == {0.1: pytest.approx(0.1), 0.2: pytest.approx(0.1)}
    # A budget on a knot is counted as it is (exact integers: the keyword runs are unchanged).
    assert pool_counts({0.1: (13, 130), 0.2: (7, 40)}, knots) == {0.1: (13, 130), 0.2: (7, 40)}
    both = pool_counts({0.2: (8, 40), 0.3: (2, 20)}, knots)  # 0.3: error −0.2, shared half and half
    assert both[0.2] == pytest.approx((8 + 0.2 * 10 + 0.5 * (2 - 6), 50.0))
    assert both[0.4] == pytest.approx((0.4 * 10 + 0.5 * (2 - 6), 10.0))


def test_the_dual_steps_on_errors_pooled_from_budgets_between_its_knots():
    from agents.lagrangian import PIDGains, make_dual
    from agents.train import multiplier_for

    dual = make_dual([0.1, 0.2], "pid", cap=4.0, floor=-4.0, gains=PIDGains(kp=1.0, ki=0.0, kd=0.0, smoothing=1.0))
    dual.record({0.15: (5, 20)})  # error +0.1 at 0.15, nothing at the knots themselves
    assert dual.step() == {0.1: pytest.approx(0.1), 0.2: pytest.approx(0.1)}
    assert multiplier_for({0.1: 1.0, 0.2: 3.0}, np.float32(0.15)) == pytest.approx(2.0)
    assert multiplier_for({0.1: 1.0, 0.2: 3.0}, np.float32(0.1)) == 1.0


def test_budget_range_needs_numeric_prompts_and_a_range():
    from agents.train import TrainConfig

    with pytest.raises(ValueError, match="budget_style 'numeric'"):
        TrainConfig(budget_range=[0.0, 0.5]).validate()
    with pytest.raises(ValueError, match=r"budget_range must be \[lo, hi\]"):
        TrainConfig(budget_range=[0.5, 0.1], env_kwargs={"budget_style": "numeric"}).validate()
    TrainConfig(budget_range=[0.0, 0.5], env_kwargs={"budget_style": "numeric"}).validate()


def test_budget_range_draws_on_its_grid_and_refuses_a_step_that_does_not_divide_it():
    from agents.train import TrainConfig, draw_budgets

    numeric = {"budget_style": "numeric"}
    config = TrainConfig(budget_range=[0.0, 0.5], budget_step=0.02, env_kwargs=numeric)
    config.validate()
    drawn = draw_budgets(config, np.random.default_rng(0), 5000)
    grid = {round(0.02 * k, 3) for k in range(26)}
    assert set(np.round(drawn, 3).tolist()) == grid  # every point of the grid, both ends included, nothing else
    assert not {0.05, 0.15, 0.25, 0.35, 0.45} & set(drawn.tolist())  # the unseen budgets stay unseen
    fine = draw_budgets(TrainConfig(budget_range=[0.1, 0.2], env_kwargs=numeric), np.random.default_rng(1), 5000)
    assert fine.min() == 0.1 and fine.max() == 0.2 and len(set(fine.tolist())) == 101  # 0.001 by default
    for step in (0.03, 0.0005, 0.0):
        with pytest.raises(ValueError, match="budget_step must be a multiple of 0.001"):
            TrainConfig(budget_range=[0.0, 0.5], budget_step=step, env_kwargs=numeric).validate()


def test_a_task_registered_with_numeric_prompts_needs_no_budget_style_in_a_config():
    from agents.train import TrainConfig
    from scripts.evaluate import EvalConfig
    from tw_env.registration import budget_style_of

    numeric_id = "TrainingWheels-SyntheticNumeric-v0"
    assert budget_style_of(numeric_id) == "numeric"
    assert budget_style_of("TrainingWheels-Synthetic-v0") == "keyword"
    assert budget_style_of("TrainingWheels-WMT19-v0") == "keyword"
    assert budget_style_of("TrainingWheels-WMT19-v0", {"budget_style": "numeric"}) == "numeric"
    TrainConfig(env_id=numeric_id, budget_range=[0.0, 0.5], budget_step=0.02).validate()
    EvalConfig(env_id=numeric_id, budgets=[0.05, 0.15]).validate()
    with pytest.raises(ValueError, match="keyword"):
        EvalConfig(env_id="TrainingWheels-Synthetic-v0", budgets=[0.05]).validate()


def test_held_out_budgets_are_never_drawn_and_a_holdout_needs_a_range():
    from agents.train import TrainConfig, draw_budgets

    numeric = {"budget_style": "numeric"}
    unseen = [0.05, 0.15, 0.25, 0.35, 0.45]
    config = TrainConfig(budget_range=[0.0, 0.5], budget_holdout=unseen, env_kwargs=numeric)
    config.validate()
    drawn = set(draw_budgets(config, np.random.default_rng(0), 200_000).tolist())
    assert not drawn & set(unseen) and {0.049, 0.051, 0.0, 0.5} <= drawn and len(drawn) == 501 - 5
    with pytest.raises(ValueError, match="set budget_range too"):
        TrainConfig(budget_holdout=[0.05], env_kwargs=numeric).validate()
    with pytest.raises(ValueError, match="leaves no budget"):
        TrainConfig(budget_range=[0.1, 0.12], budget_step=0.02, budget_holdout=[0.1, 0.12], env_kwargs=numeric).validate()


# ---------------------------------------------------------------------------------------------- the value read

def test_budget_labels_keep_the_tenths_and_never_merge_two_budgets():
    from tw_env.prompts import budget_label

    assert [budget_label(b) for b in (0.0, 0.1, 0.2, 0.5, 1.0)] == ["0.0", "0.1", "0.2", "0.5", "1.0"]
    assert [budget_label(b) for b in (0.025, 0.075, 0.15, 0.125)] == ["0.025", "0.075", "0.15", "0.125"]
    grid = [round(k * 0.001, 3) for k in range(501)]
    assert len({budget_label(b) for b in grid}) == len(grid)


def test_the_budget_basis_and_the_value_in_a_prompt_by_hand():
    import torch

    from agents.policy import BUDGET_BASIS_KNOTS, budget_basis
    from tw_env.prompts import numeric_budget_in as budget_value_in

    basis = budget_basis(torch.tensor([0.0, 0.15, 0.175, 0.5, 1.0]))
    assert basis.shape == (5, len(BUDGET_BASIS_KNOTS)) == (5, 11)
    expected = torch.zeros(5, 11, dtype=torch.float64)
    expected[0, 0] = 1.0
    expected[1, 1], expected[1, 2] = 0.5, 0.5  # 0.15: halfway between the knots 0.1 and 0.2
    expected[2, 1], expected[2, 2] = 0.25, 0.75
    expected[3, 5] = 1.0
    expected[4, 10] = 1.0
    torch.testing.assert_close(basis, expected)
    assert budget_value_in("With teacher use 0.150, translate German to English: Ein Hund.") == 0.15
    assert budget_value_in("<|user|>\nWith teacher use 0.05, summarize: x") == 0.05  # after a chat template
    assert budget_value_in("With teacher use 0 . 125 , translate") == 0.125  # spaces a decode put in
    assert budget_value_in("With teacher use 0, x") == 0.0
    assert budget_value_in("With light teacher use, translate: x") is None  # a keyword prompt
    assert budget_value_in("With teacher use 1.5, x") is None


def _value_reading_policy(t5_tokenizer_dir, tiny_t5_dir, budgets, source):
    """A fresh tiny policy that reads the budget's value with weights w (its other <τ> reads are zero), and
    numeric-fixed prompts at ``budgets``: (tokenizer, policy, w, ids, mask, states)."""
    import torch
    from transformers import AutoTokenizer

    from agents.policy import StudentPolicy

    tokenizer = AutoTokenizer.from_pretrained(t5_tokenizer_dir)
    policy = StudentPolicy.load(tiny_t5_dir).eval()
    weights = torch.linspace(-2.0, 3.0, 11)[None]
    policy.read_budget_value(tokenizer, weights)
    texts = [make_prompt("translate German to English", source, b, "numeric-fixed") for b in budgets]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    return tokenizer, policy, weights, encoded["input_ids"], encoded["attention_mask"], torch.full((len(budgets), 3), 5)


def _first_step_logits(policy, ids, mask):
    """The acting path's logits for the first action (the prompt read once per episode, no stream yet)."""
    import torch

    rows = ids.shape[0]
    obs = {"prompt_ids": ids.numpy(), "prompt_length": mask.sum(1).numpy(),
           "state_ids": np.zeros((rows, 4), dtype=np.int64), "state_length": np.zeros(rows, dtype=np.int64)}
    with torch.no_grad():
        return policy.rollout(rows, 4).logits(obs)


@pytest.mark.shared
def test_a_policy_reads_the_budget_value_between_its_knots_and_keeps_the_read(t5_tokenizer_dir, tiny_t5_dir, tmp_path):
    import torch

    from agents.policy import StudentPolicy, budget_basis, call_log_probability
    from agents.train import TrainConfig

    budgets = [0.1, 0.15, 0.2, 0.45]
    tokenizer, policy, weights, ids, mask, states = _value_reading_policy(
        t5_tokenizer_dir, tiny_t5_dir, budgets, "Ein Hund läuft.")
    with torch.no_grad():
        logits = policy(ids, mask, states, torch.ones_like(states))
    # A fresh policy's other <τ> reads are zero: its <τ> logit is the value read alone, w · basis(b) ...
    torch.testing.assert_close(logits[:, :, -1], (budget_basis(torch.tensor(budgets)).float() @ weights.T).expand(-1, 3))
    # ... so 0.15 is read halfway between 0.1 and 0.2.
    torch.testing.assert_close(logits[1, :, -1], (logits[0, :, -1] + logits[2, :, -1]) / 2)
    # The acting path (the prompt read once per episode) reads it too.
    first = _first_step_logits(policy, ids, mask)
    torch.testing.assert_close(call_log_probability(first), call_log_probability(logits[:, 0]), atol=1e-5, rtol=0)
    # Saved with its tokenizer and weights; loaded, it reads the same.
    policy.save(tmp_path / "policy")
    again = StudentPolicy.load(tmp_path / "policy").eval()
    assert again.budget_tokenizer is not None and (tmp_path / "policy" / "budget_tokenizer").is_dir()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask, states, torch.ones_like(states)), logits)
    keyword = tokenizer([make_prompt("translate German to English", "Ein Hund.", 0.1, "keyword")], return_tensors="pt")
    with pytest.raises(ValueError, match="states no numeric budget"):
        again(keyword["input_ids"], keyword["attention_mask"], states[:1], torch.ones_like(states[:1]))
    with pytest.raises(ValueError, match="read_budget_value reads the number a numeric prompt states"):
        TrainConfig(env_id="TrainingWheels-WMT19-v0", read_budget_value=True).validate()


@pytest.mark.shared
def test_a_policy_can_hide_the_budget_number_from_its_lm(t5_tokenizer_dir, tiny_t5_dir, tmp_path):
    """hide_budget_from_lm: the LM reads the number's pieces as the unknown token (nothing else changes, a number
    in the source stays), so its token logits are the same at every budget whose number has as many pieces;
    the budget then reaches π only through the value read, on the training and the acting path; the setting is
    saved with the policy; without the value read it is refused."""
    import torch

    from agents.policy import StudentPolicy, budget_basis, call_log_probability
    from agents.train import TrainConfig

    with pytest.raises(ValueError, match="call read_budget_value"):
        StudentPolicy.load(tiny_t5_dir).hide_budget()
    budgets = [0.125, 0.15, 0.375, 0.45]
    tokenizer, policy, weights, ids, mask, states = _value_reading_policy(
        t5_tokenizer_dir, tiny_t5_dir, budgets, "3 Hunde laufen.")
    given = ids.clone()
    with torch.no_grad():
        shown = policy(ids, mask, states, torch.ones_like(states))
    policy.hide_budget()
    hidden_ids = policy.lm_prompt_ids(ids)
    changed = hidden_ids != ids
    for row, b in enumerate(budgets):
        pieces = tokenizer.convert_ids_to_tokens(ids[row][changed[row]].tolist())
        assert tokenizer.convert_tokens_to_string(pieces).strip() == f"{b:.3f}"  # exactly the number's pieces
        assert (hidden_ids[row][changed[row]] == tokenizer.unk_token_id).all()
        assert "3 Hunde" in tokenizer.decode(hidden_ids[row].tolist())  # the source's own number is read
    assert changed.sum(1).unique().numel() == 1, "the test needs budgets whose numbers have as many pieces"
    assert torch.equal(policy.lm_prompt_ids(ids), hidden_ids) and torch.equal(ids, given)  # input kept
    with torch.no_grad():
        logits = policy(ids, mask, states, torch.ones_like(states))
    # The LM reads one prompt at every budget: the same token logits; a fresh policy's <τ> logit is w · basis(b).
    for row in range(1, len(budgets)):
        torch.testing.assert_close(logits[row, :, :-1], logits[0, :, :-1])
    assert not torch.allclose(shown[1, :, :-1], shown[0, :, :-1])  # shown, the LM reads the numbers
    torch.testing.assert_close(logits[:, :, -1], (budget_basis(torch.tensor(budgets)).float() @ weights.T).expand(-1, 3))
    first = _first_step_logits(policy, ids, mask)
    torch.testing.assert_close(call_log_probability(first), call_log_probability(logits[:, 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(first[:, :-1].log_softmax(-1), logits[:, 0, :-1].log_softmax(-1), atol=1e-5, rtol=0)
    policy.save(tmp_path / "policy")
    again = StudentPolicy.load(tmp_path / "policy").eval()
    assert again.hide_budget_from_lm
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask, states, torch.ones_like(states)), logits)
    # A number before the budget clause is not taken for the budget: refused, the ids left as they were.
    late = tokenizer(["3 Hunde. With teacher use 0.150, translate German to English: x"], return_tensors="pt")["input_ids"]
    kept = late.clone()
    with pytest.raises(ValueError, match=r"the first number in it \('3'\) is not the budget it states \(0.15\)"):
        again.lm_prompt_ids(late)
    assert torch.equal(late, kept)
    with pytest.raises(ValueError, match="set read_budget_value true as well"):
        TrainConfig(env_id="TrainingWheels-WMT19-v0", env_kwargs={"budget_style": "numeric-fixed"},
                    hide_budget_from_lm=True).validate()


@pytest.mark.shared
def test_a_tenths_hint_lets_the_lm_read_the_budget_rounded_down_to_a_tenth(t5_tokenizer_dir, tiny_t5_dir, tmp_path):
    """lm_budget_hint "tenths": the hidden number's first pieces write the budget rounded down to a tenth
    ("0.1" for 0.125 and 0.150), the rest stay unknown; budgets of one tenth (and as many pieces) give the LM
    one prompt, budgets of another tenth another; saved with the policy; refused where it cannot apply."""
    import torch

    from agents.policy import StudentPolicy
    from agents.train import TrainConfig

    budgets = [0.125, 0.15, 0.4, 0.45]  # pairs of one tenth whose numbers have as many pieces (T5: "▁0.", "150")
    tokenizer, policy, _, ids, mask, states = _value_reading_policy(t5_tokenizer_dir, tiny_t5_dir, budgets, "Ein Hund.")
    with pytest.raises(ValueError, match="the LM's budget hint must be one of \\['none', 'tenths'\\], got 'hundredths'"):
        policy.hide_budget("hundredths")
    assert not policy.hide_budget_from_lm  # refused: nothing changed
    policy.hide_budget("tenths")
    lm_ids = policy.lm_prompt_ids(ids)
    hidden = [tokenizer.decode(row.tolist()) for row in lm_ids]
    for text, b in zip(hidden, budgets, strict=True):
        tenth = f"{int(b * 10) / 10:.1f}"
        # The clause reads the tenth, then (where the number had more pieces) unknown tokens.
        assert f"use{tenth}," in text.replace(" ", "").replace("<unk>", "") and f"{b:.3f}" not in text
    assert torch.equal(lm_ids[0], lm_ids[1]) and torch.equal(lm_ids[2], lm_ids[3])  # one string per tenth
    assert not torch.equal(lm_ids[0], lm_ids[2])
    with torch.no_grad():
        logits = policy(ids, mask, states, torch.ones_like(states))
    torch.testing.assert_close(logits[1, :, :-1], logits[0, :, :-1])  # the LM reads one prompt per tenth
    assert not torch.allclose(logits[2, :, :-1], logits[0, :, :-1])  # and another for another tenth
    assert not torch.allclose(logits[1, :, -1], logits[0, :, -1])  # the value read still tells 0.125 from 0.15
    policy.save(tmp_path / "policy")
    again = StudentPolicy.load(tmp_path / "policy").eval()
    assert again.lm_budget_hint == "tenths" and torch.equal(again.lm_prompt_ids(ids), lm_ids)
    with pytest.raises(ValueError, match="other than 'none' only with hide_budget_from_lm true"):
        TrainConfig(env_id="TrainingWheels-WMT19-v0", env_kwargs={"budget_style": "numeric-fixed"},
                    read_budget_value=True, lm_budget_hint="tenths").validate()
    TrainConfig(env_id="TrainingWheels-WMT19-v0", env_kwargs={"budget_style": "numeric-fixed"}, read_budget_value=True,
                hide_budget_from_lm=True, lm_budget_hint="tenths").validate()
