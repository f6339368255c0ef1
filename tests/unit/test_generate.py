"""Generation: the per-step KV cache equals recomputation, Q-exit decides as hand-computed and
really skips steps, each KV policy holds what it claims, batched rows equal rows alone."""

from __future__ import annotations

import pytest
import torch
from tiny_models import logit, model_and_prompt

from ouro_train.inference import (
    KV_POLICIES,
    ExitPolicy,
    LoopDecoder,
    LoopKVCache,
    Sampling,
    generate,
    generate_uncached,
    q_exit_steps,
    sample,
    score,
)
from ouro_train.model.objective import exit_log_distribution


# -- Q-exit decisions ------------------------------------------------------------------------------
def test_q_exit_matches_hand_computed_distributions():
    # lambda per step for 3 tokens; CDF(t) = 1 - prod_{j<=t}(1 - lambda_j).
    lambdas = torch.tensor([[0.2, 0.6, 0.05], [0.5, 0.5, 0.05], [0.9, 0.5, 0.05], [0.9, 0.9, 0.9]])  # (R=4, 3)
    gates = torch.log(lambdas / (1 - lambdas))
    # token 0: CDF = 0.2, 0.6, 0.96, 1 ; token 1: 0.6, 0.8, 0.9, 1 ; token 2: 0.05, 0.0975, 0.142625, 1
    assert q_exit_steps(gates, 0.5).tolist() == [1, 0, 3]
    assert q_exit_steps(gates, 0.7).tolist() == [2, 1, 3]
    assert q_exit_steps(gates, 0.85).tolist() == [2, 2, 3]
    assert q_exit_steps(gates, 0.97).tolist() == [3, 3, 3]
    assert q_exit_steps(gates, 0.1).tolist() == [0, 0, 2]
    assert q_exit_steps(gates, 0.0).tolist() == [0, 0, 0]
    assert q_exit_steps(gates, 1.0).tolist() == [3, 3, 3]  # never early, even with lambda ~ 1
    assert q_exit_steps(torch.full((4, 2), 80.0), 1.0).tolist() == [3, 3]
    # The same CDF as the training objective's exit distribution: CDF(t) = sum_{j<=t} p(j).
    cdf = exit_log_distribution(gates).exp().cumsum(0)
    for q in (0.3, 0.5, 0.7, 0.9):
        first = (cdf >= q - 1e-6).int().argmax(0)
        assert q_exit_steps(gates, q).tolist() == first.tolist()


def test_exit_policy_parsing():
    assert ExitPolicy.parse("all") == ExitPolicy("all")
    assert ExitPolicy.parse("step:2") == ExitPolicy("step", 2)
    assert ExitPolicy.parse("q:0.7") == ExitPolicy("q", 0.7)
    for bad in ("q:1.5", "step:0", "steps:2", "all:1", "q:x"):
        with pytest.raises(ValueError, match="exit policy"):
            ExitPolicy.parse(bad)
    model, _ = model_and_prompt()
    with pytest.raises(ValueError, match="only 3 recurrent steps"):
        LoopDecoder(model, 1, 8, "step:4")


# -- the cache against recomputation ----------------------------------------------------------------
def test_cached_decoding_equals_recomputation_every_step():
    model, prompt = model_and_prompt(steps=3)
    new = 6
    out = generate(model, prompt, max_new_tokens=new, record_step_logits=True)
    assert out.tokens.tolist() == generate_uncached(model, prompt, new).tolist()
    sequence = torch.cat([prompt, out.tokens], dim=1)
    full = model(sequence)
    for index, step_logits in enumerate(out.step_logits):  # (R, 1, V) for new token `index`
        position = prompt.shape[1] - 1 + index
        for step in range(3):
            expected = model.logits(full.hidden_states[step][:, position])
            torch.testing.assert_close(step_logits[step], expected, rtol=1e-5, atol=1e-5)


def test_q_one_equals_all_steps_and_fixed_step_equals_a_shorter_model():
    model, prompt = model_and_prompt(seed=1, steps=4)
    every = generate(model, prompt, max_new_tokens=8)
    q_one = generate(model, prompt, max_new_tokens=8, exit_policy="q:1.0")
    assert q_one.tokens.tolist() == every.tokens.tolist()
    assert (q_one.exit_steps == 3).all() and q_one.mean_steps() == 4.0
    # step:2 reads out step 2 of a model whose later steps never run: recomputation with R = 2.
    two = generate(model, prompt, max_new_tokens=8, exit_policy="step:2")
    assert two.tokens.tolist() == generate_uncached(model, prompt, 8, recurrent_steps=2).tolist()
    assert two.mean_steps() == 2.0


