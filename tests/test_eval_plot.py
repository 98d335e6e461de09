"""`tw eval` and `tw plot` end to end on tiny random models (no download, a few seconds).

The task is the synthetic language's real word-level tokenizer with a tiny random teacher and student
T5 and a folder of JSON-lines split files; ``env_kwargs`` names all four, so the synthetic task trains
nothing. Its test and validation files hold the same rows, so the calibrations run on the rows the
evaluation reads (from another file: `tw eval` refuses to calibrate on the evaluated file itself). Each
model gets its own random LM head (transformers 5.x otherwise ties it to the input embedding and a
random tied T5 just copies its input token), with the EOS row enlarged so that outputs end.
The Training Wheels policy always wants to call (a large <τ> bias) and runs under the hard budget
cap, so b = 0 never calls and b = 0.5 alternates between the teacher and the student.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from scripts.evaluate import CSV_COLUMNS, EvalConfig
from scripts.evaluate import run as run_eval
from scripts.plot import PlotConfig
from scripts.plot import run as run_plot

MAX_NEW = 8
EXAMPLES = 6


def _tiny_t5(vocab: int, d_model: int, layers: int, seed: int, path: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers, num_decoder_layers=layers,
        num_heads=max(d_model // 8, 1), feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
    )
    model = T5ForConditionalGeneration(config).eval()
    head = torch.nn.Linear(d_model, vocab, bias=False)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0)
        head.weight[1] *= 1.5  # EOS now and then
    model.lm_head = head
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    from agents.policy import StudentPolicy
    from tw_env.models import load_model
    from tw_env.synthetic import SyntheticLanguage, build_tokenizer, padded_vocab_size

    root = tmp_path_factory.mktemp("eval_task")
    language = SyntheticLanguage(seed=0, n_words=40, n_target_words=40)
    tokenizer = build_tokenizer(language)
    tokenizer.save_pretrained(root / "tokenizer")
    vocab = padded_vocab_size(tokenizer)
    teacher = _tiny_t5(vocab, 32, 2, seed=1, path=root / "teacher")
    student = _tiny_t5(vocab, 16, 1, seed=2, path=root / "student")
    data = root / "data"
    data.mkdir()
    rows = "".join(json.dumps(row) + "\n" for row in language.sample(EXAMPLES, 3))
    for split in ("test", "validation"):  # the same rows in two files: calibrating reads the evaluated rows
        (data / f"{split}.jsonl").write_text(rows)
    policy = StudentPolicy(load_model(str(student)))
    with torch.no_grad():
        policy.call_head.bias.fill_(1e4)  # <τ> always wins; the budget cap decides
    policy.save(root / "policy")
    return {
        "root": root, "student": str(student), "policy": str(root / "policy"),
        "env_kwargs": {"teacher": str(teacher), "student": str(student), "tokenizer": str(root / "tokenizer"),
                       "data": str(data), "max_prompt_length": 32},
    }


@pytest.fixture(scope="module")
def evaluated(task) -> tuple[dict, Path]:
    out = task["root"] / "results"
    config = EvalConfig(
        env_kwargs=task["env_kwargs"], examples=EXAMPLES, device="cpu", max_new_tokens=MAX_NEW, output_dir=str(out),
        tw_policy=task["policy"], budgets=[0.0, 0.5], budget_cap=True, draft=task["student"],
        lenience=[0.0, 1.0], draft_lengths=[3], thresholds=[0.0, 1.5], batch_size=4, latency_examples=2, warmup=1,
        fallback_targets=[0.0, 0.5], calibration_examples=EXAMPLES,  # validation.jsonl repeats test.jsonl: calibrates on the rows it evaluates
        bild_fallback=[0.0, 1.5], bild_rollback=[100.0],
    )
    return run_eval(config), out


def _csv_rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_eval_writes_one_row_per_method_and_setting(evaluated):
    results, out = evaluated
    for name in ("results.json", "results.csv", "outputs.jsonl"):
        assert (out / name).stat().st_size > 0
    rows = _csv_rows(out)
    assert list(rows[0]) == CSV_COLUMNS
    settings = [(r["method"], r["setting"]) for r in rows]
    assert settings == [
        ("student", "alone"), ("teacher", "alone"), ("training_wheels", "b=0"), ("training_wheels", "b=0.5"),
        ("distillspec", "K=3 l=0"), ("distillspec", "K=3 l=1"), ("fallback", "t=0"), ("fallback", "t=1.5"),
        ("fallback", "t=0 (for 0)"), settings[9], ("bild", "FB=0 RB=100"), ("bild", "FB=1.5 RB=100"),
    ]
    assert settings[9][1].endswith("(for 0.5)")
    # "t=0 (for 0)" is "t=0" again (the same decoder at the same threshold): its row is copied, not decoded.
    by_setting = {(r["method"], r["setting"]): r for r in results["rows"]}
    same, calibrated = by_setting["fallback", "t=0"], by_setting["fallback", "t=0 (for 0)"]
    assert {k: v for k, v in same.items() if k not in ("setting", "calibrated_for")} == {
        k: v for k, v in calibrated.items() if k not in ("setting", "calibrated_for")}
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
    for r in rows:
        assert int(r["examples"]) == EXAMPLES and r["metric"] == "bleu" and r["device"].startswith("cpu")
        for key in ("quality", "teacher_fraction", "wasted_per_example", "teacher_forwards_per_example",
                    "latency_ms_median", "batched_tokens_per_s"):
            assert math.isfinite(float(r[key])), (r["method"], r["setting"], key)
        assert 0.0 <= float(r["teacher_fraction"]) <= 1.0


def _outputs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]


def test_eval_reference_points(evaluated):
    results, out = evaluated
    row = {(r["method"], r["setting"]): r for r in results["rows"]}
    teacher, student = row["teacher", "alone"], row["student", "alone"]
    assert teacher["teacher_fraction"] == 1.0 and student["teacher_fraction"] == 0.0
    assert teacher["teacher_forwards_per_example"] > 0 and student["teacher_forwards_per_example"] == 0
    # Lenience 1 reproduces the teacher's greedy output; lenience 0 accepts every draft.
    assert row["distillspec", "K=3 l=1"]["quality"] == pytest.approx(teacher["quality"])
    assert row["distillspec", "K=3 l=0"]["wasted_per_example"] == 0
    # The fallback: threshold 0 never falls back, a threshold above 1 always does.
    assert row["fallback", "t=0"]["teacher_fraction"] == 0.0
    assert row["fallback", "t=1.5"]["teacher_fraction"] == 1.0
    assert row["fallback", "t=1.5"]["quality"] == pytest.approx(teacher["quality"])
    # BiLD: α_FB above 1 always falls back (the teacher's output); α_FB 0 and no rollback: the teacher
    # writes the first token only (the outputs are shorter than bild_small_iters + 1).
    assert row["bild", "FB=1.5 RB=100"]["quality"] == pytest.approx(teacher["quality"])
    assert row["bild", "FB=1.5 RB=100"]["teacher_fraction"] == 1.0
    never = [o for o in _outputs(out) if (o["method"], o["setting"]) == ("bild", "FB=0 RB=100")]
    assert row["bild", "FB=0 RB=100"]["teacher_fraction"] == pytest.approx(
        EXAMPLES / (row["bild", "FB=0 RB=100"]["output_tokens_per_example"] * EXAMPLES)) and len(never) == EXAMPLES
    # Training Wheels under the cap: no calls at b = 0, at most ceil(b * n) calls per output at b = 0.5.
    assert row["training_wheels", "b=0"]["teacher_fraction"] == 0.0
    assert 0.0 < row["training_wheels", "b=0.5"]["teacher_fraction"] <= 0.5 + 1.0 / 2
    for method in ("training_wheels", "fallback", "student", "teacher"):
        assert all(r["wasted_per_example"] == 0 for r in results["rows"] if r["method"] == method)
    outputs = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == EXAMPLES * len(results["rows"])
    texts = {(o["method"], o["setting"], o["index"]): o["output"] for o in outputs}
    assert all(texts["distillspec", "K=3 l=1", i] == texts["teacher", "alone", i] for i in range(EXAMPLES))
    tw = [o for o in outputs if o["method"] == "training_wheels"]
    assert all(len(o["tokens"]) == len(o["from_teacher"]) == len(o["token_ids"]) for o in tw)
    assert all(not any(o["from_teacher"]) for o in tw if o["budget"] == 0.0)
    assert any(any(o["from_teacher"]) for o in tw if o["budget"] == 0.5)
    assert all(sum(o["from_teacher"]) <= math.ceil(0.5 * len(o["tokens"])) for o in tw)


def test_the_fallback_calibrated_per_target_teacher_fraction(evaluated):
    results, _ = evaluated
    calibrated = [r for r in results["rows"] if r["calibrated_for"] is not None and r["method"] == "fallback"]
    found = results["fallback_calibration"]
    assert [c["target"] for c in found] == [r["calibrated_for"] for r in calibrated] == [0.0, 0.5]
    assert found[0]["threshold"] == 0.0 and calibrated[0]["teacher_fraction"] == 0.0
    # The closest fraction of every threshold tried, and (the calibration rows being the evaluated
    # ones here) the same fraction when evaluated.
    closest = min(abs(f - 0.5) for _, f in found[1]["tried"])
    assert abs(found[1]["teacher_fraction"] - 0.5) == pytest.approx(closest)
    assert calibrated[1]["threshold"] == found[1]["threshold"]
    assert calibrated[1]["teacher_fraction"] == pytest.approx(found[1]["teacher_fraction"])
    assert 0.0 < calibrated[1]["teacher_fraction"] < 1.0


def test_the_cost_model_projects_latency_from_forwards(evaluated):
    from scripts.plot import project

    results, out = evaluated
    costs = results["cost_model"]
    assert costs["label"].startswith("measured here")
    row = {(r["method"], r["setting"]): r for r in results["rows"]}
    teacher, student = row["teacher", "alone"], row["student", "alone"]
    # Costs measured here are the alone rows' latency per forward, so those rows project to themselves.
    assert teacher["projected_latency_ms"] == pytest.approx(teacher["latency_ms_median"])
    assert student["projected_latency_ms"] == pytest.approx(student["latency_ms_median"])
    for r in results["rows"]:
        assert r["projected_latency_ms"] == pytest.approx(
            r["teacher_forwards_per_example"] * costs["teacher_ms"] + r["student_forwards_per_example"] * costs["student_ms"])
    # Given costs re-project the recorded forwards without decoding again.
    rows, description = project(results, PlotConfig(teacher_forward_ms=55.0, student_forward_ms=14.0, cost_label="H100"))
    tw = next(r for r in rows if r["method"] == "training_wheels")
    assert tw["projected_latency_ms"] == pytest.approx(
        55.0 * tw["teacher_forwards_per_example"] + 14.0 * tw["student_forwards_per_example"])
    assert description.startswith("H100")
    with pytest.raises(ValueError, match="given together"):
        PlotConfig(teacher_forward_ms=1.0).validate()
    with pytest.raises(ValueError, match="evaluated split"):
        EvalConfig(fallback_targets=[0.1], split="validation").validate()


def test_plot_writes_figures_and_token_view(evaluated, capsys):
    _, out = evaluated
    files = run_plot(PlotConfig(results=str(out), token_view_examples=2))
    for key in ("operating_points", "operating_points_projected", "quality_vs_teacher_use", "teacher_use_vs_budget"):
        data = Path(files[key]).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    page = Path(files["token_view"]).read_text()
    assert page.count('<span class="teacher"') > 1 and "title=" in page and "Budget b = 0.5" in page
    printed = capsys.readouterr().out
    assert "\033[1;30;43m" in printed and "budget b=0.5" in printed
    # One budget only, figures into another folder, given the results.json path.
    other = out.parent / "figures"
    files = run_plot(PlotConfig(results=str(out / "results.json"), output_dir=str(other), token_view_budget=0.0,
                                terminal=False))
    page = Path(files["token_view"]).read_text()
    assert "Budget b = 0<" in page and "Budget b = 0.5" not in page
    assert page.count('<span class="teacher"') == 1  # the legend's: b = 0 never calls
    # The command line: `tw plot --results DIR`.
    from scripts.cli import main

    assert main(["plot", "--results", str(out), "--output-dir", str(other), "--terminal", "false"]) == 0
    assert (other / "operating_points.png").stat().st_size > 1000


def test_training_wheels_call_threshold_calibrated_per_budget_and_the_candidate_chosen(task):
    from agents.policy import StudentPolicy
    from scripts.plot import _series
    from tw_env.models import load_model

    # A candidate whose π(<τ>) depends on the state (so a threshold can set its teacher use) beside
    # tw_policy, which always calls and so cannot be calibrated down to b = 0.
    mixed = StudentPolicy(load_model(task["student"]))
    torch.manual_seed(0)
    with torch.no_grad():
        mixed.call_head.weight.normal_(0.0, 1.0)
        mixed.call_head.bias.fill_(0.0)
    mixed.save(task["root"] / "mixed")
    out = task["root"] / "calibrated"
    config = EvalConfig(
        env_kwargs=task["env_kwargs"], examples=EXAMPLES, device="cpu", max_new_tokens=MAX_NEW, output_dir=str(out),
        methods=["training_wheels", "kl_oracle"], tw_policy=task["policy"], tw_calibrate=True,
        tw_policy_candidates=[str(task["root"] / "mix*")], budgets=[0.0, 0.3], batch_size=4, latency_examples=0,
        calibration_examples=EXAMPLES, calibration_tolerance=0.0,  # validation.jsonl repeats test.jsonl (as above)
    )
    results = run_eval(config)
    report = results["tw_calibration"]
    always, chosen = report["candidates"]
    assert always["policy"] == task["policy"] and not always["meets_budgets"]
    assert always["budgets"][0]["teacher_fraction"] == 1.0  # no threshold below 1 stops a 1e4 call logit
    assert report["chosen"] == chosen["policy"] == str(task["root"] / "mixed")
    assert chosen["worst_violation"] < always["worst_violation"]
    for entry in chosen["budgets"]:
        # The closest teacher fraction of every threshold tried, measured on the calibration rows.
        assert abs(entry["teacher_fraction"] - entry["budget"]) == min(abs(f - entry["budget"]) for _, f, _ in entry["tried"])
        assert [entry["threshold"], entry["teacher_fraction"], entry["quality"]] in entry["tried"]
    assert chosen["budgets"][0]["teacher_fraction"] == 0.0
    assert 0.0 < chosen["budgets"][1]["teacher_fraction"] < 1.0
    assert chosen["budgets"][1]["tried"][0][0] == 0.5  # the search starts at the policy's own rule
    rows = [r for r in results["rows"] if r["method"] == "training_wheels" and r["calibrated_for"] is not None]
    assert [r["setting"].split(" calibrated")[0] for r in rows] == ["b=0", "b=0.3"]
    for row, entry in zip(rows, chosen["budgets"], strict=True):
        # The calibration rows are the evaluated rows here, so the row reproduces its calibration.
        assert row["threshold"] == entry["threshold"] and row["calibrated_for"] == entry["budget"]
        assert row["teacher_fraction"] == pytest.approx(entry["teacher_fraction"])
        assert row["quality"] == pytest.approx(entry["quality"])
    # The KL oracle: the chosen policy's tokens, calls where KL(p ‖ π_V) exceeds a threshold calibrated per budget.
    oracle_rows = [r for r in results["rows"] if r["method"] == "kl_oracle"]
    oracle = results["kl_oracle_calibration"]
    assert [r["calibrated_for"] for r in oracle_rows] == [e["budget"] for e in oracle] == [0.0, 0.3]
    for row, entry in zip(oracle_rows, oracle, strict=True):
        assert row["threshold"] == entry["threshold"] and row["teacher_fraction"] == pytest.approx(entry["teacher_fraction"])
        assert abs(entry["teacher_fraction"] - entry["budget"]) == min(abs(f - entry["budget"]) for _, f, _ in entry["tried"])
    assert oracle[0]["teacher_fraction"] == 0.0 and 0.0 < oracle[1]["teacher_fraction"] < 1.0
    labels = [c["label"] for c in _series(results["rows"], "teacher_fraction")]
    assert labels[:2] == ["Training Wheels", "Training Wheels, call threshold calibrated by tw eval"]
    assert labels[2].startswith("KL oracle")
    with pytest.raises(ValueError, match="list 'training_wheels' too"):
        EvalConfig(tw_policy="p", methods=["kl_oracle"]).validate()
    with pytest.raises(ValueError, match="set tw_calibrate"):
        EvalConfig(tw_policy="p", tw_policy_candidates=["q"]).validate()
    with pytest.raises(ValueError, match="tw-policy"):
        EvalConfig(tw_calibrate=True).validate()


def test_candidate_patterns_expand_to_sorted_directories(tmp_path):
    from agents.methods import expand_candidates

    for step in (30, 0, 120):
        (tmp_path / "evaluated" / f"step-{step:06d}").mkdir(parents=True)
    (tmp_path / "evaluated" / ".step-000000.v-x").mkdir()  # an atomic publish's hidden version: not a candidate
    pattern, final = str(tmp_path / "evaluated" / "step-*"), str(tmp_path / "final")
    first = str(tmp_path / "evaluated" / "step-000030")
    assert expand_candidates([first, pattern, final]) == [
        first, *(str(tmp_path / "evaluated" / f"step-{s:06d}") for s in (0, 120)), final]
    with pytest.raises(FileNotFoundError, match="matches no directory"):
        expand_candidates([str(tmp_path / "nothing-*")])


def test_calibration_guard_compares_the_files_the_splits_read(task, tmp_path):
    """Calibrating on the evaluated data is refused by the file both splits resolve to, not by the
    split names: one file (a file has no splits) or one file under two names (a link) is refused,
    two files with the same rows (the fixture's folder) are not."""
    calibrating = {"tw_policy": "p", "tw_calibrate": True}
    EvalConfig(env_kwargs=task["env_kwargs"], **calibrating).validate()  # test.jsonl and validation.jsonl
    one_file = {**task["env_kwargs"], "data": str(Path(task["env_kwargs"]["data"]) / "test.jsonl")}
    with pytest.raises(ValueError, match="evaluated split 'test'.*test.jsonl"):
        EvalConfig(env_kwargs=one_file, fallback_targets=[0.1]).validate()
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "test.jsonl").symlink_to(Path(task["env_kwargs"]["data"]) / "test.jsonl")
    (linked / "validation.jsonl").symlink_to(Path(task["env_kwargs"]["data"]) / "test.jsonl")
    for config in ({"fallback_targets": [0.1]}, calibrating, {"tw_policy": "p", "methods": ["training_wheels", "kl_oracle"]}):
        with pytest.raises(ValueError, match="reads the same data as the evaluated split"):
            EvalConfig(env_kwargs={**task["env_kwargs"], "data": str(linked)}, **config).validate()
    EvalConfig(env_kwargs={**task["env_kwargs"], "data": str(linked)}).validate()  # nothing calibrated: allowed
    # Split names still count where they choose the data: a hub id or the task's default data.
    with pytest.raises(ValueError, match="evaluated split"):
        EvalConfig(env_kwargs={"data": "wmt/wmt19"}, fallback_targets=[0.1], calibration_split="test").validate()
    EvalConfig(env_kwargs={"data": "wmt/wmt19"}, fallback_targets=[0.1]).validate()


