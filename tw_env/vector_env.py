"""`TeacherAssistedDecodingVectorEnv`: N episodes with one batched teacher forward per step."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from tw_env.env import TaskAttributes, render_state
from tw_env.task import Task


class TeacherAssistedDecodingVectorEnv(TaskAttributes, VectorEnv):
    """The batched form of :class:`~tw_env.TeacherAssistedDecodingEnv`: ``(num_envs, task, ...)`` with the
    same task and options (or the task's fields as keywords).

    Every step runs one batched teacher decoder forward for all N rows, each row with its own KV
    cache (see :mod:`tw_env.incremental`, and :mod:`tw_env.causal_incremental` for a causal teacher). Autoreset follows Gymnasium's NEXT_STEP mode: the step
    after an episode ends resets that row and ignores its action. Infos are dicts of arrays with
    ``_key`` masks; the end-of-episode keys are present only for rows that just ended.
    """

    metadata = {"render_modes": ["ansi"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int, task: Task | None = None, **options: Any) -> None:
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs}")
        self.num_envs = int(num_envs)
        self.single_action_space, self.single_observation_space = self._start_task(self.num_envs, task, **options)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self._autoreset = True

    def reset(
        self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Reset every row. ``options`` may hold ``budget`` and ``index``, each a scalar or one per row,
        and ``autoreset`` (default True).

        ``autoreset=False`` runs exactly one episode per row until the next ``reset``: a row whose
        episode has ended stays ended (its action is ignored, its reward is 0, its observation and
        flags stay as they were, no new episode starts and the env's RNG is not drawn from). A
        trainer that wants one episode per row uses it, so that no episode it would discard feeds
        the reward normalisers or consumes random draws.
        """
        options = dict(options or {})
        autoreset = options.pop("autoreset", True)
        if not isinstance(autoreset, (bool, np.bool_)):
            raise ValueError(f"reset option 'autoreset' must be True or False, got {autoreset!r}")
        per_row = self._per_row_options(options)
        if isinstance(seed, list):
            seed = seed[0] if seed else None
        super().reset(seed=seed)
        if seed is not None:
            self.reward_stats.reset()
        rows = np.arange(self.num_envs)
        self._start_rows(rows, per_row, advance=True)
        self._started = True
        self._autoreset = bool(autoreset)
        info = {"budget": self.batch.budget.copy(), "example_index": self.example_index.copy()}
        return self._observations(), info

    def step(
        self, actions: Any
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if not self._started:
            raise RuntimeError("step() called before reset(); call envs.reset() to start the episodes")
        actions = self._check_actions(actions)
        batch = self.batch
        # Rows that ended last step: NEXT_STEP autoreset, unless this batch runs one episode per row.
        resetting = np.flatnonzero(batch.done) if self._autoreset else np.zeros(0, dtype=np.int64)
        acting = np.flatnonzero(~batch.done)
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        infos: dict[str, Any] = {}
        emitted = np.zeros(0, dtype=np.int64)
        if len(acting):
            outcome = batch.act(actions[acting], acting, self._episodes.lagrange(acting), self.np_random)
            rewards[acting], terminated[acting], truncated[acting] = outcome.reward, outcome.terminated, outcome.truncated
            emitted = outcome.emitted
            for j, row in enumerate(acting.tolist()):
                info = {
                    "teacher_logprob": float(outcome.teacher_logprob[j]),
                    "teacher_call": bool(outcome.is_call[j]),
                    "budget": float(batch.budget[row]),
                }
                if batch.done[row]:
                    info.update(self._episodes.episode_end_info(row))
                    batch.finish(row)
                    # Outputs differ in length: keep them as objects, not one fixed-shape array.
                    infos.setdefault("output_ids", np.full(self.num_envs, None, dtype=object))
                infos = self._add_info(infos, info, row)
        if len(resetting):
            self._start_rows(resetting, self._per_row_options(None), advance=False)
        if not batch.done.all():
            # Restarted rows read their first token; rows that just ended read a harmless one (their
            # last first token) and restart next step.
            tokens = batch.first_tokens.copy()
            tokens[acting] = emitted
            batch.advance(tokens)
        return self._observations(), rewards, terminated, truncated, infos

    def reset_done_rows(self) -> dict[str, np.ndarray]:
        """Start new episodes now in the rows whose episode has ended; returns all observations.

        For wrappers that need same-step autoreset (Stable-Baselines3's VecEnv): after a step in
        which rows ended, this starts them at once (with the env's RNG), so that the next ``step``
        acts on every row. The other rows are untouched.
        """
        if not self._started:
            raise RuntimeError("reset_done_rows() called before reset()")
        done = np.flatnonzero(self.batch.done)
        if len(done):
            self._start_rows(done, self._per_row_options(None), advance=True)
        return self._observations()

    def render(self) -> tuple[str, ...] | None:
        if self.render_mode != "ansi":
            return None
        b = self.batch
        return tuple(render_state(self.tokenizer, b.state_ids[i, : b.length[i]], self.vocab_size) for i in range(self.num_envs))

    # ------------------------------------------------------------------ helpers
    def _per_row_options(self, options: dict[str, Any] | None) -> list[tuple[float | None, int | None]]:
        options = dict(options or {})
        unknown = set(options) - {"budget", "index"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; expected 'budget' and/or 'index'")
        parsed = []
        for i in range(self.num_envs):
            row = {}
            for key in ("budget", "index"):
                value = options.get(key)
                if value is not None and np.ndim(value) > 0:
                    if len(value) != self.num_envs:
                        raise ValueError(f"reset option {key!r} has {len(value)} entries; expected {self.num_envs}")
                    value = value[i]
                row[key] = value
            parsed.append(self._episodes.parse_options(row))
        return parsed

    def _start_rows(self, rows: np.ndarray, per_row: list[tuple[float | None, int | None]], advance: bool) -> None:
        self._episodes.start_rows(rows, [per_row[row] for row in rows], self.np_random, advance=advance)

    def _check_actions(self, actions: Any) -> np.ndarray:
        array = np.asarray(actions)
        if array.shape != (self.num_envs,) or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(
                f"actions must be {self.num_envs} integers in [0, {self.vocab_size}], got shape {array.shape} "
                f"and dtype {array.dtype}"
            )
        bad = (array < 0) | (array > self.vocab_size)
        if bad.any():
            raise ValueError(
                f"actions {array[bad].tolist()} are outside [0, {self.vocab_size}]: tokens are "
                f"0..{self.vocab_size - 1} and {self.vocab_size} is the teacher call <τ>"
            )
        return array.astype(np.int64)

    def _observations(self) -> dict[str, np.ndarray]:
        b = self.batch
        return {
            "prompt_ids": b.prompt_ids.copy(),
            "prompt_length": b.prompt_length[:, None].copy(),
            "state_ids": b.state_ids.copy(),
            "state_length": b.length[:, None].copy(),
            "budget": b.budget[:, None].astype(np.float32),
        }
