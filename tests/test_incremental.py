"""The incremental decoders of both model families against full no-cache forwards of the same model.

Every row keeps its own episode in a shared cache; rows restart on their own with contexts of other
lengths, read one token or a block of tokens per step, roll back rejected drafts, and the cache is
compacted (T5) or its buffers grow and are trimmed (a causal LM). Whatever happens, each row's logits
must equal one forward without any cache over that row's context and the inputs it has read since
its restart: T5's ``IncrementalDecoder`` (the encoder reads the prompt, the decoder the inputs from
the start token on) and a causal LM's ``CausalIncrementalDecoder`` (the context, then the inputs).

The models: T5s with the real vocabulary size (``[encoder-decoder-untied]``, T5 v1.1; ``-tied``: the
original layout, decoder outputs rescaled) and decoder-only LMs of vocabulary 256 (a Llama with peaked
distributions, a tied Llama with eager attention, a Qwen2 whose layer 1 has a 3-token sliding window
and a Qwen3 with q/k norms).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, T5ForConditionalGeneration

from tests.tiny_task import EOS, family_of_model, tiny_causal_lm
from tw_env.causal_incremental import CausalIncrementalDecoder, check_supported_causal_lm
from tw_env.families import DECODER_ONLY, ENCODER_DECODER, family_of
from tw_env.models import UnsupportedModelError

CAUSAL_VOCAB = 256
# The tolerance of a cached step against a full forward. A causal LM's float32 rounding: a cached step
# and a full forward sum in different orders, so logits near 1 differ by a few ulps (1.07e-5 seen on a
# loaded machine); torch's float32 rtol covers that, while a cache bug moves logits by orders of magnitude more.
TOLERANCE = {"encoder-decoder": dict(atol=1e-4, rtol=0), "decoder-only": dict(atol=1e-5, rtol=1.3e-6)}
T5_MODELS = ["untied", "tied"]
CAUSAL_MODELS = {
    # peaked distributions (wide weights), untied head, SDPA
    "llama": dict(arch="llama", initializer_range=0.3),
    # tied embeddings (the head applied as is: no T5 rescaling) and eager attention
    "llama-tied-eager": dict(arch="llama", tied=True, attn="eager"),
    # layer 0 full attention, layer 1 a 3-token sliding window: one mask per layer type
    "qwen2-sliding": dict(arch="qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1),
    # q/k norms
    "qwen3": dict(arch="qwen3", initializer_range=0.1),
}
MODELS = [f"encoder-decoder-{name}" for name in T5_MODELS] + [f"decoder-only-{name}" for name in sorted(CAUSAL_MODELS)]


def build(request, name: str):
    if name.startswith("encoder-decoder-"):
        variant = name.removeprefix("encoder-decoder-")
        path = request.getfixturevalue("tiny_t5_dir" if variant == "untied" else "tiny_t5_tied_dir")
        m = T5ForConditionalGeneration.from_pretrained(path).eval()
        assert m.config.scale_decoder_outputs is (variant == "tied")
        return m
    variant = name.removeprefix("decoder-only-")
    spec = dict(CAUSAL_MODELS[variant])
    attn = spec.pop("attn", None)
    m = tiny_causal_lm(CAUSAL_VOCAB, 32, 2, seed=len(variant), **spec)
    if attn is not None:
        m.set_attn_implementation(attn)
    return m


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return build(request, request.param)


@pytest.fixture(scope="module", params=[m for m in MODELS if m.startswith("encoder-decoder")])
def t5_model(request):
    return build(request, request.param)


@pytest.fixture(scope="module", params=[m for m in MODELS if m.startswith("decoder-only")])
def causal_model(request):
    return build(request, request.param)


def padded(contexts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(contexts), max(map(len, contexts)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(contexts):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1
    return ids, mask


class Tracker:
    """Drives a model's incremental decoder and keeps, per row, its context and the inputs read since
    its restart; checks every step's logits against a full forward over them.

    T5's context is a prompt ending in EOS (one token at least) and a restarted row reads the
    decoder start token first; a causal LM's context may be empty (a one-token prompt) and any
    token may come first."""

    def __init__(self, model, batch_size: int, max_episode_len: int, seed: int = 0):
        self.model, self.family = model, family_of_model(model)
        self.dec = self.family.incremental_decoder(model, batch_size, max_episode_len)
        self.rng = np.random.default_rng(seed)
        self.contexts: list[list[int]] = [[] for _ in range(batch_size)]
        self.inputs: list[list[int]] = [[] for _ in range(batch_size)]
        self.checked = 0
        self.t5 = model.config.is_encoder_decoder
        self.min_context = 1 if self.t5 else 0
        self.token_range = (700 if self.t5 else CAUSAL_VOCAB, 500 if self.t5 else CAUSAL_VOCAB)  # (inputs, contexts)

    @property
    def read(self) -> list[int]:
        return [len(i) for i in self.inputs]

    @property
    def discardable(self) -> list[int]:
        """What each row may roll back: everything it read (T5: but its start token)."""
        return [max(n - self.t5, 0) for n in self.read]

    def random_context(self, length: int) -> list[int]:
        if self.t5:
            return [int(t) for t in self.rng.integers(2, self.token_range[1], size=length - 1)] + [EOS]
        return [int(t) for t in self.rng.integers(2, self.token_range[1], size=length)]

    def restart(self, rows: list[int], lengths: list[int]) -> None:
        contexts = [self.random_context(n) for n in lengths]
        with torch.no_grad():
            self.dec.restart(rows, *padded(contexts))
        for row, c in zip(rows, contexts, strict=True):
            self.contexts[row], self.inputs[row] = c, []

    def step(self, width: int | None = None, embeds: bool = False) -> None:
        """One token per row (``width=None``) or a block of ``width`` tokens per row in one forward."""
        k = 1 if width is None else width
        block = torch.as_tensor(self.rng.integers(0, self.token_range[0], size=(self.dec.batch_size, k)))
        for row, inputs in enumerate(self.inputs):
            if self.t5 and not inputs:
                block[row, 0] = self.model.config.decoder_start_token_id  # a restarted row reads the start token first
            inputs.extend(block[row].tolist())
        inputs = block[:, 0] if width is None else block
        with torch.no_grad():
            if embeds:
                states = self.dec.step(inputs_embeds=self.model.get_input_embeddings()(inputs))
            else:
                states = self.dec.step(input_ids=inputs)
            logits = self.dec.logits(states)
        logits = logits[:, None] if width is None else logits
        assert logits.shape == (self.dec.batch_size, k, self.model.config.vocab_size)
        for row in range(self.dec.batch_size):
            expected = self.family.reference_logits(self.model, self.contexts[row], self.inputs[row])[-k:]
            torch.testing.assert_close(logits[row], expected, **TOLERANCE[self.family.name])
            self.checked += k

    def rollback(self, discard: list[int]) -> None:
        with torch.no_grad():
            self.dec.rollback(torch.tensor(discard))
        for row, d in enumerate(discard):
            if d:
                del self.inputs[row][-d:]


# ------------------------------------------------------------------------------------- both families
def test_rows_with_different_context_lengths_match_full_forwards(model):
    tr = Tracker(model, batch_size=4, max_episode_len=16)
    tr.restart([2, 0, 3, 1], [5, 11, tr.min_context, 1])  # the first restart in any order; row 2 gets 5 tokens
    assert [len(c) for c in tr.contexts] == [11, 1, 5, tr.min_context]
    for _ in range(5):
        tr.step()
    assert tr.checked == 20
    if tr.t5:  # one clock for the rows' decoder steps
        assert tr.dec.clock == 5
    else:  # each row's own positions, after a context of its own length (row 3's is empty: a one-token prompt)
        assert tr.dec.clock == 16 and tr.dec.length.tolist() == [16, 6, 10, 5]


def test_multi_token_steps_and_per_row_rollback_match_full_forwards(model):
    tr = Tracker(model, batch_size=3, max_episode_len=16, seed=4)
    tr.restart([0, 1, 2], [4, 9, 6])
    tr.step()
    tr.step(width=3)  # a verifier's block: every row reads 3 tokens in one forward
    clock = tr.dec.clock
    tr.rollback([2, 0, 1])  # per-row: rejected drafts are forgotten
    assert tr.dec.clock == clock and tr.read == [2, 4, 3]
    tr.step()
    tr.step(width=2)
    tr.restart([1], [13])  # a restart after a rollback, with a longer context
    tr.step()
    tr.rollback([1, 0, 2])
    tr.step(width=3)
    tr.rollback([0, 3, 0])  # row 1 back to its first input only (T5: its start token)
    tr.step()
    assert tr.read == [9, 2, 9]


def test_random_blocks_rollbacks_and_restarts_match_full_forwards(model):
    """Rows restart on their own, with contexts longer and shorter than before; some steps read
    embeddings rather than ids."""
    tr = Tracker(model, batch_size=3, max_episode_len=6, seed=5)
    tr.restart([0, 1, 2], [3, 8, 5])
    rng = np.random.default_rng(6)
    clocks, restarts = [], 0
    for i in range(30):
        tr.step(width=int(rng.integers(1, 4)) if rng.random() < 0.5 else None, embeds=i % 5 == 4)
        clocks.append(tr.dec.clock)
        tr.rollback([int(rng.integers(0, min(2, n) + 1)) for n in tr.discardable])  # rejected drafts, per row
        due = [row for row in range(3) if tr.read[row] >= 5]
        if due:
            tr.restart(due, [int(rng.integers(tr.min_context, 14)) for _ in due])
            restarts += len(due)
    assert restarts >= 4
    assert tr.checked >= 90
    assert (np.diff(clocks) < 0).sum() >= 2  # compacted (T5) or the longest row restarted shorter (a causal LM)
    assert max(clocks) <= 3 * 6 + 4


def test_inputs_embeds_step_equals_input_ids_step(model):
    ids, mask = padded([[5, 6, 7, 1], [8, 1]])
    family = family_of_model(model)
    a, b = family.incremental_decoder(model, 2, 8), family.incremental_decoder(model, 2, 8)
    with torch.no_grad():
        a.restart([0, 1], ids, mask)
        b.restart([0, 1], ids, mask)
        for tokens in ([0, 0], [12, 40], [3, 3]):
            t = torch.tensor(tokens)
            sa = a.step(input_ids=t)
            sb = b.step(inputs_embeds=model.get_input_embeddings()(t))
            torch.testing.assert_close(a.logits(sa), b.logits(sb), atol=1e-5, rtol=0)


def test_step_before_restart_and_partial_first_restart_raise(model):
    dec = family_of_model(model).incremental_decoder(model, 3, 8)
    with pytest.raises(RuntimeError, match="restart"):
        dec.step(input_ids=torch.zeros(3, dtype=torch.long))
    ids, mask = padded([[5, 1], [6, 1]])
    with pytest.raises(ValueError, match="all 3 rows"):
        dec.restart([0, 1], ids, mask)


# ------------------------------------------------------------------------------------- T5
def test_rows_restarting_midway_with_longer_prompts_match_full_forwards(t5_model):
    tr = Tracker(t5_model, batch_size=3, max_episode_len=16, seed=1)
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


def test_cache_compaction_keeps_the_clock_bounded_and_logits_exact(t5_model):
    max_len = 4
    tr = Tracker(t5_model, batch_size=3, max_episode_len=max_len, seed=2)
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


# ------------------------------------------------------------------------------------- decoder-only
def test_buffers_grow_for_long_contexts_and_are_trimmed_after(causal_model):
    tr = Tracker(causal_model, batch_size=2, max_episode_len=4, seed=3)
    tr.restart([0, 1], [2, 3])
    tr.step()
    small = tr.dec.capacity
    tr.restart([1], [30])  # a long context: the buffers grow
    tr.step(width=2)
    assert tr.dec.capacity >= 33 > small
    tr.restart([1], [1])  # gone again: the buffers are trimmed, and the rows' keys survive the trim
    assert tr.dec.capacity < 33
    for _ in range(3):
        tr.step()
    assert tr.dec.capacity <= 2 * (tr.dec.clock + 4 + 1)


def test_gradients_through_the_decoder_equal_a_full_forwards(causal_model):
    """With grad enabled (a training forward), the buffers are written out of place: the loss and its
    gradient are a full forward's."""
    model = causal_model
    contexts, steps = [[5, 6, 7, 8], [9]], [[10, 11], [12, 13]]
    dec = CausalIncrementalDecoder(model, 2, 4)
    dec.restart([0, 1], *padded(contexts))
    first = dec.logits(dec.step(input_ids=torch.tensor([s[0] for s in steps])))
    second = dec.logits(dec.step(input_ids=torch.tensor([s[1] for s in steps])))
    loss = first.logsumexp(-1).sum() + second.logsumexp(-1).sum()
    weight = model.get_input_embeddings().weight
    (incremental,) = torch.autograd.grad(loss, weight)
    full_loss = sum(model(input_ids=torch.tensor([c + s])).logits[0, -2:].logsumexp(-1).sum()
                    for c, s in zip(contexts, steps, strict=True))
    (full,) = torch.autograd.grad(full_loss, weight)
    torch.testing.assert_close(loss, full_loss, atol=1e-4, rtol=0)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-4)


