"""The attention backends (ouro_train/kernels/attention.py) against the dense document-causal mask.

`sdpa` runs forward and backward here; `flex` runs forward only on CPU (torch 2.13 has no flex
backward on CPU), its backward and `flash` are GPU tests. Packed rows are several documents of
uneven length, with single-document rows in the same batch, GQA (4 query heads over 2 kv heads).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from tiny_models import randomized, tiny_config

import ouro_train.model.looplm as looplm_module
from ouro_train.kernels import attention as attn
from ouro_train.kernels.attention import (
    AttentionBackendError,
    attention,
    check_backend,
    document_block_mask,
    document_causal_mask,
    document_index,
    plan_attention,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def packed_doc_ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    """Rows of random document lengths (ids as the loader gives them: increasing per row); row 0
    is a single document, so a batch mixes both kinds."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.zeros(seq, dtype=torch.long)]
    for _ in range(batch - 1):
        cuts = torch.randperm(seq - 1, generator=generator)[:5].add(1).sort().values
        row = torch.zeros(seq, dtype=torch.long)
        for cut in cuts:
            row[cut:] += 1
        rows.append(row + 10)  # not starting at 0: the backends must not care
    return torch.stack(rows)


def qkv(batch: int, seq: int, dtype=torch.float32, device="cpu", requires_grad=False):
    generator = torch.Generator().manual_seed(1)
    shapes = [(batch, 4, seq, 16), (batch, 2, seq, 16), (batch, 2, seq, 16)]
    return [
        torch.randn(shape, generator=generator).to(device=device, dtype=dtype).requires_grad_(requires_grad)
        for shape in shapes
    ]


def dense_reference(q, k, v, doc_ids):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(doc_ids), enable_gqa=True)


@pytest.mark.parametrize("seq", [37, 300])  # under one flex block, and not a multiple of 128
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backend_forward_equals_dense_mask(backend, seq):
    doc_ids = packed_doc_ids(3, seq, seed=seq)
    q, k, v = qkv(3, seq)
    out = attention(q, k, v, plan_attention(backend, 3, seq, doc_ids))
    torch.testing.assert_close(out, dense_reference(q, k, v, doc_ids), atol=2e-6, rtol=2e-6)


def test_sdpa_packed_backward_equals_dense_mask():
    doc_ids = packed_doc_ids(3, 200, seed=2)
    inputs = qkv(3, 200, requires_grad=True)
    attention(*inputs, plan_attention("sdpa", 3, 200, doc_ids)).square().sum().backward()
    ours = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    dense_reference(*inputs, doc_ids).square().sum().backward()
    for got, want in zip(ours, [x.grad for x in inputs]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_single_document_rows_take_the_causal_kernel_without_segments():
    ids = torch.full((2, 50), 3)
    assert not plan_attention("sdpa", 2, 50, ids).packed
    assert not plan_attention("sdpa", 2, 50, None).packed
    plan = plan_attention("sdpa", 2, 50, packed_doc_ids(2, 50, seed=0))
    assert plan.packed and len(plan.segments[0]) == 1 and len(plan.segments[1]) == 6


def test_documents_are_runs_of_equal_ids_and_cu_seqlens_restart_every_row():
    ids = torch.tensor([[4, 4, 9, 9, 9], [9, 9, 2, 2, 2]])
    assert document_index(ids).tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    # Row 1 starts with the id row 0 ended with: still a new document.
    plan = plan_attention("flash", 2, 5, ids)
    assert plan.cu_seqlens.tolist() == [0, 2, 5, 7, 10] and plan.max_seqlen == 3


@pytest.mark.parametrize("seq", [128, 300, 700])
def test_block_mask_equals_flex_create_block_mask(seq):
    from torch.nn.attention.flex_attention import create_block_mask

    index = document_index(packed_doc_ids(3, seq, seed=seq))

    def mask_mod(b, h, q, kv):
        return (index[b, q] == index[b, kv]) & (q >= kv)

    theirs = create_block_mask(mask_mod, 3, None, seq, seq, device="cpu")
    ours = document_block_mask(index)
    assert torch.equal(ours.to_dense(), theirs.to_dense())  # which blocks are visited at all
    # and which of them skip the mask (full): a wrong "full" would leak across documents
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
    assert ours.kv_num_blocks.sum() == theirs.kv_num_blocks.sum()


def test_model_attention_plan_is_built_once_per_forward(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return plan_attention(*args, **kwargs)

    monkeypatch.setattr(looplm_module, "plan_attention", counting)
    model = randomized(tiny_config(num_layers=2, recurrent_steps=3))
    ids = torch.randint(0, 64, (2, 40))
    model(ids, doc_ids=packed_doc_ids(2, 40, seed=3))
    assert len(calls) == 1  # not L x R = 6


def test_model_flex_forward_equals_sdpa_on_packed_rows():
    cfg = tiny_config()
    sdpa_model = randomized(cfg)
    flex_model = looplm_module.LoopLM(tiny_config(attention="flex"))
    flex_model.load_state_dict(sdpa_model.state_dict())
    ids, doc_ids = torch.randint(0, 64, (3, 150)), packed_doc_ids(3, 150, seed=4)
    positions = torch.zeros(3, 150, dtype=torch.long)  # restarting at each document, as the loader gives them
    for row, spans in enumerate(plan_attention("sdpa", 3, 150, doc_ids).segments):
        for start, end in spans:
            positions[row, start:end] = torch.arange(end - start)
    with torch.no_grad():
        a = sdpa_model(ids, position_ids=positions, doc_ids=doc_ids)
        b = flex_model(ids, position_ids=positions, doc_ids=doc_ids)
    for t in range(cfg.recurrent_steps):
        torch.testing.assert_close(a.hidden_states[t], b.hidden_states[t], atol=1e-5, rtol=1e-5)


def test_unavailable_backends_fail_with_what_to_do_instead():
    q, k, v = qkv(1, 16)
    with pytest.raises(AttentionBackendError, match="CUDA only.*model.attention=sdpa"):
        attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), plan_attention("flash", 1, 16, None))
    with pytest.raises(AttentionBackendError, match="no backward on CPU.*sdpa"):
        attention(*qkv(1, 16, requires_grad=True), plan_attention("flex", 1, 16, None))
    with pytest.raises(AttentionBackendError, match="CUDA only"):
        check_backend("flash", "cpu", "bf16")
    with pytest.raises(AttentionBackendError, match="no backward on CPU"):
        check_backend("flex", "cpu", "fp32")
    check_backend("flex", "cpu", "fp32", training=False)  # forward (evaluation, inference) is fine
    with pytest.raises(AttentionBackendError, match="unknown"):
        plan_attention("dense", 1, 16, None)


