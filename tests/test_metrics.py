"""Quality metrics: corpus BLEU (sacrebleu) and ROUGE-2 (rouge-score), and the dispatcher."""

from __future__ import annotations

import pytest

from tw_env.metrics import METRICS, bleu, quality, rouge2


def test_bleu_identical_is_100_and_disjoint_is_0():
    refs = ["the cat sat on the mat today", "a dog runs in the big green park"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert quality("bleu", refs, refs) == pytest.approx(100.0)
    assert bleu(["xx yy zz ww vv uu", "qq rr ss tt oo pp"], refs) == pytest.approx(0.0)
    partial = bleu(["the cat sat on the mat", "a dog runs in the park"], refs)
    assert 0.0 < partial < 100.0


def test_rouge2_by_hand():
    # hypothesis bigrams: the-cat cat-sat sat-on on-the the-mat; reference: the-cat cat-sat sat-on on-a a-mat
    # overlap 3 of 5 each way: P = R = F = 0.6
    assert rouge2(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(60.0)
    # the mean over pairs: (60 + 100) / 2
    score = quality("rouge2", ["the cat sat on the mat", "big red dog"], ["the cat sat on a mat", "big red dog"])
    assert score == pytest.approx(80.0)
    assert rouge2(["alpha beta gamma"], ["delta epsilon zeta"]) == 0.0
    assert rouge2([], []) == 0.0


def test_unknown_metric_raises_naming_the_choices():
    assert METRICS == ("bleu", "rouge2")
    with pytest.raises(ValueError, match=r"unknown metric 'meteor'.*bleu.*rouge2"):
        quality("meteor", ["a"], ["a"])


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        quality("bleu", ["a b", "c d"], ["a b"])
    with pytest.raises(ValueError, match="1 hypotheses for 2 references"):
        quality("rouge2", ["a b"], ["a b", "c d"])
