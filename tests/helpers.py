"""Helpers shared by the tests of both model families (T5 and decoder-only): comparing a batched
decoder with each row alone, a vector env's rows with single envs, and the env checkers."""

from __future__ import annotations

import warnings

import numpy as np

from agents.decoding import DecodeResult

EOS = 1  # the synthetic tokenizer's EOS id, which every tiny test model uses


def single_rows(prompts):
    """Each prompt alone, unpadded: ``[(ids [1, L_i], mask [1, L_i])]``."""
    ids, mask = prompts
    return [(ids[i : i + 1, :n], mask[i : i + 1, :n]) for i, n in enumerate(mask.sum(dim=1).tolist())]


def per_row(decode, prompts) -> DecodeResult:
    """Run ``decode(ids, mask)`` on each prompt alone and gather the rows into one result."""
    results = [decode(ids, mask) for ids, mask in single_rows(prompts)]
    return DecodeResult(
        output_ids=[r.output_ids[0] for r in results],
        from_teacher=[r.from_teacher[0] for r in results],
        teacher_calls=[r.teacher_calls[0] for r in results],
        teacher_forwards=sum(r.teacher_forwards for r in results),
        wasted_tokens=[r.wasted_tokens[0] for r in results],
    )


def assert_same_rows(batched: DecodeResult, single: DecodeResult) -> None:
    assert batched.output_ids == single.output_ids
    assert batched.from_teacher == single.from_teacher
    assert batched.teacher_calls == single.teacher_calls
    assert batched.wasted_tokens == single.wasted_tokens


def check_well_formed(result: DecodeResult, max_new_tokens: int) -> None:
    """Each row ends at its first EOS or at max_new_tokens; the bookkeeping is consistent."""
    for ids, flags, calls in zip(result.output_ids, result.from_teacher, result.teacher_calls, strict=True):
        assert 1 <= len(ids) <= max_new_tokens
        assert EOS not in ids[:-1]
        assert ids[-1] == EOS or len(ids) == max_new_tokens
        assert len(flags) == len(ids) and calls == sum(flags)
    assert result.teacher_fraction == [
        c / len(i) for c, i in zip(result.teacher_calls, result.output_ids, strict=True)
    ]


def row_obs(obs: dict, row: int) -> dict:
    """Row ``row`` of a vector env's observation."""
    return {k: v[row] for k, v in obs.items()}


def assert_obs_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def check_env_quietly(env, spec_less: bool = False) -> None:
    """Gymnasium's and Stable-Baselines3's env checkers, every warning an error (but, for an env made
    without ``gym.make``, the one warning that only a spec-less env gets: gymnasium cannot re-make it
    in other render modes)."""
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if spec_less:
            warnings.filterwarnings("ignore", message=".*not having a spec")
        check_env(env)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sb3_check_env(env, warn=True)
