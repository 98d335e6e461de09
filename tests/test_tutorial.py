"""docs/tutorial.md runs as a user pastes it, and its agent file runs end to end, at a tiny size.

The tiny size is the embedded task's cache built with 3 training steps per model (seconds instead
of minutes), so every ``gym.make("TrainingWheels-Synthetic-v0")`` of the tutorial loads real,
barely trained models of the real architecture, and the agent command gets flags that shrink its
run. How each fenced block is treated:

- ``python``: executed, in order, in one namespace (as pasted into one interpreter session);
- ``bash``: each ``python examples/...`` line is run as a subprocess with the tiny flags appended
  (argparse: the last flag wins); the set-up lines (``python3 -m venv``, ``pip install``) and
  ``tensorboard`` are not, since the test already runs inside the installed project;
- ``text``: printed output, not run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tw_env.synthetic as syn

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial.md"
AGENT_FILE = ROOT / "examples" / "reinforce_lagrangian.py"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SAME_AS_FILE = "<!-- tutorial-test: these lines are examples/reinforce_lagrangian.py's own -->"
SETUP_COMMANDS = ("python3 -m venv", "pip install", "tensorboard")
TINY_AGENT_FLAGS = ["--total-batches", "3", "--num-envs", "8", "--eval-examples", "8", "--threads", "1"]


def blocks(text: str) -> list[tuple[str, str]]:
    """The tutorial's fenced code blocks as (language, code), in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """The embedded task's cache with 3-step models, in a folder of its own."""
    cache = tmp_path_factory.mktemp("tw-cache")
    specs = syn.TEACHER_SPEC, syn.STUDENT_SPEC
    syn.TEACHER_SPEC = dataclasses.replace(syn.TEACHER_SPEC, steps=3, warmup=1)
    syn.STUDENT_SPEC = dataclasses.replace(syn.STUDENT_SPEC, steps=3, warmup=1)
    try:
        syn.ensure_synthetic_models(cache, seed=0, progress=False)
    finally:
        syn.TEACHER_SPEC, syn.STUDENT_SPEC = specs
    return cache


def run_agent(command: str, output_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    args = command.split()
    if args[0] != "python":
        raise AssertionError(f"expected a `python examples/...` command, got {command!r}")
    env = {**os.environ, "TW_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args[1:], *TINY_AGENT_FLAGS, "--output-dir", str(output_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


def check_results(output_dir: Path) -> None:
    results = json.loads((output_dir / "results.json").read_text())
    assert [r["budget"] for r in results["agent"]] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    for row in results["agent"]:
        assert 0.0 <= row["teacher_fraction"] <= 1.0 and 0.0 <= row["bleu"] <= 100.0
    # The two reference points are exact by construction: the student never calls, the teacher always.
    assert results["student alone"]["teacher_fraction"] == 0.0
    assert results["teacher alone"]["teacher_fraction"] == 1.0
    assert (output_dir / "reinforce_vs_pcl.png").stat().st_size > 0
    assert any(p.name.startswith("events.out.tfevents") for p in output_dir.iterdir())  # TensorBoard


def test_every_tutorial_block_runs_in_order(tiny_cache, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TW_CACHE_DIR", str(tiny_cache))
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))  # `from examples.reinforce_lagrangian import ...`, as from the root
    import matplotlib

    matplotlib.use("Agg")
    namespace: dict = {"__name__": "__tutorial__"}
    ran = {"python": 0, "agent": 0}
    for n, (language, code) in enumerate(blocks(TUTORIAL.read_text())):
        if language == "python":
            exec(compile(code, f"{TUTORIAL.name}, block {n}", "exec"), namespace)
            ran["python"] += 1
        elif language == "bash":
            for line in code.splitlines():
                command = line.split("#", 1)[0].strip()
                if not command or command.startswith(SETUP_COMMANDS):
                    continue
                output_dir = tmp_path / f"agent-{n}"
                done = run_agent(command, output_dir, tiny_cache)
                assert done.returncode == 0, f"{command!r} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                check_results(output_dir)
                ran["agent"] += 1
        else:
            assert language == "text", f"block {n}: unexpected language {language!r}"
    assert ran["python"] >= 6 and ran["agent"] == 1
    # What the blocks built is what they say: a trained-for-one-batch dual with a λ per budget.
    assert set(namespace["dual"].lambdas) == {0.0, 0.1, 0.2, 0.3, 0.4, 0.5}
    assert namespace["episodes"].calls.shape == namespace["episodes"].rewards.shape


def test_the_tutorials_training_step_is_the_agent_files() -> None:
    """The block marked as the file's own lines must not drift from the file it describes."""
    text = TUTORIAL.read_text()
    assert SAME_AS_FILE in text
    code = next(c for lang, c in blocks(text[text.index(SAME_AS_FILE):]) if lang == "python")
    file_lines = {line.strip() for line in AGENT_FILE.read_text().splitlines()}
    setup = ("from ", "import ", "print(", "args = Args()")  # the block's own set-up and its closing print
    missing = [line for line in code.splitlines()
               if line.strip() and not line.startswith(setup) and line.strip() not in file_lines]
    assert not missing, f"lines of the tutorial's training step that examples/reinforce_lagrangian.py lacks: {missing}"


