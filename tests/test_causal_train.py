"""Training Wheels training on decoder-only (causal LM) pairs: the KL-ranked oracle, phases 1 and 2
end to end, and kill-and-resume, as tests/test_train.py checks them on T5.

The oracle is checked for both families against a hand computation that shares nothing with the
batched code: each row alone, unpadded, the teacher decoded greedily by one full forward (no cache)
per token on its own prompt C^(T), the student's distribution from one plain full forward of its LM
over the row (tests/test_causal_agents.py's ``manual_policy_logits``), KL(teacher ‖ student over V)
per position, and the top ⌊l·b⌋ positions (ties: the earlier one).
"""

from __future__ import annotations

import json
import math
import signal
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from transformers import Qwen2ForCausalLM

from agents.policy import StudentPolicy
from agents.train import TrainConfig, run
from agents.trajectories import collect_on_policy, oracle_batch
from tests.test_causal_agents import manual_policy_logits
from tests.test_train import _launch, weights
from tests.tiny_task import make_tiny_causal_task, tiny_causal_lm, tiny_t5

ENV_ID = "TrainingWheels-Synthetic-v0"
EOS = 1


# --------------------------------------------------------------------------------------------- the oracle

V = 64
MAX_NEW = 7


def random_prompts(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random prompts (ids ≥ 2: no pad, no EOS) of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(2, V, (n,), generator=generator)
        mask[i, :n] = 1
    return ids, mask


@torch.no_grad()
def teacher_greedy_by_full_forwards(teacher, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """One unpadded row: the teacher's greedy output (up to EOS or MAX_NEW) and its logits ``[T, V]``,
    one full forward per token without any cache."""
    out, logits = [], []
    for _ in range(MAX_NEW):
        if teacher.config.is_encoder_decoder:
            step = teacher(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[0, *out]])).logits[0, -1]
        else:
            step = teacher(input_ids=torch.tensor([prompt + out])).logits[0, -1]
        logits.append(step[:V])
        out.append(int(step[:V].argmax()))
        if out[-1] == EOS:
            break
    return out, torch.stack(logits)


@torch.no_grad()
def student_logits_by_full_forward(policy: StudentPolicy, prompt: list[int], output: list[int]) -> torch.Tensor:
    """π's logits over V for one unpadded row whose every token is the student's own (what the oracle ranks)."""
    if policy.model.config.is_encoder_decoder:
        # A fresh T5 policy's token logits are its LM's (the prompt summary starts at zero).
        return policy.model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[0, *output[:-1]]])).logits[0]
    return manual_policy_logits(policy, prompt, output)[:, :V]


def hand_oracle_calls(teacher_logits: torch.Tensor, student_logits: torch.Tensor, budget: float) -> list[int]:
    """The top ⌊l·b⌋ positions by KL(teacher ‖ student), ties to the earlier position, by hand."""
    log_p, log_q = torch.log_softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).tolist()
    k = math.floor(Fraction(str(budget)) * len(kl))
    return sorted(sorted(range(len(kl)), key=lambda i: (-kl[i], i))[:k])