def test_token_view_escapes_html(tmp_path):
    from scripts.plot import render_html

    record = {"index": 0, "teacher_fraction": 0.5, "source": "<b>s</b>", "reference": "a & b",
              "tokens": [" <script>", " x"], "from_teacher": [True, False]}
    page = render_html({0.5: [record]}, "t")
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;s&lt;/b&gt;" in page


def test_cli_help_and_validation(task):
    from scripts.cli import main

    for command in ("eval", "plot"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    with pytest.raises(ValueError, match="tw-policy"):
        EvalConfig(methods=["training_wheels"]).validate()
    with pytest.raises(ValueError, match="lenience"):
        EvalConfig(lenience=[1.5]).validate()
    with pytest.raises(ValueError, match="keyword"):
        EvalConfig(budgets=[0.25]).validate()
    assert EvalConfig().selected_methods() == ["student", "teacher", "speculative", "fallback", "bild"]
    assert EvalConfig(tw_policy="p", draft="d", co_llm_router="r").selected_methods() == [
        "student", "teacher", "training_wheels", "distillspec", "fallback", "co_llm", "bild"]
    with pytest.raises(ValueError, match="co-llm-router"):
        EvalConfig(methods=["co_llm"]).validate()
    with pytest.raises(ValueError, match="bild_small_iters"):
        EvalConfig(bild_small_iters=0).validate()
    with pytest.raises(ValueError, match="co_llm_targets"):
        EvalConfig(co_llm_targets=[1.2]).validate()


@pytest.mark.parametrize("template, message", [
    ("{instruction}:", "has no \\{source\\} field"),
    ("{budget} {instruction}: {source}", "may only use the fields"),
])
def test_eval_refuses_a_plain_prompt_the_prompt_module_refuses(template, message):
    from scripts.evaluate import EvalConfig

    with pytest.raises(ValueError, match=f"plain_prompt .* is not usable: it {message}"):
        EvalConfig(plain_prompt=template).validate()


def test_eval_decodes_with_the_checkpoints_call_rule_and_reports_the_raw_rule_beside(task):
    """A policy that holds a call rule (tw train's call_rule.json) is decoded at its threshold for each
    budget by default, labelled, with the raw rule π(<τ>) > ½ beside it; a budget without one gets ½."""
    from agents.policy import StudentPolicy
    from scripts.plot import _series
    from tw_env.models import load_model

    ruled = StudentPolicy(load_model(task["student"]))
    torch.manual_seed(0)
    with torch.no_grad():
        ruled.call_head.weight.normal_(0.0, 1.0)
        ruled.call_head.bias.fill_(10.0)  # π(<τ>) around ½, above and below by state
    ruled.call_thresholds = {0.3: 0.95}
    ruled.save(task["root"] / "ruled")
    config = EvalConfig(
        env_kwargs=task["env_kwargs"], examples=EXAMPLES, device="cpu", max_new_tokens=MAX_NEW,
        output_dir=str(task["root"] / "ruled-eval"), methods=["training_wheels"], tw_policy=str(task["root"] / "ruled"),
        budgets=[0.0, 0.3], batch_size=4, latency_examples=0)
    rows = run_eval(config)["rows"]
    assert [(r["setting"], r["threshold"]) for r in rows] == [
        ("b=0", 0.5), ("b=0.3 (checkpoint c=0.95)", 0.95), ("b=0.3 raw π>½", 0.5)]
    assert rows[1]["teacher_fraction"] < rows[2]["teacher_fraction"]  # a higher threshold than ½ calls less here
    labels = [c["label"] for c in _series(rows, "teacher_fraction")]
    assert labels == ["Training Wheels", "Training Wheels, raw rule π(<τ>) > ½"]


def test_co_llm_and_bild_calibrated_per_target_teacher_fraction(task):
    """Both routers (and DistillSpec's lenience) as tw eval methods, each calibrated to target fractions on the calibration rows (here the
    evaluated rows): the achieved fraction is the calibration's, and it lands at the target within the
    granularity of this tiny set (one token of the ~40 decoded changes the fraction by about 0.025)."""
    from agents.routers import CoLLMRouter
    from tw_env.models import load_model

    router = CoLLMRouter(load_model(task["student"]))
    with torch.no_grad():
        router.deferral.weight.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(0))
    router.save(task["root"] / "router", extra={"prompt": EvalConfig().plain_prompt})
    out = task["root"] / "routed"
    targets = [0.0, 0.3, 0.5]
    results = run_eval(EvalConfig(
        env_kwargs=task["env_kwargs"], examples=EXAMPLES, device="cpu", max_new_tokens=MAX_NEW, output_dir=str(out),
        methods=["teacher", "distillspec", "co_llm", "bild"], co_llm_router=str(task["root"] / "router"), co_llm_thresholds=[0.0, 1.0],
        draft=task["student"], draft_lengths=[3], lenience=[1.0], speculative_targets=targets,
        co_llm_targets=targets, bild_fallback=[0.5], bild_rollback=[1.0, 100.0], bild_small_iters=3, bild_targets=targets,
        batch_size=4, latency_examples=0, calibration_examples=EXAMPLES, calibration_tolerance=0.0,
    ))
    rows = {(r["method"], r["setting"]): r for r in results["rows"]}
    assert rows["co_llm", "η=0"]["teacher_fraction"] == 1.0 and rows["co_llm", "η=1"]["teacher_fraction"] == 0.0
    assert rows["co_llm", "η=0"]["quality"] == pytest.approx(rows["teacher", "alone"]["quality"])
    for method, report in (("co_llm", results["co_llm_calibration"]), ("bild", results["bild_calibration"]),
                           ("distillspec", results["distillspec_calibration"])):
        calibrated = [r for r in results["rows"] if r["method"] == method and r["calibrated_for"] is not None]
        assert [r["calibrated_for"] for r in calibrated] == [c["target"] for c in report] == targets
        for row, found in zip(calibrated, report, strict=True):
            chosen = found if method != "bild" else next(
                c for c in found["candidates"] if c["rollback_threshold"] == found["chosen"]["rollback_threshold"])
            assert row["teacher_fraction"] == pytest.approx(chosen["teacher_fraction"])
            assert row["lenience" if method == "distillspec" else "threshold"] == chosen["threshold"]
        fractions = [r["teacher_fraction"] for r in calibrated]
        assert fractions == sorted(fractions)
    co_llm_fractions = [r["teacher_fraction"] for r in results["rows"] if r["method"] == "co_llm" and r["calibrated_for"] is not None]
    assert co_llm_fractions[0] == 0.0 and all(abs(f - t) <= 0.05 for f, t in zip(co_llm_fractions, targets, strict=True))
    # BiLD's large model writes the first token and one after every 3 small ones: no fraction below that floor.
    bild_rows = [r for r in results["rows"] if r["method"] == "bild" and r["calibrated_for"] is not None]
    floor = min(r["teacher_fraction"] for r in results["rows"] if r["method"] == "bild")
    assert bild_rows[0]["teacher_fraction"] == pytest.approx(floor) and floor > 0.0
    assert all(abs(r["teacher_fraction"] - t) <= 0.05 for r, t in zip(bild_rows[1:], targets[1:], strict=True))
    assert {r["rollback_threshold"] for r in bild_rows} <= {1.0, 100.0}
    run_plot(PlotConfig(results=str(out), terminal=False))
    assert (out / "quality_vs_teacher_use.png").stat().st_size > 0


