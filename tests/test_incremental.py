"""`IncrementalDecoder` against full no-cache forwards of the same model.

Every row keeps its own episode in a shared KV cache; rows restart on their own with prompts of
other lengths, and the cache is compacted when the shared clock grows. Whatever happens, each row's
next-token logits must equal ``model(prompt, mask, decoder_inputs).logits[-1]`` of a full forward
over that row's current prompt and the decoder inputs it has read since its restart.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import T5ForConditionalGeneration

from tw_env.incremental import IncrementalDecoder

ATOL = 1e-4


@pytest.fixture(scope="module", params=["untied", "tied"])
def model(request, tiny_t5_dir, tiny_t5_tied_dir):
    path = tiny_t5_dir if request.param == "untied" else tiny_t5_tied_dir
    m = T5ForConditionalGeneration.from_pretrained(path).eval()
    assert m.config.scale_decoder_outputs is (request.param == "tied")
    return m


def random_prompt(rng: np.random.Generator, length: int) -> list[int]:
    return [int(t) for t in rng.integers(2, 500, size=length - 1)] + [1]


def padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    return ids, mask


@torch.no_grad()
def full_forward_logits(model, prompt: list[int], decoder_inputs: list[int]) -> torch.Tensor:
    """Logits at every decoder position, from one forward without any cache."""
    ids = torch.tensor([prompt])
    return model(
        input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=torch.tensor([decoder_inputs])
    ).logits[0]


class Tracker:
    """Drives an IncrementalDecoder and keeps, per row, the prompt and the decoder inputs since restart."""

    def __init__(self, model, batch_size: int, max_episode_len: int, seed: int = 0):
        self.model = model
        self.dec = IncrementalDecoder(model, batch_size, max_episode_len)
        self.rng = np.random.default_rng(seed)
        self.prompts: list[list[int]] = [[] for _ in range(batch_size)]
        self.inputs: list[list[int]] = [[] for _ in range(batch_size)]
        self.checked = 0

    def restart(self, rows: list[int], lengths: list[int]) -> None:
        prompts = [random_prompt(self.rng, n) for n in lengths]
        ids, mask = padded(prompts)
        with torch.no_grad():
            self.dec.restart(rows, ids, mask)
        for row, p in zip(rows, prompts, strict=True):
            self.prompts[row] = p
            self.inputs[row] = []

    def step(self, width: int | None = None) -> torch.Tensor:
        """One token per row (``width=None``) or a block of ``width`` tokens per row in one forward."""
        start = self.model.config.decoder_start_token_id
        k = 1 if width is None else width
        block = []
        for inp in self.inputs:
            tokens = [int(t) for t in self.rng.integers(0, 700, size=k)]
            if not inp:
                tokens[0] = start  # a restarted row reads the decoder start token first
            inp.extend(tokens)
            block.append(tokens)
        ids = torch.tensor(block)
        with torch.no_grad():
            states = self.dec.step(input_ids=ids[:, 0] if width is None else ids)
            logits = self.dec.logits(states)
        if width is None:
            logits = logits[:, None]
        assert logits.shape == (self.dec.batch_size, k, self.model.config.vocab_size)
        for row in range(self.dec.batch_size):
            expected = full_forward_logits(self.model, self.prompts[row], self.inputs[row])[-k:]
            torch.testing.assert_close(logits[row], expected, atol=ATOL, rtol=0)
            self.checked += k
        return logits

    def rollback(self, discard: list[int]) -> None:
        with torch.no_grad():
            self.dec.rollback(torch.tensor(discard))
        for row, d in enumerate(discard):
            if d:
                del self.inputs[row][-d:]


def test_rows_with_different_prompt_lengths_match_full_forwards(model):
    tr = Tracker(model, batch_size=3, max_episode_len=16)
    tr.restart([2, 0, 1], [5, 11, 3])  # the first restart in any order; row 2 gets the 5-token prompt
    assert [len(p) for p in tr.prompts] == [11, 3, 5]
    for _ in range(6):
        tr.step()
    assert tr.dec.clock == 6
    assert tr.checked == 18


def test_rows_restarting_midway_with_longer_prompts_match_full_forwards(model):
    tr = Tracker(model, batch_size=3, max_episode_len=16, seed=1)
    tr.restart([0, 1, 2], [5, 9, 3])
    for _ in range(3):
        tr.step()
    tr.restart([1], [14])  # longer than any prompt so far: the encoder states and cross-attention cache grow
    for _ in range(2):
        tr.step()
    tr.restart([2, 0], [20, 4])  # two rows at once, out of order, one even longer
    for _ in range(3):
        tr.step()
    tr.restart([1], [2])  # a shorter prompt after a longer one (padding inside the cache)
    for _ in range(2):
        tr.step()
    assert tr.dec.encoder_states.shape[1] == 20
    assert tr.checked == 30


def test_cache_compaction_keeps_the_clock_bounded_and_logits_exact(model):
    max_len = 4
    tr = Tracker(model, batch_size=3, max_episode_len=max_len, seed=2)
    tr.restart([0, 1, 2], [4, 7, 2])
    rng = np.random.default_rng(3)
    remaining = [int(rng.integers(1, max_len + 2)) for _ in range(3)]  # episodes of 1..max_len+1 reads
    clocks, restarts = [], [0, 0, 0]
    for _ in range(60):
        tr.step()
        clocks.append(tr.dec.clock)
        assert tr.dec.clock <= 2 * max_len + 2
        due = []
        for row in range(3):
            remaining[row] -= 1
            if remaining[row] == 0:
                due.append(row)
                remaining[row] = int(rng.integers(1, max_len + 2))
        if due:
            tr.restart(due, [int(rng.integers(2, 16)) for _ in due])
            for row in due:
                restarts[row] += 1
    assert min(restarts) >= 5, restarts
    # The cache was compacted several times (the clock went down), otherwise it would have reached 60.
    assert (np.diff(clocks) < 0).sum() >= 3
    assert max(clocks) <= 2 * max_len + 2
    assert tr.checked == 180


def test_multi_token_steps_and_per_row_rollback_match_full_forwards(model):
    tr = Tracker(model, batch_size=3, max_episode_len=16, seed=4)
    tr.restart([0, 1, 2], [4, 9, 6])
    tr.step()
    tr.step(width=3)  # a verifier's block: every row reads 3 tokens in one forward
    clock = tr.dec.clock
    tr.rollback([2, 0, 1])  # per-row: rejected drafts are forgotten
    assert tr.dec.clock == clock and [len(i) for i in tr.inputs] == [2, 4, 3]
    tr.step()
    tr.step(width=2)
    tr.restart([1], [13])  # a restart after a rollback, with a longer prompt
    tr.step()
    tr.rollback([1, 0, 2])
    tr.step(width=3)
    tr.rollback([0, 3, 0])  # row 1 back to its start token only
    tr.step()
    assert [len(i) for i in tr.inputs] == [9, 2, 9]


def test_random_blocks_rollbacks_and_restarts_with_compaction(model):
    max_len = 6
    tr = Tracker(model, batch_size=3, max_episode_len=max_len, seed=5)
    tr.restart([0, 1, 2], [3, 8, 5])
    rng = np.random.default_rng(6)
    clocks = []
    for _ in range(30):
        tr.step(width=int(rng.integers(1, 4)) if rng.random() < 0.5 else None)
        clocks.append(tr.dec.clock)
        discard = [int(rng.integers(0, min(2, len(i) - 1) + 1)) for i in tr.inputs]  # never the start token
        tr.rollback(discard)
        due = [row for row in range(3) if len(tr.inputs[row]) >= max_len - 1]
        if due:
            tr.restart(due, [int(rng.integers(2, 14)) for _ in due])
    assert (np.diff(clocks) < 0).sum() >= 2  # compacted along the way
    assert max(clocks) <= 3 * max_len + 4


def test_inputs_embeds_step_equals_input_ids_step(model):
    ids, mask = padded([[5, 6, 7, 1], [8, 1]])
    a, b = IncrementalDecoder(model, 2, 8), IncrementalDecoder(model, 2, 8)
    with torch.no_grad():
        a.restart([0, 1], ids, mask)
        b.restart([0, 1], ids, mask)
        for tokens in ([0, 0], [12, 40], [3, 3]):
            t = torch.tensor(tokens)
            sa = a.step(input_ids=t)
            sb = b.step(inputs_embeds=model.get_input_embeddings()(t))
            torch.testing.assert_close(a.logits(sa), b.logits(sb), atol=1e-5, rtol=0)


def test_step_before_restart_and_partial_first_restart_raise(model):
    dec = IncrementalDecoder(model, 3, 8)
    with pytest.raises(RuntimeError, match="restart"):
        dec.step(input_ids=torch.zeros(3, dtype=torch.long))
    ids, mask = padded([[5, 1], [6, 1]])
    with pytest.raises(ValueError, match="all 3 rows"):
        dec.restart([0, 1], ids, mask)
