"""Training Wheels: teacher-assisted decoding as a Gymnasium environment (arXiv 2502.17717).

Importing this package registers the tasks of :data:`tw_env.registration.TASKS` (a task is one row
there); nothing is downloaded or trained at import:

- ``TrainingWheels-XSum-v0``: summarization, teacher google/flan-t5-xl, student google/flan-t5-small.
- ``TrainingWheels-WMT19-v0``: German→English (wmt/wmt19, de-en), same models.
- ``TrainingWheels-Synthetic-v0``: the embedded task, a synthetic translation language whose small
  models train on a CPU in minutes on first use.
- ``TrainingWheels-SyntheticCausal-v0``: the same language with a decoder-only (Llama-style) teacher
  and student, also trained on first use.

Each has a native vector form: ``gym.make_vec(id, num_envs=N, vectorization_mode="vector_entry_point")``.
"""

from tw_env.env import TeacherAssistedDecodingEnv
from tw_env.prompts import BUDGET_KEYWORDS, BUDGETS, make_prompt
from tw_env.registration import make_task, register_tasks
from tw_env.rewards import RunningRewardStats, eq17_reward
from tw_env.task import Task
from tw_env.tasks import Example
from tw_env.vector_env import TeacherAssistedDecodingVectorEnv

__all__ = [
    "BUDGETS",
    "BUDGET_KEYWORDS",
    "Example",
    "RunningRewardStats",
    "TeacherAssistedDecodingEnv",
    "TeacherAssistedDecodingVectorEnv",
    "Task",
    "eq17_reward",
    "make_prompt",
    "make_task",
]

register_tasks()
