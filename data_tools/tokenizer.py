"""Byte-level BPE tokenizers and the cached demo tokenizer: implemented in `ouro_train.data.tokenizer`.

The library builds the pipeline demo's data itself and never imports data_tools; the tools use
the library. This module keeps the `data_tools.tokenizer` names working for scripts that import them.
"""

from ouro_train.data.tokenizer import (  # noqa: F401
    END_THINK_ID,
    EOS_ID,
    IM_END_ID,
    IM_START_ID,
    SPECIAL_TOKENS,
    THINK_ID,
    default_cache_dir,
    demo_tokenizer_path,
    encode_documents,
    load_or_train_demo_tokenizer,
    load_tokenizer,
    save_tokenizer,
    train_bpe_tokenizer,
)
