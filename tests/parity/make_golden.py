"""Generate golden outputs of the reference Ouro implementation for the parity test.

The reference is the Hugging Face remote code `modeling_ouro.py` of ByteDance/Ouro-1.4B
(public copies exist; it is not vendored here). Run once, with a separate environment that
has transformers 4.55.0 (the project itself does not depend on transformers):

    python3.11 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 transformers==4.55.0 safetensors
    /tmp/refvenv/bin/python tests/parity/make_golden.py --reference /path/to/modeling_ouro.py

It writes tests/parity/golden_tiny.safetensors: the weights of a tiny random Ouro under the
reference key names, input ids, and per recurrent step the normalised hidden state, the
logits and the exit-gate logits, all fp32; and it checks the reference's parameter counts for
the two released sizes on the meta device.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=112,
    total_ut_steps=4,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
)
RELEASED = dict(
    vocab_size=49152,
    hidden_size=2048,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=128,
    intermediate_size=5632,
    total_ut_steps=4,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=65536,
)

# The released repositories ship a configuration_ouro.py that public copies of the modeling
# file lack; a PretrainedConfig with the fields of the released config.json is enough.
CONFIG_SOURCE = """
from transformers.configuration_utils import PretrainedConfig


class OuroConfig(PretrainedConfig):
    model_type = "ouro"

    def __init__(self, vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16, head_dim=128, hidden_act="silu",
                 max_position_embeddings=65536, initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
                 rope_theta=1000000.0, rope_scaling=None, attention_dropout=0.0, layer_types=None,
                 sliding_window=None, use_sliding_window=False, max_window_layers=0, total_ut_steps=4,
                 early_exit_threshold=1.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                 pad_token_id=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_dropout = attention_dropout
        self.layer_types = layer_types or ["full_attention"] * num_hidden_layers
        self.sliding_window = sliding_window
        self.use_sliding_window = use_sliding_window
        self.max_window_layers = max_window_layers
        self.total_ut_steps = total_ut_steps
        self.early_exit_threshold = early_exit_threshold
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
"""


def load_reference(reference: Path):
    """Import the reference as a package `ouro_reference` built in a temporary directory."""
    package = Path(tempfile.mkdtemp()) / "ouro_reference"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(reference, package / "modeling_ouro.py")
    (package / "configuration_ouro.py").write_text(CONFIG_SOURCE)
    sys.path.insert(0, str(package.parent))
    return importlib.import_module("ouro_reference.modeling_ouro"), importlib.import_module(
        "ouro_reference.configuration_ouro"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, type=Path, help="path to the reference modeling_ouro.py")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("golden_tiny.safetensors"))
    args = parser.parse_args()
    import transformers
    from safetensors.torch import save_file

    modeling, configuration = load_reference(args.reference)

    for layers, expected in ((24, 1_434_652_673), (48, 2_667_974_657)):
        with torch.device("meta"):
            big = modeling.OuroForCausalLM(configuration.OuroConfig(num_hidden_layers=layers, **RELEASED))
        count = sum(p.numel() for p in big.parameters())
        print(f"reference, {layers} layers: {count:,} parameters")
        assert count == expected, (count, expected)

    torch.manual_seed(1234)
    config = configuration.OuroConfig(**TINY)
    config._attn_implementation = "eager"
    model = modeling.OuroForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith("early_exit_gate.bias"):
                param.normal_(0.0, 1.0)
            elif "embed_tokens" in name:
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]))
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    with torch.no_grad():
        _, hidden_list, gate_list = model.model(input_ids=input_ids, use_cache=False)
        logits = [model.lm_head(h) for h in hidden_list]
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["golden.input_ids"] = input_ids
    tensors["golden.step_hidden"] = torch.stack(hidden_list).contiguous()
    tensors["golden.step_logits"] = torch.stack(logits).contiguous()
    tensors["golden.gate_logits"] = torch.stack([g.squeeze(-1) for g in gate_list]).contiguous()
    metadata = {
        "config": json.dumps(TINY),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "reference_sha256": hashlib.sha256(args.reference.read_bytes()).hexdigest(),
    }
    save_file(tensors, str(args.out), metadata=metadata)
    print(
        f"wrote {args.out} ({args.out.stat().st_size:,} bytes): {sorted(k for k in tensors if k.startswith('golden.'))}"
    )
    print(json.dumps(metadata, indent=1))


if __name__ == "__main__":
    main()
