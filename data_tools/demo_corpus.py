"""The embedded demo corpus (the Python documentation in `pydoc_data`): implemented in `ouro_train.data.demo_corpus`.

The library builds the pipeline demo's data itself and never imports data_tools; the tools use
the library. This module keeps the `data_tools.demo_corpus` names working for scripts that import them.
"""

from ouro_train.data.demo_corpus import (  # noqa: F401
    corpus_fingerprint,
    demo_documents,
    split_documents,
)
