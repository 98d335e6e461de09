"""`tw train-mt`: train a translation teacher and a much smaller student from scratch, with their tokenizer.

For real text on a CPU (issue 12): parallel text in JSON lines (fields ``de``/``en`` by default, a
``corpus`` field to select parts of it), a BPE tokenizer trained on the same text (the
`tokenizers` library; T5's id conventions: pad 0, EOS 1, unk 2), then two T5 models (gated-GELU,
no dropout) trained with cross-entropy, each saved as a plain transformers directory with the
tokenizer (``from_pretrained`` loads it; safetensors weights). The models learn every prompt the
registered WMT19 task shows them: the teacher's ``"translate German to English: {de}"`` and the
student's six budget prompts and the plain one (a prompt drawn at random for each example).
Batches are bucketed by length (less padding: 0.47 → 0.80 steps/s for the d256 3+3 teacher, measured here).

Resumable: the tokenizer and each finished model are published atomically; a model being trained
writes an atomic checkpoint (weights, optimiser, step) every ``checkpoint_every`` steps, and a
killed run continues from the newest one with the same data order (one seeded permutation per
epoch), so it ends with the weights an uninterrupted run would have. A tqdm bar shows progress;
validation BLEU (sacrebleu, greedy, on the selection rows of the task data) is printed every
``eval_every`` steps and at the end.

    tw train-mt --config configs/deen-models.json
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from agents import checkpoint as ckpt
from tw_env.atomic import publish_dir, write_json
from tw_env.prompts import BUDGETS, PLAIN_TEMPLATE, fill_template, make_prompt
from tw_env.synthetic import padded_vocab_size

INSTRUCTION = "translate German to English"  # the registered WMT19 task's instruction
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as T5's


@dataclass
class ModelSize:
    """A T5's size and its fixed-step training recipe."""

    d_model: int = 256
    num_layers: int = 3  # encoder layers = decoder layers
    d_ff: int = 1024
    num_heads: int = 4
    steps: int = 4000
    lr: float = 1e-3
    warmup: int = 200


