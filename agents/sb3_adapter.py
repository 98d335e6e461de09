"""Stable-Baselines3 glue for the PPO ablation: a `VecEnv` over the native vector env, an
`ActorCriticPolicy` around :class:`~agents.policy.StudentPolicy`, and the callbacks (λ, wall time,
periodic checkpoints).

Autoreset, and why no action is ever lost:

- SB3 expects *same-step* autoreset: when ``step`` reports ``done`` for a row, the observation it
  returns for that row is already the first observation of the next episode, the final observation
  travels in ``info["terminal_observation"]``, and the next action SB3 picks for that row is the
  first action of the new episode (it goes into the rollout buffer with its log-prob and advantage).
- :class:`~tw_env.TeacherAssistedDecodingVectorEnv` autoresets in Gymnasium's NEXT_STEP mode: the
  step after a row ended restarts it and *ignores its action*. Passed straight through, every
  episode would begin with an action that PPO trains on but the env never applied.
- Neither stepping once more (that advances every other row) nor restarting the row by hand (the
  teacher's decoder advances all rows together in one batched forward with a shared clock, see
  :class:`~tw_env.incremental.IncrementalDecoder`) works from outside. The env therefore offers the
  hook :meth:`~tw_env.TeacherAssistedDecodingVectorEnv.reset_done_rows`: it starts new episodes in
  exactly the rows that ended (their encoder runs; the teacher reads their start token in one extra
  decoder step while the other rows read a placeholder that is rolled back, their cached
  distributions restored) and returns the observations. The rows that did not end are untouched.
- :meth:`SB3VecEnvAdapter.step_wait` steps the env, copies each ended row's observation into its
  ``terminal_observation`` (with ``TimeLimit.truncated`` = truncated and not terminated), then calls
  ``reset_done_rows()`` and returns its observations. After that no row is done, so the env's own
  NEXT_STEP branch never runs and every action SB3 sends is applied to the episode it was chosen for.
  ``tests/test_ppo.py`` checks this against a plain teacher forward over every prefix.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import VectorEnv
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn
from torch import nn

from agents.lagrangian import PIDGains, make_dual
from agents.policy import (
    IncrementalReader,
    PromptFeatures,
    StudentPolicy,
    ValueNetwork,
    _StateModel,
    choose_actions,
)
from tw_env.prompts import budget_label
from tw_env.rewards import RunningRewardStats
from tw_env.vector_env import TeacherAssistedDecodingVectorEnv

# ---------------------------------------------------------------------------------------------- env


def unbatch_infos(infos: Mapping[str, Any], num_envs: int) -> list[dict[str, Any]]:
    """Gymnasium's dict-of-arrays infos (with ``_key`` masks) as SB3's list of per-row dicts."""
    rows: list[dict[str, Any]] = [{} for _ in range(num_envs)]
    for key, value in infos.items():
        if key.startswith("_"):
            continue
        mask = infos.get(f"_{key}", np.ones(num_envs, dtype=bool))
        if isinstance(value, Mapping):
            nested = unbatch_infos(value, num_envs)
            for i in np.flatnonzero(mask):
                rows[i][key] = nested[i]
            continue
        for i in np.flatnonzero(mask):
            item = value[i]
            rows[i][key] = item.item() if isinstance(item, np.generic) else item
    return rows


class SB3VecEnvAdapter(VecEnv):
    """An SB3 ``VecEnv`` over a :class:`~tw_env.TeacherAssistedDecodingVectorEnv` (same-step autoreset).

    ``step_wait`` returns ``(obs, rewards, dones, infos)``: for a row that ended, ``obs`` is the new
    episode's first observation (``state_length == 0``), its info holds ``terminal_observation``
    and ``TimeLimit.truncated`` (True when truncated and not terminated), and the env's end-of-episode
    keys (``teacher_fraction``, ``output_ids``, ``output_text``, ``reference``). The vector env is
    one object: ``get_attr``/``env_method`` read it once and repeat the answer for every index.
    """

    def __init__(self, env: VectorEnv) -> None:
        unwrapped: Any = getattr(env, "unwrapped", env)  # duck-typed: checked for reset_done_rows() below
        if not callable(getattr(unwrapped, "reset_done_rows", None)):
            raise TypeError(
                f"SB3VecEnvAdapter needs a vector env with reset_done_rows() (a TeacherAssistedDecodingVectorEnv), "
                f"got {type(unwrapped).__name__}"
            )
        self.env: TeacherAssistedDecodingVectorEnv = unwrapped
        self._actions: np.ndarray | None = None
        super().__init__(self.env.num_envs, self.env.single_observation_space, self.env.single_action_space)

    # SB3 API ---------------------------------------------------------------------------------
    def reset(self) -> VecEnvObs:
        seed = next((s for s in self._seeds if s is not None), None)
        obs, info = self.env.reset(seed=seed, options=self._batched_options())
        self.reset_infos = unbatch_infos(info, self.num_envs)
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs).astype(np.int64)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("step_wait() called without step_async()")
        actions, self._actions = self._actions, None
        obs, rewards, terminated, truncated, infos = self.env.step(actions)
        dones = np.asarray(terminated, dtype=bool) | np.asarray(truncated, dtype=bool)
        info_list = unbatch_infos(infos, self.num_envs)
        ended = np.flatnonzero(dones)
        for i in ended:
            info_list[i]["terminal_observation"] = {key: value[i].copy() for key, value in obs.items()}
            info_list[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
        if len(ended):
            obs = self.env.reset_done_rows()
        return obs, np.asarray(rewards, dtype=np.float32), dones, info_list

    def close(self) -> None:
        self.env.close()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self.env, attr_name)] * len(self._indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self.env, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        result = getattr(self.env, method_name)(*method_args, **method_kwargs)
        return [result] * len(self._indices(indices))

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False] * len(self._indices(indices))

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None] * self.num_envs

    # Training Wheels API ------------------------------------------------------------------------
    @property
    def lagrange_multipliers(self) -> dict[float, float]:
        return self.env.lagrange_multipliers

    def set_lagrange_multipliers(self, multipliers: Mapping[float, float]) -> None:
        self.env.set_lagrange_multipliers(multipliers)

    @property
    def reward_stats(self) -> RunningRewardStats:
        return self.env.reward_stats

    # helpers ---------------------------------------------------------------------------------
    def _indices(self, indices: VecEnvIndices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, int):
            return [indices]
        return list(indices)

    def _batched_options(self) -> dict[str, Any] | None:
        keys = sorted({k for options in self._options for k in (options or {})})
        if not keys:
            return None
        return {k: [(options or {}).get(k) for options in self._options] for k in keys}


# ---------------------------------------------------------------------------------------------- policy


def _tokens(value: torch.Tensor) -> torch.Tensor:
    """SB3 may hand Box observations over as floats; token ids are exact integers below 2^24."""
    return value.long() if not torch.is_floating_point(value) else value.round().long()


def observation_batch(obs: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of Dict observations as LM inputs, trimmed to the longest prompt and state in it."""
    prompt_length = _tokens(obs["prompt_length"]).reshape(-1).to(device)
    state_length = _tokens(obs["state_length"]).reshape(-1).to(device)
    width = max(int(prompt_length.max()), 1)
    # At least one (masked) state column: StudentPolicy.decoder_states needs T >= 1 to place the start token.
    steps = max(int(state_length.max()), 1)
    prompt_ids = _tokens(obs["prompt_ids"])[:, :width].to(device)
    state_ids = _tokens(obs["state_ids"])[:, :steps].to(device)
    arange = torch.arange(max(width, steps), device=device)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": (arange[None, :width] < prompt_length[:, None]).long(),
        "state_ids": state_ids,
        "state_mask": (arange[None, :steps] < state_length[:, None]).long(),
        "state_length": state_length,
    }