def test_q_exit_skips_the_remaining_steps():
    """A gate that says 'exit' after step 1 for every token: the layers run once per token."""
    model, prompt = model_and_prompt(seed=2, steps=4)
    with torch.no_grad():
        model.model.early_exit_gate.weight.zero_()
        model.model.early_exit_gate.bias.fill_(logit(0.9))
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda module, args, output: calls.append(args[0].shape[1]))
    out = generate(model, prompt, max_new_tokens=5, exit_policy="q:0.5")
    hook.remove()
    # prefill: one call per step over the prompt; then 4 decoded columns, one step each.
    assert calls == [prompt.shape[1]] * 4 + [1] * 4
    assert (out.exit_steps == 0).all()
    assert out.tokens.tolist() == generate(model, prompt, max_new_tokens=5, exit_policy="step:1").tokens.tolist()


def test_q_exit_reads_out_where_the_gate_says():
    model, prompt = model_and_prompt(seed=3, steps=4)
    out = generate(model, prompt, max_new_tokens=6, exit_policy="q:0.6", record_step_logits=True)
    for index, step_logits in enumerate(out.step_logits):
        step = int(out.exit_steps[0, index])
        computed = ~torch.isnan(step_logits[:, 0, 0])
        assert computed.tolist() == [s <= step for s in range(4)]  # nothing after the exit step ran
        assert int(step_logits[step, 0].argmax()) == int(out.tokens[0, index])


# -- KV policies ------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", KV_POLICIES)
def test_each_policy_holds_the_tensors_it_claims(policy):
    model, prompt = model_and_prompt(steps=3)
    decoder = LoopDecoder(model, 1, 16, "q:0.5", policy)
    cache = decoder.cache
    layers, steps = model.config.num_layers, 3
    expected = 2 * layers * (steps if policy == "full" else 1)
    assert cache.num_tensors == expected == len(cache.keys) + len(cache.values)
    out = generate(model, prompt, max_new_tokens=4, exit_policy="q:0.5", kv_policy=policy)
    assert out.lengths.tolist() == [4]
    full = LoopKVCache("full", 3, layers, 1, 16, 2, 8, torch.float32, "cpu")
    shared = LoopKVCache(policy, 3, layers, 1, 16, 2, 8, torch.float32, "cpu")
    assert full.nbytes(used_only=False) == shared.nbytes(used_only=False) * (1 if policy == "full" else steps)


def test_policies_store_the_exit_steps_keys():
    """A token that exits after step 1 of 3: `full` copies its step-1 keys into steps 2 and 3;
    `last` and `first` hold step 1's; `avg` the mean of the one step computed."""
    model, prompt = model_and_prompt(seed=4, steps=3)
    stored = {}
    for policy in KV_POLICIES:
        decoder = LoopDecoder(model, 1, 16, "step:1", policy)
        result = decoder.prefill(prompt)
        decoder.step(result.logits.argmax(-1), result.rows)
        col = prompt.shape[1]
        cache = decoder.cache
        stored[policy] = [cache.keys[cache.slot_index(s, 0)][0, :, col].clone() for s in range(3)]
    step_one = stored["full"][0]
    for policy in KV_POLICIES:
        for tensor in stored[policy]:
            torch.testing.assert_close(tensor, step_one, rtol=0, atol=0 if policy != "avg" else 1e-6)


def test_last_policy_prefill_keeps_the_last_step_and_avg_the_mean():
    model, prompt = model_and_prompt(seed=5, steps=3)
    caches = {}
    for policy in ("full", "last", "avg", "first"):
        decoder = LoopDecoder(model, 1, 16, "all", policy)
        decoder.prefill(prompt)
        caches[policy] = decoder.cache
    seq, full = prompt.shape[1], caches["full"]
    per_step = [full.keys[full.slot_index(s, 1)][:, :, :seq] for s in range(3)]
    torch.testing.assert_close(caches["last"].keys[1][:, :, :seq], per_step[2], rtol=0, atol=0)
    torch.testing.assert_close(caches["first"].keys[1][:, :, :seq], per_step[0], rtol=0, atol=0)
    torch.testing.assert_close(caches["avg"].keys[1][:, :, :seq], sum(per_step) / 3, rtol=1e-6, atol=1e-6)


