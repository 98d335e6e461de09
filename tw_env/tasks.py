"""Tasks: source/reference pairs plus an instruction, loaded through `datasets`.

A task's data is a hub dataset id (the default users get), a local JSON-lines / JSON / parquet file
(read whole: a file has no splits), or a local folder of split files ``train.jsonl``,
``validation.jsonl``, ``test.jsonl`` (or ``.json``/``.parquet``), of which a split reads its own
(what tests and offline machines use). Nothing is read at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # datasets ships no type information: Dataset is Any to the type checker
    from datasets import Dataset


@dataclass(frozen=True)
class Example:
    source: str
    reference: str
    corpus: str = ""  # the row's "corpus" field where the data has one (de→en mixes Multi30k and Tatoeba)


@dataclass(frozen=True)
class TaskSpec:
    """What a registered hub task needs to know about its data and how it is scored (the rows of
    :data:`tw_env.registration.TASKS` hold them)."""

    name: str
    instruction: str
    metric: str  # "bleu" or "rouge2"
    source_field: str
    reference_field: str
    default_data: str
    default_config: str | None = None
    default_split: str = "train"


_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

DATA_OFFLINE_HINT = (
    "If the Hugging Face Hub cannot be reached, pass a local JSON-lines or parquet file with the fields "
    "'{source_field}' and '{reference_field}', e.g. gym.make(..., data='pairs.jsonl'), or a folder of split "
    "files (train.jsonl, validation.jsonl, test.jsonl)."
)


def _field(row: dict[str, Any], name: str) -> str:
    # WMT rows on the hub nest the pair under "translation"; local files keep it flat.
    if name in row:
        return row[name]
    if "translation" in row and isinstance(row["translation"], dict) and name in row["translation"]:
        return row["translation"][name]
    raise KeyError(name)


def _split_file(folder: Path, data: str, split: str) -> Path:
    """The folder's file for ``split``: ``{split}.jsonl``, ``{split}.json`` or ``{split}.parquet``."""
    found = [folder / f"{split}{suffix}" for suffix in _LOCAL_FORMATS if (folder / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        raise ValueError(
            f"the data folder '{data}' has several files for the split '{split}': "
            f"{[p.name for p in found]}; expected exactly one"
        )
    if not found:
        present = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in _LOCAL_FORMATS)
        if not present:
            raise FileNotFoundError(
                f"no .jsonl/.json/.parquet files in the data folder '{data}'; expected one file per split "
                f"({split}.jsonl, {split}.json or {split}.parquet for the split '{split}')"
            )
        raise FileNotFoundError(
            f"the data folder '{data}' has no file for the split '{split}': expected {split}.jsonl, "
            f"{split}.json or {split}.parquet; the data files there are {present}. A folder holds "
            "one file per split (train.jsonl, validation.jsonl, ...); pass a file to read it whole."
        )
    return found[0]


def _local_file(data: str, split: str) -> Path | None:
    """The local file ``data`` and ``split`` read (resolved), or None when ``data`` is a hub id."""
    path = Path(data).expanduser()
    if path.is_dir():
        return _split_file(path, data, split).resolve()
    if path.exists():
        if path.suffix not in _LOCAL_FORMATS:
            raise ValueError(
                f"data file '{data}' has suffix {path.suffix!r}; expected one of {sorted(_LOCAL_FORMATS)}"
            )
        return path.resolve()
    if data.startswith((".", "/", "~")) or data.endswith(tuple(_LOCAL_FORMATS)):
        raise FileNotFoundError(
            f"data not found: no file or folder at '{data}'. Expected a local .jsonl/.json/.parquet file "
            "or folder, or a hub dataset id."
        )
    return None


def resolve_data_source(data: str, split: str = "train", config: str | None = None) -> str:
    """What ``load_examples(data, ..., split=split, config=config)`` reads, as a string.

    A local file or a folder's split file gives its absolute path (a file is the same whatever the
    split); a hub id gives ``"hub:ID[CONFIG]:SPLIT"`` (``"hub:ID:SPLIT"`` without a config). Two
    (data, split) choices read the same examples exactly when their sources are equal. Raises as
    ``load_examples`` does for a missing path or a folder without the split's file.
    """
    file = _local_file(data, split)
    if file is not None:
        return str(file)
    return f"hub:{data}{f'[{config}]' if config else ''}:{split}"


def env_data_source(env_kwargs: dict[str, Any], default_split: str = "train") -> str:
    """:func:`resolve_data_source` of the ``data``/``split``/``config`` overrides a registered task is made
    with. Without ``data`` the task's default applies (its hub dataset, or the embedded task's cache),
    which is split-aware: ``"the task's default data, split 'SPLIT'"``. Reads no examples."""
    split = env_kwargs.get("split") or default_split
    data = env_kwargs.get("data")
    if data is None:
        return f"the task's default data, split '{split}'"
    return resolve_data_source(str(data), split, env_kwargs.get("config"))


def _has_no_rows(file: Path) -> bool:
    if file.stat().st_size == 0:
        return True
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of datasets

        return pq.ParquetFile(file).metadata.num_rows == 0
    with file.open("rb") as f:  # JSON: nothing but white space (stops at the first non-blank line)
        return all(not line.strip() for line in f)


def _read_local(file: Path) -> Dataset:
    import datasets

    empty = ValueError(f"the data file '{file}' holds no rows; expected one record per example")
    if _has_no_rows(file):
        raise empty
    try:
        return datasets.load_dataset(_LOCAL_FORMATS[file.suffix], data_files=[str(file)], split="train")
    except StopIteration:  # what datasets raises for a JSON file without records
        raise empty from None
    except ValueError as err:
        if "corresponds to no data" in str(err):  # a JSON file that holds an empty list
            raise empty from None
        raise


def _read_hub(data: str, split: str, config: str | None, source_field: str, reference_field: str) -> Dataset:
    import datasets  # imported here so that `import tw_env` stays light

    from tw_env.models import hub_unavailable_reason, in_hub_cache

    hint = DATA_OFFLINE_HINT.format(source_field=source_field, reference_field=reference_field)
    reason = hub_unavailable_reason(extra_offline_vars=("HF_DATASETS_OFFLINE",))
    if reason is not None and not in_hub_cache(data, repo_type="dataset"):
        raise OSError(
            f"cannot load the dataset '{data}' ({config=}, {split=}): it is a hub id, the Hugging Face Hub "
            f"is {reason} and it is not in the local datasets cache.\n{hint}"
        )
    try:
        return datasets.load_dataset(data, config, split=split)
    except Exception as err:  # datasets raises several types when offline
        raise OSError(f"could not load the dataset '{data}' ({config=}, {split=}): {err}\n{hint}") from err


def load_examples(
    data: str,
    source_field: str,
    reference_field: str,
    split: str = "train",
    config: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Read (source, reference) pairs from a hub dataset, a local file or a local folder of split files.

    Args:
        data: a hub id (``"EdinburghNLP/xsum"``); a local ``.jsonl``/``.json``/``.parquet`` file, which
            is read whole whatever ``split`` says (a file has no splits); or a local folder, of which
            the split's file ``{split}.jsonl``, ``{split}.json`` or ``{split}.parquet`` is read
            (FileNotFoundError, naming the files there, when it has none).
        source_field, reference_field: column names (looked up under ``translation`` too).
        split: the hub split, or which file of a local folder.
        config: the hub configuration (``"de-en"`` for WMT19).
        limit: keep only the first ``limit`` rows.

    Returns:
        The examples, in the data's order. See :func:`resolve_data_source` for which file a
        (data, split) pair reads.

    Raises:
        OSError: a hub id when the hub is offline (``HF_HUB_OFFLINE``) or does not answer and the
            dataset is not cached (at once, without retrying).
        FileNotFoundError: a missing local path, or a folder without the split's file.
        ValueError: an empty local file or one of another format, a folder with several files for
            the split, or data that holds no examples.
        KeyError: a row without ``source_field`` or ``reference_field``.
    """
    file = _local_file(data, split)
    if file is not None:
        dataset = _read_local(file)
        data = str(file) if Path(data).expanduser().is_dir() else data  # name the split file in messages
    else:
        dataset = _read_hub(data, split, config, source_field, reference_field)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    examples = []
    for i, row in enumerate(dataset):
        try:
            examples.append(Example(_field(row, source_field), _field(row, reference_field),
                                    str(row.get("corpus") or "")))
        except KeyError as missing:
            raise KeyError(
                f"row {i} of '{data}' has no field {missing}; expected fields '{source_field}' and "
                f"'{reference_field}', found {sorted(row)}"
            ) from None
    if not examples:
        raise ValueError(f"the data '{data}' holds no examples")
    return examples