class LMActorCriticPolicy(ActorCriticPolicy):
    """π and V for SB3's PPO around a pretrained :class:`~agents.policy.StudentPolicy`.

    The action distribution is Categorical over V + 1: the student's LM head plus its <τ> logit at
    the state after each observation's (prompt, X^(in) prefix), for either model family. A rollout
    (no gradients, the same rows at every step) reads it incrementally (:class:`IncrementalStates`:
    one decoder step per env step, a row restarting on a new episode); a training minibatch by one
    teacher-forced pass per episode in it (:func:`teacher_forced_states`). Nothing of SB3's
    MLP/action head is built. The value is either ``"head"`` (an MLP on the student's final
    decoder state, detached, so that only the policy loss trains the LM) or ``"network"`` (a
    :class:`~agents.policy.ValueNetwork`, a copy of the student with a scalar head).

    Extra keyword arguments (``policy_kwargs``): ``student`` (a directory written by
    ``StudentPolicy.save``, or a loaded StudentPolicy), ``value_model``, ``value_hidden`` (the head's
    hidden sizes) and ``value_lr_scale`` (the value parameters' learning rate as a multiple of the
    policy's; SB3 has one schedule, the scale is applied around every optimiser step).
    The student is kept in eval mode (dropout off, as in §5.2) in training too, so PPO's ratio is
    exactly 1 at the first epoch.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        lr_schedule: Schedule,
        student: str | StudentPolicy | None = None,
        value_model: str = "head",
        value_hidden: Sequence[int] = (256,),
        value_lr_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if student is None:
            raise ValueError("LMActorCriticPolicy needs policy_kwargs={'student': <phase-1 policy directory>}")
        if value_model not in ("head", "network"):
            raise ValueError(f"value_model must be 'head' or 'network', got {value_model!r}")
        if value_lr_scale <= 0:
            raise ValueError(f"value_lr_scale must be positive, got {value_lr_scale}")
        # Plain attributes only before nn.Module.__init__ (which ActorCriticPolicy calls); _build loads.
        self._student_source = (student,)
        self.value_model = value_model
        self.value_hidden = tuple(int(h) for h in value_hidden)
        self.value_lr_scale = float(value_lr_scale)
        kwargs.setdefault("ortho_init", False)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        source = self._student_source[0]
        student = source if isinstance(source, StudentPolicy) else StudentPolicy.load(source, device="cpu")
        if not isinstance(self.action_space, spaces.Discrete):
            raise TypeError(
                f"LMActorCriticPolicy needs a Discrete action space (V + 1 actions), got {self.action_space}"
            )
        if student.vocab_size + 1 != self.action_space.n:
            raise ValueError(
                f"the student has V = {student.vocab_size} (so {student.vocab_size + 1} actions) but the env's "
                f"action space has {self.action_space.n}; the student and the teacher must share the vocabulary"
            )
        self.student = student.eval()
        # Rollouts read the student (and a value network) incrementally, one reader per batch size.
        self._readers: dict[tuple[int, int], IncrementalStates] = {}
        state_space = self.observation_space["state_ids"] if isinstance(self.observation_space, spaces.Dict) else None
        if state_space is None or state_space.shape is None:
            raise TypeError(f"LMActorCriticPolicy reads the env's Dict observations, got {self.observation_space}")
        self._max_episode_len = int(state_space.shape[0])
        if self.value_model == "network":
            self.value_network = ValueNetwork.from_policy(student).eval()
            value_parameters = list(self.value_network.parameters())
        else:
            layers: list[nn.Module] = []
            width = student.model.config.hidden_size  # T5 configs map it to d_model
            for hidden in self.value_hidden:
                layers += [nn.Linear(width, hidden), nn.Tanh()]
                width = hidden
            layers.append(nn.Linear(width, 1))
            self.value_head = nn.Sequential(*layers)
            if self.ortho_init:
                for module in list(self.value_head)[:-1]:
                    module.apply(lambda m: self.init_weights(m, gain=np.sqrt(2)))
                self.init_weights(self.value_head[-1], gain=1.0)
            value_parameters = list(self.value_head.parameters())
        groups = [
            {"params": list(self.student.parameters()), "lr_scale": 1.0},
            {"params": value_parameters, "lr_scale": self.value_lr_scale},
        ]
        # optimizer_class is an Optimizer subclass taking lr (Adam by default), as SB3's own _build assumes.
        self.optimizer = self.optimizer_class(groups, lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]
        self.optimizer.register_step_pre_hook(_scale_lr)
        self.optimizer.register_step_post_hook(_restore_lr)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        source = self._student_source[0]
        data.update(
            student=source if not isinstance(source, nn.Module) else None, value_model=self.value_model,
            value_hidden=self.value_hidden, value_lr_scale=self.value_lr_scale,
        )
        return data

    def set_training_mode(self, mode: bool) -> None:
        super().set_training_mode(mode)
        self.student.eval()
        if self.value_model == "network":
            self.value_network.eval()

    # distributions and values ------------------------------------------------------------------
    def _batch(self, obs: PyTorchObs) -> dict[str, torch.Tensor]:
        if not isinstance(obs, Mapping):
            raise TypeError(f"LMActorCriticPolicy reads Dict observations, got a {type(obs).__name__}")
        return observation_batch(obs, self.device)

    def _reader(self, model: _StateModel, t: dict[str, torch.Tensor]) -> IncrementalStates | None:
        """The incremental reader of ``model`` for this batch, or None where a teacher-forced pass applies.

        A rollout calls the policy without gradients with the same rows at every step: one reader per
        (model, batch size), so that SB3's one-row calls on terminal observations leave the rollout's cache alone.
        """
        if torch.is_grad_enabled():
            return None  # a training forward: one teacher-forced pass per episode carries the gradients
        key = (id(model), len(t["state_length"]))
        reader = self._readers.get(key)
        if reader is None:
            reader = self._readers[key] = IncrementalStates(model, self._max_episode_len)
        return reader

    def _current_states(self, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, PromptFeatures]:
        """The student's final state ``[B, d]`` after each observation's last action, and its prompt reads."""
        reader = self._reader(self.student, t)
        return reader.current(t) if reader is not None else teacher_forced_states(self.student, t)

    def _head_values(self, current: torch.Tensor) -> torch.Tensor:
        # The head's dtype is that of its first parameter (the first Linear's weight).
        return self.value_head(current.detach().to(next(self.value_head.parameters()).dtype)).float()

    def _network_values(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        reader = self._reader(self.value_network, t)
        states = reader.current(t)[0] if reader is not None else teacher_forced_states(self.value_network, t)[0]
        head = self.value_network.value_head
        return head(states.to(head.weight.dtype)).float()

    def _evaluate(self, obs: PyTorchObs) -> tuple[torch.Tensor, torch.Tensor]:
        """Action logits ``[B, V+1]`` and values ``[B, 1]`` at each observation's current state."""
        t = self._batch(obs)
        current, prompt = self._current_states(t)
        logits = self.student.head(current, prompt).float()
        values = self._head_values(current) if self.value_model == "head" else self._network_values(t)
        return logits, values

    def _logits(self, obs: PyTorchObs) -> torch.Tensor:
        """Action logits ``[B, V+1]`` at each observation's current state."""
        current, prompt = self._current_states(self._batch(obs))
        return self.student.head(current, prompt).float()

    def forward(
        self, obs: PyTorchObs, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, values = self._evaluate(obs)
        distribution = self.action_dist.proba_distribution(action_logits=logits)
        actions = choose_actions(logits) if deterministic else distribution.get_actions()
        return actions.reshape(-1), values, distribution.log_prob(actions)  # Discrete: one action per row

    def evaluate_actions(
        self, obs: PyTorchObs, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        logits, values = self._evaluate(obs)
        distribution = self.action_dist.proba_distribution(action_logits=logits)
        return values, distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs: PyTorchObs) -> Distribution:
        return self.action_dist.proba_distribution(action_logits=self._logits(obs))

    def predict_values(self, obs: PyTorchObs) -> torch.Tensor:
        t = self._batch(obs)
        if self.value_model == "head":
            return self._head_values(self._current_states(t)[0])
        return self._network_values(t)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> torch.Tensor:
        # Deterministic means the greedy rule of every decoder here (call iff π(<τ>) > ½, else the
        # top token), not SB3's argmax over V + 1; sampling is the categorical over V + 1 either way.
        if deterministic:
            return choose_actions(self._logits(observation))
        return self.get_distribution(observation).get_actions()


# ---------------------------------------------------------------------------------------------- the two reads


def episode_groups(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Observations that lie on one sequence: ``(representatives [G], group of each observation [N])``.

    Two observations belong together when their prompts are equal and one's X^(in) prefix is the
    start of the other's (steps of one episode, or of episodes that agree so far): π and V at a state
    depend only on (prompt, prefix), so one teacher-forced pass over the longest of a group gives every
    member's state at its own length. The representative of a group is its longest observation.
    """
    prompt_length, state_length = t["prompt_mask"].sum(1).tolist(), t["state_length"].tolist()
    prompts, states = t["prompt_ids"].tolist(), t["state_ids"].tolist()
    order = sorted(range(len(state_length)), key=lambda i: -state_length[i])  # longest first: it founds the group
    representatives: list[int] = []
    by_prompt: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    group = [0] * len(order)
    for i in order:
        prefix = states[i][: state_length[i]]
        candidates = by_prompt.setdefault(tuple(prompts[i][: prompt_length[i]]), [])
        found = next((g for g, longest in candidates if longest[: len(prefix)] == prefix), None)
        if found is None:
            found = len(representatives)
            representatives.append(i)
            candidates.append((found, prefix))
        group[i] = found
    device = t["state_length"].device
    return torch.tensor(representatives, device=device), torch.tensor(group, device=device)


def teacher_forced_states(model: _StateModel, t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, PromptFeatures]:
    """Final states ``[N, d]`` of ``model`` after each observation's prefix, and their prompt reads, by one
    teacher-forced pass per group of :func:`episode_groups` (the training forward: gradients flow)."""
    representatives, group = episode_groups(t)
    lengths = t["state_length"]
    width = max(int(lengths[representatives].max()), 1)
    read = model.read_prompt(t["prompt_ids"][representatives], t["prompt_mask"][representatives], width + 1)
    prompt = model.prompt_features(read.states, read.mask, t["prompt_ids"][representatives])
    states = model.stream_states(read, prompt.summary, t["state_ids"][representatives, :width],
                                 t["state_mask"][representatives, :width])
    return states[group, lengths], PromptFeatures(prompt.summary[group], prompt.call_bias[group])


def _agree(new: torch.Tensor, old: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """``[B]``: whether each row of ``new`` and ``old`` (``[B, *]``, trimmed to different widths) agree before ``length``."""
    width = min(new.shape[1], old.shape[1])
    columns = torch.arange(width, device=new.device)[None, :]
    same = ((new[:, :width] == old[:, :width]) | (columns >= length[:, None])).all(1)
    return same & (length <= width)


def _weights_version(model: nn.Module) -> tuple[int, ...]:
    # Every in-place write to a parameter (an optimiser step, load_state_dict, copy_) bumps its version
    # counter: a cache built before it holds keys and values of other weights.
    return tuple(p._version for p in model.parameters())


class IncrementalStates:
    """A :class:`~agents.policy._StateModel`'s final states at the current observations of a fixed set of
    rows, one incremental decoder step per environment step (an :class:`~agents.policy.IncrementalReader`).

    Per row it keeps what the cache has read (prompt, X^(in) prefix). An observation that starts an
    episode (``state_length == 0``) restarts its row (T5: the encoder; causal: the prefill); one that
    extends the row's prefix by one token feeds that token; a batch that is the last one again is
    answered from memory. Anything else (the first call, weights changed since the cache was built,
    e.g. by PPO's update between two rollouts, or observations that do not follow on) rebuilds every
    row: a restart and one teacher-forced step over each prefix, then a per-row rollback of the padding.
    """

    def __init__(self, model: _StateModel, max_episode_len: int) -> None:
        self.model = model
        self.max_episode_len = max_episode_len
        self.reader: IncrementalReader | None = None
        self.version: tuple[int, ...] = ()
        self.rebuilds = 0  # how often the cache was rebuilt (the tests read it)
        self._prompt_ids = self._prompt_length = self._state_ids = self._state_length = torch.empty(0)
        self._last: tuple[torch.Tensor, PromptFeatures] | None = None  # what the last call returned

    @torch.no_grad()
    def current(self, t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, PromptFeatures]:
        """``[B, d]`` final states after each observation's prefix, and the rows' prompt reads."""
        if self.reader is None or self._last is None or self.version != _weights_version(self.model):
            return self._rebuild(t)
        length, prompt_length = t["state_length"], t["prompt_mask"].sum(1)
        known = self._state_length
        # Equal lengths, then equal tokens before them (both batches are at least that wide where lengths agree).
        same_prompt = (prompt_length == self._prompt_length) & _agree(t["prompt_ids"], self._prompt_ids, prompt_length)
        same_prefix = (length >= known) & _agree(t["state_ids"], self._state_ids, known)
        if bool((same_prompt & same_prefix & (length == known)).all()):
            return self._last  # the last observations again (e.g. values, then actions)
        follows = same_prompt & same_prefix & (length == known + 1)
        if not bool(((length == 0) | follows).all()):
            return self._rebuild(t)
        return self._remember(t, self.reader.step(t))

    def _rebuild(self, t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, PromptFeatures]:
        self.rebuilds += 1
        self.reader = IncrementalReader(self.model, len(t["state_length"]), self.max_episode_len)
        current = self.reader.catch_up(t)
        self.version = _weights_version(self.model)
        return self._remember(t, current)

    def _remember(
        self, t: Mapping[str, torch.Tensor], current: tuple[torch.Tensor, PromptFeatures]
    ) -> tuple[torch.Tensor, PromptFeatures]:
        self._prompt_ids, self._prompt_length = t["prompt_ids"].clone(), t["prompt_mask"].sum(1)
        self._state_ids, self._state_length = t["state_ids"].clone(), t["state_length"].clone()
        self._last = current
        return current


def _scale_lr(optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)


def _restore_lr(optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group.pop("base_lr", group["lr"])


# ---------------------------------------------------------------------------------------------- callbacks


class LagrangeCallback(BaseCallback):
    """One dual step per budget after every rollout, from the teacher use of the episodes that ended.

    The dual is :class:`~agents.lagrangian.BudgetDual`, the same object PCL uses. The teacher fraction
    of budget b is token-level: Σ calls / Σ tokens over the episodes of budget b that ended in the
    last ``window`` rollouts (read from the episode-end infos: ``teacher_fraction`` ×
    ``len(output_ids)`` calls). Then λ ← clip(λ + η(f − b), floor, cap), set on the env for the next
    rollout, and logged as ``lagrange/lambda_b=…`` and ``lagrange/teacher_fraction_b=…``.
    """

    def __init__(
        self, budgets: Sequence[float], lr: float = 1e-2, cap: float = 2.0, window: int = 4, floor: float = 0.0,
        lambdas: Mapping[float, float] | None = None, verbose: int = 0, rule: str = "integral",
        gains: PIDGains | None = None,
    ) -> None:
        super().__init__(verbose)
        self.dual = make_dual(budgets, rule, lr=lr, cap=cap, floor=floor, window=window, gains=gains)
        if lambdas:
            self.dual.lambdas.update({self.dual.key(b): float(v) for b, v in lambdas.items()})
        self._counts: dict[float, list[int]] = {}

    @property
    def lambdas(self) -> dict[float, float]:
        return self.dual.lambdas

    @property
    def fractions(self) -> dict[float, float]:
        return self.dual.fractions

    @property
    def history(self) -> deque[dict[float, tuple[float, float]]]:
        return self.dual.history

    def _init_callback(self) -> None:
        self._env().set_lagrange_multipliers(self.lambdas)

    def _env(self) -> SB3VecEnvAdapter:
        env = self.training_env.unwrapped
        if not isinstance(env, SB3VecEnvAdapter):
            raise TypeError(
                f"LagrangeCallback sets λ on an SB3VecEnvAdapter, but the training env is a {type(env).__name__}"
            )
        return env

    def _on_rollout_start(self) -> None:
        self._counts = {}

    def _on_step(self) -> bool:
        for done, info in zip(self.locals["dones"], self.locals["infos"], strict=True):
            if done and "teacher_fraction" in info:
                tokens = len(info["output_ids"])
                calls = int(round(float(info["teacher_fraction"]) * tokens))
                acc = self._counts.setdefault(self.dual.key(info["budget"]), [0, 0])
                acc[0] += calls
                acc[1] += tokens
        return True

    def _on_rollout_end(self) -> None:
        self.dual.record({b: (c, t) for b, (c, t) in self._counts.items()})
        self._counts = {}
        self.dual.step()
        self._env().set_lagrange_multipliers(self.lambdas)
        fractions = self.fractions
        for b in self.dual.budgets:
            self.logger.record(f"lagrange/lambda_b={budget_label(b)}", self.lambdas[b])
            if b in fractions:
                self.logger.record(f"lagrange/teacher_fraction_b={budget_label(b)}", fractions[b])

    def state_dict(self) -> dict[str, Any]:
        return self.dual.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.dual.load_state_dict(state)


class WallTimeCallback(BaseCallback):
    """Stop ``learn`` once ``seconds`` have passed since it started (None: never)."""

    def __init__(self, seconds: float | None, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.seconds = seconds
        self.stopped = False
        self._start = time.monotonic()

    def _on_training_start(self) -> None:
        self._start = time.monotonic()

    def _on_step(self) -> bool:
        if self.seconds is not None and time.monotonic() - self._start > self.seconds:
            self.stopped = True
            return False
        return True


class PeriodicCallback(BaseCallback):
    """Call ``action(model)`` at the start of a rollout once ``every`` timesteps passed since the last call.

    At a rollout's start the previous update is done and λ is stepped, so the model, the
    optimiser and λ are consistent with each other there.
    """

    def __init__(self, every: int, action: Callable[[BaseAlgorithm], None], verbose: int = 0) -> None:
        super().__init__(verbose)
        self.every, self.action = every, action
        self.last = 0

    def _on_training_start(self) -> None:
        self.last = self.model.num_timesteps

    def _on_rollout_start(self) -> None:
        if self.every and self.model.num_timesteps - self.last >= self.every:
            self.last = self.model.num_timesteps
            self.action(self.model)

    def _on_step(self) -> bool:
        return True
