"""The shared core of both environments: N decoding episodes with the teacher in the dynamics.

`TeacherAssistedDecodingEnv` runs it with N = 1 and `TeacherAssistedDecodingVectorEnv` with N
rows, so the two share their semantics by construction. Everything here is tensors on the
teacher's device; the environments convert to numpy at their boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from tw_env.families import ModelFamily, family_of
from tw_env.prompts import pad_token_lists
from tw_env.rewards import RunningRewardStats, eq17_reward


@dataclass
class StepOutcome:
    """What one step did, per row (numpy arrays of length N)."""

    emitted: np.ndarray  # the token appended to X^(out)
    is_call: np.ndarray  # whether the action was <τ>
    teacher_logprob: np.ndarray  # log p(emitted | X^(out)_<i, Y), unnormalised
    teacher_own_logprob: np.ndarray  # log p of the teacher's own greedy token (feeds μ_r)
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray


class EpisodeBatch:
    """N episodes of teacher-assisted decoding, advanced together with one teacher forward per step."""

    def __init__(
        self,
        teacher: PreTrainedModel,
        num_rows: int,
        vocab_size: int,
        eos_token_id: int,
        max_new_tokens: int,
        max_prompt_length: int,
        teacher_sampling: bool,
        teacher_temperature: float,
        reward_stats: RunningRewardStats,
        reward_clip: float = 2.0,
        family: ModelFamily | None = None,
    ) -> None:
        self.teacher = teacher
        self.num_rows = num_rows
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.max_new_tokens = max_new_tokens
        self.max_prompt_length = max_prompt_length
        self.teacher_sampling = teacher_sampling
        self.teacher_temperature = teacher_temperature
        self.reward_stats = reward_stats
        self.reward_clip = reward_clip
        self.device = teacher.device
        self.family = family if family is not None else family_of(teacher)
        self.decoder = self.family.incremental_decoder(teacher, num_rows, max_new_tokens)
        n, m, p = num_rows, max_new_tokens, max_prompt_length
        # The token each row's teacher reads first: T5's decoder start token, a causal LM's last prompt
        # token (ModelFamily.restart_inputs); set when the row starts an episode.
        self.first_tokens = np.zeros(n, dtype=np.int64)
        self.prompt_ids = np.zeros((n, p), dtype=np.int64)
        self.prompt_length = np.zeros(n, dtype=np.int64)
        self.state_ids = np.zeros((n, m), dtype=np.int64)  # X^(in): teacher tokens stored as t + V
        self.output_ids = np.zeros((n, m), dtype=np.int64)  # X^(out)
        self.length = np.zeros(n, dtype=np.int64)
        self.budget = np.zeros(n, dtype=np.float64)
        self.calls = np.zeros(n, dtype=np.int64)
        self.done = np.ones(n, dtype=bool)
        self.teacher_logprobs: torch.Tensor | None = None  # [N, V]: log p(· | X^(out), Y) for the next token
        self._episode_student_lp: list[list[float]] = [[] for _ in range(n)]
        self._episode_teacher_lp: list[list[float]] = [[] for _ in range(n)]

    # ------------------------------------------------------------------ starting
    def start(
        self, rows: np.ndarray, prompts: list[list[int]], budgets: np.ndarray, advance: bool = True,
        teacher_prompts: list[list[int]] | None = None,
    ) -> None:
        """Begin episodes in ``rows``; with ``advance`` the teacher reads each row's first token now.

        Without ``advance`` (the vector env) the first tokens (``first_tokens``) join the next batched
        step instead. ``prompts`` are the student's (observed) prompts Y; the teacher reads
        ``teacher_prompts`` (C^(T)) when given, else Y: an encoder-decoder's encoder reads it whole and
        its decoder starts from the start token; a causal LM's cache is prefilled with all of it
        but its last token, which is the row's first token (``ModelFamily.restart_inputs``).
        """
        rows = np.asarray(rows, dtype=np.int64)
        teacher_prompts = prompts if teacher_prompts is None else teacher_prompts
        if len(teacher_prompts) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(teacher_prompts)} teacher prompts")
        context, first_tokens = self.family.restart_inputs(self.teacher, teacher_prompts)
        ids, mask = pad_token_lists(context)
        for row, prompt in zip(rows, prompts, strict=True):
            self.prompt_ids[row] = 0
            self.prompt_ids[row, : len(prompt)] = prompt
            self.prompt_length[row] = len(prompt)
            self._episode_student_lp[row] = []
            self._episode_teacher_lp[row] = []
        self.state_ids[rows] = 0
        self.output_ids[rows] = 0
        self.length[rows] = 0
        self.calls[rows] = 0
        self.budget[rows] = budgets
        self.done[rows] = False
        self.first_tokens[rows] = first_tokens
        if len(rows) == self.num_rows:
            # Every row restarts: drop the old caches, so a full reset always starts from the same state.
            self.decoder = self.family.incremental_decoder(self.teacher, self.num_rows, self.max_new_tokens)
        with torch.no_grad():
            self.decoder.restart(torch.from_numpy(rows), ids, mask)
        if advance and len(rows) == self.num_rows:
            self.advance(self.first_tokens.copy())
        elif advance:
            self._advance_subset(rows)

    def _advance_subset(self, rows: np.ndarray) -> None:
        # Only `rows` should read their first token now; a step advances every row, so the others
        # read a placeholder that is rolled back at once, and keep their distributions.
        previous = self.teacher_logprobs
        self.advance(self.first_tokens.copy())
        others = np.setdiff1d(np.arange(self.num_rows), rows)
        discard = torch.zeros(self.num_rows, dtype=torch.long)
        discard[torch.from_numpy(others)] = 1
        self.decoder.rollback(discard)
        if previous is not None and len(others):
            index = torch.from_numpy(others).to(self.device)
            self._next_logprobs()[index] = previous[index]

    def _next_logprobs(self) -> torch.Tensor:
        if self.teacher_logprobs is None:
            raise RuntimeError("the teacher has read no token yet; start() the rows (with advance) before acting")
        return self.teacher_logprobs

    def advance(self, tokens: np.ndarray) -> None:
        """One batched teacher decoder step, every row reading its token; caches p(·|X^(out), Y)."""
        with torch.no_grad():
            states = self.decoder.step(input_ids=torch.as_tensor(tokens, dtype=torch.long, device=self.device))
            logits = self.decoder.logits(states).float()[:, : self.vocab_size]
            self.teacher_logprobs = torch.log_softmax(logits, dim=-1)

    # ------------------------------------------------------------------ stepping
    def act(
        self, actions: np.ndarray, rows: np.ndarray, lagrange: np.ndarray, rng: np.random.Generator
    ) -> StepOutcome:
        """Apply ``actions`` to ``rows`` (Eq. 13–14) and score them (Eq. 17); does not advance the teacher."""
        logprobs = self._next_logprobs()[torch.as_tensor(rows, device=self.device)]
        actions = np.asarray(actions, dtype=np.int64)
        is_call = actions == self.vocab_size
        teacher_greedy = logprobs.argmax(dim=-1).cpu().numpy()
        emitted = actions.copy()
        if is_call.any():
            emitted[is_call] = self._teacher_tokens(logprobs[torch.from_numpy(is_call)], teacher_greedy[is_call], rng)
        lp = logprobs.cpu().numpy()  # small: [n, V] float32
        index = np.arange(len(rows))
        teacher_logprob = lp[index, emitted]
        teacher_own = lp[index, teacher_greedy]

        stats = self.reward_stats
        reward = eq17_reward(
            teacher_logprob, is_call, self.budget[rows], lagrange, stats.mu, stats.sigma, clip=self.reward_clip
        )

        position = self.length[rows]
        self.output_ids[rows, position] = emitted
        self.state_ids[rows, position] = np.where(is_call, emitted + self.vocab_size, emitted)
        self.length[rows] += 1
        self.calls[rows] += is_call
        terminated = emitted == self.eos_token_id
        truncated = ~terminated & (self.length[rows] >= self.max_new_tokens)
        self.done[rows] = terminated | truncated
        for j, row in enumerate(rows):
            self._episode_teacher_lp[row].append(float(teacher_own[j]))
            if not is_call[j]:
                self._episode_student_lp[row].append(float(teacher_logprob[j]))
        return StepOutcome(emitted, is_call, teacher_logprob, teacher_own, reward, terminated, truncated)

    def _teacher_tokens(self, logprobs: torch.Tensor, greedy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.teacher_sampling:
            return greedy
        # Sampling uses the environment's own seeded generator, so seeded episodes repeat exactly.
        probs = torch.softmax(logprobs / self.teacher_temperature, dim=-1).double().cpu().numpy()
        return np.array([rng.choice(len(p), p=p / p.sum()) for p in probs], dtype=np.int64)

    def finish(self, row: int) -> None:
        """Feed a finished episode's token statistics to the running reward normalisers."""
        self.reward_stats.update(self._episode_teacher_lp[row], self._episode_student_lp[row])

    # ------------------------------------------------------------------ views
    def teacher_fraction(self, row: int) -> float:
        """The share of the row's tokens so far that the teacher produced (0 before the first)."""
        return float(self.calls[row] / max(self.length[row], 1))