def test_flash_without_the_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # what an environment without it looks like
    with pytest.raises(AttentionBackendError, match=r"pip install -e '\.\[gpu\]'"):
        attn._flash_function()


def test_bf16_model_runs_and_keeps_rope_frequencies_in_fp32():
    model = randomized(tiny_config(rope_theta=1e6))
    exact = model.model.rotary_emb.inv_freq.clone()
    model = model.to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, exact)
    out = model(torch.randint(0, 64, (2, 20)))
    assert out.hidden_states[0].dtype == torch.bfloat16
    assert out.gate_logits.dtype == torch.float32 and torch.isfinite(out.gate_logits).all()


def test_rope_frequencies_survive_meta_device_materialisation():
    with torch.device("meta"):
        model = looplm_module.LoopLM(tiny_config())
    model = model.to_empty(device="cpu")
    assert torch.equal(model.model.rotary_emb.inv_freq, looplm_module.LoopLM(tiny_config()).model.rotary_emb.inv_freq)


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from ouro_train.kernels.attention import attention, plan_attention
    seq, docs = int(sys.argv[1]), int(sys.argv[2])
    doc_ids = torch.arange(seq)[None] // (seq // docs)  # `docs` documents packed in one row
    q, k, v = (torch.randn(1, 2, seq, 32, requires_grad=True) for _ in range(3))
    attention(q[:, :, :64], k[:, :, :64], v[:, :, :64]).sum().backward()  # warm up the kernels
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    attention(q, k, v, plan_attention("sdpa", 1, seq, doc_ids)).sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mib": (peak - base) / 1024}))
    """
)


@pytest.mark.slow
def test_packed_sdpa_at_32k_tokens_stays_far_below_the_dense_mask():
    seq = 32768
    # The dense path would hold a (1, 1, S, S) bool mask (1 GiB) and, on SDPA's math path, fp32
    # scores and probabilities of 2 heads x S x S (8 GiB each). Ours: O(S) per document segment.
    dense_mask_mib = seq * seq / 2**20
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(seq), "8"], capture_output=True, text=True, check=True, timeout=300
    )
    grown = json.loads(out.stdout.strip().splitlines()[-1])["mib"]
    assert grown < dense_mask_mib / 4, f"forward+backward grew peak RSS by {grown:.0f} MiB"


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_gpu_backends_forward_and_backward_equal_sdpa(backend):
    if backend == "flash":
        pytest.importorskip("flash_attn", reason="flash-attn is installed by the .[gpu] extra / Docker image")
    doc_ids = packed_doc_ids(3, 1000, seed=5).cuda()
    results = {}
    for name in ("sdpa", backend):
        inputs = qkv(3, 1000, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        out = attention(*inputs, plan_attention(name, 3, 1000, doc_ids))
        out.float().square().sum().backward()
        results[name] = [out.float(), *(x.grad.float() for x in inputs)]
    for got, want in zip(results[backend], results["sdpa"]):
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)  # bf16 kernels, different summation orders
