"""MMLU questions: from the Hub (`cais/mmlu` through `datasets`) or a local folder.

A local folder (`--data`) may hold either of the two layouts MMLU circulates in:

- the Hub's export: one folder per subject (or one `all/` folder with a
  `subject` column) holding `dev-*.parquet` / `test-*.parquet` files, or a
  `datasets` `save_to_disk` folder (`dataset_dict.json` + arrow files);
  columns `question`, `choices` (4 strings), `answer` (0-3);
- the original CSV release (Hendrycks et al., `data.tar`): `dev/<subject>_dev.csv`
  and `test/<subject>_test.csv` (and `val/`), no header, six columns:
  question, four choices, answer letter.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from backends.base import UserError

HUB_DATASET = "cais/mmlu"
LETTERS = "ABCD"

# The seed project's 10-subject subset: the default, so runs stay comparable with it.
DEFAULT_SUBJECTS = (
    "abstract_algebra", "computer_security", "elementary_mathematics", "high_school_physics",
    "high_school_chemistry", "logical_fallacies", "machine_learning", "professional_law",
    "world_religions", "us_foreign_policy",
)

ALL_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)

HOW_TO_GET = (
    "get it once with network access: python -c \"import datasets; datasets.load_dataset('cais/mmlu', 'all')\" "
    "(then it works offline from the Hugging Face cache), or download the CSV release "
    "https://people.eecs.berkeley.edu/~hendrycks/data.tar, unpack it and pass --data <folder>")


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3


@dataclass(frozen=True)
class Subject:
    name: str
    dev: tuple[Question, ...]  # the few-shot examples, in their published order
    test: tuple[Question, ...]


def parse_subjects(text: str | None, available: list[str] | None = None) -> list[str]:
    """None/'' -> the default 10; 'all' -> the 57 (or every subject of a local folder); else a comma list."""
    if not text:
        return list(DEFAULT_SUBJECTS)
    if text.strip().lower() == "all":
        return sorted(available) if available else list(ALL_SUBJECTS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    known = set(available or ALL_SUBJECTS)
    unknown = [s for s in names if s not in known]
    if unknown:
        where = "in this data folder" if available else "in MMLU"
        raise UserError(f"unknown subject {unknown[0]!r} ({where}); choose from {', '.join(sorted(known))}")
    return names


# ---------------------------------------------------------------- checking rows


def _question(question, choices, answer, where: str) -> Question:
    choices = tuple(str(c) for c in choices)
    if len(choices) != 4:
        raise UserError(f"{where}: expected 4 choices, found {len(choices)}")
    if isinstance(answer, str):
        if answer.strip().upper() not in tuple(LETTERS):
            raise UserError(f"{where}: the answer must be one of A, B, C, D, found {answer!r}")
        answer = LETTERS.index(answer.strip().upper())
    if not 0 <= int(answer) <= 3:
        raise UserError(f"{where}: the answer must be 0-3, found {answer!r}")
    return Question(str(question), choices, int(answer))


# ---------------------------------------------------------------- the CSV release


def _csv_root(folder: Path) -> Path | None:
    for root in (folder, folder / "data"):
        if (root / "test").is_dir() and (root / "dev").is_dir():
            return root
    return None


def read_csv(path: Path) -> tuple[Question, ...]:
    """One subject's CSV file; a malformed row is an error naming the file and line."""
    questions = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        line = 1  # the physical line where the next row starts (a quoted field may span lines)
        for row in reader:
            where = f"{path}:{line}"
            line = reader.line_num + 1
            if not row:
                continue
            if len(row) != 6:
                raise UserError(f"{where}: expected 6 columns (question, 4 choices, answer letter), "
                                f"found {len(row)}")
            questions.append(_question(row[0], row[1:5], row[5], where))
    return tuple(questions)


def _csv_subjects(root: Path) -> list[str]:
    return sorted(p.name[: -len("_test.csv")] for p in (root / "test").glob("*_test.csv"))


def _load_csv(root: Path, name: str) -> Subject:
    test, dev = root / "test" / f"{name}_test.csv", root / "dev" / f"{name}_dev.csv"
    for p in (test, dev):
        if not p.is_file():
            raise UserError(f"no file {p} for subject {name!r}")
    return Subject(name, read_csv(dev), read_csv(test))


