"""Data-parallel training (agents/distributed.py) on CPU processes with gloo.

The pure helpers are checked against hand computations; the collectives in two real processes
(torch.multiprocessing with a gloo group, as torchrun would start them); the commands end to end
under the real launcher (``python -m torch.distributed.run``), marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from agents.config import config_to_json
from agents.distributed import (
    Distributed,
    all_sum_counts,
    check_replicas,
    data_parallel_loss_scale,
    draw_examples,
    merge_reward_stats,
    rank_part,
    rank_seed,
    rows_per_rank,
    shard,
    shard_bounds,
    wrap,
)
from agents.gkd import GKDConfig
from agents.lagrangian import merge_counts
from agents.policy import StudentPolicy, ValueNetwork
from agents.train import TrainConfig, episode_rewards, optimizers_for, pcl_update
from agents.trajectories import Trajectories, collect_on_policy
from tests.tiny_task import make_tiny_task
from tw_env.registration import make_task
from tw_env.rewards import RunningRewardStats
from tw_env.vector_env import TeacherAssistedDecodingVectorEnv

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- pure helpers
def test_loss_scale_makes_the_rank_average_the_global_mean():
    # Ranks with 3 and 1 rows of losses 1,2,3 and 10: global mean 16/4 = 4.
    means, counts = [2.0, 10.0], [3, 1]
    scales = [data_parallel_loss_scale(n, 4, 2) for n in counts]
    assert scales == [1.5, 0.5]
    assert sum(s * m for s, m in zip(scales, means, strict=True)) / 2 == 4.0  # DDP divides by N
    assert data_parallel_loss_scale(5, 10, 2) == 1.0  # equal shares: unchanged
    assert data_parallel_loss_scale(0, 0, 2) == 1.0  # nothing anywhere: no division by zero


def test_counts_merge_per_budget():
    merged = merge_counts([{0.1: (1, 10), 0.3: (3, 10)}, {0.1: (2, 5)}, {0.5: (0, 4)}])
    assert merged == {0.1: (3, 15), 0.3: (3, 10), 0.5: (0, 4)}
    assert all_sum_counts({0.2: (1, 4)}, Distributed()) == {0.2: (1, 4)}


def test_global_batches_split_evenly_or_say_why():
    assert rows_per_rank(48, 2, "num_envs") == 24
    with pytest.raises(ValueError, match=r"num_envs=5 does not split over 2 processes.*multiple"):
        rows_per_rank(5, 2, "num_envs")


def test_shards_cover_every_example_once_in_order():
    for total in (0, 1, 5, 512):
        for world in (1, 2, 3):
            bounds = [shard_bounds(total, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    assert shard(list("abcde"), Distributed(1, 2)) == ["d", "e"]


def test_one_process_draws_and_seeds_as_before():
    assert rank_seed(7, 0) == 7 and rank_seed(7, 1) != rank_seed(7, 2) != 7
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert np.array_equal(draw_examples(a, 100, 8, Distributed()), b.integers(100, size=8))
    rank1 = draw_examples(np.random.default_rng(3), 100, 200, Distributed(1, 2))
    assert rank1.min() >= 50 and rank1.max() < 100  # rank 1 of 2 draws from the second half only


def test_reward_stats_report_what_was_added_since_a_mark():
    stats = RunningRewardStats(window=4, min_count=1)
    stats.update([1.0], [2.0])
    mark = stats.mark()
    stats.update([3.0, 4.0], [5.0])
    assert stats.added_since(mark) == ([3.0, 4.0], [5.0])
    stats.update([6.0, 7.0, 8.0, 9.0, 10.0], [])  # more than the window: only its last 4 remain
    assert stats.added_since(mark)[0] == [7.0, 8.0, 9.0, 10.0]


def test_resuming_with_another_world_size_is_refused_clearly(tmp_path):
    state = {"world_size": 2, "rng": "rank0", "rank_rng": ["rank0", "rank1"]}
    assert rank_part(state, "rng", Distributed(1, 2), tmp_path) == "rank1"
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) but this run has 1.*same world size|world size"):
        rank_part(state, "rng", Distributed(), tmp_path)
    assert rank_part({"rng": "old"}, "rng", Distributed(), tmp_path) == "old"  # a 1-process checkpoint


# ---------------------------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_two_processes(fn, *args) -> None:
    """Run ``fn(rank, *args)`` in 2 spawned processes joined in a gloo group (what torchrun sets up)."""
    mp.spawn(_join_group, args=(fn, _free_port(), args), nprocs=2, join=True)


def _join_group(rank: int, fn, port: int, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _merge_stats_on_rank(rank: int, out: str) -> None:
    info = Distributed(rank, 2)
    stats = RunningRewardStats(window=8, min_count=1)
    stats.update([0.0], [0.0])
    mark = stats.mark()
    stats.update([float(rank + 1)] * (rank + 1), [float(-rank - 1)] * 2)  # each rank's own episodes
    merge_reward_stats(stats, mark, info)
    counts = all_sum_counts({0.1: (rank, 10), 0.3: (1, 5)}, info)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"stats": stats.state_dict(), "mu": stats.mu,
                                                         "sigma": stats.sigma, "counts": list(counts.items())}))


def test_normalisers_and_teacher_use_are_merged_over_ranks(tmp_path):
    _in_two_processes(_merge_stats_on_rank, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # identical μ_r, σ_r and counts everywhere
    assert ranks[0]["stats"] == {"teacher": [0.0, 1.0, 2.0, 2.0], "student": [0.0, -1.0, -1.0, -2.0, -2.0]}
    assert ranks[0]["mu"] == pytest.approx(1.25)
    assert ranks[0]["counts"] == [[0.1, [1, 20]], [0.3, [2, 10]]]


def _disagree_on_rank(rank: int, out: str) -> None:
    info = Distributed(rank, 2)
    same = [torch.ones(3)]
    check_replicas(info, same, {0.1: 0.5})
    try:
        check_replicas(info, [torch.ones(3) * (1 + rank * 1e-7)], {0.1: 0.5}, what="weights")
    except RuntimeError as err:
        Path(out, f"rank{rank}.txt").write_text(str(err))


def test_replica_check_catches_ranks_that_drift_apart(tmp_path):
    _in_two_processes(_disagree_on_rank, str(tmp_path))
    for r in (0, 1):
        assert "ranks disagree on their weights: ranks [1] differ from rank 0" in (tmp_path / f"rank{r}.txt").read_text()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def fixed_batch(tiny, tmp_path_factory) -> Path:
    """A phase-1-style policy folder and 5 real on-policy episodes of the tiny task, on disk."""
    folder = tmp_path_factory.mktemp("fixed")
    task = make_task("TrainingWheels-Synthetic-v0", **tiny.env_kwargs(), max_new_tokens=6, device="cpu")
    torch.manual_seed(0)
    policy = StudentPolicy.load(tiny.student_dir, device=torch.device("cpu")).eval()
    policy.save(folder / "policy")
    envs = TeacherAssistedDecodingVectorEnv(5, task)
    batch, _ = collect_on_policy(envs, policy, [0.0, 0.1, 0.3, 0.5, 0.2], [0, 1, 2, 3, 4],
                                 torch.Generator().manual_seed(0), 1.0)
    save_file({f: getattr(batch, f).contiguous() for f in batch.__dataclass_fields__}, str(folder / "batch.safetensors"))
    return folder


def _pcl_update_on(folder: Path, rows: list[int], info: Distributed) -> dict[str, torch.Tensor]:
    config = TrainConfig(tau=0.1, policy_lr=1e-2, value_lr=1e-2, grad_clip=1.0)
    torch.manual_seed(1)
    policy = StudentPolicy.load(folder / "policy", device=torch.device("cpu")).eval()
    value = ValueNetwork.from_policy(policy).eval()
    batch = Trajectories(**load_file(str(folder / "batch.safetensors"))).select(rows)
    rewards = episode_rewards(batch, {b: 0.5 for b in (0.0, 0.1, 0.2, 0.3, 0.5)}, -1.0, 2.0)
    scale = data_parallel_loss_scale(len(rows), 5, info.world_size)
    pcl_update(wrap(policy, info), wrap(value, info), batch, rewards, config, optimizers_for(config, policy, value), scale)
    return ({f"policy.{k}": v.clone() for k, v in policy.state_dict().items()}
            | {f"value.{k}": v.clone() for k, v in value.state_dict().items()})


def _pcl_update_on_rank(rank: int, folder: str) -> None:
    rows = [[0, 1, 2], [3, 4]][rank]  # unequal shares: the loss scale matters
    save_file(_pcl_update_on(Path(folder), rows, Distributed(rank, 2)), str(Path(folder) / f"rank{rank}.safetensors"))


def test_one_pcl_update_on_two_ranks_equals_one_on_one_rank(fixed_batch):
    single = _pcl_update_on(fixed_batch, [0, 1, 2, 3, 4], Distributed())
    _in_two_processes(_pcl_update_on_rank, str(fixed_batch))
    rank0, rank1 = (load_file(str(fixed_batch / f"rank{r}.safetensors")) for r in (0, 1))
    original = load_file(str(fixed_batch / "policy" / "model.safetensors"))
    assert any(not torch.equal(single[f"policy.model.{k}"], v) for k, v in original.items())  # the update moved weights
    for key, expected in single.items():
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ at {key}"
        torch.testing.assert_close(rank0[key], expected, rtol=1e-5, atol=1e-6, msg=key)


def _gkd_update_on(tiny_dir: Path, rows: list[int], info: Distributed) -> dict[str, torch.Tensor]:
    from transformers import T5ForConditionalGeneration

    from agents.gkd import GKDBatch, gkd_update

    student = T5ForConditionalGeneration.from_pretrained(tiny_dir / "student").eval()
    data = load_file(str(tiny_dir / "gkd_batch.safetensors"))
    batch = GKDBatch(data["prompt_ids"][rows], data["prompt_mask"][rows], data["tokens"][rows],
                     data["mask"][rows], data["from_student"][rows])
    tokens, total = float(batch.mask.sum()), float(data["mask"].sum())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    gkd_update(student, optimizer, batch, data["teacher_logits"][rows], 1.0, wrap(student, info),
               data_parallel_loss_scale(tokens, total, info.world_size))
    return dict(student.state_dict())


def _gkd_update_on_rank(rank: int, tiny_dir: str) -> None:
    state = _gkd_update_on(Path(tiny_dir), [[0, 1], [2, 3, 4, 5]][rank], Distributed(rank, 2))
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(Path(tiny_dir) / f"gkd_rank{rank}.safetensors"))


def test_one_gkd_update_on_two_ranks_equals_one_on_one_rank(tiny, tmp_path):
    from transformers import T5ForConditionalGeneration

    from agents.gkd import collect, logits_on

    task = make_task("TrainingWheels-Synthetic-v0", **tiny.env_kwargs(), max_new_tokens=6, device="cpu")
    student = T5ForConditionalGeneration.from_pretrained(tiny.student_dir).eval()
    student.save_pretrained(tmp_path / "student")
    ids, mask = task.plain_prompts([e.source for e in task.examples[:6]], "{instruction}: {source}", "cpu")
    torch.manual_seed(0)
    batch = collect(student, task.teacher, ids, mask, 3, 6, task.eos_token_id)  # rows end at different lengths
    with torch.no_grad():
        teacher_logits = logits_on(task.teacher, batch)[..., : student.config.vocab_size].float()
    save_file({"prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask, "tokens": batch.tokens,
               "mask": batch.mask, "from_student": batch.from_student, "teacher_logits": teacher_logits.contiguous()},
              str(tmp_path / "gkd_batch.safetensors"))
    assert batch.mask[:2].sum() * 2 != batch.mask.sum()  # the two shards hold unequal token counts
    single = _gkd_update_on(tmp_path, list(range(6)), Distributed())
    _in_two_processes(_gkd_update_on_rank, str(tmp_path))
    rank0, rank1 = (load_file(str(tmp_path / f"gkd_rank{r}.safetensors")) for r in (0, 1))
    original = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert any(not torch.equal(single[k], original[k]) for k in original)
    for key, expected in single.items():
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ at {key}"
        torch.testing.assert_close(rank0[key], expected, rtol=1e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------- the commands under torchrun
def _launch(command: str, config, path: Path, processes: int, new_session: bool = False) -> subprocess.Popen:
    path.write_text(config_to_json(config))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                "--master-port", str(_free_port())] if processes > 1 else [sys.executable]
    return subprocess.Popen([*launcher, "-m", "scripts.cli", command, "--config", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=new_session)


def _finish(proc: subprocess.Popen) -> None:
    assert proc.wait(timeout=900) == 0, proc.stderr.read().decode()[-4000:]


def _train_config(tiny, out: Path, **overrides) -> TrainConfig:
    base = dict(env_kwargs=tiny.env_kwargs(), output_dir=str(out), max_new_tokens=6, bc_batches=4, bc_batch_size=6,
                pcl_batches=6, num_envs=6, eval_every=3, eval_examples=10, checkpoint_every=2, tau=0.1,
                policy_lr=1e-3, value_lr=1e-3, bc_lr=1e-3, replay_per_update=4, threads=1, device="cpu",
                oracle_rounding="stochastic", lagrange_floor=-1.0, lagrange_lr=0.5, check_replicas=True)
    return TrainConfig(**(base | overrides))


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors")) | load_file(str(directory / "training_wheels.safetensors"))


@pytest.mark.slow
def test_two_process_training_keeps_ranks_identical_and_writes_once(tiny, tmp_path):
    """Phases 1 and 2 on 2 gloo ranks: every update is followed by a replica check (weights, λ, μ_r, σ_r), every
    tracked call rule by a check that both ranks set the same thresholds from their pooled rollouts."""
    _finish(_launch("train", _train_config(tiny, tmp_path / "run", track_call_rule=True, call_rule_episodes=24),
                    tmp_path / "train.json", 2))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["phase1"]["processes"] == 2 and summary["phase2"]["processes"] == 2
    assert len(summary["phase2"]["selection"]["evaluations"]) == 3  # steps 0, 3, 6
    for record in summary["phase2"]["selection"]["evaluations"]:  # four batches of 3 rows on each of the 2 ranks
        assert record["call_rule"]["episodes"] == 24 and len(record["call_rule"]["thresholds"]) == 6
    checkpoint = tmp_path / "run" / "phase2-checkpoints" / "step-000004"
    assert (checkpoint / "rank-1" / "state.json").exists() and (checkpoint / "rank-1" / "replay.safetensors").exists()
    rank0 = json.loads((checkpoint / "state.json").read_text())
    rank1 = json.loads((checkpoint / "rank-1" / "state.json").read_text())
    assert rank0["dual"] == rank1["dual"] and rank0["reward_stats"] == rank1["reward_stats"]
    assert rank0["rng"] != rank1["rng"]  # each rank draws its own examples and samples
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.*"))) == 1  # rank 0 logs alone

    _finish(_launch("gkd", GKDConfig(env_kwargs=tiny.env_kwargs(), output_dir=str(tmp_path / "gkd"), max_new_tokens=6,
                                     batches=3, batch_size=4, eval_every=2, eval_examples=10, threads=1, device="cpu",
                                     check_replicas=True), tmp_path / "gkd.json", 2))
    gkd = json.loads((tmp_path / "gkd" / "summary.json").read_text())
    assert gkd["processes"] == 2 and [e["step"] for e in gkd["evaluations"]] == [2, 3]


@pytest.mark.slow
def test_two_process_co_llm_router_keeps_ranks_identical(tiny, tmp_path):
    """`tw co-llm` on 2 gloo ranks, both phases, a replica check (router weights) after every update, and
    rank 0 alone writes the router."""
    from agents.co_llm import CoLLMConfig
    from agents.routers import CoLLMRouter

    config = CoLLMConfig(env_kwargs=tiny.env_kwargs(), output_dir=str(tmp_path / "two"), init_batches=2, batches=2,
                         batch_size=4, eval_every=0, eval_examples=10, threads=1, device="cpu", check_replicas=True)
    _finish(_launch("co-llm", config, tmp_path / "two.json", 2))
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["processes"] == 2 and [e["step"] for e in two["evaluations"]] == [4]
    assert CoLLMRouter.load(tmp_path / "two" / "best").deferral.weight.abs().sum() > 0
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.*"))) == 1


@pytest.mark.slow
def test_killed_two_process_run_resumes_exactly(tiny, tmp_path):
    reference = _train_config(tiny, tmp_path / "reference", pcl_batches=8, eval_every=4, check_replicas=False)
    _finish(_launch("train", reference, tmp_path / "reference.json", 2))

    interrupted = _train_config(tiny, tmp_path / "interrupted", pcl_batches=8, eval_every=4, check_replicas=False)
    proc = _launch("train", interrupted, tmp_path / "interrupted.json", 2, new_session=True)
    pointer = tmp_path / "interrupted" / "phase2-checkpoints" / "latest"
    deadline = time.time() + 900
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    assert not (tmp_path / "interrupted" / "final").exists(), "the run finished before it could be killed"

    one = _launch("train", interrupted, tmp_path / "interrupted.json", 1)  # the wrong world size is refused
    assert one.wait(timeout=600) != 0
    assert "written by 2 process(es) but this run has 1" in one.stderr.read().decode()

    _finish(_launch("train", interrupted, tmp_path / "interrupted.json", 2))
    a, b = _weights(tmp_path / "reference" / "final"), _weights(tmp_path / "interrupted" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((tmp_path / "reference" / "summary.json").read_text())["phase2"]
    sb = json.loads((tmp_path / "interrupted" / "summary.json").read_text())["phase2"]
    assert sa["lambdas"] == sb["lambdas"] and sa["reward_normalisers"] == sb["reward_normalisers"]
    assert sa["selection"]["evaluations"] == sb["selection"]["evaluations"]


@pytest.mark.slow
def test_the_parallel_benchmark_reports_both_variants(tiny, tmp_path):
    from scripts.bench_parallel import BenchParallelConfig
    from scripts.bench_parallel import run as bench

    policy = tmp_path / "phase1"
    StudentPolicy.load(tiny.student_dir, device=torch.device("cpu")).save(policy)
    train, gkd = tmp_path / "train.json", tmp_path / "gkd.json"
    train.write_text(json.dumps({"num_envs": 6, "max_new_tokens": 6, "replay_per_update": 4}))
    gkd.write_text(json.dumps({"batch_size": 4, "max_new_tokens": 6}))
    result = bench(BenchParallelConfig(env_kwargs=tiny.env_kwargs(), init=str(policy), train_config=str(train),
                                       gkd_config=str(gkd), pcl_batches=2, gkd_batches=2, repeats=1,
                                       output=str(tmp_path / "out.json")))
    assert [(r["processes"], r["threads_per_process"]) for r in result["runs"]] == [(1, 2), (2, 1)]
    assert all(r["pcl_tokens_per_s"] > 0 and r["gkd_tokens_per_s"] > 0 for r in result["runs"])
    assert len(result["pcl_parallel_over_single"]) == 1
    assert json.loads((tmp_path / "out.json").read_text())["runs"] == result["runs"]


def _pid_dual_on_rank(rank: int, out: str) -> None:
    from agents.lagrangian import PIDBudgetDual, PIDGains

    info = Distributed(rank, 2)
    dual = PIDBudgetDual([0.1, 0.3], PIDGains(kp=0.5, ki=0.1, kd=0.2, smoothing=0.4), cap=2.0, floor=-2.0)
    for step in range(5):  # each rank sees its own rollouts; the dual steps on every rank's
        own = {0.1: (rank + step, 20 + rank), 0.3: (3 * rank + 2, 12)}
        dual.record(all_sum_counts(own, info))
        dual.step()
    Path(out, f"rank{rank}.json").write_text(json.dumps(dual.state_dict()))


def test_two_ranks_hold_equal_pid_lambdas(tmp_path):
    _in_two_processes(_pid_dual_on_rank, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the same λ, integral, averages and previous fraction on both ranks
    assert any(v != 0.0 for _, v in ranks[0]["lambdas"])  # and they moved