def test_agent_arguments_are_a_documented_dataclass(tmp_path) -> None:
    """CleanRL style: one dataclass, a docstring per field, which is the field's --help text."""
    done = subprocess.run([sys.executable, str(AGENT_FILE), "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    sys.path.insert(0, str(ROOT))
    try:
        from examples.reinforce_lagrangian import Args
    finally:
        sys.path.remove(str(ROOT))
    from agents.config import _field_help

    helps = _field_help(Args)
    for field in dataclasses.fields(Args):
        assert helps.get(field.name), f"Args.{field.name} has no docstring"
        flag = "--" + field.name.replace("_", "-")
        assert flag in done.stdout and helps[field.name].split()[0] in done.stdout


def test_the_agent_files_student_reads_either_model_family(family_task, monkeypatch) -> None:
    """`Student` tests no family: on each family's tiny task, episodes without calls write the student's own
    greedy output (``generate`` on the same prompts), and the agent's state is finite."""
    import gymnasium as gym
    import numpy as np
    import torch

    from tw_env.families import family_of

    monkeypatch.syspath_prepend(str(ROOT))
    from examples.reinforce_lagrangian import Student, play

    n, new_tokens = 4, 6
    envs = gym.make_vec("TrainingWheels-Synthetic-v0", num_envs=n, vectorization_mode="vector_entry_point",
                        split="validation", max_new_tokens=new_tokens, **family_task.env_kwargs())
    student = Student(str(family_task.student_dir), envs.unwrapped.vocab_size)
    episodes = play(envs, student, lambda s: torch.zeros(len(s)), np.zeros(n), np.arange(n))
    assert episodes.calls.sum() == 0 and torch.isfinite(episodes.states).all()

    obs, _ = envs.reset(options={"budget": [0.0] * n, "index": list(range(n)), "autoreset": False})
    length = torch.as_tensor(obs["prompt_length"][:, 0])
    ids = torch.as_tensor(obs["prompt_ids"][:, : int(length.max())]).long()
    mask = (torch.arange(ids.shape[1])[None] < length[:, None]).long()
    family = family_of(student.lm)
    generate_ids, generate_mask = family.generation_inputs(ids, mask)
    out = student.lm.generate(input_ids=generate_ids, attention_mask=generate_mask, do_sample=False, num_beams=1,
                              max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=1)
    tokenizer = envs.unwrapped.task.tokenizer
    want = tokenizer.batch_decode(family.generated_tokens(out, generate_ids.shape[1]), skip_special_tokens=True)
    assert episodes.outputs == want
