"""The published token routers (agents.routers, agents.co_llm): Co-LLM's learnt deferral and BiLD's
fallback with rollback, for both model families.

What is checked, and against what:
- the maths against hand computations: Co-LLM's marginal likelihood on a two-token example (and which way
  its gradient moves the deferral logit), its pseudo-labels, the deferral decision at η, and BiLD's
  rollback position on constructed negative log-likelihoods;
- the BiLD decoder against a plain reference written from the official loop (batch size 1, one full
  forward without a cache per step, rollback by slicing a list): the same outputs, the same provenance and
  the same wasted tokens over a grid of (α_FB, α_RB, small_iters); batched = each row alone; its extremes
  (α_FB > 1 is the teacher's greedy output);
- the Co-LLM router's teacher-forced pass against full forwards; its decoder against the rule on full
  forwards (the teacher writes exactly where σ(w·h_t) > η); batched = each row alone; η = 1 and 0;
- `tw co-llm` end to end on a tiny task: the initialisation fits the pseudo-labels, the marginal NLL
  falls, a crash after a checkpoint resumes to the same router bit for bit, the router loads back.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from agents import co_llm
from agents.co_llm import CoLLMConfig
from agents.objectives import bild_rollback_position, collm_defers, collm_marginal_nll, collm_pseudo_labels
from agents.routers import ROUTER_WEIGHTS, CoLLMRouter, bild_decode, co_llm_decode
from tests.helpers import assert_same_rows, check_well_formed, per_row, single_rows
from tests.test_decoding import MAX_NEW, greedy, prompts, student, teacher  # noqa: F401  (fixtures)
from tests.test_gkd import synthetic_factory_importable, task  # noqa: F401  (fixtures)
from tests.tiny_task import EOS

# --------------------------------------------------------------------------------------------- the maths


def test_co_llm_marginal_likelihood_by_hand():
    # token 1: σ(0) = ½, p_s = 0.2, p_t = 0.6 → −log(0.5·0.2 + 0.5·0.6) = −log 0.4
    # token 2: σ(log 3) = 0.75, p_s = 0.5, p_t = 0.1 → −log(0.25·0.5 + 0.75·0.1) = −log 0.2
    # token 3 is padding: any values, not counted
    d = torch.tensor([[0.0, math.log(3.0), 7.0]], requires_grad=True)
    student_logprobs = torch.log(torch.tensor([[0.2, 0.5, 0.9]]))
    teacher_logprobs = torch.log(torch.tensor([[0.6, 0.1, 0.9]]))
    mask = torch.tensor([[True, True, False]])
    loss = collm_marginal_nll(d, student_logprobs, teacher_logprobs, mask)
    assert loss.item() == pytest.approx((-math.log(0.4) - math.log(0.2)) / 2, rel=1e-6)
    loss.backward()
    # More deferral helps where the teacher gives the token the higher probability, and hurts elsewhere.
    assert d.grad[0, 0] < 0 < d.grad[0, 1] and d.grad[0, 2] == 0
    # d/dd of −log(σ(d) p_t + σ(−d) p_s) at d = 0: −σ'(0)(p_t − p_s)/p(x) = −0.25·0.4/0.4 / 2 tokens
    assert d.grad[0, 0].item() == pytest.approx(-0.25 / 2, rel=1e-5)


def test_co_llm_pseudo_labels_and_deferral_decision():
    targets = torch.tensor([[2, 0, 1]])
    student_logits = torch.tensor([[[0.0, 1.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])  # argmax 1, 0, 2
    teacher_logits = torch.tensor([[[0.0, 0.0, 2.0], [0.0, 4.0, 0.0], [0.0, 1.0, 0.0]]])  # argmax 2, 1, 1
    # 1 only where the teacher is right and the student wrong: token 1 (teacher 2 = target, student 1)
    # and token 3 (teacher 1 = target, student 2); token 2: the student is right.
    assert collm_pseudo_labels(student_logits, teacher_logits, targets).tolist() == [[1.0, 0.0, 1.0]]
    d = torch.tensor([math.log(0.3 / 0.7) - 1e-4, math.log(0.3 / 0.7) + 1e-4, 40.0, -40.0])
    assert collm_defers(d, 0.3).tolist() == [False, True, True, False]
    assert not collm_defers(d, 1.0).any() and collm_defers(d, 0.0).all()
    with pytest.raises(ValueError, match="η must lie in"):
        collm_defers(d, 1.5)


def test_bild_rollback_position_by_hand():
    nll = torch.tensor([[0.1, 6.0, 0.2], [0.1, 0.2, 9.0], [3.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    # row 0: s_2 is over α_RB = 5: keep 1 (s_2, s_3 wasted); row 1: its third slot is not a token: keep
    # both; row 2: nothing over 5: keep all 3.
    assert bild_rollback_position(nll, valid, 5.0).tolist() == [1, 2, 3]
    assert bild_rollback_position(nll, valid, 7.0).tolist() == [3, 2, 3]
    assert bild_rollback_position(nll, valid, 0.0).tolist() == [0, 0, 0]
    # A token that is the large model's own argmax is never rolled back; the next one over α_RB is.
    argmax = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    assert bild_rollback_position(nll, valid, 0.0, large_argmax=argmax).tolist() == [1, 0, 3]
    with pytest.raises(ValueError, match="α_RB"):
        bild_rollback_position(nll, valid, -1.0)


# --------------------------------------------------------------------------------------------- BiLD


def reference_bild(family, small, large, prompt: list[int], fallback: float, rollback: float, small_iters: int):
    """The official loop for one prompt, on full forwards (no cache): (outputs, from-large flags, wasted)."""
    out: list[int] = []
    flags: list[bool] = []
    wasted, run, large_next, unchecked_from = 0, 0, True, 0
    while len(out) < MAX_NEW and (not out or out[-1] != EOS):
        if not large_next:
            probs = family.next_logits(small, prompt, out).softmax(-1)
            if fallback <= 1.0 and probs.max() >= fallback:
                out.append(int(probs.argmax()))
                flags.append(False)
                run += 1
                large_next = run == small_iters
            else:
                large_next = True  # the small model's token is dropped
            continue
        logp = family.output_logits(large, prompt, [*out, 0]).log_softmax(-1)  # entry p predicts output p
        first_bad = next((p for p in range(unchecked_from, len(out))
                          if -logp[p, out[p]] > rollback and int(logp[p].argmax()) != out[p]), None)
        if first_bad is None:
            out.append(int(logp[len(out)].argmax()))
            flags.append(True)
            large_next = False
        else:
            wasted += len(out) - first_bad
            out, flags = [*out[:first_bad], int(logp[first_bad].argmax())], [*flags[:first_bad], True]
            large_next = True  # the large model writes the token after its replacement too
        run, unchecked_from = 0, len(out)
    return out, flags, wasted


@pytest.mark.parametrize("fallback, rollback, small_iters", [(0.6, 5.0, 10), (0.3, 1.0, 4), (0.0, 0.5, 3), (0.5, 0.0, 2)])
def test_bild_follows_the_official_loop_and_batches_exactly(family, teacher, student, prompts,  # noqa: F811
                                                            fallback, rollback, small_iters):
    batched = bild_decode(student, teacher, *prompts, MAX_NEW, fallback, rollback, small_iters)
    check_well_formed(batched, MAX_NEW)
    single = per_row(lambda i, m: bild_decode(student, teacher, i, m, MAX_NEW, fallback, rollback, small_iters), prompts)
    assert_same_rows(batched, single)
    for (ids, _), out, flags, wasted in zip(single_rows(prompts), batched.output_ids, batched.from_teacher,
                                           batched.wasted_tokens, strict=True):
        assert (out, flags, wasted) == reference_bild(family, student, teacher, ids[0].tolist(), fallback, rollback,
                                                      small_iters)
    assert batched.teacher_forwards >= 1 and batched.student_forwards >= 1


def test_bild_rolls_back_and_counts_the_waste(family, teacher, student, prompts):  # noqa: F811
    # Never falling back, rolling back at any token the large model would not have written: every
    # checked small token is the large model's, and what the small model wrote otherwise is wasted.
    result = bild_decode(student, teacher, *prompts, MAX_NEW, 0.0, 0.0, 3)
    assert sum(result.wasted_tokens) > 0
    lenient = bild_decode(student, teacher, *prompts, MAX_NEW, 0.0, math.inf, 3)
    assert sum(lenient.wasted_tokens) == 0
    # Without rollback the large model writes the first token and one after every small_iters small ones.
    for out, flags in zip(lenient.output_ids, lenient.from_teacher, strict=True):
        assert flags == [i % 4 == 0 for i in range(len(out))]


def test_bild_extremes(family, teacher, student, prompts):  # noqa: F811
    always = bild_decode(student, teacher, *prompts, MAX_NEW, 1.01, 5.0, 10)
    assert always.output_ids == greedy(family, teacher, prompts)
    assert all(all(f) for f in always.from_teacher) and sum(always.wasted_tokens) == 0
    with pytest.raises(ValueError, match="small_iters"):
        bild_decode(student, teacher, *prompts, MAX_NEW, 0.6, 5.0, 0)
    with pytest.raises(ValueError, match="α_FB"):
        bild_decode(student, teacher, *prompts, MAX_NEW, -0.1, 5.0, 10)


# --------------------------------------------------------------------------------------------- Co-LLM


def router_with_head(student, bias_std: float, seed: int = 0) -> CoLLMRouter:  # noqa: F811
    router = CoLLMRouter(student).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.deferral.weight.copy_(torch.randn(router.deferral.weight.shape, generator=generator) * bias_std)
    return router


def full_states(family, model, prompt: list[int], outputs: list[int]) -> torch.Tensor:
    """``[len(outputs), d]``: the final state from which output token p is predicted, by one full forward."""
    context, first = family.stream_start(model, prompt)
    embeds = model.get_input_embeddings()(torch.tensor([first, *outputs[:-1]]))
    return family._stream(model, context, embeds)[0]


def test_co_llm_router_reads_the_states_of_full_forwards(family, teacher, student, prompts):  # noqa: F811
    router = router_with_head(student, 1.0)
    outputs = [greedy(family, teacher, prompts)[i] for i in range(len(prompts[0]))]
    width = max(len(o) for o in outputs)
    tokens = torch.tensor([o + [0] * (width - len(o)) for o in outputs])
    with torch.no_grad():
        logits, deferral = router(*prompts, tokens)
    for row, ((ids, _), out) in enumerate(zip(single_rows(prompts), outputs, strict=True)):
        want = family.output_logits(student, ids[0].tolist(), out)
        torch.testing.assert_close(logits[row, : len(out)], want, rtol=1e-4, atol=1e-4)
        states = full_states(family, student, ids[0].tolist(), out)
        torch.testing.assert_close(deferral[row, : len(out)], router.deferral_logits(states), rtol=1e-4, atol=1e-4)


def test_co_llm_decode_defers_exactly_above_eta(family, teacher, student, prompts):  # noqa: F811
    router = router_with_head(student, 3.0, seed=1)
    never = co_llm_decode(router, teacher, *prompts, MAX_NEW, 1.0)
    assert never.output_ids == greedy(family, student, prompts) and never.teacher_forwards == 0
    always = co_llm_decode(router, teacher, *prompts, MAX_NEW, 0.0)
    assert always.output_ids == greedy(family, teacher, prompts) and all(all(f) for f in always.from_teacher)
    batched = co_llm_decode(router, teacher, *prompts, MAX_NEW, 0.5)
    check_well_formed(batched, MAX_NEW)
    assert any(0 < c < len(o) for c, o in zip(batched.teacher_calls, batched.output_ids, strict=True))
    assert_same_rows(batched, per_row(lambda i, m: co_llm_decode(router, teacher, i, m, MAX_NEW, 0.5), prompts))
    for (ids, _), out, flags in zip(single_rows(prompts), batched.output_ids, batched.from_teacher, strict=True):
        with torch.no_grad():
            probability = torch.sigmoid(router.deferral_logits(full_states(family, student, ids[0].tolist(), out)))
        assert flags == (probability > 0.5).tolist()
        own = family.output_logits(student, ids[0].tolist(), out).argmax(-1).tolist()
        theirs = family.output_logits(teacher, ids[0].tolist(), out).argmax(-1).tolist()
        assert out == [t if f else s for s, t, f in zip(own, theirs, flags, strict=True)]


# --------------------------------------------------------------------------------------------- tw co-llm


def co_llm_config(task, output_dir, **overrides) -> CoLLMConfig:  # noqa: F811
    values = dict(env_kwargs=task["env_kwargs"], eval_env_kwargs=task["eval_env_kwargs"], output_dir=str(output_dir),
                  device="cpu", threads=1, init_batches=3, batches=3, batch_size=16, init_lr=0.05, lr=3e-3,
                  eval_every=3, eval_examples=512, checkpoint_every=2)
    values.update(overrides)
    return CoLLMConfig(**values)


def test_co_llm_training_fits_and_resumes_exactly(task, tmp_path, monkeypatch):  # noqa: F811
    reference = co_llm.run(co_llm_config(task, tmp_path / "reference"))
    steps = [e["step"] for e in reference["evaluations"]]
    assert steps == [3, 6] and reference["eval_examples"] == 40
    # The initialisation moves P(teacher) off ½ towards the pseudo-label rate; the marginal NLL then falls.
    start = co_llm.run(co_llm_config(task, tmp_path / "untrained", init_batches=0, batches=0))["evaluations"][0]
    after_init, after_all = reference["evaluations"]
    assert start["defer_probability"] == pytest.approx(0.5)
    assert abs(after_init["defer_probability"] - after_init["pseudo_label_rate"]) < abs(0.5 - after_init["pseudo_label_rate"])
    assert after_all["nll"] < after_init["nll"] < start["nll"]
    # A crash after the checkpoint at batch 4 (inside phase 2); the re-run resumes from it.
    write = co_llm.ckpt.write_checkpoint

    def write_then_crash(run_dir, step, writer, keep=2):
        path = write(run_dir, step, writer, keep)
        if step == 4:
            raise KeyboardInterrupt("killed after the checkpoint")
        return path

    monkeypatch.setattr(co_llm.ckpt, "write_checkpoint", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        co_llm.run(co_llm_config(task, tmp_path / "killed"))
    monkeypatch.setattr(co_llm.ckpt, "write_checkpoint", write)
    resumed = co_llm.run(co_llm_config(task, tmp_path / "killed"))
    assert resumed["evaluations"] == reference["evaluations"] and resumed["best"] == reference["best"]
    for name in ("model.safetensors", ROUTER_WEIGHTS):
        want, got = load_file(tmp_path / "reference" / "final" / name), load_file(tmp_path / "killed" / "final" / name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    loaded = CoLLMRouter.load(tmp_path / "reference" / "best")
    assert loaded.deferral.weight.abs().sum() > 0 and not loaded.training


def test_co_llm_config_and_router_errors(tmp_path, task):  # noqa: F811
    with pytest.raises(ValueError, match="batch_size"):
        CoLLMConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="init_lr"):
        CoLLMConfig(init_lr=0.0).validate()
    with pytest.raises(FileNotFoundError, match="no Co-LLM deferral head"):
        CoLLMRouter.load(task["env_kwargs"]["student"])


def test_frozen_student_trains_the_head_only(task, tmp_path):  # noqa: F811
    co_llm.run(co_llm_config(task, tmp_path / "frozen", train_student=False, init_batches=1, batches=2, eval_every=0))
    want = load_file(task["env_kwargs"]["student"] + "/model.safetensors")
    got = load_file(tmp_path / "frozen" / "final" / "model.safetensors")
    assert want.keys() & got.keys() and all(torch.equal(want[k], got[k]) for k in want.keys() & got.keys())
