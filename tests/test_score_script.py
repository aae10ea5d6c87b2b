"""scripts/score.py: a predictions file scored alone (benchmark from the ids, modes, score.json), its refusals
of bad input, and the scorers' copies of the benchmarks' constants against the dataset builders'.

Expected numbers are derived by hand in the comments, from the official rules in each scorer's docstring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from moka_train.data.datasets import air_bench as air_bench_data
from moka_train.data.datasets import ave as ave_data
from moka_train.data.datasets import mmau as mmau_data
from moka_train.data.datasets import mme as mme_data
from moka_train.data.datasets import music_avqa as music_avqa_data
from moka_train.data.datasets import pope as pope_data
from moka_train.data.datasets import seed_bench as seed_bench_data
from moka_train.evaluation.metrics import air_bench, ave, mmau, mme, music_avqa, pope, seed_bench
from tests.helpers import loaded_script

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "score.py"


@pytest.fixture(scope="module")
def score_script():
    with loaded_script(SCRIPT) as module:
        yield module


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- records as generate writes them
def avqa(n: int, prediction: str, answer: str, modality: str, qtype: str) -> dict[str, Any]:
    """generate over build_music_avqa (word targets): index, id, prediction, answer, then the metadata."""
    return {
        "index": n,
        "id": f"music_avqa/test/{n}",
        "prediction": prediction,
        "answer": answer,
        "split": "test",
        "question_id": n,
        "video_id": f"{n:08d}",
        "question_modality": modality,
        "question_type": qtype,
        "question": "How many instruments are sounding in the video?",
        "question_content": "How many instruments are sounding in the video?",
        "templ_values": [],
    }


AVQA = [
    # official: <answer> content (tags any case), else the whole text, must be a class; moka_compat: exactly one
    # case-sensitive tag whose content is a class, else dropped; correct iff the truth is a substring of it.
    avqa(1, "<answer>two</answer>", "two", "Audio", "Counting"),  # official right; moka right
    avqa(2, "<answer>piano</answer>", "no", "Audio-Visual", "Existential"),  # official wrong; moka right (substring)
    avqa(3, "The left one.", "left", "Visual", "Location"),  # official unparsable (wrong); moka dropped
    avqa(4, "<ANSWER>three</ANSWER>", "three", "Audio-Visual", "Counting"),  # official right; moka dropped (case)
    avqa(5, "two", "one", "Visual", "Counting"),  # official wrong (parsed "two"); moka dropped (no tag)
    avqa(6, "<answer>no</answer>", "yes", "Audio", "Comparative"),  # official wrong; moka wrong
]
# official: right 1, 4 of all 6 -> 2/6 = 33.33 %, unparsable 1 (record 3); the Audio row pools records 1 and 6: 1/2.
# moka_compat: parsed 1, 2, 6 (3 in the denominator), right 1, 2 -> 2/3 = 66.67 %, unparsable 3 (records 3, 4, 5).


def pope_record(split: str, qid: int, label: str, prediction: str) -> dict[str, Any]:
    """generate over build_pope: ``answer`` is the target, the label."""
    return {
        "index": qid,
        "id": f"pope/coco/{split}/{qid}",
        "prediction": prediction,
        "answer": label,
        "question_id": qid,
        "image": f"COCO_val2014_{qid:012d}.jpg",
        "question": "Is there a dog in the image?",
        "label": label,
        "split": split,
        "category": split,
        "dataset": "coco",
        "line": qid,
    }


POPE = [
    # official (evaluate.py): "No" / "not" / "no" a word of the first sentence -> no, anything else -> yes.
    pope_record("random", 1, "yes", "Yes, there is a dog."),  # yes: TP
    pope_record("random", 2, "yes", "No."),  # no: FN
    pope_record("random", 3, "no", "Yes"),  # yes: FP
    pope_record("random", 4, "no", "No, there is not."),  # no: TN
    pope_record("random", 5, "no", "There is a cat."),  # no yes/no word: read as yes, FP (unparsable 1)
    pope_record("popular", 1, "yes", "yes"),  # TP
    pope_record("popular", 2, "no", "no"),  # TN
    pope_record("random", 1, "yes", "No"),  # a repeat of random/1: official keeps the first
]
# official, random: TP 1, FP 2, TN 1, FN 1, N 5 -> accuracy 2/5 = 40, precision 1/3 = 33.33, recall 1/2 = 50,
#   F1 = 2 (1/3)(1/2) / (1/3 + 1/2) = (1/3) / (5/6) = 2/5 = 40, yes ratio 3/5 = 60.
# official, popular: TP 1, TN 1 -> 100 everywhere but yes ratio 1/2 = 50.
# official headline: the mean over the splits, (40 + 100) / 2 = 70; scored 7, duplicates 1.
# moka_compat (cal_pope.py): "yes" anywhere -> yes, else "no" anywhere -> no, else neither; all 8 records:
#   TP 2 (random/1, popular/1), TN 2 (random/4, popular/2), FP 1 (random/3), FN 2 (random/2, the repeat),
#   random/5 neither (unparsable 1) -> accuracy (2 + 2) / 8 = 50.


def mmau_record(uid: str, prediction: str, choices: list[str], answer: str, task: str) -> dict[str, Any]:
    """generate over build_mmau (choice_format text: the target is the answer's text)."""
    letter = "ABCDEFGH"[choices.index(answer)]
    return {
        "index": 0,
        "id": f"mmau/test-mini/{uid}",
        "prediction": prediction,
        "answer": answer,
        "question": "Which sound is heard?",
        "choices": choices,
        "answer_letter": letter,
        "letters": dict(zip("ABCDEFGH", choices, strict=False)),
        "choice_format": "text",
        "task": task,
        "category": "Information Extraction",
        "category_raw": "Information Extraction",
        "sub_category": "Event identification",
        "difficulty": "easy",
        "dataset": "synthetic",
        "split": "test-mini",
    }


MMAU = [
    # string_match: every answer token predicted, none that only another choice has ("a" is in both: harmless).
    mmau_record("u1", "A dog is barking.", ["a dog barking", "a cat meowing"], "a dog barking", "sound"),  # right
    mmau_record("u2", "Happy", ["Happy", "Sad"], "Sad", "speech"),  # wrong
    mmau_record("u3", "", ["Happy", "Sad"], "Happy", "speech"),  # no word token: wrong, unparsable
]
# official: 1/3 = 33.33 %; task/sound 1/1 = 100, task/speech 0/2 = 0.


# ---------------------------------------------------------------------------------------------------- scoring
def test_music_avqa_both_modes_printed_and_written(score_script, tmp_path, capsys):
    predictions = write_jsonl(tmp_path / "predictions.jsonl", AVQA)
    score_script.main([str(predictions), "--mode", "both"])
    out = capsys.readouterr().out
    assert "music_avqa (official): accuracy 33.33" in out
    assert "music_avqa (moka_compat): accuracy 66.67" in out
    assert f"wrote {tmp_path / 'score.json'}" in out

    written = json.loads((tmp_path / "score.json").read_text())
    assert list(written) == ["official", "moka_compat"]
    official, moka = written["official"], written["moka_compat"]
    assert (official["benchmark"], official["mode"], official["main_name"]) == ("music_avqa", "official", "accuracy")
    assert official["main"] == pytest.approx(100 * 2 / 6)
    assert official["counts"] == {"total": 6, "scored": 6, "unparsable": 1, "duplicates": 0}
    assert official["groups"]["Audio"] == {"accuracy": 50.0, "correct": 1, "total": 2, "unparsable": 0}
    assert official["groups"]["Overall"]["correct"] == 2
    assert moka["main"] == pytest.approx(100 * 2 / 3)
    assert moka["counts"] == {"total": 6, "scored": 3, "unparsable": 3, "duplicates": 0}


def test_pope_both_modes_to_another_file(score_script, tmp_path, capsys):
    predictions = write_jsonl(tmp_path / "predictions.jsonl", POPE)
    out_file = tmp_path / "scores" / "pope.json"  # a folder that does not exist yet
    score_script.main([str(predictions), "--mode", "both", "--out", str(out_file)])
    out = capsys.readouterr().out
    assert "pope (official): accuracy (mean over splits) 70.00" in out
    assert "pope (moka_compat): accuracy 50.00" in out
    assert not (tmp_path / "score.json").exists()  # --out replaces the default

    written = json.loads(out_file.read_text())
    official = written["official"]
    assert official["main"] == pytest.approx(70.0)
    assert official["counts"] == {"total": 8, "scored": 7, "unparsable": 1, "duplicates": 1}
    random = official["groups"]["random"]
    assert random["total"] == 5
    for name, value in {"accuracy": 40, "precision": 100 / 3, "recall": 50, "f1": 40, "yes_ratio": 60}.items():
        assert random[name] == pytest.approx(value), name
    assert official["groups"]["popular"]["accuracy"] == pytest.approx(100.0)
    assert written["moka_compat"]["main"] == pytest.approx(50.0)
    assert written["moka_compat"]["counts"] == {"total": 8, "scored": 8, "unparsable": 1}


def test_a_mode_already_in_score_json_is_scored_again_and_kept(score_script, tmp_path, capsys):
    """evaluate.py writes the official score; score.py --mode moka_compat afterwards keeps an official score in
    the file (make_tables reads it), scored again from the same predictions: a hand-edited old value does not
    survive."""
    predictions = write_jsonl(tmp_path / "predictions.jsonl", AVQA)
    score_script.main([str(predictions)])
    written = json.loads((tmp_path / "score.json").read_text())
    written["official"]["main"] = 12.5  # stale: not what these predictions give
    (tmp_path / "score.json").write_text(json.dumps(written))
    capsys.readouterr()
    score_script.main([str(predictions), "--mode", "moka_compat"])
    assert "also held official: scored again from these predictions and kept" in capsys.readouterr().out
    written = json.loads((tmp_path / "score.json").read_text())
    assert list(written) == ["moka_compat", "official"]
    assert written["official"]["main"] == pytest.approx(100 * 2 / 6)  # as in the test above
    assert written["moka_compat"]["main"] == pytest.approx(100 * 2 / 3)


def test_mmau_both_scores_official_only_and_says_so(score_script, tmp_path, capsys):
    predictions = write_jsonl(tmp_path / "predictions.jsonl", MMAU)
    scores = score_script.main([str(predictions), "--mode", "both"])
    out = capsys.readouterr().out
    assert list(scores) == ["official"]
    assert "mmau (official): accuracy 33.33" in out
    assert "note: no moka_compat score: mmau: MokA published no scoring script for MMAU" in out
    written = json.loads((tmp_path / "score.json").read_text())
    assert list(written) == ["official"]
    assert written["official"]["groups"]["task/sound"] == {"accuracy": 100.0, "correct": 1, "total": 1}
    assert written["official"]["groups"]["task/speech"] == {"accuracy": 0.0, "correct": 0, "total": 2}


@pytest.mark.parametrize(
    ("record_id", "benchmark"),
    [
        # the builders' id formats (moka_train.data.datasets), MokA's own files' included
        ("music_avqa/test/4", "music_avqa"),
        ("music_avqa_moka/test/4", "music_avqa"),
        ("ave/test/12", "ave"),
        ("ave_moka/test/0", "ave"),
        ("mme/OCR/0001/1", "mme"),
        ("mmbench/DEV_EN/1000007", "mmbench"),
        ("pope/coco/adversarial/3", "pope"),
        ("seed_bench/101669", "seed_bench"),
        ("mmau/test-mini/5a0d1b3c", "mmau"),
        ("air_bench/foundation/17", "air_bench"),
    ],
)
def test_benchmark_inferred_from_the_id_prefix(score_script, record_id, benchmark):
    assert score_script.infer_benchmark([{"id": record_id}, {"id": record_id + "#2"}]) == benchmark


def test_benchmark_option_overrides_the_ids(score_script, tmp_path, capsys):
    renamed = [{**record, "id": f"my_run/{n}"} for n, record in enumerate(MMAU)]
    predictions = write_jsonl(tmp_path / "predictions.jsonl", renamed)
    score_script.main([str(predictions), "--benchmark", "mmau"])
    assert "mmau (official): accuracy 33.33" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- bad input
def refusal(score_script, argv: list[str], capsys) -> str:
    """The message of a run that must stop with exit status 2 and no traceback."""
    with pytest.raises(SystemExit) as stopped:
        score_script.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_missing_file(score_script, tmp_path, capsys):
    err = refusal(score_script, [str(tmp_path / "nothing.jsonl")], capsys)
    assert f"{tmp_path / 'nothing.jsonl'}: no such file" in err
    assert "a folder, not a predictions file" in refusal(score_script, [str(tmp_path)], capsys)


def test_bad_json_line_is_named(score_script, tmp_path, capsys):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps(AVQA[0]) + "\n\n" + '{"id": "music_avqa/test/2", \n')
    assert f"{path}:3: not a JSON record" in refusal(score_script, [str(path)], capsys)
    path.write_text(json.dumps(AVQA[0]) + "\n[1, 2]\n")
    assert f"{path}:2: not a JSON record (an object): [1, 2]" in refusal(score_script, [str(path)], capsys)
    path.write_text("\n")
    assert "no prediction records" in refusal(score_script, [str(path)], capsys)


