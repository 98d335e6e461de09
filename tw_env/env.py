"""`TeacherAssistedDecodingEnv`: token-level decoding in which the teacher is part of the dynamics.

Both environments (this one and :class:`~tw_env.vector_env.TeacherAssistedDecodingVectorEnv`) are
thin shells over a :class:`~tw_env.task.Task` and :class:`TaskEpisodes` (which example and budget
each row plays, the prompts, λ), which drives :class:`~tw_env.episodes.EpisodeBatch` (the
tensors, the teacher's cache and the Eq. 17 reward).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tw_env.episodes import EpisodeBatch, StepOutcome
from tw_env.prompts import BUDGET_DECIMALS, check_budget, format_budget, is_numeric_style
from tw_env.rewards import RunningRewardStats, interpolate_multiplier
from tw_env.task import FromTask, Task
from tw_env.tasks import Example

ENV_OPTIONS = ("teacher_sampling", "teacher_temperature", "reward_window", "reward_clip", "render_mode")


def resolve_task(task: Task | None, task_kwargs: dict[str, Any]) -> Task:
    """The task given, or one built from the keywords (``Task.build``); not both."""
    if task is None:
        return Task.build(**task_kwargs)
    if not isinstance(task, Task):
        raise TypeError(f"task must be a tw_env.task.Task, got {type(task).__name__}; pass the task's fields as keywords instead")
    if task_kwargs:
        raise TypeError(f"pass a task or its fields, not both; got a task and {sorted(task_kwargs)}")
    return task


class TaskEpisodes:
    """What both environments keep on top of the episode tensors: which example and budget each row
    plays, their prompts (tokenised once per pair), the Lagrange multipliers and the end-of-episode info."""

    def __init__(
        self, task: Task, num_rows: int, teacher_sampling: bool = False, teacher_temperature: float = 1.0,
        reward_window: int = 4096, reward_clip: float = 2.0,
    ) -> None:
        if reward_clip <= 0:
            raise ValueError(f"reward_clip must be positive, got {reward_clip}")
        if teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be positive, got {teacher_temperature}")
        self.task = task
        self.reward_stats = RunningRewardStats(window=reward_window)
        self.lagrange_multipliers = {b: 0.0 for b in task.budgets}
        self.batch = EpisodeBatch(
            task.teacher, num_rows, task.vocab_size, task.eos_token_id, task.max_new_tokens, task.max_prompt_length,
            teacher_sampling, teacher_temperature, self.reward_stats, reward_clip, family=task.family,
        )
        self.example_index = np.zeros(num_rows, dtype=np.int64)
        self._prompt_cache: dict[tuple[int, float, bool], list[int]] = {}

    def set_lagrange_multipliers(self, multipliers: Mapping[float, float]) -> None:
        """Set λ_b for some budgets; unknown budgets or non-finite λ raise, changing nothing."""
        updates = {}
        for b, lam in multipliers.items():
            match = [k for k in self.task.budgets if abs(k - float(b)) < 1e-6]
            if not match:
                raise ValueError(f"no budget {b} in this env; expected one of {list(self.task.budgets)}")
            if not np.isfinite(lam):
                raise ValueError(f"Lagrange multiplier for budget {b} must be a finite number, got {lam}")
            updates[match[0]] = float(lam)
        self.lagrange_multipliers.update(updates)

    def lagrange(self, rows: np.ndarray) -> np.ndarray:
        """λ of each row's budget, for ``rows``: its own, or for a budget between the task's (numeric
        prompts) λ interpolated between the two around it (:func:`~tw_env.rewards.interpolate_multiplier`)."""
        out = []
        for r in rows:
            b = float(self.batch.budget[r])
            lam = self.lagrange_multipliers.get(b)
            out.append(interpolate_multiplier(b, self.lagrange_multipliers) if lam is None else lam)
        return np.array(out)

    def parse_options(self, options: Mapping[str, Any] | None) -> tuple[float | None, int | None]:
        """Validate one row's reset options ``budget`` and ``index`` (None: drawn at the start)."""
        options = dict(options or {})
        unknown = set(options) - {"budget", "index"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; expected 'budget' and/or 'index'")
        budget = index = None
        if options.get("budget") is not None:
            budget = self.known_budget(check_budget(options["budget"]))
        if options.get("index") is not None:
            index = int(options["index"])
            if not 0 <= index < len(self.task.examples):
                raise ValueError(f"example index {index} out of range; expected 0 <= index < {len(self.task.examples)}")
        return budget, index

    def known_budget(self, budget: float) -> float:
        """The task's own budget within 1e-6 of ``budget`` (observations carry float32 budgets); with numeric
        prompts any budget in [0, 1] to 0.001 (rounded so, for the same reason); raises otherwise."""
        for known in self.task.budgets:
            if abs(known - budget) < 1e-6:
                return known
        if is_numeric_style(self.task.budget_style):
            rounded = round(budget, BUDGET_DECIMALS)
            format_budget(rounded if abs(rounded - budget) < 1e-6 else budget)  # raises for a finer budget
            return rounded
        raise ValueError(f"budget {budget} is not one of this env's budgets {list(self.task.budgets)}; "
                         "expected one of them, or a task with budget_style 'numeric' for any budget in [0, 1]")

    def start_rows(
        self, rows: np.ndarray, per_row: list[tuple[float | None, int | None]], rng: np.random.Generator,
        advance: bool = True,
    ) -> None:
        """Start episodes in ``rows`` with their (budget, index) choices; None is drawn from ``rng``."""
        prompts, teacher_prompts, budgets = [], [], []
        for row, (budget, index) in zip(rows, per_row, strict=True):
            if budget is None:
                budget = float(self.task.budgets[rng.integers(len(self.task.budgets))])
            if index is None:
                index = int(rng.integers(len(self.task.examples)))
            self.example_index[row] = index
            prompts.append(self._example_prompt(index, budget))
            teacher_prompts.append(self._example_prompt(index, budget, teacher=True))
            budgets.append(budget)
        self.batch.start(np.asarray(rows), prompts, np.array(budgets), advance=advance, teacher_prompts=teacher_prompts)

    def _example_prompt(self, index: int, budget: float, teacher: bool = False) -> list[int]:
        # Resets re-use prompts often (six budgets × a fixed dataset): tokenise each pair once.
        key = (index, budget, teacher)
        cached = self._prompt_cache.get(key)
        if cached is None:
            if len(self._prompt_cache) >= 65536:
                self._prompt_cache.clear()
            encode = self.task.encode_teacher_prompt if teacher else self.task.encode_prompt
            cached = self._prompt_cache[key] = encode(self.task.examples[index].source, budget)
        return cached

    def episode_end_info(self, row: int) -> dict[str, Any]:
        """The final ``info`` keys of the row's episode: teacher fraction, output ids and text, reference."""
        b = self.batch
        output_ids = b.output_ids[row, : b.length[row]].copy()
        return {
            "teacher_fraction": b.teacher_fraction(row),
            "output_ids": output_ids,
            "output_text": self.task.tokenizer.decode(output_ids, skip_special_tokens=True),
            "reference": self.task.examples[int(self.example_index[row])].reference,
        }


class TaskAttributes:
    """What both envs share: the task and the episode core they are built on (:meth:`_start_task`), and
    the task's fields, read through the env (``env.unwrapped.teacher``, ``.tokenizer``, ...)."""

    metadata: dict[str, Any]
    task: Task
    _episodes: TaskEpisodes
    _vocab_size: int
    _started: bool

    def _start_task(
        self,
        num_rows: int,
        task: Task | None = None,
        *,
        teacher_sampling: bool = False,
        teacher_temperature: float = 1.0,
        reward_window: int = 4096,
        reward_clip: float = 2.0,
        render_mode: str | None = None,
        **task_kwargs: Any,
    ) -> tuple[spaces.Discrete, spaces.Dict]:
        """Set up the task (given, or built from ``task_kwargs``) and the episodes of ``num_rows`` rows
        with the env's options (see the env's Arguments); returns one row's action and observation spaces."""
        check_render_mode(render_mode, self.metadata["render_modes"])
        self.task = resolve_task(task, task_kwargs)
        self._episodes = TaskEpisodes(self.task, num_rows, teacher_sampling, teacher_temperature, reward_window,
                                      reward_clip)
        self._vocab_size = self.task.vocab_size
        self.render_mode = render_mode
        self._started = False
        return (spaces.Discrete(self._vocab_size + 1),
                observation_space(self._vocab_size, self.max_prompt_length, self.max_new_tokens))

    # The task's fields, read through the env (one line each: see :class:`FromTask`).
    teacher = FromTask[PreTrainedModel]()
    tokenizer = FromTask[PreTrainedTokenizerBase]()
    examples = FromTask[list[Example]]()
    instruction = FromTask[str]()
    metric = FromTask[str]()
    budgets = FromTask[tuple[float, ...]]()
    teacher_prompt = FromTask["str | None"]()
    student = FromTask["str | PreTrainedModel | None"]()
    max_new_tokens = FromTask[int]()
    max_prompt_length = FromTask[int]()

    @property
    def vocab_size(self) -> int:
        """V, the rows of the teacher's output layer; action V is <τ>."""
        return self._vocab_size

    @property
    def teacher_action(self) -> int:
        """The action <τ> (= V)."""
        return self._vocab_size

    @property
    def reward_stats(self) -> RunningRewardStats:
        return self._episodes.reward_stats

    @property
    def batch(self) -> EpisodeBatch:
        return self._episodes.batch

    @property
    def example_index(self) -> np.ndarray:
        return self._episodes.example_index

    @property
    def lagrange_multipliers(self) -> dict[float, float]:
        return self._episodes.lagrange_multipliers

    def set_lagrange_multipliers(self, multipliers: Mapping[float, float]) -> None:
        """Set λ_b for some budgets; unknown budgets or non-finite λ raise, changing nothing.

        λ_b ≥ 0 treats b as a ceiling (the paper); a negative λ_b (a trainer with a negative
        ``lagrange_floor``) treats it as a target and makes Eq. 17 pay for calls.
        """
        self._episodes.set_lagrange_multipliers(multipliers)

    def encode_prompt(self, source: str, budget: float) -> list[int]:
        """Token ids of the prompt Y for ``source`` at ``budget`` (truncated to max_prompt_length)."""
        return self.task.encode_prompt(source, budget)

    def encode_teacher_prompt(self, source: str, budget: float) -> list[int]:
        """Token ids of the teacher's prompt C^(T) for ``source`` (Y itself without ``teacher_prompt``)."""
        return self.task.encode_teacher_prompt(source, budget)


class TeacherAssistedDecodingEnv(TaskAttributes, gym.Env):
    """Token-by-token decoding by a student that may hand any token to a teacher.

    ## Description
    The agent is the student of *Knowledge Distillation with Training Wheels* (arXiv 2502.17717).
    An episode decodes one output for one prompt Y = "With {keyword} teacher use, {instruction}:
    {source}". At each step the agent emits a vocabulary token itself, or the action <τ>, which asks
    the teacher (part of the environment's dynamics) for that token. Two sequences are kept
    (Eq. 13–14): X^(out), the output text, and X^(in), the student's internal state, in which a
    teacher-produced token t is stored as t + V so that the student can see where it asked for help.
    The teacher reads (X^(out), C^(T)) and advances one token per step with a KV cache, so its
    distribution p(·|X^(out)_<i, C^(T)) is always at hand, both to score a student token and to
    produce a teacher token. An encoder-decoder teacher (T5) runs its encoder on C^(T) once per
    episode; a decoder-only teacher (``AutoModelForCausalLM``: Llama, Qwen) reads C^(T) followed
    directly by X^(out), its prompt prefilled into the cache once per episode
    (:mod:`tw_env.causal_incremental`). C^(T) is the teacher's own
    prompt (the paper's §2.3 names the two prefixes C^(S) and C^(T)): by default Y itself; with
    ``teacher_prompt`` a budget-free template, so that an instruction meant for the student does
    not move the teacher.

    ## Action Space
    ``Discrete(V + 1)``: actions 0..V−1 are vocabulary tokens (V is the number of rows of the teacher's
    output layer, which must equal the student's); action V (``env.unwrapped.teacher_action``) is <τ>.

    ## Observation Space
    A ``Dict`` of integer ``Box`` spaces (Stable-Baselines3 accepts it):

    - ``prompt_ids`` (int64, ``[max_prompt_length]``): the tokenised prompt Y, zero-padded.
    - ``prompt_length`` (int64, ``[1]``): its length.
    - ``state_ids`` (int64, ``[max_new_tokens]``): X^(in) so far, zero-padded; values in [0, 2V).
    - ``state_length`` (int64, ``[1]``): the number of tokens emitted so far.
    - ``budget`` (float32, ``[1]``): the episode's teacher-use budget b.

    ## Rewards
    Eq. 17 with λ_b the Lagrange multiplier of the episode's budget (set by the agent through
    ``set_lagrange_multipliers``): a student token x earns (log p(x) − μ_r)/σ_r + λ_b·b, a call earns
    λ_b·(b − 1); the total is clipped to [−2, 2] (``reward_clip``). μ_r is the running mean teacher log-likelihood of
    the teacher's own tokens, σ_r the running std of the teacher log-likelihood of student tokens
    (updated at each episode end; a seeded reset clears them). ``info`` carries the raw parts:
    ``teacher_logprob`` (natural log, unnormalised, of the token emitted at this step; for a call,
    of the teacher's own token), ``teacher_call`` and ``budget``.

    ## Starting State
    An example drawn uniformly from the task with the env's RNG (or ``options={"index": i}``), and a
    budget drawn uniformly from ``budgets`` (or ``options={"budget": b}``). X^(in) and X^(out) are empty.

    ## Episode End
    Terminated when EOS enters X^(out) (from the student or the teacher); truncated after
    ``max_new_tokens`` tokens. The final ``info`` adds ``teacher_fraction``, ``output_ids``,
    ``output_text`` and ``reference``.

    ## Arguments
    ``TeacherAssistedDecodingEnv(task, ...)`` takes a :class:`~tw_env.task.Task` (the teacher, tokenizer,
    examples, instruction, metric, budgets, prompts and lengths, validated once), or the task's
    fields as keywords, which build one (``Task.build``):

    - ``teacher``: hub id, local directory or a loaded model: seq2seq (T5) or causal LM (Llama, Qwen),
      read from its config; a ``student`` must be of the same family.
    - ``tokenizer``: the student's tokenizer (hub id, directory or object); the vocabulary is shared.
    - ``examples``: (source, reference) pairs.
    - ``instruction``: e.g. ``"summarize"`` or ``"translate German to English"``.
    - ``metric``: the task's quality metric, ``"rouge2"`` or ``"bleu"`` (used by agents and evaluation).
    - ``budgets``: the budgets an episode may draw (Table 1's six by default).
    - ``student``: optional student (name or model) whose vocabulary size is checked against the teacher's.
    - ``max_new_tokens``, ``max_prompt_length``: episode and prompt lengths (prompts are truncated).
    - ``teacher_prompt``: None (the teacher reads Y) or a template with ``{source}`` (and optionally
      ``{instruction}``) for the teacher's prompt C^(T), e.g. ``"{instruction}: {source}"``.
    - ``device``, ``dtype``: where and in which precision the teacher runs.

    and the env's own options:

    - ``reward_window``: how many recent tokens the reward normalisers remember.
    - ``reward_clip``: rewards are clipped to [−reward_clip, reward_clip] (2 in the paper).
    - ``teacher_sampling``: False (default) for the teacher's greedy token on <τ>, True to sample it
      (temperature ``teacher_temperature``) from the env's seeded generator.
    - ``render_mode``: ``"ansi"`` or None.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, task: Task | None = None, **options: Any) -> None:
        self.action_space, self.observation_space = self._start_task(1, task, **options)

    # ------------------------------------------------------------------ gym API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        choice = self._episodes.parse_options(options)  # validate before touching any state
        super().reset(seed=seed)
        if seed is not None:
            self.reward_stats.reset()  # a seeded reset reproduces the env exactly, normalisers included
        self._episodes.start_rows(np.array([0]), [choice], self.np_random)
        self._started = True
        return self._observation(0), {"budget": float(self.batch.budget[0]), "example_index": int(self.example_index[0])}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if not self._started:
            raise RuntimeError("step() called before reset(); call env.reset() to start an episode")
        if self.batch.done[0]:
            raise RuntimeError("step() called after the episode ended; call env.reset() to start a new one")
        action = self._check_action(action)
        rows = np.array([0])
        outcome = self.batch.act(np.array([action]), rows, self._episodes.lagrange(rows), self.np_random)
        if not self.batch.done[0]:
            self.batch.advance(outcome.emitted)
        info = step_info(outcome, 0, float(self.batch.budget[0]))
        if self.batch.done[0]:
            info.update(self._episodes.episode_end_info(0))
            self.batch.finish(0)
        return (
            self._observation(0), float(outcome.reward[0]), bool(outcome.terminated[0]), bool(outcome.truncated[0]), info,
        )

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return render_state(self.tokenizer, self.batch.state_ids[0, : self.batch.length[0]], self.vocab_size)

    # ------------------------------------------------------------------ helpers
    def _check_action(self, action: Any) -> int:
        array = np.asarray(action)
        if array.shape not in ((), (1,)) or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(
                f"action must be an integer in [0, {self.vocab_size}] (V = {self.vocab_size} is <τ>), got {action!r}"
            )
        value = int(array.reshape(()))
        if not 0 <= value <= self.vocab_size:
            raise ValueError(
                f"action {value} is outside [0, {self.vocab_size}]: tokens are 0..{self.vocab_size - 1} and "
                f"{self.vocab_size} is the teacher call <τ>"
            )
        return value

    def _observation(self, row: int) -> dict[str, np.ndarray]:
        b = self.batch
        return {
            "prompt_ids": b.prompt_ids[row].copy(),
            "prompt_length": np.array([b.prompt_length[row]], dtype=np.int64),
            "state_ids": b.state_ids[row].copy(),
            "state_length": np.array([b.length[row]], dtype=np.int64),
            "budget": np.array([b.budget[row]], dtype=np.float32),
        }


def check_render_mode(render_mode: str | None, modes: list[str]) -> None:
    """Refuse a ``render_mode`` that is neither None nor one of ``modes``."""
    if render_mode is not None and render_mode not in modes:
        raise ValueError(f"render_mode must be one of {modes} or None, got {render_mode!r}")


def observation_space(vocab_size: int, max_prompt_length: int, max_new_tokens: int) -> spaces.Dict:
    """The Dict observation space shared by the single and the vector environment."""
    return spaces.Dict(
        {
            "prompt_ids": spaces.Box(0, vocab_size - 1, (max_prompt_length,), dtype=np.int64),
            "prompt_length": spaces.Box(0, max_prompt_length, (1,), dtype=np.int64),
            "state_ids": spaces.Box(0, 2 * vocab_size - 1, (max_new_tokens,), dtype=np.int64),
            "state_length": spaces.Box(0, max_new_tokens, (1,), dtype=np.int64),
            "budget": spaces.Box(0.0, 1.0, (1,), dtype=np.float32),
        }
    )


def step_info(outcome: StepOutcome, j: int, budget: float) -> dict[str, Any]:
    """The per-step ``info`` of the ``j``-th acting row: its raw reward parts and budget."""
    return {
        "teacher_logprob": float(outcome.teacher_logprob[j]),
        "teacher_call": bool(outcome.is_call[j]),
        "budget": budget,
    }


def render_state(tokenizer: PreTrainedTokenizerBase, state_ids: np.ndarray, vocab_size: int) -> str:
    """X^(in) as text, teacher-produced tokens in [[double brackets]]."""
    pieces = []
    for token in state_ids:
        from_teacher = token >= vocab_size
        text = tokenizer.convert_ids_to_tokens(int(token - vocab_size if from_teacher else token))
        pieces.append(f"[[{text}]]" if from_teacher else str(text))
    return " ".join(pieces)
