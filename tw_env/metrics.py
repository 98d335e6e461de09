"""Output quality: BLEU through sacrebleu (translation), ROUGE-2 through rouge-score (summarization)."""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer

METRICS = ("bleu", "rouge2")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults), 0–100."""
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge2(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-2 F-measure with stemming, 0–100."""
    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    if not hypotheses:
        return 0.0
    scores = [scorer.score(ref, hyp)["rouge2"].fmeasure for hyp, ref in zip(hypotheses, references, strict=True)]
    return 100.0 * sum(scores) / len(scores)


def quality(metric: str, hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """The task's quality metric by name ("bleu" or "rouge2")."""
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses for {len(references)} references")
    if metric == "bleu":
        return bleu(hypotheses, references)
    if metric == "rouge2":
        return rouge2(hypotheses, references)
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