# -- batches ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_policy", ["full", "last"])
def test_a_batch_with_different_exits_equals_each_row_alone(kv_policy):
    model, _ = model_and_prompt(seed=6, steps=4)
    torch.manual_seed(7)
    prompts = [torch.randint(5, 64, (n,)) for n in (3, 9, 6)]
    width = max(p.numel() for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding
        ids[row, width - p.numel() :] = p
        mask[row, width - p.numel() :] = 1
    batch = generate(model, ids, mask, max_new_tokens=10, exit_policy="q:0.5", kv_policy=kv_policy)
    exits = set(batch.exit_steps.flatten().tolist())
    assert len(exits) > 1, f"the test needs rows exiting at different steps, got {exits}"
    for row, p in enumerate(prompts):
        alone = generate(model, p[None], max_new_tokens=10, exit_policy="q:0.5", kv_policy=kv_policy)
        assert batch.tokens[row].tolist() == alone.tokens[0].tolist()
        assert batch.exit_steps[row].tolist() == alone.exit_steps[0].tolist()


def test_eos_stops_a_row_and_the_others_go_on():
    model, prompt = model_and_prompt(seed=8, steps=2)
    free = generate(model, prompt.repeat(2, 1), max_new_tokens=6)
    eos = int(free.tokens[0, 2])
    first = free.tokens[0].tolist().index(eos)
    out = generate(model, prompt.repeat(2, 1), max_new_tokens=6, eos_ids=[eos], pad_id=0)
    assert out.lengths.tolist() == [first + 1] * 2
    assert out.tokens[0, : first + 1].tolist() == free.tokens[0, : first + 1].tolist()
    assert (out.tokens[:, first + 1 :] == 0).all() and (out.exit_steps[:, first + 1 :] == -1).all()


# -- sampling -----------------------------------------------------------------------------------------
def test_sampling_truncations():
    logits = torch.tensor([[4.0, 3.0, 2.0, -10.0]]).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    top1 = sample(logits, Sampling(temperature=1.0, top_k=1), generator)
    assert (top1 == 0).all()
    top2 = sample(logits, Sampling(temperature=1.0, top_k=2), generator)
    assert set(top2.tolist()) == {0, 1}
    # p = softmax = [0.665, 0.245, 0.090, ~0]: top_p 0.8 keeps the first two.
    nucleus = sample(logits, Sampling(temperature=1.0, top_p=0.8), generator)
    assert set(nucleus.tolist()) == {0, 1}
    hot = sample(logits, Sampling(temperature=1.0), generator)
    assert set(hot.tolist()) == {0, 1, 2}
    assert sample(logits[:3], Sampling()).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        Sampling(top_p=0.0)


def test_seeded_sampling_is_reproducible():
    model, prompt = model_and_prompt(seed=9)
    runs = [
        generate(
            model,
            prompt,
            max_new_tokens=8,
            sampling=Sampling(temperature=1.0, top_p=0.9),
            generator=torch.Generator().manual_seed(3),
        ).tokens
        for _ in range(2)
    ]
    assert runs[0].tolist() == runs[1].tolist()


# -- scoring and precision ------------------------------------------------------------------------------
def test_score_all_steps_equals_the_forward_cross_entropy():
    model, _ = model_and_prompt(seed=10, steps=3)
    torch.manual_seed(11)
    sequences = [torch.randint(5, 64, (n,)) for n in (12, 5)]
    scored = score(model, sequences, "all")
    for seq, logprobs in zip(sequences, scored.logprobs, strict=True):
        out = model(seq[None])
        expected = model.logits(out.hidden_states[-1])[0, :-1].log_softmax(-1).gather(1, seq[1:, None])[:, 0]
        torch.testing.assert_close(logprobs, expected, rtol=1e-5, atol=1e-5)


def test_bf16_generation_tracks_fp32():
    model, prompt = model_and_prompt(seed=12, steps=3)
    fp32 = generate(model, prompt, max_new_tokens=4, record_step_logits=True)
    half = generate(model.to(torch.bfloat16), prompt, max_new_tokens=4, record_step_logits=True)
    assert half.tokens.dtype == torch.long
    # First token: same prompt, so the logits agree to bf16 accuracy.
    torch.testing.assert_close(half.step_logits[0], fp32.step_logits[0], rtol=0.05, atol=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decoding_matches_cpu():
    """fp32 on the GPU: the same tokens and exits as on the CPU; bf16: first-token logits close."""
    model, prompt = model_and_prompt(seed=13, steps=4)
    cpu = generate(model, prompt, max_new_tokens=8, exit_policy="q:0.5", record_step_logits=True)
    gpu_model = model.to("cuda")
    gpu = generate(gpu_model, prompt.cuda(), max_new_tokens=8, exit_policy="q:0.5", kv_policy="last")
    same = generate(gpu_model, prompt.cuda(), max_new_tokens=8, exit_policy="q:0.5", record_step_logits=True)
    assert same.tokens.cpu().tolist() == cpu.tokens.tolist() and gpu.lengths.tolist() == [8]
    half = generate(gpu_model.to(torch.bfloat16), prompt.cuda(), max_new_tokens=2, record_step_logits=True)
    torch.testing.assert_close(half.step_logits[0].cpu(), cpu.step_logits[0], rtol=0.05, atol=0.1)