@dataclass
class TranslationConfig:
    """Everything `tw train-mt` needs (defaults: the issue's CPU-sized teacher and student)."""

    train_data: str = "../shared/data/deen/train.jsonl"  # JSON lines with source, target (and corpus) fields
    validation_data: str = "../shared/data/deen/validation.jsonl"  # JSON lines split into the task data's validation (selection) and test rows
    corpora: list = field(default_factory=lambda: ["multi30k", "tatoeba"])  # training rows whose corpus starts with one of these ([]: all)
    validation_corpora: list = field(default_factory=lambda: ["multi30k"])  # validation rows whose corpus starts with one of these ([]: all)
    source_field: str = "de"  # source language field
    target_field: str = "en"  # target language field
    output_dir: str = "runs/deen-models"  # tokenizer/, teacher/, student/, checkpoints, summary.json
    vocab_size: int = 8000  # BPE tokenizer size (model vocab_size: this rounded up to a multiple of 8)
    teacher: ModelSize = field(default_factory=ModelSize)  # the teacher's size and recipe
    student: ModelSize = field(default_factory=lambda: ModelSize(d_model=64, num_layers=1, d_ff=256, num_heads=2,
                                                                  steps=4000, lr=3e-3, warmup=200))  # the student's
    batch_size: int = 64  # sentence pairs per step
    max_source_length: int = 64  # prompt tokens (longer prompts are cut)
    max_target_length: int = 48  # target tokens (longer targets are cut, EOS kept)
    eval_every: int = 1000  # steps between printed validation BLEU (0: only at the end)
    eval_examples: int = 512  # pairs for the printed BLEU: the first N of the task data's validation.jsonl (never its test rows)
    checkpoint_every: int = 200  # steps between resumable checkpoints
    threads: int = 2  # torch CPU threads (fixed, so that runs are reproducible)
    seed: int = 0  # seeds initialisation, data order and prompts
    selection_examples: int = 512  # task data: validation.jsonl gets a seeded random N of the validation corpora, test.jsonl the rest

    def __post_init__(self) -> None:
        # JSON configs give the sizes as dicts.
        for name in ("teacher", "student"):
            value = getattr(self, name)
            if isinstance(value, str):  # a --teacher/--student flag: JSON
                value = json.loads(value)
            if isinstance(value, dict):
                setattr(self, name, ModelSize(**value))

    def validate(self) -> None:
        for name in ("vocab_size", "batch_size", "max_source_length", "max_target_length", "eval_examples",
                     "checkpoint_every", "threads", "selection_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        for name in ("teacher", "student"):
            size: ModelSize = getattr(self, name)
            if size.steps < 1 or size.d_model % size.num_heads or size.lr <= 0:
                raise ValueError(f"{name}: need steps >= 1, d_model divisible by num_heads and lr > 0, got {size}")
        for path in (self.train_data, self.validation_data):
            if not Path(path).is_file():
                raise FileNotFoundError(f"no data file at '{path}'; expected JSON lines with fields "
                                        f"'{self.source_field}' and '{self.target_field}'")


# ---------------------------------------------------------------------------------------------- data
def read_pairs(path: str | Path, source_field: str, target_field: str, corpora: Sequence[str]) -> list[tuple[str, str]]:
    """(source, target) pairs of a JSON-lines file, keeping rows whose ``corpus`` starts with one of ``corpora``."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if corpora and not str(row.get("corpus", "")).startswith(tuple(corpora)):
                continue
            if source_field not in row or target_field not in row:
                raise KeyError(f"line {number} of '{path}' has no field '{source_field}' or '{target_field}'; "
                               f"found {sorted(row)}")
            pairs.append((str(row[source_field]), str(row[target_field])))
    if not pairs:
        raise ValueError(f"no pairs in '{path}' for the corpora {list(corpora)}; expected at least one row")
    return pairs


def read_rows(path: str | Path, corpora: Sequence[str]) -> list[dict]:
    """The JSON rows of a file whose ``corpus`` starts with one of ``corpora`` (all rows for [])."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if not corpora or str(r.get("corpus", "")).startswith(tuple(corpora))]


def write_task_data(config: TranslationConfig, folder: Path) -> dict[str, int]:
    """The pipeline's data folder (``gym.make(..., data=folder)`` reads ``{split}.jsonl``).

    ``train.jsonl``: the training rows of the selected corpora. ``validation.jsonl``: a seeded random
    ``selection_examples`` of the selected validation corpora (checkpoint selection, GKD selection,
    fallback calibration). ``test.jsonl``: the remaining validation rows, which nothing selects or
    tunes on (the held-out results). Rows keep all their fields. A validation row whose source
    sentence also occurs in the training rows is dropped after the split (Multi30k validation repeats
    one training sentence, "Drei Hunde spielen im Schnee."): a held-out row must not have been trained
    on, and dropping it after the split leaves every other row where it was."""
    train = read_rows(config.train_data, config.corpora)
    validation = read_rows(config.validation_data, config.validation_corpora)
    if len(validation) <= config.selection_examples:
        raise ValueError(f"selection_examples={config.selection_examples} leaves no test rows of the "
                         f"{len(validation)} validation rows of {config.validation_corpora}; expected fewer")
    order = list(range(len(validation)))
    random.Random(f"mt-selection-{config.seed}").shuffle(order)
    chosen = set(order[: config.selection_examples])
    seen = {str(r.get(config.source_field, "")).strip() for r in train}
    unseen = [str(r.get(config.source_field, "")).strip() not in seen for r in validation]
    splits = {"train": train, "validation": [r for i, r in enumerate(validation) if i in chosen and unseen[i]],
              "test": [r for i, r in enumerate(validation) if i not in chosen and unseen[i]]}

    def build(target: Path) -> None:
        for split, rows in splits.items():
            with open(target / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    publish_dir(folder, build)
    return {split: len(rows) for split, rows in splits.items()}


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A BPE ``PreTrainedTokenizerFast`` (Metaspace, NFKC) trained on ``texts``; appends EOS as T5 does.

    BPE rather than T5's Unigram: the `tokenizers` Unigram trainer's scores vary slightly from run to
    run (its EM sums in a varying order), so two runs could segment differently; BPE's merges are
    deterministic, which keeps a from-scratch run reproducible."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def prompt_texts(source: str, choice: int) -> str:
    """Prompt ``choice`` for a source: 0 the teacher's plain prompt, 1…6 the student's budget prompts."""
    if choice == 0:
        return fill_template(PLAIN_TEMPLATE, INSTRUCTION, source)
    return make_prompt(INSTRUCTION, source, BUDGETS[choice - 1])


TEACHER_PROMPTS = (0,)  # the teacher only ever reads the plain prompt (the task's C^(T))
STUDENT_PROMPTS = tuple(range(len(BUDGETS) + 1))  # the student reads the budget prompts (and the plain one)
BUCKET_BATCHES = 32  # batches per length bucket: sorting 32 batches' pairs by length cuts padding


class Batches:
    """Deterministic, length-bucketed batches.

    Epoch e shuffles the pairs with ``Random(f"{seed}-{e}")``, sorts each window of
    ``BUCKET_BATCHES`` batches' worth of pairs by length (so a batch holds pairs of similar length and
    little padding: Tatoeba's 7-word and Multi30k's 12-word sentences otherwise share batches), and
    shuffles the batches. Step s is a pure function of (seed, s), so a resumed run reads exactly the
    batches an uninterrupted one would. Each example's prompt is drawn from ``prompt_choices``
    (0: the plain prompt, 1…6: the budget prompts)."""

    def __init__(self, tokenizer, pairs: Sequence[tuple[str, str]], config: TranslationConfig,
                 prompt_choices: Sequence[int] = STUDENT_PROMPTS) -> None:
        self.tokenizer, self.pairs, self.config = tokenizer, pairs, config
        self.prompt_choices = tuple(prompt_choices)
        self.per_epoch = max(1, len(pairs) // config.batch_size)
        self._batches: dict[int, list[list[int]]] = {}
        self._targets: dict[int, list[int]] = {}

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._batches:
            rng = random.Random(f"mt-order-{self.config.seed}-{epoch}")
            order = list(range(len(self.pairs)))
            rng.shuffle(order)
            size = self.config.batch_size
            order = order[: self.per_epoch * size]  # whole batches only
            window = size * BUCKET_BATCHES
            batches = []
            for start in range(0, len(order), window):
                bucket = sorted(order[start : start + window], key=lambda i: (len(self.pairs[i][0]), i))
                batches += [bucket[k : k + size] for k in range(0, len(bucket), size)]
            rng.shuffle(batches)
            self._batches = {epoch: batches}  # one epoch kept in memory
        return self._batches[epoch]

    def _target(self, i: int) -> list[int]:
        if i not in self._targets:
            ids = self.tokenizer(self.pairs[i][1], truncation=True, max_length=self.config.max_target_length)["input_ids"]
            self._targets[i] = list(ids)
        return self._targets[i]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        epoch, offset = divmod(step, self.per_epoch)
        idx = self._epoch_batches(epoch)[offset]
        rng = random.Random(f"mt-prompts-{self.config.seed}-{step}")
        prompts = [prompt_texts(self.pairs[i][0], self.prompt_choices[rng.randrange(len(self.prompt_choices))])
                   for i in idx]
        enc = self.tokenizer(prompts, truncation=True, max_length=self.config.max_source_length, padding=True,
                             return_tensors="pt")
        targets = [self._target(i) for i in idx]
        width = max(len(t) for t in targets)
        labels = torch.full((len(targets), width), -100, dtype=torch.long)
        for row, t in enumerate(targets):
            labels[row, : len(t)] = torch.tensor(t)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


# ---------------------------------------------------------------------------------------------- models
def t5_config(size: ModelSize, vocab_size: int):
    from transformers import T5Config

    return T5Config(  # type: ignore[call-arg]
        vocab_size=vocab_size, d_model=size.d_model, d_kv=size.d_model // size.num_heads, d_ff=size.d_ff,
        num_layers=size.num_layers, num_decoder_layers=size.num_layers, num_heads=size.num_heads,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # tied embeddings with the d_model**-0.5 output scaling: T5's own (v1.0) recipe, see train_one


@torch.no_grad()
def validation_bleu(model, tokenizer, pairs: Sequence[tuple[str, str]], config: TranslationConfig,
                    batch_size: int = 64) -> float:
    """Corpus BLEU (sacrebleu) of greedy translations with the teacher's plain prompt."""
    import sacrebleu

    model.eval()
    hypotheses: list[str] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        enc = tokenizer([prompt_texts(s, 0) for s, _ in chunk], truncation=True, max_length=config.max_source_length,
                        padding=True, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=config.max_target_length, do_sample=False, num_beams=1)
        hypotheses += tokenizer.batch_decode(out, skip_special_tokens=True)
    model.train()
    return float(sacrebleu.corpus_bleu(hypotheses, [[t for _, t in pairs]]).score)


def train_one(name: str, size: ModelSize, vocab_size: int, tokenizer, batches: Batches,
              validation: Sequence[tuple[str, str]], config: TranslationConfig, out: Path) -> dict[str, Any]:
    """Train one model to ``size.steps`` (resuming from its newest checkpoint) and publish it in ``out/name``."""
    from safetensors.torch import load_model, save_model
    from transformers import T5ForConditionalGeneration

    run_dir = out / "checkpoints" / name
    torch.manual_seed(config.seed * 1000 + (1 if name == "teacher" else 2))
    model = T5ForConditionalGeneration(t5_config(size, vocab_size))
    # T5's lm_head is the shared embedding (tied). Its default init (std 1.0) gives the encoder and
    # decoder inputs unit-scale token vectors, and the d_model**-0.5 scaling of the decoder output
    # (on while tie_word_embeddings is left at its default) keeps the first logits at unit scale, so
    # the loss starts near log(vocab). An earlier recipe shrank the shared embedding to std
    # d_model**-0.5 with the scaling off instead: the first attention outputs then swamp the token
    # vectors in the residual stream, and the teacher learned to write fluent captions that missed
    # much of the source (12.0 BLEU after 6,000 steps).
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < size.warmup:
            return (step + 1) / size.warmup
        progress = (step - size.warmup) / max(1, size.steps - size.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    start, evaluations, seconds = 0, [], 0.0
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None:
        load_model(model, str(latest / "model.safetensors"))
        ckpt.load_optimizer(latest / "optimizer.pt", optimizer)
        state = ckpt.load_json(latest / "state.json")
        start, evaluations, seconds = int(state["step"]), state["evaluations"], float(state["seconds"])
        scheduler.load_state_dict(state["scheduler"])
        print(f"{name}: resuming at step {start} from {latest}", flush=True)

    def checkpoint(step: int) -> None:
        def write(folder: Path) -> None:
            save_model(model, str(folder / "model.safetensors"))  # shared (tied) tensors stored once
            ckpt.save_optimizer(folder / "optimizer.pt", optimizer)
            ckpt.save_json(folder / "state.json", {"step": step, "evaluations": evaluations, "seconds": seconds,
                                                   "scheduler": scheduler.state_dict()})

        ckpt.write_checkpoint(run_dir, step, write)

    bar = tqdm(total=size.steps, initial=start, desc=f"{name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M)",
               unit="step", file=sys.stderr, dynamic_ncols=True)
    began = time.perf_counter()
    for step in range(start, size.steps):
        loss = model(**batches.batch(step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if config.eval_every and done % config.eval_every == 0 and done < size.steps:
            bleu = validation_bleu(model, tokenizer, validation, config)
            evaluations.append({"step": done, "bleu": bleu})
            tqdm.write(f"{name} step {done}: validation BLEU {bleu:.1f}", file=sys.stdout)
        if done % config.checkpoint_every == 0 or done == size.steps:
            seconds_now = seconds + time.perf_counter() - began
            seconds, began = seconds_now, time.perf_counter()
            checkpoint(done)
    bar.close()
    bleu = validation_bleu(model, tokenizer, validation, config)
    evaluations.append({"step": size.steps, "bleu": bleu})
    print(f"{name}: validation BLEU {bleu:.1f} after {size.steps} steps ({seconds:.0f} s of training)", flush=True)

    def build(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    publish_dir(out / name, build)
    return {"parameters": sum(p.numel() for p in model.parameters()), "steps": size.steps,
            "training_seconds": seconds, "validation_bleu": bleu, "evaluations": evaluations}


def run(config: TranslationConfig) -> dict[str, Any]:
    """Tokenizer, then teacher, then student; each part already finished is reused (a resumed run)."""
    from transformers import PreTrainedTokenizerFast

    config.validate()
    torch.set_num_threads(config.threads)  # fixed: the reduction order, hence the weights, is reproducible
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(config))
    pairs = read_pairs(config.train_data, config.source_field, config.target_field, config.corpora)
    summary_path = out / "summary.json"
    summary: dict[str, Any] = ckpt.load_json(summary_path) if summary_path.is_file() else {}
    if not (out / "data" / "test.jsonl").is_file():
        summary["data"] = write_task_data(config, out / "data")
        write_json(summary_path, summary)
    # The printed BLEU reads the selection rows only, so that nothing chosen by looking at it (a
    # recipe, a number of steps) has seen the held-out test rows.
    validation = read_pairs(out / "data" / "validation.jsonl", config.source_field, config.target_field,
                            [])[: config.eval_examples]
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        began = time.perf_counter()
        tokenizer = train_tokenizer([t for pair in pairs for t in pair], config.vocab_size)
        publish_dir(out / "tokenizer", tokenizer.save_pretrained)
        summary["tokenizer"] = {"size": len(tokenizer), "seconds": time.perf_counter() - began,
                                "training_pairs": len(pairs)}
        write_json(summary_path, summary)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out / "tokenizer"))
    vocab_size = padded_vocab_size(tokenizer)  # rounded up to a multiple of 8, as the embedded models'
    for name, choices in (("teacher", TEACHER_PROMPTS), ("student", STUDENT_PROMPTS)):
        if (out / name / "model.safetensors").is_file() and name in summary:
            continue
        batches = Batches(tokenizer, pairs, config, choices)
        summary[name] = train_one(name, getattr(config, name), vocab_size, tokenizer, batches, validation, config, out)
        write_json(summary_path, summary)
    gap = summary["teacher"]["validation_bleu"] - summary["student"]["validation_bleu"]
    print(f"teacher {summary['teacher']['validation_bleu']:.1f} BLEU, student {summary['student']['validation_bleu']:.1f} "
          f"(gap {gap:.1f}) on {len(validation)} selection pairs "
          f"({out / 'data' / 'validation.jsonl'}) of {config.validation_corpora}", flush=True)
    return summary
