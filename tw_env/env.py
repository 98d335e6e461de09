"""`TeacherAssistedDecodingEnv`: token-level decoding in which the teacher is part of the dynamics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from tw_env.budgets import BUDGETS, check_budget, keyword_for, make_prompt
from tw_env.episodes import EpisodeBatch
from tw_env.models import check_same_vocabulary, load_seq2seq, load_tokenizer, output_vocab_size
from tw_env.rewards import RunningRewardStats
from tw_env.tasks import Example


def as_examples(examples: Sequence[Any]) -> list[Example]:
    """Accept Examples, (source, reference) pairs or {"source", "reference"} dicts."""
    out = []
    for i, item in enumerate(examples):
        if isinstance(item, Example):
            out.append(item)
        elif isinstance(item, Mapping) and "source" in item and "reference" in item:
            out.append(Example(str(item["source"]), str(item["reference"])))
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
            out.append(Example(str(item[0]), str(item[1])))
        else:
            raise TypeError(
                f"example {i} is {item!r}; expected an Example, a (source, reference) pair or a dict with "
                "'source' and 'reference'"
            )
    if not out:
        raise ValueError("the task has no examples; expected at least one (source, reference) pair")
    return out


def check_teacher_prompt(template: str | None) -> None:
    """A teacher prompt is None or a template with ``{source}`` and at most ``{instruction}`` besides."""
    if template is None:
        return
    problem = None
    if not isinstance(template, str) or "{source}" not in template:
        problem = "it has no {source} field"
    else:
        try:
            template.format(instruction="", source="")
        except (KeyError, IndexError, ValueError) as error:
            problem = f"formatting it failed ({type(error).__name__}: {error})"
    if problem:
        raise ValueError(
            f"teacher_prompt {template!r} is not usable: {problem}; expected None or a template such as "
            "'{instruction}: {source}'"
        )


def student_vocab_size(student: str | PreTrainedModel) -> int:
    """The student's output-layer size, read from its config when given a name (no weights loaded)."""
    if isinstance(student, PreTrainedModel):
        return output_vocab_size(student)
    from tw_env.models import _check_source

    return int(AutoConfig.from_pretrained(_check_source(str(student), "student"), trust_remote_code=False).vocab_size)