def test_router_table_lists_each_method_at_the_target_fraction(evaluated, capsys):
    from scripts.router_table import main as router_table

    results, out = evaluated
    router_table([str(out), "--fractions", "0.5"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.5 |")]
    assert [line.split(" | ")[1] for line in lines] == ["Training Wheels (checkpoint rule)", "confidence fallback"]
    fallback = next(r for r in results["rows"] if r["method"] == "fallback" and r["calibrated_for"] == 0.5)
    assert f"| {fallback['teacher_fraction']:.3f} | {fallback['quality']:.2f} |" in lines[1]


def test_budget_curves_read_each_call_rule_at_its_budget():
    from scripts.plot import budget_curves

    rows = [
        {"method": "training_wheels", "setting": "b=0.1 (checkpoint c=0.4)", "budget": 0.1, "teacher_fraction": 0.1, "quality": 50.0},
        {"method": "training_wheels", "setting": "b=0.05 (checkpoint c=0.4)", "budget": 0.05, "teacher_fraction": 0.06, "quality": 45.0},
        {"method": "training_wheels", "setting": "b=0.1 raw π>½", "budget": 0.1, "teacher_fraction": 0.08, "quality": 48.0},
        {"method": "training_wheels", "setting": "b=0.1 calibrated c=0.3", "budget": 0.1, "calibrated_for": 0.1,
         "teacher_fraction": 0.1, "quality": 49.0},
        {"method": "fallback", "setting": "t=0.5", "budget": None, "teacher_fraction": 0.2, "quality": 40.0},
    ]
    assert budget_curves(rows) == {
        "checkpoint rule": [(0.05, 0.06, 45.0), (0.1, 0.1, 50.0)],
        "raw rule π(<τ>) > ½": [(0.1, 0.08, 48.0)],
        "calibrated by tw eval": [(0.1, 0.1, 49.0)],
    }
