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

It also writes tests/parity/golden_tiny_bf16.safetensors: a second tiny random Ouro (head_dim 64,
rope theta 1e6) in bf16, loaded into the reference with from_pretrained(torch_dtype=torch.bfloat16)
as a released bf16 checkpoint is, run on 2 x 2,048 tokens at positions from 1,000 and 2,500 with
eager attention and with sdpa: its bf16 weights, the inputs, and per step the reference's hidden
states, logits and gate logits of both backends (stored as fp32); the metadata holds the reference's
eager-vs-sdpa max differences. `--only fp32|bf16` writes one of the two (a few minutes for bf16).
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

# The bf16 golden: the same kind of tiny random model with the release's rope theta, run as a released
# bf16 checkpoint is run (weights in bf16, from_pretrained(torch_dtype=torch.bfloat16)). With bf16
# RoPE frequencies the angle between a query and a key is off by distance x (inv_freq rounding), so
# the lever is the sequence length (2,048 here) and the number of frequencies in the band where that
# error is large: head_dim 64 puts about ten pairs there (at head_dim 16 only one, and rounding
# inv_freq then hides in bf16 noise: measured over all 2 x 2,048 tokens, 1.1-2.6x the reference's
# eager-vs-sdpa difference, against 2.9-7.2x with head_dim 64). The rows start at positions 1,000 and
# 2,500 (up to 4,547), as a long-context model sees them.
TINY_BF16 = {**TINY, "head_dim": 64, "rope_theta": 1000000.0, "max_position_embeddings": 8192}
BF16_SEQ_LEN = 2048
BF16_FIRST_POSITIONS = (1000, 2500)
# Hidden states and logits are stored at every 64th token (the last of each block of 64, so 32 per
# row) to keep the file under 1 MB; gate logits at every token.
BF16_TOKEN_STRIDE = 64
BACKENDS = ("eager", "sdpa")


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


def randomise(model) -> None:
    """Re-randomise every weight so that no term is trivially one or zero: norm weights
    1 + 0.1 N(0,1), gate bias N(0,1), embeddings N(0,1), other matrices N(0, 1/fan_in)."""
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