def test_out_is_a_folder(score_script, tmp_path, capsys):
    path = write_jsonl(tmp_path / "predictions.jsonl", AVQA)
    assert "a folder; name the JSON file" in refusal(score_script, [str(path), "--out", str(tmp_path)], capsys)


def test_unknown_or_mixed_benchmarks_name_the_ids(score_script, tmp_path, capsys):
    path = write_jsonl(tmp_path / "predictions.jsonl", [AVQA[0], {**AVQA[1], "id": "vqav2/test/7"}])
    err = refusal(score_script, [str(path)], capsys)
    assert "name no known benchmark" in err and "'vqav2/test/7'" in err and "--benchmark" in err

    write_jsonl(path, [AVQA[0], POPE[0]])
    err = refusal(score_script, [str(path)], capsys)
    assert "several benchmarks" in err and "'music_avqa/test/1'" in err and "'pope/coco/random/1'" in err

    write_jsonl(path, [{k: v for k, v in AVQA[0].items() if k != "id"}])
    assert "no string 'id'" in refusal(score_script, [str(path)], capsys)

    write_jsonl(path, AVQA)
    assert "invalid choice: 'vqav2'" in refusal(score_script, [str(path), "--benchmark", "vqav2"], capsys)


def test_mode_the_benchmark_lacks_run_as_a_command(tmp_path):
    # As a command: exit status 2, the scorer's message on stderr, no traceback, nothing written.
    path = write_jsonl(tmp_path / "predictions.jsonl", MMAU)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(path), "--mode", "moka_compat"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("score.py: error: mmau: MokA published no scoring script for MMAU")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "score.json").exists()


