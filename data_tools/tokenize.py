"""Corpus files -> webdataset token shards + manifest (`ouro-data tokenize`): implemented in `ouro_train.data.tokenize`.

The library builds the pipeline demo's data itself and never imports data_tools; the tools use
the library. This module keeps the `data_tools.tokenize` names working for scripts that import them.
"""

from ouro_train.data.tokenize import (  # noqa: F401
    DONE_DIR,
    TokenizeOptions,
    _commit_json,
    _done_record,
    _write_shard,
    expand_inputs,
    iter_jsonl,
    read_documents,
    tokenize,
    tokenize_file,
    tokenizer_info,
)