def max_abs(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per recurrent step (dim 0), max |a - b| in fp32."""
    return [(x.float() - y.float()).abs().max().item() for x, y in zip(a, b)]


def reference_steps(model, input_ids: torch.Tensor, position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per step: normalised hidden state, logits, gate logits, each stacked over steps, in the dtype
    the reference computes them in."""
    with torch.no_grad():
        _, hidden_list, gate_list = model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        logits = [model.lm_head(h) for h in hidden_list]
    return {
        "step_hidden": torch.stack(hidden_list),
        "step_logits": torch.stack(logits),
        "gate_logits": torch.stack([g.squeeze(-1) for g in gate_list]),
    }


def make_bf16_golden(modeling, configuration, reference: Path, out: Path) -> dict:
    """The reference in bf16, loaded as a released bf16 checkpoint is loaded: from_pretrained with
    torch_dtype=torch.bfloat16, once per attention backend (eager, sdpa). from_pretrained keeps
    RoPE's inv_freq in fp32 (computed at init); `.to(torch.bfloat16)` on the reference would round
    it to bf16 as well, which the metadata records as a third, wrong, way to run it."""
    import transformers

    torch.manual_seed(4321)
    model = modeling.OuroForCausalLM(configuration.OuroConfig(**TINY_BF16)).float().eval()
    randomise(model)
    refs = {}
    with tempfile.TemporaryDirectory() as checkpoint:
        model.save_pretrained(checkpoint)
        for backend in BACKENDS:
            refs[backend] = modeling.OuroForCausalLM.from_pretrained(
                checkpoint, torch_dtype=torch.bfloat16, attn_implementation=backend
            ).eval()
    for backend, ref in refs.items():
        assert ref.config._attn_implementation == backend, (backend, ref.config._attn_implementation)
        assert ref.model.rotary_emb.inv_freq.dtype == torch.float32, ref.model.rotary_emb.inv_freq.dtype
        assert all(p.dtype == torch.bfloat16 for p in ref.parameters())
    cast = model.to(torch.bfloat16)  # the reference cast with .to(): inv_freq rounded to bf16 too
    cast.config._attn_implementation = "eager"
    assert cast.model.rotary_emb.inv_freq.dtype == torch.bfloat16

    batch = len(BF16_FIRST_POSITIONS)
    input_ids = torch.randint(0, TINY_BF16["vocab_size"], (batch, BF16_SEQ_LEN))
    position_ids = torch.tensor(BF16_FIRST_POSITIONS)[:, None] + torch.arange(BF16_SEQ_LEN)[None, :]
    results = {backend: reference_steps(ref, input_ids, position_ids) for backend, ref in refs.items()}
    results["eager_cast_with_to"] = reference_steps(cast, input_ids, position_ids)
    for backend in BACKENDS:
        assert all(v.dtype == torch.bfloat16 for v in results[backend].values()), backend

    kept = torch.arange(BF16_TOKEN_STRIDE - 1, BF16_SEQ_LEN, BF16_TOKEN_STRIDE)
    tensors = {k: v.contiguous() for k, v in refs["eager"].state_dict().items()}  # bf16 weights
    tensors["golden.input_ids"] = input_ids
    tensors["golden.position_ids"] = position_ids
    tensors["golden.kept_tokens"] = kept
    stored = {}
    for backend in BACKENDS:
        r = results[backend]
        stored[backend] = {
            "step_hidden": r["step_hidden"][:, :, kept].float(),
            "step_logits": r["step_logits"][:, :, kept].float(),
            "gate_logits": r["gate_logits"].float(),
        }
        for name, value in stored[backend].items():
            tensors[f"golden.{backend}.{name}"] = value.contiguous()
    # The reference's self-difference across attention backends, and the .to()-cast reference's
    # distance from the from_pretrained one, per quantity and per step, on what is stored.
    cast_stored = {
        "step_hidden": results["eager_cast_with_to"]["step_hidden"][:, :, kept],
        "step_logits": results["eager_cast_with_to"]["step_logits"][:, :, kept],
        "gate_logits": results["eager_cast_with_to"]["gate_logits"],
    }
    eager_vs_sdpa = {k: max_abs(stored["eager"][k], stored["sdpa"][k]) for k in stored["eager"]}
    to_cast_vs_eager = {k: max_abs(cast_stored[k], stored["eager"][k]) for k in stored["eager"]}
    metadata = {
        "config": json.dumps(TINY_BF16),
        "dtype": "bfloat16",
        "how_loaded": "OuroForCausalLM.from_pretrained(torch_dtype=torch.bfloat16, attn_implementation=...)",
        "reference_eager_vs_sdpa_max_abs": json.dumps(eager_vs_sdpa),
        "reference_cast_with_to_vs_eager_max_abs": json.dumps(to_cast_vs_eager),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "reference_sha256": hashlib.sha256(reference.read_bytes()).hexdigest(),
    }
    write_golden(tensors, out, metadata)
    return metadata


def write_golden(tensors: dict, out: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(out), metadata=metadata)
    print(f"wrote {out} ({out.stat().st_size:,} bytes): {sorted(k for k in tensors if k.startswith('golden.'))}")
    print(json.dumps(metadata, indent=1))


def make_fp32_golden(modeling, configuration, reference: Path, out: Path) -> None:
    """The fp32 golden: the reference in fp32 with eager attention, 2 x 12 tokens."""
    import transformers

    torch.manual_seed(1234)
    config = configuration.OuroConfig(**TINY)
    config._attn_implementation = "eager"
    model = modeling.OuroForCausalLM(config).float().eval()
    randomise(model)
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
        "reference_sha256": hashlib.sha256(reference.read_bytes()).hexdigest(),
    }
    write_golden(tensors, out, metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, type=Path, help="path to the reference modeling_ouro.py")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("golden_tiny.safetensors"))
    parser.add_argument(
        "--bf16-out", type=Path, default=Path(__file__).with_name("golden_tiny_bf16.safetensors"), help="bf16 golden"
    )
    parser.add_argument("--only", choices=("fp32", "bf16"), help="write only one of the two golden files")
    args = parser.parse_args()

    modeling, configuration = load_reference(args.reference)

    for layers, expected in ((24, 1_434_652_673), (48, 2_667_974_657)):
        with torch.device("meta"):
            big = modeling.OuroForCausalLM(configuration.OuroConfig(num_hidden_layers=layers, **RELEASED))
        count = sum(p.numel() for p in big.parameters())
        print(f"reference, {layers} layers: {count:,} parameters")
        assert count == expected, (count, expected)

    if args.only in (None, "fp32"):
        make_fp32_golden(modeling, configuration, args.reference, args.out)
    if args.only in (None, "bf16"):
        make_bf16_golden(modeling, configuration, args.reference, args.bf16_out)


if __name__ == "__main__":
    main()
