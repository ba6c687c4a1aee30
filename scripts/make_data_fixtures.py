#!/usr/bin/env python3
"""Parquet and Arrow fixtures for lathe-data's readers, written by the tools users' files come
from: pyarrow 26.0.1 and Hugging Face datasets 5.2.0 (python 3, the venv /tmp/venv-tf5:
`pip install pyarrow==26.0.1 datasets==5.2.0`).

Reads the committed JSONL files of data/tests/fixtures/ (texts, labelled, preferences, messages)
and writes next to each, from the same records:
  <name>.snappy.parquet   pyarrow.parquet, snappy pages (pyarrow's and the Hub's default)
  <name>.zstd.parquet     pyarrow.parquet, zstd pages
  <name>.stream.arrow     `datasets.Dataset.save_to_disk`'s data file: an Arrow IPC *stream*
                          (the format of the HF cache's .arrow files too)
  <name>.file.arrow       pyarrow.ipc.new_file: an Arrow IPC *file* (ARROW1 magic, footer)
and two more shapes of the texts:
  texts.dict.arrow        an IPC stream whose text column is dictionary-encoded, in two batches
  texts_dataset/          `save_to_disk(num_shards=2)`: a folder of two .arrow shards (its
                          dataset_info.json and state.json as datasets writes them)
and, for lathe-reward's tests and the `arrow` fuzzer's seed, reward/tests/fixtures/tiny.arrow: an IPC
stream of columns idx (int32), sentence (utf8) and label (int64), three rows (GLUE SST-2's layout).
The tables are typed by datasets' inference from the JSONL (strings, int64 labels with a null,
list<struct<role, content>> messages), the way `load_dataset("json", ...)` would type them.

Run from the repository root: /tmp/venv-tf5/bin/python scripts/make_data_fixtures.py
"""

import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

FIXTURES = Path(__file__).resolve().parent.parent / "data" / "tests" / "fixtures"
NAMES = ["texts", "labelled", "preferences", "messages"]


def records(name):
    with open(FIXTURES / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    assert pa.__version__ == "26.0.1", pa.__version__
    assert datasets.__version__ == "5.2.0", datasets.__version__
    for name in NAMES:
        dataset = datasets.Dataset.from_list(records(name))
        table = dataset.data.table  # the pyarrow Table datasets holds
        pq.write_table(table, FIXTURES / f"{name}.snappy.parquet", compression="snappy")
        pq.write_table(table, FIXTURES / f"{name}.zstd.parquet", compression="zstd")

        tmp = FIXTURES / f"_{name}_dataset"
        shutil.rmtree(tmp, ignore_errors=True)
        dataset.save_to_disk(str(tmp))
        shutil.copyfile(tmp / "data-00000-of-00001.arrow", FIXTURES / f"{name}.stream.arrow")
        shutil.rmtree(tmp)

        with ipc.new_file(FIXTURES / f"{name}.file.arrow", table.schema) as writer:
            writer.write_table(table)

    # Dictionary-encoded texts, two record batches.
    texts = datasets.Dataset.from_list(records("texts")).data.table
    column = texts.column("text").combine_chunks().dictionary_encode()
    table = pa.table({"text": column})
    with ipc.new_stream(FIXTURES / "texts.dict.arrow", table.schema) as writer:
        for batch in table.to_batches(max_chunksize=3):
            writer.write_batch(batch)

    # A save_to_disk folder of two shards.
    out = FIXTURES / "texts_dataset"
    shutil.rmtree(out, ignore_errors=True)
    datasets.Dataset.from_list(records("texts")).save_to_disk(str(out), num_shards=2)

    # lathe-reward's tiny SST-2-like stream.
    tiny = pa.table({
        "idx": pa.array([0, 1, 2], pa.int32()),
        "sentence": pa.array(["a fine film", "dull", "moving and bright"], pa.string()),
        "label": pa.array([1, 0, 1], pa.int64()),
    })
    reward_tiny = FIXTURES.parent.parent.parent / "reward" / "tests" / "fixtures" / "tiny.arrow"
    with ipc.new_stream(reward_tiny, tiny.schema) as writer:
        writer.write_table(tiny)
    print(f"{reward_tiny.name}: {reward_tiny.stat().st_size} bytes")

    for path in sorted(FIXTURES.rglob("*")):
        if path.is_file() and not path.name.endswith(".jsonl"):
            print(f"{path.relative_to(FIXTURES)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
