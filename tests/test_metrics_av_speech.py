"""The MUSIC-AVQA, AVE, MMAU and AIR-Bench scorers (``moka_train.evaluation.metrics``), both modes.

Every expected number is derived by hand in a comment from the rule in benchmarks.md / moka_reference.md §6, or
is a published / documented figure (MokA's 77.06 on its released AVE predictions, the 76.78 and 76.12 variants
of moka_reference.md §6). The released-file and excerpt tests read ../shared/samples and skip without it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from moka_train.evaluation.metrics import air_bench, ave, get_scorer, mmau, music_avqa
from tests.reference_files import shared_file


def pct(value: float) -> float:
    return round(value, 2)


# ---------------------------------------------------------------------------------------------------- MUSIC-AVQA


def avqa(pid: str, prediction: str, answer: str, modality: Any = "Audio", qtype: str = "Counting") -> dict:
    """A prediction record as generate writes it over music_avqa records (the fields the scorer reads)."""
    return {
        "id": pid,
        "prediction": prediction,
        "answer": answer,
        "question_modality": modality,
        "question_type": qtype,
    }


# Each line: prediction, ground truth, official verdict, moka_compat verdict (None: dropped from its denominator).
AVQA_CASES = [
    ("<answer>two</answer>", "two", True, True),
    ("<answer> Two </answer>", "two", True, True),  # both strip and lower-case the tag content
    ("two", "two", True, None),  # no tag: MokA drops it; officially the whole text is the answer
    ("<answer>two</answer> <answer>two</answer>", "two", True, None),  # doubled tag: MokA needs exactly one
    ("<answer>piano</answer>", "no", False, True),  # MokA's substring bug: "no" in "piano"
    ("<answer>2</answer>", "two", None, None),  # a digit is none of the 42 classes
    ("<ANSWER>two</ANSWER>", "two", True, None),  # MokA's pattern is case-sensitive
    ("<answer>three</answer>", "two", False, False),
    ("", "yes", None, None),  # empty
    ("No, there are two.", "no", None, None),  # a sentence is not a class: not read as "no"
    ("acoustic guitar", "acoustic_guitar", True, None),  # a space for the class name's underscore
    ("<answer>yes</answer><answer>no</answer>", "yes", None, None),  # disagreeing tags
]


@pytest.mark.parametrize(("prediction", "truth", "official", "moka"), AVQA_CASES)
def test_music_avqa_verdict_per_case(prediction, truth, official, moka):
    record = [avqa("q", prediction, truth)]
    result = music_avqa.score(record)
    # official: every question is in the denominator; unparsable counts as wrong.
    assert (result.main, result.counts["scored"], result.counts["unparsable"]) == (
        100.0 if official else 0.0,
        1,
        int(official is None),
    )
    result = music_avqa.score(record, "moka_compat")
    # moka_compat: an unparsable question leaves the denominator (empty: accuracy reads 0).
    assert (result.main, result.counts["scored"], result.counts["unparsable"]) == (
        100.0 if moka else 0.0,
        int(moka is not None),
        int(moka is None),
    )


def test_music_avqa_official_and_moka_compat_totals():
    records = [avqa(f"q{i}", p, a) for i, (p, a, _, _) in enumerate(AVQA_CASES)]
    official = music_avqa.score(records)
    # official: right on lines 1, 2, 3, 4, 7, 11 = 6 of 12 (every question in the denominator) -> 50.0;
    # unparsable (None) on lines 6, 9, 10, 12 = 4, counted wrong.
    assert official.main == pytest.approx(50.0)
    assert official.counts == {"total": 12, "scored": 12, "unparsable": 4, "duplicates": 0}
    moka = music_avqa.score(records, "moka_compat")
    # moka_compat: parsed lines 1, 2, 5, 8 (4 in the denominator), right on 1, 2, 5 -> 3/4 = 75.0; 8 dropped.
    assert moka.main == pytest.approx(75.0)
    assert moka.counts == {"total": 12, "scored": 4, "unparsable": 8, "duplicates": 0}
    assert "dropped from the denominator" in moka.notes[0]
    assert "counted wrong" in official.notes[0]


def test_music_avqa_groups_pool_by_modality_in_paper_order():
    records = [
        avqa("a1", "one", "one", "Audio", "Counting"),
        avqa("a2", "yes", "no", "Audio", "Comparative"),
        avqa("v1", "left", "left", "Visual", "Location"),
        avqa("v2", "right", "right", "Visual", "Location"),
        avqa("av1", "two", "three", "Audio-Visual", "Counting"),
        avqa("av2", "yes", "yes", "Audio-Visual", "Temporal"),
    ]
    result = music_avqa.score(records)
    # Present types only, each modality after its types, Overall last (Visual/Counting has no record).
    assert list(result.groups) == [
        "Audio/Counting",
        "Audio/Comparative",
        "Audio",
        "Visual/Location",
        "Visual",
        "Audio-Visual/Counting",
        "Audio-Visual/Temporal",
        "Audio-Visual",
        "Overall",
    ]
    # Audio: 1 of 2 -> 50; Visual: 2 of 2 -> 100; Audio-Visual: 1 of 2 -> 50; Overall 4 of 6 -> 66.67.
    assert result.groups["Audio"] == {"accuracy": 50.0, "correct": 1, "total": 2, "unparsable": 0}
    assert result.groups["Visual"]["accuracy"] == 100.0
    assert result.groups["Audio-Visual/Counting"]["accuracy"] == 0.0
    assert result.groups["Audio-Visual"]["accuracy"] == 50.0
    assert pct(result.main) == 66.67
    assert pct(result.groups["Overall"]["accuracy"]) == 66.67


def test_music_avqa_tagged_ground_truth_and_duplicates():
    # The ground truth of a tagged target ("<answer>two</answer>") is the tag's word.
    first = avqa("q1", "two", "<answer>two</answer>")
    repeat = avqa("q1", "three", "<answer>two</answer>")
    other = avqa("q2", "<answer>yes</answer>", "yes")
    official = music_avqa.score([first, repeat, other])
    # official scores q1 once (its first record, right) and q2 (right): 2 of 2.
    assert official.main == 100.0
    assert official.counts["duplicates"] == 1 and official.counts["scored"] == 2
    moka = music_avqa.score([first, repeat, other], "moka_compat")
    # moka_compat keeps all three; only q2 has a tag: 1 of 1.
    assert moka.main == 100.0 and moka.counts["scored"] == 1 and moka.counts["duplicates"] == 1


def test_music_avqa_bad_records_are_named():
    with pytest.raises(KeyError, match=r"'q7'.*\['question_type'\]"):
        music_avqa.score([{"id": "q7", "prediction": "two", "answer": "two", "question_modality": "Audio"}])
    with pytest.raises(ValueError, match="'q8'.*not one of the 42"):
        music_avqa.score([avqa("q8", "two", "a trumpet")])
    with pytest.raises(ValueError, match="'q9'.*unknown question type"):
        music_avqa.score([avqa("q9", "two", "two", "Visual", "Temporal")])
    with pytest.raises(ValueError, match=r"'q10'.*unknown question type \(\['Audio'\]"):
        music_avqa.score([avqa("q10", "two", "two", ["Audio"], "Counting")])


def avqa_excerpt() -> list[dict]:
    """The 40 real json_update test questions, as prediction records (prediction filled in by the test)."""
    items = json.loads(
        shared_file("samples", "music_avqa", "json_update", "avqa-test.json").read_text(encoding="utf-8")
    )
    records = []
    for item in items:
        modality, qtype = json.loads(item["type"])
        records.append(avqa(f"music_avqa/test/{item['question_id']}", "", item["anser"], modality, qtype))
    return records


def test_music_avqa_real_excerpt():
    records = avqa_excerpt()
    types = Counter((r["question_modality"], r["question_type"]) for r in records)
    answers = Counter(r["answer"] for r in records)

    truth = [{**r, "prediction": r["answer"]} for r in records]
    result = music_avqa.score(truth)
    assert result.main == 100.0 and result.counts["unparsable"] == 0
    for (modality, qtype), n in types.items():
        assert result.groups[f"{modality}/{qtype}"]["total"] == n
    tagged = [{**r, "prediction": f"<answer>{r['answer']}</answer>"} for r in records]
    assert music_avqa.score(tagged, "moka_compat").main == 100.0
    # Bare words have no tag: moka_compat drops all 40 and its accuracy over nothing reads 0.
    assert music_avqa.score(truth, "moka_compat").counts == {
        "total": 40,
        "scored": 0,
        "unparsable": 40,
        "duplicates": 0,
    }

    # "piano" for everything: officially right only where the answer is piano (none in the excerpt); moka_compat
    # also credits every "no" question (substring), 7 of the 40 in this excerpt.
    piano = [{**r, "prediction": "<answer>piano</answer>"} for r in records]
    assert answers["piano"] == 0 and answers["no"] == 7
    assert music_avqa.score(piano).main == 0.0
    assert music_avqa.score(piano, "moka_compat").main == pytest.approx(100 * 7 / 40)  # 17.5


# ----------------------------------------------------------------------------------------------------------- AVE


def ave_record(pid: str, prediction: str, category: str, start: int, end: int) -> dict:
    """A prediction record with the metadata the AVE builders give (start/end as in Annotations.txt)."""
    return {
        "id": pid,
        "prediction": prediction,
        "category": category,
        "start": start,
        "end": end,
        "end_exclusive": True,
    }


def test_ave_boundaries_end_exclusive_vs_inclusive():
    records = [
        # Annotations "6&8": official seconds {6, 7}; MokA inclusive {6, 7, 8}. Predicted "8,10": official {8, 9}
        # -> wrong at 6, 7, 8, 9 -> 6/10; MokA {8, 9} (no second 10) -> agrees at 8, wrong at 6, 7, 9 -> 7/10.
        ave_record(
            "a", "So the event is <event> Church bell </event>, range <range> 8,10 </range>.", "Church bell", 6, 8
        ),
        # "0&10" is the whole video either way; predicted "0,9": official {0..8} -> 9/10, MokA {0..9} -> 10/10.
        ave_record("b", "<event>Banjo</event> <range>0,9</range>", "Banjo", 0, 10),
        # No tags: official predicts background everywhere, right outside "2&5" = {2, 3, 4} -> 7/10; MokA skips
        # it and its 10 zero-filled slots count as correct -> 10/10.
        ave_record("c", "A bus drives by.", "Bus", 2, 5),
    ]
    official = ave.score(records)
    assert official.main == pytest.approx(100 * (6 + 9 + 7) / 30)  # 73.33
    assert official.groups["segments"] == {"accuracy": pytest.approx(100 * 22 / 30), "correct": 22, "total": 30}
    assert official.counts == {"total": 3, "scored": 3, "unparsable": 1, "duplicates": 0}
    moka = ave.score(records, "moka_compat")
    assert moka.main == pytest.approx(100 * (7 + 10 + 10) / 30)  # 90.0
    assert moka.counts["unparsable"] == 1
    assert "counted as correct" in moka.notes[0] and "background" in official.notes[0]


def test_ave_parsers():
    church = ave.CLASSES["church bell"]
    # Several ranges are a union; case and spacing of the event do not matter; a malformed range is ignored.
    assert ave.parse_official("<event>church  BELL</event><range>0,2</range><range>x</range><range>5,7</range>") == (
        ave.Localisation(church, ((0, 2), (5, 7)))
    )
    assert ave.parse_moka("<event> Church bell </event><range>0,2</range><range>0-3</range>") == ave.Localisation(
        church, ((0, 2),)
    )
    # Only malformed ranges: nothing to localise in either reading.
    assert ave.parse_official("<event>Bus</event><range>0-10</range>") is None
    assert ave.parse_moka("<event>Bus</event><range>0-10</range>") is None
    # The same event twice: one event officially; MokA needs exactly one tag.
    twice = "<event>Bus</event><range>0,3</range> ... <event>Bus</event><range>5,6</range>"
    assert ave.parse_official(twice) == ave.Localisation(ave.CLASSES["bus"], ((0, 3), (5, 6)))
    assert ave.parse_moka(twice) is None
    # Two different events, or one outside the 28 categories: unparsable in both.
    assert ave.parse_official("<event>Bus</event><range>0,3</range><event>Truck</event><range>3,9</range>") is None
    assert ave.parse_official("<event>Cow</event><range>0,10</range>") is None
    assert ave.parse_moka("<event>Cow</event><range>0,10</range>") is None
    # MokA's fallback "Event, (a b)" inside the tag; officially that is no category name.
    assert ave.parse_moka("<event>Church bell, (0 4)</event>") == ave.Localisation(church, ((0, 4),))
    assert ave.parse_official("<event>Church bell, (0 4)</event>") is None
    # "none" is MokA's background class: a parsed prediction of background.
    assert ave.parse_official("<event>none</event><range>0,10</range>") == ave.Localisation(0, ((0, 10),))
    assert ave.parse_official("") is None and ave.parse_moka("") is None


def test_ave_bad_records_are_named():
    with pytest.raises(KeyError, match=r"'v1'.*\['end'\]"):
        ave.score([{"id": "v1", "prediction": "", "category": "Bus", "start": 0}])
    with pytest.raises(ValueError, match="'v2'.*not one of the 28"):
        ave.score([ave_record("v2", "", "Cow", 0, 10)])
    with pytest.raises(ValueError, match="'v3'.*start 7, end 3"):
        ave.score([ave_record("v3", "", "Bus", 7, 3)])
    with pytest.raises(ValueError, match="'v4'.*end_exclusive False"):
        ave.score([{**ave_record("v4", "", "Bus", 0, 10), "end_exclusive": False}])


def test_ave_release_reader_names_a_bad_line(tmp_path: Path):
    good = {"output": "event:Bus start_time:2 end_time:5</s>", "predict": "x", "video_path": "/d/AVE/-ab_c.mp4"}
    path = tmp_path / "inference_ave.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "output": "event:Cow start_time:0 end_time:1"}))
    with pytest.raises(ValueError, match=r"inference_ave.jsonl:2: output 'event:Cow"):
        ave.records_from_moka_release(path)
    path.write_text(json.dumps(good) + "\n")
    (record,) = ave.records_from_moka_release(path)
    assert (record["id"], record["video_id"], record["category"], record["start"], record["end"]) == (
        "ave_moka/test/0",
        "-ab_c",
        "Bus",
        2,
        5,
    )
    assert record["answer"] == record["ground_truth"] == "event:Bus start_time:2 end_time:5"


def test_ave_released_moka_predictions():
    records = ave.records_from_moka_release(shared_file("samples", "ave", "moka", "inference_ave.jsonl"))
    assert len(records) == 402
    # The five MokA's script skips (0-based lines): 125 and 203 have no tags, 250 names two events, 163 "Cow" and
    # 326 "Squirrel" are no AVE category.
    skipped = [r["index"] for r in records if ave.parse_moka(r["prediction"]) is None]
    assert skipped == [125, 163, 203, 250, 326]
    assert [r["index"] for r in records if ave.parse_official(r["prediction"]) is None] == skipped

    moka = ave.score(records, "moka_compat")
    assert pct(moka.main) == 77.06  # MokA README's number from this very file
    assert moka.counts["unparsable"] == 5 and moka.groups["segments"]["total"] == 4020
    # moka_reference.md §6's two corrections of MokA's inclusive reading: 76.78 over the 397 parsed videos' slots,
    # 76.12 with the 5 failures as background over all 4,020.
    correct, total, _ = ave.segment_accuracy(records, ave.parse_moka, inclusive=True, unparsable="drop")
    assert (total, pct(100 * correct / total)) == (3970, 76.78)
    correct, total, _ = ave.segment_accuracy(records, ave.parse_moka, inclusive=True, unparsable="background")
    assert (total, pct(100 * correct / total)) == (4020, 76.12)

    # official: the same failure handling as 76.12 (background, all 4,020 segments) but end-exclusive seconds:
    # 2,988 of 4,020 = 74.33 (an independent scratch port of ave_eval.py with `<` in place of `<=` gave 2,988).
    official = ave.score(records)
    assert official.groups["segments"]["correct"] == 2988 and official.groups["segments"]["total"] == 4020
    assert pct(official.main) == 74.33
    assert official.counts == {"total": 402, "scored": 402, "unparsable": 5, "duplicates": 0}


# ---------------------------------------------------------------------------------------------------------- MMAU


def mmau_record(pid: str, prediction: str, choices: list[str], answer: str, **extra: object) -> dict:
    return {
        "id": pid,
        "prediction": prediction,
        "choices": choices,
        "answer": answer,
        "answer_letter": "ABCDEFGH"[choices.index(answer)],
        **extra,
    }


STATES = ["North Carolina", "Virginia", "South Carolina", "Ohio"]  # real test-mini choices sharing "Carolina"
YEARS = [f"one thousand, nine hundred and {n}" for n in ("nineteen", "twenty-one", "eighteen", "twenty")]
HANDS = ["The Red Hand", "The Golden Circle", "The Iron Fist", "The Black Hand"]


@pytest.mark.parametrize(
    ("prediction", "choices", "answer", "right"),
    [
        ("North Carolina", STATES, "North Carolina", True),
        ("The answer is north carolina.", STATES, "North Carolina", True),  # extra words no choice has: fine
        ("Carolina", STATES, "North Carolina", False),  # "north" missing
        ("North Carolina, not South Carolina", STATES, "North Carolina", False),  # "south" is only a wrong choice's
        ("South Carolina", STATES, "South Carolina", True),  # "carolina" is the answer's too: not held against it
        ("Black Hand", HANDS, "The Black Hand", False),  # the answer's "the" is missing
        ("the black hand", HANDS, "The Black Hand", True),
        ("(A) Man", ["Man", "Woman", "A child"], "Man", False),  # the prefix's "a" belongs to "A child"
        ("(A) Man", ["Man", "Woman", "Child"], "Man", True),
        ("", STATES, "Ohio", False),
        # Real choices: "twenty-one" tokenizes to "twenty" and "one", both already in the answer's tokens, so the
        # wrong choice has exactly the answer's tokens and passes.
        ("one thousand, nine hundred and twenty-one", YEARS, YEARS[3], True),
        ("one thousand, nine hundred and twenty", YEARS, YEARS[0], False),  # lacks "nineteen"
    ],
)
def test_mmau_official_token_rule(prediction, choices, answer, right):
    result = mmau.score([mmau_record("m", prediction, choices, answer)])
    assert result.main == (100.0 if right else 0.0)
    assert result.counts["unparsable"] == (prediction == "")


def test_mmau_letter_answers_and_groups():
    common = {"choice_format": "letter", "task": "speech", "difficulty": "easy"}
    records = [
        mmau_record("m1", "B", HANDS, "The Golden Circle", **common),  # the letter's choice text: right
        mmau_record("m2", "(D).", HANDS, "The Black Hand", **{**common, "difficulty": "hard"}),  # right
        mmau_record("m3", "E", HANDS, "The Red Hand", **common),  # no option E: scored as the text "E": wrong
        mmau_record("m4", "A", HANDS, "The Red Hand", task="sound", difficulty="easy"),  # text format: "a" is wrong
    ]
    result = mmau.score(records)
    # 2 of 4 right; speech 2 of 3, sound 0 of 1; easy 1 of 3 (m1), hard 1 of 1.
    assert result.main == 50.0
    assert list(result.groups) == ["task/sound", "task/speech", "difficulty/easy", "difficulty/hard", "Overall"]
    assert result.groups["task/speech"] == {"accuracy": pytest.approx(200 / 3), "correct": 2, "total": 3}
    assert result.groups["difficulty/easy"]["correct"] == 1 and result.groups["difficulty/hard"]["accuracy"] == 100.0


def mmau_excerpt() -> list[dict]:
    items = json.loads(shared_file("samples", "mmau", "mmau-test-mini.json").read_text(encoding="utf-8"))
    return [
        mmau_record(
            f"mmau/test-mini/{item['id']}",
            "",
            item["choices"],
            item["answer"],
            task=item["task"],
            difficulty=item["difficulty"],
            sub_category=item["sub-category"],
        )
        for item in items
    ]


def test_mmau_real_excerpt():
    records = mmau_excerpt()
    assert len(records) == 50

    def words(text: str) -> set[str]:
        return set(re.findall(r"\b\w+\b", text.lower()))

    # No wrong choice has the answer's token set, so its text always lacks an answer token or has one of its
    # own: it can never pass the official rule. (Two wrong choices may share one: "... twenty-one" / "... twenty".)
    assert all(words(c) != words(r["answer"]) for r in records for c in r["choices"] if c != r["answer"])
    assert mmau.score([{**r, "prediction": r["answer"]} for r in records]).main == 100.0

    def wrong(r: dict) -> str:
        return next(c for c in r["choices"] if c != r["answer"])

    # Sound questions (12) answered right, music (12) with a wrong choice, speech (26) left empty:
    # 12 / 50 = 24.0; per task 100 / 0 / 0; 26 unparsable (empty) counted wrong.
    mixed = [{**r, "prediction": {"sound": r["answer"], "music": wrong(r), "speech": ""}[r["task"]]} for r in records]
    result = mmau.score(mixed)
    assert result.main == 24.0
    assert result.counts == {"total": 50, "scored": 50, "unparsable": 26, "duplicates": 0}
    assert [result.groups[f"task/{t}"]["accuracy"] for t in ("sound", "music", "speech")] == [100.0, 0.0, 0.0]
    assert [result.groups[f"task/{t}"]["total"] for t in ("sound", "music", "speech")] == [12, 12, 26]


def test_mmau_bad_records_and_modes():
    with pytest.raises(ValueError, match="MokA published no scoring script for MMAU"):
        mmau.score([], "moka_compat")
    with pytest.raises(KeyError, match=r"'m9'.*\['choices'\]"):
        mmau.score([{"id": "m9", "prediction": "x", "answer": "x"}])
    with pytest.raises(ValueError, match="'m8'.*not one of its choices"):
        mmau.score([{"id": "m8", "prediction": "x", "answer": "Maine", "choices": STATES}])


# ----------------------------------------------------------------------------------------------------- AIR-Bench


def air(pid: str, prediction: str, letter: str, task: str = "Speaker_Age_Prediction") -> dict:
    return {
        "id": pid,
        "prediction": prediction,
        "task_name": task,
        "dataset_name": "common_voice_13.0_en",
        "answer_letter": letter,
    }


def test_air_bench_official_letter_rule():
    first = "Speaker_Age_Prediction"
    second = "Speaker_Gender_Recognition"
    records = [
        air("1", "A", "A", first),  # A: right
        air("2", "Apple", "A", first),  # p[0] = "A": read as A, right (the rule's quirk)
        air("3", "Answer: B", "B", first),  # p[0] = "A": read as A, wrong
        air("4", "The answer is B.", "B", first),  # p[-2] = "B": right
        air("5", "I think C", "C", first),  # p[0] "I", p[-2] " ": fails, excluded
        air("6", "", "A", second),  # empty: fails
        air("7", "None", "A", second),  # the literal 'None': fails
        air("8", " \nD\n ", "D", second),  # stripped to "D": right
        air("9", "bAnana", "A", second),  # the "A" inside the word is neither p[0] nor p[-2]: fails
        air("10", "c", "C", second),  # lower-case: fails
    ]
    result = air_bench.score(records)
    # First group: 4 scored (1-4), 3 right -> 75.0, 1 failed; second: 1 scored (8), right -> 100.0, 4 failed.
    # Pooled 4 of 5 = 80.0; the unweighted mean of the groups (75 + 100) / 2 = 87.5; 5 excluded in all.
    assert result.main == 80.0
    assert result.counts == {"total": 10, "scored": 5, "unparsable": 5, "duplicates": 0}
    age, gender = f"{first}_common_voice_13.0_en", f"{second}_common_voice_13.0_en"
    assert list(result.groups) == [age, gender, "mean of groups", "Overall"]
    assert result.groups[age] == {"accuracy": 75.0, "correct": 3, "total": 4, "unparsable": 1}
    assert result.groups[gender] == {"accuracy": 100.0, "correct": 1, "total": 1, "unparsable": 4}
    assert result.groups["mean of groups"]["accuracy"] == 87.5
    assert "excluded from the denominators" in result.notes[0]


def test_air_bench_ground_truth_from_text_and_bad_records():
    base = {"id": "t", "prediction": "B", "task_name": "Speech_Grounding", "dataset_name": "librispeech"}
    # No answer_letter: the first option whose text equals answer_gt, here the second -> B, right.
    assert air_bench.score([{**base, "answer_gt": "y", "choices": ["x", "y", None, None]}]).main == 100.0
    with pytest.raises(ValueError, match="'t'.*answer_gt 'z' is none of the options"):
        air_bench.score([{**base, "answer_gt": "z", "choices": ["x", "y", None, None]}])
    with pytest.raises(ValueError, match="'t' has choices None; expected a list"):
        air_bench.score([{**base, "answer_gt": "z", "choices": None}])
    with pytest.raises(KeyError, match="'t' has neither 'answer_letter'"):
        air_bench.score([base])
    with pytest.raises(KeyError, match=r"'u'.*\['task_name'\]"):
        air_bench.score([{"id": "u", "prediction": "A", "dataset_name": "x", "answer_letter": "A"}])
    with pytest.raises(ValueError, match="MokA published no scoring script for AIR-Bench"):
        air_bench.score([], "moka_compat")


# ------------------------------------------------------------------------------------------------------- shared


@pytest.mark.parametrize("name", ["music_avqa", "ave", "mmau", "air_bench"])
def test_unknown_mode_is_refused(name):
    with pytest.raises(ValueError, match="mode must be one of"):
        get_scorer(name)([], mode="compat")