class TeacherAssistedDecodingEnv(gym.Env):
    """Token-by-token decoding by a student that may hand any token to a teacher.

    ## Description
    The agent is the student of *Knowledge Distillation with Training Wheels* (arXiv 2502.17717).
    An episode decodes one output for one prompt Y = "With {keyword} teacher use, {instruction}:
    {source}". At each step the agent emits a vocabulary token itself, or the action <τ>, which asks
    the teacher (part of the environment's dynamics) for that token. Two sequences are kept
    (Eq. 13–14): X^(out), the output text, and X^(in), the student's internal state, in which a
    teacher-produced token t is stored as t + V so that the student can see where it asked for help.
    The teacher reads (X^(out), C^(T)): its encoder runs once per episode and its decoder advances
    one token per step with a KV cache, so its distribution p(·|X^(out)_<i, C^(T)) is always at
    hand, both to score a student token and to produce a teacher token. C^(T) is the teacher's own
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
    - ``teacher``: hub id, local directory or a loaded seq2seq model.
    - ``tokenizer``: the student's tokenizer (hub id, directory or object); the vocabulary is shared.
    - ``examples``: (source, reference) pairs.
    - ``instruction``: e.g. ``"summarize"`` or ``"translate German to English"``.
    - ``metric``: the task's quality metric, ``"rouge2"`` or ``"bleu"`` (used by agents and evaluation).
    - ``budgets``: the budgets an episode may draw (Table 1's six by default).
    - ``student``: optional student (name or model) whose vocabulary size is checked against the teacher's.
    - ``max_new_tokens``, ``max_prompt_length``: episode and prompt lengths (prompts are truncated).
    - ``teacher_sampling``: False (default) for the teacher's greedy token on <τ>, True to sample it
      (temperature ``teacher_temperature``) from the env's seeded generator.
    - ``device``, ``dtype``: where and in which precision the teacher runs.
    - ``reward_window``: how many recent tokens the reward normalisers remember.
    - ``reward_clip``: rewards are clipped to [−reward_clip, reward_clip] (2 in the paper).
    - ``teacher_prompt``: None (the teacher reads Y) or a template with ``{source}`` (and optionally
      ``{instruction}``) for the teacher's prompt C^(T), e.g. ``"{instruction}: {source}"``.
    - ``render_mode``: ``"ansi"`` or None.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        teacher: str | PreTrainedModel,
        tokenizer: str | PreTrainedTokenizerBase,
        examples: Sequence[Any],
        instruction: str,
        metric: str = "bleu",
        budgets: Sequence[float] = BUDGETS,
        student: str | PreTrainedModel | None = None,
        max_new_tokens: int = 64,
        max_prompt_length: int = 512,
        teacher_sampling: bool = False,
        teacher_temperature: float = 1.0,
        device: str = "cpu",
        dtype: str | None = None,
        reward_window: int = 4096,
        reward_clip: float = 2.0,
        teacher_prompt: str | None = None,
        render_mode: str | None = None,
        _num_rows: int = 1,
    ):
        self._configure(
            teacher, tokenizer, examples, instruction, metric, budgets, student, max_new_tokens,
            max_prompt_length, teacher_sampling, teacher_temperature, device, dtype, reward_window,
            render_mode, _num_rows, reward_clip, teacher_prompt,
        )
        self.action_space = spaces.Discrete(self.vocab_size + 1)
        self.observation_space = observation_space(self.vocab_size, max_prompt_length, max_new_tokens)

    # Shared with the vector env, which calls it with its number of rows.
    def _configure(
        self, teacher, tokenizer, examples, instruction, metric, budgets, student, max_new_tokens,
        max_prompt_length, teacher_sampling, teacher_temperature, device, dtype, reward_window,
        render_mode, num_rows, reward_clip: float = 2.0, teacher_prompt: str | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        if max_new_tokens < 1 or max_prompt_length < 2:
            raise ValueError(
                f"max_new_tokens must be >= 1 and max_prompt_length >= 2, got {max_new_tokens} and {max_prompt_length}"
            )
        if reward_clip <= 0:
            raise ValueError(f"reward_clip must be positive, got {reward_clip}")
        if teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be positive, got {teacher_temperature}")
        check_teacher_prompt(teacher_prompt)
        self.budgets = tuple(check_budget(b) for b in budgets)
        if not self.budgets:
            raise ValueError("budgets must name at least one teacher-use budget")
        for b in self.budgets:
            keyword_for(b)  # every budget needs a prompt keyword
        self.examples = as_examples(examples)
        self.tokenizer = load_tokenizer(tokenizer)
        self.teacher = load_seq2seq(teacher, role="teacher", device=device, dtype=dtype)
        self.vocab_size = output_vocab_size(self.teacher)
        if student is not None:
            check_same_vocabulary(self.teacher, student_vocab_size(student))
        if len(self.tokenizer) > self.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} entries but the teacher's output layer only "
                f"{self.vocab_size} rows; expected a tokenizer no larger than the model's vocabulary"
            )
        self.student = student
        self.instruction = instruction
        self.teacher_prompt = teacher_prompt
        self.metric = metric
        self.max_new_tokens = max_new_tokens
        self.max_prompt_length = max_prompt_length
        self.teacher_action = self.vocab_size
        self.render_mode = render_mode
        self.reward_stats = RunningRewardStats(window=reward_window)
        self.lagrange_multipliers = {b: 0.0 for b in self.budgets}
        eos = self.tokenizer.eos_token_id
        self.batch = EpisodeBatch(
            self.teacher, num_rows, self.vocab_size, eos if eos is not None else self.teacher.config.eos_token_id,
            max_new_tokens, max_prompt_length, teacher_sampling, teacher_temperature, self.reward_stats,
            reward_clip,
        )
        self.example_index = np.zeros(num_rows, dtype=np.int64)
        self._prompt_cache: dict[tuple[int, float], list[int]] = {}
        self._started = False

    # ------------------------------------------------------------------ public API
    def set_lagrange_multipliers(self, multipliers: Mapping[float, float]) -> None:
        """Set λ_b for some budgets; unknown budgets or non-finite λ raise, changing nothing.

        λ_b ≥ 0 treats b as a ceiling (the paper); a negative λ_b (a trainer with a negative
        ``lagrange_floor``) treats it as a target and makes Eq. 17 pay for calls.
        """
        updates = {}
        for b, lam in multipliers.items():
            match = [k for k in self.budgets if abs(k - float(b)) < 1e-6]
            if not match:
                raise ValueError(f"no budget {b} in this env; expected one of {list(self.budgets)}")
            if not np.isfinite(lam):
                raise ValueError(f"Lagrange multiplier for budget {b} must be a finite number, got {lam}")
            updates[match[0]] = float(lam)
        self.lagrange_multipliers.update(updates)

    def encode_prompt(self, source: str, budget: float) -> list[int]:
        """Token ids of the prompt Y for ``source`` at ``budget`` (truncated to max_prompt_length)."""
        text = make_prompt(self.instruction, source, budget)
        return self.tokenizer(text, truncation=True, max_length=self.max_prompt_length)["input_ids"]

    def encode_teacher_prompt(self, source: str, budget: float) -> list[int]:
        """Token ids of the teacher's prompt C^(T) for ``source`` (Y itself without ``teacher_prompt``)."""
        if self.teacher_prompt is None:
            return self.encode_prompt(source, budget)
        text = self.teacher_prompt.format(instruction=self.instruction, source=source)
        return self.tokenizer(text, truncation=True, max_length=self.max_prompt_length)["input_ids"]

    def _example_prompt(self, index: int, budget: float, teacher: bool = False) -> list[int]:
        # Resets re-use prompts often (six budgets × a fixed dataset): tokenise each pair once.
        key = (index, budget, teacher)
        cached = self._prompt_cache.get(key)
        if cached is None:
            if len(self._prompt_cache) >= 65536:
                self._prompt_cache.clear()
            encode = self.encode_teacher_prompt if teacher else self.encode_prompt
            cached = self._prompt_cache[key] = encode(self.examples[index].source, budget)
        return cached

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        budget, index = self._parse_options(options)  # validate before touching any state
        super().reset(seed=seed)
        if seed is not None:
            self.reward_stats.reset()  # a seeded reset reproduces the env exactly, normalisers included
        budget, index = self._draw(budget, index)
        self.batch.start(
            np.array([0]), [self._example_prompt(index, budget)], np.array([budget]),
            teacher_prompts=[self._example_prompt(index, budget, teacher=True)],
        )
        self.example_index[0] = index
        self._started = True
        return self._observation(0), {"budget": budget, "example_index": index}

    def step(self, action):
        if not self._started:
            raise RuntimeError("step() called before reset(); call env.reset() to start an episode")
        if self.batch.done[0]:
            raise RuntimeError("step() called after the episode ended; call env.reset() to start a new one")
        action = self._check_action(action)
        rows = np.array([0])
        outcome = self.batch.act(np.array([action]), rows, self._lagrange(rows), self.np_random)
        if not self.batch.done[0]:
            self.batch.advance(outcome.emitted)
        info = step_info(outcome, 0, float(self.batch.budget[0]))
        if self.batch.done[0]:
            info.update(self._episode_end_info(0))
            self.batch.finish(0)
        return (
            self._observation(0), float(outcome.reward[0]), bool(outcome.terminated[0]), bool(outcome.truncated[0]), info,
        )

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return render_state(self.tokenizer, self.batch.state_ids[0, : self.batch.length[0]], self.vocab_size)

    # ------------------------------------------------------------------ helpers
    def _parse_options(self, options: dict[str, Any] | None) -> tuple[float | None, int | None]:
        options = dict(options or {})
        unknown = set(options) - {"budget", "index"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; expected 'budget' and/or 'index'")
        budget = index = None
        if "budget" in options and options["budget"] is not None:
            budget = self._known_budget(check_budget(options["budget"]))
        if "index" in options and options["index"] is not None:
            index = int(options["index"])
            if not 0 <= index < len(self.examples):
                raise ValueError(f"example index {index} out of range; expected 0 <= index < {len(self.examples)}")
        return budget, index

    def _known_budget(self, budget: float) -> float:
        # Snap to the env's own value (observations carry float32 budgets), or refuse.
        for known in self.budgets:
            if abs(known - budget) < 1e-6:
                return known
        raise ValueError(f"budget {budget} is not one of this env's budgets {list(self.budgets)}")

    def _draw(self, budget: float | None, index: int | None) -> tuple[float, int]:
        if budget is None:
            budget = float(self.budgets[self.np_random.integers(len(self.budgets))])
        if index is None:
            index = int(self.np_random.integers(len(self.examples)))
        return budget, index

    def _check_action(self, action) -> int:
        value = np.asarray(action)
        if value.shape not in ((), (1,)) or not np.issubdtype(value.dtype, np.integer):
            raise ValueError(
                f"action must be an integer in [0, {self.vocab_size}] (V = {self.vocab_size} is <τ>), got {action!r}"
            )
        value = int(value.reshape(()))
        if not 0 <= value <= self.vocab_size:
            raise ValueError(
                f"action {value} is outside [0, {self.vocab_size}]: tokens are 0..{self.vocab_size - 1} and "
                f"{self.vocab_size} is the teacher call <τ>"
            )
        return value

    def _lagrange(self, rows: np.ndarray) -> np.ndarray:
        return np.array([self.lagrange_multipliers[float(self.batch.budget[r])] for r in rows])

    def _observation(self, row: int) -> dict[str, np.ndarray]:
        b = self.batch
        return {
            "prompt_ids": b.prompt_ids[row].copy(),
            "prompt_length": np.array([b.prompt_length[row]], dtype=np.int64),
            "state_ids": b.state_ids[row].copy(),
            "state_length": np.array([b.length[row]], dtype=np.int64),
            "budget": np.array([b.budget[row]], dtype=np.float32),
        }

    def _episode_end_info(self, row: int) -> dict[str, Any]:
        b = self.batch
        output_ids = b.output_ids[row, : b.length[row]].copy()
        return {
            "teacher_fraction": b.teacher_fraction(row),
            "output_ids": output_ids,
            "output_text": self.tokenizer.decode(output_ids, skip_special_tokens=True),
            "reference": self.examples[int(self.example_index[row])].reference,
        }


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


def step_info(outcome, j: int, budget: float) -> dict[str, Any]:
    return {
        "teacher_logprob": float(outcome.teacher_logprob[j]),
        "teacher_call": bool(outcome.is_call[j]),
        "budget": budget,
    }


def render_state(tokenizer, state_ids: np.ndarray, vocab_size: int) -> str:
    """X^(in) as text, teacher-produced tokens in [[double brackets]]."""
    pieces = []
    for token in state_ids:
        from_teacher = token >= vocab_size
        text = tokenizer.convert_ids_to_tokens(int(token - vocab_size if from_teacher else token))
        pieces.append(f"[[{text}]]" if from_teacher else str(text))
    return " ".join(pieces)