@pytest.fixture(params=["decoder-only", "encoder-decoder"])
def oracle_pair(request):
    """(teacher, policy): a Llama teacher and a Qwen2 policy with every Training Wheels part random, or two T5s."""
    if request.param == "encoder-decoder":
        return tiny_t5(V, 32, 2, seed=5), StudentPolicy(tiny_t5(V, 16, 1, seed=6)).eval()
    teacher = tiny_causal_lm(V, 32, 2, seed=5, arch="llama", initializer_range=0.3)
    policy = StudentPolicy(tiny_causal_lm(V, 16, 1, seed=6, arch="qwen2", tied=True, initializer_range=0.2)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        policy.prompt_summary.weight.normal_(std=0.3)  # the student's ranking distribution reads it
        policy.state_embedding.beta.normal_()  # and not β: the oracle reads every token as the student's
    return teacher, policy


def test_the_oracle_equals_a_hand_computation_with_full_forwards(oracle_pair):
    """Rows of different prompt lengths; the teacher reads its own prompts C^(T) (other lengths, other
    tokens), the student its prompts Y; budgets 0.5 and 0.3 give one to three calls per row."""
    teacher, policy = oracle_pair
    prompt_ids, prompt_mask = random_prompts([4, 9, 1, 6], seed=1)
    teacher_ids, teacher_mask = random_prompts([7, 2, 5, 11], seed=2)
    budgets = torch.tensor([0.5, 0.3, 0.5, 0.3])
    oracle = oracle_batch(teacher, policy, prompt_ids, prompt_mask, budgets, MAX_NEW, EOS,
                          teacher_prompts=(teacher_ids, teacher_mask))
    traj = oracle.trajectories
    calls_seen = 0
    for b in range(4):
        prompt = prompt_ids[b, : int(prompt_mask[b].sum())].tolist()
        teacher_prompt = teacher_ids[b, : int(teacher_mask[b].sum())].tolist()
        output, teacher_logits = teacher_greedy_by_full_forwards(teacher, teacher_prompt)
        student_logits = student_logits_by_full_forward(policy, prompt, output)
        calls = hand_oracle_calls(teacher_logits, student_logits, float(budgets[b]))
        n = len(output)
        assert traj.mask[b].tolist() == [True] * n + [False] * (traj.mask.shape[1] - n)
        assert bool(traj.truncated[b]) == (output[-1] != EOS)
        assert torch.nonzero(traj.is_call[b]).flatten().tolist() == calls
        expected_state = [t + V if i in calls else t for i, t in enumerate(output)]
        assert traj.state_ids[b, :n].tolist() == expected_state
        assert traj.actions[b, :n].tolist() == [V if i in calls else t for i, t in enumerate(output)]
        expected_logprob = torch.log_softmax(teacher_logits, -1).gather(1, torch.tensor(output)[:, None]).squeeze(1)
        torch.testing.assert_close(traj.teacher_logprob[b, :n], expected_logprob, atol=1e-4, rtol=0)
        torch.testing.assert_close(oracle.teacher_logits[b, :n], teacher_logits, atol=1e-4, rtol=0)
        calls_seen += len(calls)
    assert calls_seen >= 4
    # The batch's widths: prompts are the student's, the episode as long as the longest row.
    assert torch.equal(traj.prompt_ids, prompt_ids) and traj.state_ids.shape[1] == int(traj.mask.sum(1).max())


# --------------------------------------------------------------------------------------------- the trainer


def make_eager_to_end_causal_student(task_dir: Path, target: Path) -> Path:
    """A causal student (an untied Qwen2 like the task's) whose EOS probability swings with its state,
    so that sampled episodes of one batch end at different times (as tests/tiny_task.py's T5 one).

    The final norm keeps one dimension h₀ and the LM head reads only that one, into EOS alone."""
    tied = Qwen2ForCausalLM.from_pretrained(task_dir)
    config = tied.config
    config.tie_word_embeddings = False
    model = Qwen2ForCausalLM(config).eval()
    model.load_state_dict(tied.state_dict(), strict=False)  # the embeddings; the head is rewritten below
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOS, 0] = -6.0
    model.save_pretrained(target)
    return Path(target)


@pytest.fixture(scope="module")
def causal_tiny(tmp_path_factory):
    return make_tiny_causal_task(tmp_path_factory.mktemp("tiny-causal"))


@pytest.fixture(scope="module")
def causal_early_end_kwargs(causal_tiny, tmp_path_factory) -> dict:
    student = make_eager_to_end_causal_student(causal_tiny.student_dir, tmp_path_factory.mktemp("eager") / "student")
    return {**causal_tiny.env_kwargs(), "student": str(student)}


def causal_config(tiny, out: Path, **overrides) -> TrainConfig:
    base = dict(
        env_id=ENV_ID, env_kwargs=tiny.env_kwargs(), output_dir=str(out), max_new_tokens=6, bc_batches=3,
        bc_batch_size=6, pcl_batches=4, num_envs=6, eval_every=0, eval_examples=8, checkpoint_every=2, tau=0.1,
        policy_lr=1e-3, value_lr=1e-3, bc_lr=1e-3, replay_per_update=4, threads=1, device="cpu",
    )
    base.update(overrides)
    return TrainConfig(**base)


