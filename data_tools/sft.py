"""Chat data -> ChatML token shards with assistant loss masks (`ouro-data sft`): implemented in `ouro_train.data.sft`.

The library builds the pipeline demo's data itself and never imports data_tools; the tools use
the library. This module keeps the `data_tools.sft` names working for scripts that import them.
"""

from ouro_train.data.sft import (  # noqa: F401
    ROLES,
    ChatTokens,
    build_sft_shards,
    read_conversations,
    render_conversation,
    special_ids,
)
