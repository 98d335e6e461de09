"""Padded batches of episodes, the KL-ranked oracle (§2.4.1), on-policy rollouts, and the replay buffer.

An episode is stored with its *raw* reward parts (teacher log-likelihood, whether each step was a
call, the budget), not with rewards: Eq. 17 depends on λ_b and on the normalisers, which move
during training, so rewards are recomputed from the raw parts whenever an episode is replayed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from agents.decoding import generation_model
from agents.objectives import (
    TeacherDistribution,
    oracle_call_mask,
    teacher_distribution,
    teacher_student_kl_fast,
)
from agents.policy import StudentPolicy, choose_actions
from tw_env.families import family_of
from tw_env.vector_env import TeacherAssistedDecodingVectorEnv


@dataclass
class Trajectories:
    """B episodes, padded. Positions i < length are valid; ``state_ids`` is X^(in) (teacher tokens + V)."""

    prompt_ids: torch.Tensor  # [B, L] long
    prompt_mask: torch.Tensor  # [B, L] long
    state_ids: torch.Tensor  # [B, T] long, X^(in)
    actions: torch.Tensor  # [B, T] long: the token, or V for <τ>
    teacher_logprob: torch.Tensor  # [B, T] float: log p of the emitted token (the teacher's own on a call)
    is_call: torch.Tensor  # [B, T] bool
    mask: torch.Tensor  # [B, T] bool
    budget: torch.Tensor  # [B] float
    truncated: torch.Tensor  # [B] bool: ended at max_new_tokens without EOS (bootstrap the value)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def to(self, device: torch.device) -> Trajectories:
        return Trajectories(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, index: torch.Tensor | list[int]) -> Trajectories:
        index = torch.as_tensor(index, dtype=torch.long)
        return Trajectories(**{f.name: getattr(self, f.name)[index.to(getattr(self, f.name).device)] for f in fields(self)})

    @staticmethod
    def concat(parts: list[Trajectories]) -> Trajectories:
        """Concatenate batches, padding prompts and episodes to the longest."""
        prompt_width = max(p.prompt_ids.shape[1] for p in parts)
        width = max(p.state_ids.shape[1] for p in parts)
        out = {}
        for f in fields(Trajectories):
            tensors = []
            for p in parts:
                t = getattr(p, f.name)
                if t.dim() == 2:
                    target = prompt_width if f.name.startswith("prompt") else width
                    t = torch.nn.functional.pad(t, (0, target - t.shape[1]))
                tensors.append(t)
            out[f.name] = torch.cat(tensors)
        return Trajectories(**out)

    def teacher_fraction_by_budget(self) -> dict[float, tuple[int, int]]:
        """{budget: (calls, tokens)} over the batch (token-level, as Eq. 17 balances it)."""
        result: dict[float, tuple[int, int]] = {}
        for b in torch.unique(self.budget).tolist():
            rows = self.budget == b
            calls = int((self.is_call & self.mask)[rows].sum())
            tokens = int(self.mask[rows].sum())
            result[round(b, 6)] = (calls, tokens)
        return result


@dataclass
class OracleBatch:
    """Teacher trajectories with the oracle's call positions, and what phase 1 and PCL need of them."""

    trajectories: Trajectories
    teacher_logits: torch.Tensor  # [B, T, V]
    # the teacher's log p, p and Σ p log p at the N valid positions (row-major): what the oracle ranked by,
    # kept so that the phase-1 loss does not compute them again
    teacher_distribution: TeacherDistribution