def test_the_early_end_causal_student_ends_rows_at_different_times(causal_early_end_kwargs):
    import gymnasium as gym

    envs = gym.make_vec(ENV_ID, num_envs=6, vectorization_mode="vector_entry_point", max_new_tokens=12,
                        **causal_early_end_kwargs)
    policy = StudentPolicy.load(causal_early_end_kwargs["student"])
    lengths = set()
    for k in range(3):
        batch, ends = collect_on_policy(envs, policy, [0.1] * 6, list(range(6 * k, 6 * k + 6)),
                                        torch.Generator().manual_seed(k))
        lengths |= set(batch.mask.sum(dim=1).tolist())
        # The batch is what the env emitted: X^(out) of each row, calls marked as teacher tokens.
        for row, end in enumerate(ends):
            n = int(batch.mask[row].sum())
            assert (batch.state_ids[row, :n] % policy.vocab_size).tolist() == list(end["output_ids"])
    assert len(lengths) >= 3 and min(lengths) < 12, lengths


def test_both_phases_run_on_a_causal_pair_and_select_a_policy(causal_tiny, tmp_path):
    summary = run(causal_config(causal_tiny, tmp_path, eval_every=2))
    assert summary["phase1"]["batches"] == 3 and summary["phase2"]["batches"] == 4
    best = summary["phase2"]["selection"]["best"]
    assert best is not None and len(best["results"]) == 6
    assert len(summary["phase2"]["selection"]["evaluations"]) == 3  # steps 0, 2 and 4
    assert (tmp_path / "best" / "selection.json").exists()
    # Phase 1 moved the student's LM, phase 2 moved it again.
    from safetensors.torch import load_file

    student = load_file(str(causal_tiny.student_dir / "model.safetensors"))
    phase1, final = weights(tmp_path / "phase1"), weights(tmp_path / "final")
    assert any(not torch.equal(student[k], phase1[k]) for k in student)
    assert any(not torch.equal(phase1[k], final[k]) for k in phase1)
    for name in ("phase1", "final", "best"):
        assert StudentPolicy.load(tmp_path / name, family="decoder-only").family.name == "decoder-only"


def test_same_seed_twice_gives_identical_causal_phase2(causal_tiny, causal_early_end_kwargs, tmp_path):
    overrides = dict(env_kwargs=causal_early_end_kwargs, max_new_tokens=12, bc_batches=2, pcl_batches=3, eval_every=2,
                     oracle_rounding="stochastic", lagrange_floor=-1.0, lagrange_lr=0.5)
    first = run(causal_config(causal_tiny, tmp_path / "first", **overrides))["phase2"]
    second = run(causal_config(causal_tiny, tmp_path / "second", **overrides))["phase2"]
    assert first["lambdas"] == second["lambdas"]
    assert first["reward_normalisers"] == second["reward_normalisers"]
    assert first["selection"]["evaluations"] == second["selection"]["evaluations"]
    a, b = weights(tmp_path / "first" / "final"), weights(tmp_path / "second" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_causal_run_resumes_exactly(causal_tiny, causal_early_end_kwargs, tmp_path):
    """SIGKILL a causal run right after its first phase-2 checkpoint; the resumed run ends bit-identical
    (its rows end at different times: the early-end path)."""
    overrides = dict(bc_batches=2, pcl_batches=6, checkpoint_every=2, oracle_rounding="stochastic", lagrange_floor=-1.0,
                     env_kwargs=causal_early_end_kwargs, max_new_tokens=12)
    reference = causal_config(causal_tiny, tmp_path / "reference", **overrides)
    proc = _launch(reference, tmp_path / "reference.json")
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]

    interrupted = causal_config(causal_tiny, tmp_path / "interrupted", **overrides)
    proc = _launch(interrupted, tmp_path / "interrupted.json")
    pointer = tmp_path / "interrupted" / "phase2-checkpoints" / "latest"
    deadline = time.time() + 600
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "interrupted" / "final").exists()
    proc = _launch(interrupted, tmp_path / "interrupted.json")
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]

    a, b = weights(tmp_path / "reference" / "final"), weights(tmp_path / "interrupted" / "final")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    summary_a = json.loads((tmp_path / "reference" / "summary.json").read_text())["phase2"]
    summary_b = json.loads((tmp_path / "interrupted" / "summary.json").read_text())["phase2"]
    assert summary_a["lambdas"] == summary_b["lambdas"]
    assert summary_a["reward_normalisers"] == summary_b["reward_normalisers"]