def test_a_causal_decoder_refuses_left_padding_and_rolling_back_more_than_was_read(causal_model):
    dec = CausalIncrementalDecoder(causal_model, 3, 8)
    ids, mask = padded([[5, 6], [7], [8, 9]])
    with pytest.raises(ValueError, match="right-padded"):
        dec.restart([0, 1, 2], ids, mask.flip(1))
    with torch.no_grad():
        dec.restart([0, 1, 2], ids, mask)
        dec.step(input_ids=torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match=r"rollback discards \[0, 2, 0\] tokens, but the rows read \[1, 1, 1\]"):
        dec.rollback(torch.tensor([0, 2, 0]))


def test_models_the_decoder_cannot_run_exactly_are_refused():
    gemma = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0,
    ))
    with pytest.raises(UnsupportedModelError, match="final_logit_softcapping=30.0"):
        CausalIncrementalDecoder(gemma, 2, 4)
    llama = tiny_causal_lm(64, 16, 1, seed=0)
    llama.config._attn_implementation = "flash_attention_2"  # refused before anything runs
    with pytest.raises(UnsupportedModelError, match="attn_implementation='flash_attention_2'.*'eager', 'sdpa'"):
        check_supported_causal_lm(llama)


# ------------------------------------------------------------------------------------- families
def test_family_is_read_from_the_config(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, T5Config

    llama = tiny_causal_lm(64, 16, 1, seed=0)
    assert family_of(llama) is DECODER_ONLY and family_of(llama.config) is DECODER_ONLY
    assert family_of(T5Config()) is ENCODER_DECODER
    with pytest.raises(UnsupportedModelError, match=r"model type 'bert' is neither an encoder-decoder nor a causal"):
        family_of(BertConfig())
    assert family_of(BertConfig(is_decoder=True)) is DECODER_ONLY  # BERT configured as a causal LM
    # load_model refuses an encoder with the family's message, not as a loading failure
    bert = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    bert.save_pretrained(tmp_path / "bert")
    from tw_env.models import load_model

    with pytest.raises(UnsupportedModelError, match="'bert' is neither"):
        load_model(str(tmp_path / "bert"))


def test_restart_inputs_and_generation_inputs_of_the_decoder_only_family():
    llama = tiny_causal_lm(64, 16, 1, seed=0)
    context, first = DECODER_ONLY.restart_inputs(llama, [[5, 6, 7], [8]])
    assert context == [[5, 6], []] and first.tolist() == [7, 8]
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        DECODER_ONLY.restart_inputs(llama, [[5], []])
    with pytest.raises(TypeError, match="restart_inputs"):
        DECODER_ONLY.start_token_id(llama)
    ids, mask = padded([[5, 6, 7], [8]])
    left_ids, left_mask = DECODER_ONLY.generation_inputs(ids, mask)
    assert left_ids.tolist() == [[5, 6, 7], [0, 0, 8]] and left_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    sequences = torch.tensor([[5, 6, 7, 9, 1], [0, 0, 8, 3, 4]])
    assert DECODER_ONLY.generated_tokens(sequences, 3).tolist() == [[9, 1], [3, 4]]