@torch.no_grad()
def oracle_batch(
    teacher: PreTrainedModel, policy: StudentPolicy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
    budgets: torch.Tensor, max_new_tokens: int, eos_token_id: int, round_up_draws: torch.Tensor | None = None,
    teacher_prompts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> OracleBatch:
    """The oracle of §2.4.1 on the teacher's greedy trajectories.

    The teacher decodes greedily; at each position the KL between the teacher and the student
    (renormalised over V) ranks the positions, and the top ⌊l·b⌋ become <τ> calls (notes.md 1–2).
    The student's distribution for the ranking is read with every token as its own (no call
    markers): which positions become calls is what is being decided.

    Either model family: a causal teacher reads C^(T) followed by its output, as in the env
    (``generate`` gets the prompts as :meth:`~tw_env.families.ModelFamily.generation_inputs` says).

    ``round_up_draws`` switches ⌊l·b⌋ to stochastic rounding (see
    :func:`~agents.objectives.oracle_call_mask`); ``teacher_prompts`` (ids, mask) are the teacher's
    prompts C^(T), by default the student's.
    """
    vocab = policy.vocab_size
    teacher_ids, teacher_mask = teacher_prompts if teacher_prompts is not None else (prompt_ids, prompt_mask)
    family = family_of(teacher)
    # The prompts are right-padded; a causal teacher continues the end of its input, so generate gets them
    # left-padded (the family says how; T5's encoder reads right padding as it is).
    generate_ids, generate_mask = family.generation_inputs(teacher_ids, teacher_mask)
    generated = generation_model(teacher).generate(
        input_ids=generate_ids, attention_mask=generate_mask, max_new_tokens=max_new_tokens, do_sample=False,
        num_beams=1, output_logits=True, return_dict_in_generate=True,
    )
    # .to: a teacher spread over devices (device_map) returns on its own devices.
    output = family.generated_tokens(generated.sequences, generate_ids.shape[1]).to(prompt_ids.device)
    teacher_logits = torch.stack(generated.logits, dim=1)[..., :vocab].float().to(prompt_ids.device)
    width = output.shape[1]
    is_eos = output == eos_token_id
    # Valid up to and including the first EOS (generate pads finished rows after it).
    after_eos = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = after_eos == 0
    output = output.masked_fill(~mask, 0)
    truncated = ~is_eos.any(dim=1)
    student_logits = policy.token_logits(prompt_ids, prompt_mask, output, mask.long())
    # The valid positions only (short outputs pad most of a batch), the teacher's log-softmax once for both
    # reads, and the KL in its three-pass form (agents.objectives.teacher_student_kl_fast).
    distribution = teacher_distribution(torch.log_softmax(teacher_logits[mask], dim=-1))
    teacher_log_probs = distribution.log_probs
    kl = torch.zeros(mask.shape, dtype=teacher_log_probs.dtype, device=mask.device)
    # (teacher_log_probs stands in for the teacher's logits: only their shape is read when the distribution is given)
    kl[mask] = teacher_student_kl_fast(teacher_log_probs, student_logits[mask], distribution)
    calls = oracle_call_mask(kl, mask, budgets, round_up_draws)
    teacher_logprob = torch.zeros_like(kl)
    teacher_logprob[mask] = teacher_log_probs.gather(-1, output[mask][:, None]).squeeze(-1)
    trajectories = Trajectories(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        state_ids=torch.where(calls, output + vocab, output),
        actions=torch.where(calls, torch.full_like(output, vocab), output),
        teacher_logprob=teacher_logprob, is_call=calls, mask=mask,
        budget=budgets.float(), truncated=truncated,
    )
    assert trajectories.state_ids.shape[1] == width
    return OracleBatch(trajectories, teacher_logits, distribution)


@torch.no_grad()
def collect_on_policy(
    envs: TeacherAssistedDecodingVectorEnv, policy: StudentPolicy, budgets: list[float], indices: list[int],
    generator: torch.Generator, temperature: float = 1.0, call_thresholds: Sequence[float] | None = None,
) -> tuple[Trajectories, list[dict[str, Any]]]:
    """One episode per row of the vector env, sampled from π; returns the batch and the end infos.

    ``call_thresholds`` (one per row): act greedily instead, as the shipped decoder does (call iff
    π(<τ>) > the row's threshold, else the top token; ``temperature`` and ``generator`` unused).

    The env runs without autoreset for this batch (one episode per row): a row that finishes early
    waits, its actions ignored, until the slowest row ends. No episode is started that would be
    discarded, so nothing outside the batch reaches the env's reward normalisers or its RNG.
    """
    device = policy.device
    n = envs.num_envs
    obs, _ = envs.reset(options={"budget": list(budgets), "index": list(indices), "autoreset": False})
    prompt_length = obs["prompt_length"][:, 0].copy()
    prompt_ids = obs["prompt_ids"][:, : max(int(prompt_length.max()), 1)].copy()
    rollout = policy.rollout(n, envs.max_new_tokens)
    if call_thresholds is not None and len(call_thresholds) != n:
        raise ValueError(f"call_thresholds needs one threshold per row of the vector env ({n}), got {len(call_thresholds)}")
    greedy_thresholds = None if call_thresholds is None else torch.tensor(list(call_thresholds), dtype=torch.float32)
    done = np.zeros(n, dtype=bool)
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    finals: list[dict[str, Any] | None] = [None] * n
    was_truncated = np.zeros(n, dtype=bool)
    while not done.all():
        if greedy_thresholds is None:
            actions = choose_actions(rollout.logits(obs), temperature, generator).cpu().numpy()
        else:
            actions = choose_actions(rollout.logits(obs), 0.0, call_threshold=greedy_thresholds).cpu().numpy()
        obs, _, terminated, truncated, info = envs.step(actions)
        steps.append((actions, info["teacher_logprob"].copy(), done.copy()))
        for row in np.flatnonzero((terminated | truncated) & ~done):
            finals[row] = {k: info[k][row] for k in ("output_ids", "output_text", "teacher_fraction", "reference")}
            was_truncated[row] = bool(truncated[row])
        done |= terminated | truncated
    ends: list[dict[str, Any]] = []
    for i, final in enumerate(finals):
        if final is None:  # every row is done, and a row's info is kept as it ends
            raise RuntimeError(f"row {i} of the vector env ended without its end-of-episode info")
        ends.append(final)
    lengths = np.array([len(f["output_ids"]) for f in ends])
    width = int(lengths.max())
    actions = np.stack([s[0] for s in steps], axis=1)[:, :width]
    logprob = np.stack([s[1] for s in steps], axis=1)[:, :width]
    valid = np.arange(width)[None, :] < lengths[:, None]
    output = np.zeros((n, width), dtype=np.int64)
    for i, f in enumerate(ends):
        output[i, : lengths[i]] = f["output_ids"]
    vocab = policy.vocab_size
    is_call = (actions == vocab) & valid
    trajectories = Trajectories(
        prompt_ids=torch.as_tensor(prompt_ids, device=device),
        prompt_mask=(torch.arange(prompt_ids.shape[1])[None] < torch.as_tensor(prompt_length)[:, None]).long().to(device),
        state_ids=torch.as_tensor(np.where(is_call, output + vocab, output), device=device),
        actions=torch.as_tensor(np.where(valid, actions, 0), device=device),
        teacher_logprob=torch.as_tensor(np.where(valid, logprob, 0.0), dtype=torch.float32, device=device),
        is_call=torch.as_tensor(is_call, device=device), mask=torch.as_tensor(valid, device=device),
        budget=torch.as_tensor(budgets, dtype=torch.float32, device=device),
        truncated=torch.as_tensor(was_truncated, device=device),
    )
    return trajectories, ends


class ReplayBuffer:
    """A FIFO of episodes kept on the CPU, sampled uniformly with the trainer's generator."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: Trajectories | None = None

    def __len__(self) -> int:
        return 0 if self.data is None else len(self.data)

    def add(self, batch: Trajectories) -> None:
        batch = batch.to(torch.device("cpu"))
        self.data = batch if self.data is None else Trajectories.concat([self.data, batch])
        if len(self.data) > self.capacity:
            self.data = self.data.select(torch.arange(len(self.data) - self.capacity, len(self.data)))

    def sample(self, count: int, generator: torch.Generator) -> Trajectories | None:
        if self.data is None or count <= 0:
            return None
        index = torch.randint(len(self.data), (min(count, len(self.data)),), generator=generator)
        return self.data.select(index)

    def save(self, path: str | Path) -> None:
        if self.data is not None:
            save_file({f.name: getattr(self.data, f.name).contiguous() for f in fields(Trajectories)}, str(path))

    def load(self, path: str | Path) -> None:
        if Path(path).exists():
            self.data = Trajectories(**load_file(str(path)))