def test_records_the_scorer_cannot_read(score_script, tmp_path, capsys):
    # MUSIC-AVQA records scored as MME, then a ground truth outside the 42 answers: the scorer's own messages.
    path = write_jsonl(tmp_path / "predictions.jsonl", AVQA)
    err = refusal(score_script, [str(path), "--benchmark", "mme"], capsys)
    assert "mme: prediction 'music_avqa/test/1' has no ['subtask', 'image']" in err
    write_jsonl(path, [{**AVQA[0], "answer": "a trumpet"}])
    assert "not one of the 42 MUSIC-AVQA answers" in refusal(score_script, [str(path)], capsys)


# ----------------------------------------------------------------------------- the scorers' copies of constants
# The scorers write the benchmarks' definitions out (scoring needs neither torch nor the data stack the builders
# import); these must stay equal to the builders'.
@pytest.mark.parametrize(
    ("scorer_value", "builder_value"),
    [
        pytest.param(music_avqa.QUESTION_TYPES, music_avqa_data.QUESTION_TYPES, id="music_avqa.QUESTION_TYPES"),
        pytest.param(music_avqa.ANSWERS, frozenset(music_avqa_data.ANSWERS), id="music_avqa.ANSWERS"),
        pytest.param(ave.CATEGORIES, ave_data.CATEGORIES, id="ave.CATEGORIES"),
        pytest.param(ave.NUM_SECONDS, ave_data.NUM_SECONDS, id="ave.NUM_SECONDS"),
        pytest.param(mme.PERCEPTION, mme_data.PERCEPTION, id="mme.PERCEPTION"),
        pytest.param(mme.COGNITION, mme_data.COGNITION, id="mme.COGNITION"),
        pytest.param(mme.ANSWER_SUFFIX, mme_data.ANSWER_SUFFIX, id="mme.ANSWER_SUFFIX"),
        pytest.param(mme.GT_VALUES, mme_data.ANSWERS, id="mme.GT_VALUES"),
        pytest.param(pope.SPLITS, pope_data.SPLITS, id="pope.SPLITS"),
        pytest.param(
            seed_bench.DIMENSIONS,
            {number: name for name, number in seed_bench_data.DIMENSIONS.items()},
            id="seed_bench.DIMENSIONS",
        ),
        pytest.param(mmau.ORDER["task"], mmau_data.TASKS, id="mmau.ORDER[task]"),
        pytest.param(air_bench.LETTERS, air_bench_data.LETTERS, id="air_bench.LETTERS"),
    ],
)
def test_scorer_constants_equal_the_builders(scorer_value, builder_value):
    assert scorer_value == builder_value


def test_benchmark_sizes():
    assert len(music_avqa_data.ANSWERS) == len(music_avqa.ANSWERS) == 42  # no repeat in the builder's tuple
    assert sum(len(types) for types in music_avqa.QUESTION_TYPES.values()) == 9
    assert len(ave.CATEGORIES) == len(set(ave.CATEGORIES)) == 28
    assert len(mme.PERCEPTION) == 10 and len(mme.COGNITION) == 4


def test_a_rule_that_reads_no_answer_prints_no_number(score_script, tmp_path, capsys):
    """The demo trains bare answer words; MokA's rule reads only <answer>X</answer>: every answer unparsable.
    It printed "accuracy 0.00", which reads as a result."""
    records = [dict(record, prediction="two") for record in AVQA]  # no <answer> tag anywhere
    predictions = write_jsonl(tmp_path / "predictions.jsonl", records)
    score_script.main([str(predictions), "--mode", "moka_compat"])
    out = capsys.readouterr().out
    assert f"music_avqa (moka_compat): accuracy n/a (no answer of {len(AVQA)} could be scored by this rule)" in out
    assert "accuracy 0.00" not in out
