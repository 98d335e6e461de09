"""Tasks: source/reference pairs plus an instruction, loaded through `datasets`.

A task's data is a hub dataset id (the default users get) or a local JSON-lines / JSON / parquet
file or a folder of them (what tests and offline machines use). Nothing is read at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Example:
    source: str
    reference: str


@dataclass(frozen=True)
class TaskSpec:
    """What a registered task needs to know about its data and how it is scored."""

    name: str
    instruction: str
    metric: str  # "bleu" or "rouge2"
    source_field: str
    reference_field: str
    default_data: str
    default_config: str | None = None
    default_split: str = "train"


XSUM = TaskSpec("xsum", "summarize", "rouge2", "document", "summary", "EdinburghNLP/xsum")
WMT19 = TaskSpec("wmt19", "translate German to English", "bleu", "de", "en", "wmt/wmt19", "de-en")

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _field(row: dict[str, Any], name: str) -> str:
    # WMT rows on the hub nest the pair under "translation"; local files keep it flat.
    if name in row:
        return row[name]
    if "translation" in row and isinstance(row["translation"], dict) and name in row["translation"]:
        return row["translation"][name]
    raise KeyError(name)


def load_examples(
    data: str,
    source_field: str,
    reference_field: str,
    split: str = "train",
    config: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Read (source, reference) pairs from a hub dataset or a local file/folder.

    Args:
        data: hub id (``"EdinburghNLP/xsum"``) or a local ``.jsonl``/``.json``/``.parquet`` file or folder.
        source_field, reference_field: column names (looked up under ``translation`` too).
        split: the hub split; a local file is read whole.
        config: the hub configuration (``"de-en"`` for WMT19).
        limit: keep only the first ``limit`` rows.
    """
    import datasets  # imported here so that `import tw_env` stays light

    path = Path(data).expanduser()
    if path.exists():
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in _LOCAL_FORMATS)
            if not files:
                raise FileNotFoundError(f"no .jsonl/.json/.parquet files in the data folder '{data}'")
        else:
            files = [path]
        suffix = files[0].suffix
        if suffix not in _LOCAL_FORMATS:
            raise ValueError(f"data file '{data}' has suffix {suffix!r}; expected one of {sorted(_LOCAL_FORMATS)}")
        dataset = datasets.load_dataset(
            _LOCAL_FORMATS[suffix], data_files=[str(f) for f in files], split="train"
        )
    elif data.startswith((".", "/", "~")) or data.endswith(tuple(_LOCAL_FORMATS)):
        raise FileNotFoundError(
            f"data not found: no file or folder at '{data}'. Expected a local .jsonl/.json/.parquet file "
            "or folder, or a hub dataset id."
        )
    else:
        try:
            dataset = datasets.load_dataset(data, config, split=split)
        except Exception as err:  # datasets raises several types when offline
            raise OSError(
                f"could not load the dataset '{data}' ({config=}, {split=}): {err}\nIf the Hugging Face Hub "
                "cannot be reached, pass a local JSON-lines or parquet file with the fields "
                f"'{source_field}' and '{reference_field}', e.g. gym.make(..., data='pairs.jsonl')."
            ) from err
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    examples = []
    for i, row in enumerate(dataset):
        try:
            examples.append(Example(_field(row, source_field), _field(row, reference_field)))
        except KeyError as missing:
            raise KeyError(
                f"row {i} of '{data}' has no field {missing}; expected fields '{source_field}' and "
                f"'{reference_field}', found {sorted(row)}"
            ) from None
    if not examples:
        raise ValueError(f"the data '{data}' holds no examples")
    return examples