# ---------------------------------------------------------------- the Hub's parquet / arrow export


def _hub_subjects(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in ("all", "auxiliary_train")
                  and (any(p.glob("*.parquet")) or (p / "dataset_dict.json").is_file()))


def _rows(split, name: str, where: str) -> tuple[Question, ...]:
    missing = {"question", "choices", "answer"} - set(split.column_names)
    if missing:
        raise UserError(f"{where}: no column {sorted(missing)[0]!r} (MMLU needs question, choices, answer)")
    if "subject" in split.column_names and set(split["subject"]) != {name}:  # `all`: every subject in one table
        split = split.filter(lambda s: s == name, input_columns="subject")
    return tuple(_question(r["question"], r["choices"], r["answer"], f"{where} row {i}")
                 for i, r in enumerate(split))


def _open_hub_folder(folder: Path):
    """A DatasetDict from one folder of parquet files (named <split>-*.parquet) or a save_to_disk folder."""
    import datasets

    datasets.disable_progress_bars()  # the command shows its own status line
    if (folder / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(folder))
    files = {}
    for split in ("dev", "test", "validation"):
        found = sorted(str(p) for p in folder.glob(f"{split}-*.parquet")) or \
            sorted(str(p) for p in folder.glob(f"{split}.parquet"))
        if found:
            files[split] = found
    return datasets.load_dataset("parquet", data_files=files)


def _load_hub_folder(folder: Path, name: str) -> Subject:
    sub = folder / name if (folder / name).is_dir() else folder / "all"
    if not sub.is_dir():
        raise UserError(f"no folder for subject {name!r} in {folder}")
    splits = _open_hub_folder(sub)
    for split in ("dev", "test"):
        if split not in splits:
            raise UserError(f"{sub}: no {split} split (found {', '.join(splits) or 'none'})")
    return Subject(name, _rows(splits["dev"], name, f"{sub} dev"), _rows(splits["test"], name, f"{sub} test"))


# ---------------------------------------------------------------- the Hub itself


def _load_from_hub(name: str) -> Subject:
    import datasets

    datasets.disable_progress_bars()
    try:
        splits = datasets.load_dataset(HUB_DATASET, name)
    except Exception as e:  # offline misses and network failures surface as many exception types
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        why = "is not in the local Hugging Face cache (offline)" if offline else \
            f"could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        raise UserError(f"MMLU ({HUB_DATASET}, subject {name}) {why}; {HOW_TO_GET}") from None
    return Subject(name, _rows(splits["dev"], name, f"{HUB_DATASET} {name} dev"),
                   _rows(splits["test"], name, f"{HUB_DATASET} {name} test"))


# ---------------------------------------------------------------- entry point


def local_subjects(data: str | Path) -> list[str]:
    """The subjects a local folder holds (either layout)."""
    folder = Path(data)
    if not folder.is_dir():
        raise UserError(f"MMLU data folder {folder} does not exist; {HOW_TO_GET}")
    root = _csv_root(folder)
    found = _csv_subjects(root) if root else _hub_subjects(folder)
    if not found and (folder / "all").is_dir():
        splits = _open_hub_folder(folder / "all")
        found = sorted(set(splits["test"]["subject"]))
    if not found:
        raise UserError(f"{folder} holds no MMLU data in a known layout (dev/ + test/ CSV folders, or one "
                        f"folder per subject with dev/test parquet files); {HOW_TO_GET}")
    return found


def load_subjects(names: list[str], data: str | Path | None = None) -> list[Subject]:
    """The named subjects, from `data` (a local folder in either layout) or the Hub/its cache."""
    if data is None:
        return [_load_from_hub(n) for n in names]
    folder = Path(data)
    available = local_subjects(folder)
    for n in names:
        if n not in available:
            raise UserError(f"subject {n!r} is not in {folder}; it holds {', '.join(available)}")
    root = _csv_root(folder)
    return [_load_csv(root, n) if root else _load_hub_folder(folder, n) for n in names]


def describe_source(data: str | Path | None) -> str:
    if data is None:
        return HUB_DATASET
    return f"{Path(data).resolve()} ({'CSV release' if _csv_root(Path(data)) else 'Hub parquet/arrow export'})"
