"""End to end on a GPU: dynamo-flexkv inside a real vLLM, against recompute and vLLM's own offloading.

Run on a CUDA machine with vLLM installed (docs/gpu.md: `scripts/gpu-bundle.sh` brings vLLM 0.26 to
the lent H200), one table per run:

    python3 benchmarks/e2e_gpu.py --table smoke  # tiny model under cache pressure, both model runners
    python3 benchmarks/e2e_gpu.py --table all    # Llama-3-8B shape, per engine config, in one engine:
                                                 #   greedy tokens vs recompute, TTFT of a re-asked
                                                 #   4k/16k/32k prompt, decode tokens/s while saves run
    python3 benchmarks/e2e_gpu.py --table pool   # pinning the CPU pool: 8/32/96 GiB
    python3 benchmarks/e2e_gpu.py --table sliding  # a sliding-window model, chunked prefill, a tight
                                                   #   cache: hits ending mid-prompt, PASS/FAIL line
    (--configs a,b picks engine configs; --parts picks among correctness,ttft,decode; --tp 2 on a
    two-GPU machine; --model mla for the MLA shape; --cuda-graphs runs vLLM's default CUDA-graph and
    torch.compile mode instead of eager; --out FILE.json writes the raw figures; --report FILE.json...
    prints the tables of one or more such files, merged)

The default model has Llama-3-8B's shape (32 layers, 32 heads, 8 KV heads, head dim 128, hidden 4096,
MLP 14336, bf16); `--model mla` has DeepSeek-V2-Lite's attention (27 layers, 16 heads, multi-head
latent attention: a 512-wide latent plus 64 RoPE dims cached per token and layer, one "KV head") with
dense MLPs in place of its experts. The sliding table's model (GEMMA2_SLIDING) is Gemma-2: sliding-window
and full-attention layers alternate, with Gemma-2-9B's attention (42 layers, 16 heads, 8 KV heads,
head dim 256) on a narrow 1024-wide residual and MLP, so a chunk's save takes longer than its
forward, and Gemma-3's 1024-token window. All get random weights written on the device under a fixed seed,
and the offline tokenizer's vocabulary. Every engine config runs in its own process (dynamo_flexkv.devtools.harness), one
after the other, on the same prompts. A prompt's prefix is pushed out of vLLM's GPU cache either by
cache pressure (a small `num_gpu_blocks_override`) or by `reset_prefix_cache`, which drops vLLM's own
cache only; the connector keeps its tiers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dynamo_flexkv.devtools.harness import EngineHost  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128)
# DeepSeek-V2-Lite's attention; its MoE layers replaced by dense MLPs (first_k_dense_replace = all)
MLA_LITE = dict(hidden_size=2048, intermediate_size=10944, num_hidden_layers=27, num_attention_heads=16,
                num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                qk_nope_head_dim=128, v_head_dim=128, first_k_dense_replace=27, n_routed_experts=64,
                num_experts_per_tok=6, moe_intermediate_size=1408, n_shared_experts=2)
GEMMA2_SLIDING = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=42, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=256, sliding_window=1024)
KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2  # layers x kv heads x head dim x (K, V) x bf16
CPU_GB = 16  # the CPU budget every offloading config gets
FLEXKV = {"kv_connector": "FlexKVConnectorV1", "kv_role": "kv_both"}


def log(message: str) -> None:
    print(f"[e2e_gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the model -----------------------------------------------------------------------------------

def write_random_model(out: Path, kind: str, seed: int = 0) -> Path:
    """A checkpoint with random weights, generated on the GPU and written as safetensors:
    `llama` (LLAMA3_8B), `mla` (MLA_LITE, DeepseekV2ForCausalLM) or `sliding` (GEMMA2_SLIDING,
    Gemma2ForCausalLM: even layers attend the window, odd ones every token)."""
    import torch
    from safetensors.torch import save_file

    from dynamo_flexkv.devtools.tiny_model import build_tokenizer

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    shape = {"llama": LLAMA3_8B, "mla": MLA_LITE, "sliding": GEMMA2_SLIDING}[kind]
    config = {
        "vocab_size": vocab, "max_position_embeddings": 65536, "rms_norm_eps": 1e-5, "bos_token_id": 0,
        "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu", **shape,
    }
    if kind == "llama":
        config.update(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500000.0)
    elif kind == "sliding":  # no logit soft-capping: greedy decoding without near-ties
        config.update(architectures=["Gemma2ForCausalLM"], model_type="gemma2", rope_theta=10000.0,
                      hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=shape["head_dim"],
                      attn_logit_softcapping=None, final_logit_softcapping=None, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, pad_token_id=0,
                      layer_types=["full_attention" if i % 2 else "sliding_attention"
                                   for i in range(shape["num_hidden_layers"])])
    else:
        config.update(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", rope_theta=10000.0,
                      rope_scaling=None, topk_method="greedy", n_group=1, topk_group=1, moe_layer_freq=1,
                      routed_scaling_factor=1.0, norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.0)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    h, m = shape["hidden_size"], shape["intermediate_size"]
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*size: int, std: float = 0.02):
        return (torch.randn(*size, generator=gen, device="cuda") * std).to(torch.bfloat16).cpu()

    def ones(size: int):
        return torch.ones(size, dtype=torch.bfloat16)

    def gemma_norm(size: int, scale: float):  # Gemma's norms multiply by 1 + weight
        return torch.full((size,), scale - 1.0, dtype=torch.bfloat16)

    def attention(p: str) -> dict:
        heads = shape["num_attention_heads"]
        if kind in ("llama", "sliding"):
            d, kv_heads = shape["head_dim"], shape["num_key_value_heads"]
            qk_std = 0.08 if kind == "sliding" else 0.02  # peaked attention: the next token depends on the window
            return {p + "q_proj.weight": rand(heads * d, h, std=qk_std), p + "k_proj.weight": rand(kv_heads * d, h, std=qk_std),
                    p + "v_proj.weight": rand(kv_heads * d, h), p + "o_proj.weight": rand(h, heads * d)}
        latent, rope = shape["kv_lora_rank"], shape["qk_rope_head_dim"]
        nope, v = shape["qk_nope_head_dim"], shape["v_head_dim"]
        return {p + "q_proj.weight": rand(heads * (nope + rope), h),
                p + "kv_a_proj_with_mqa.weight": rand(latent + rope, h), p + "kv_a_layernorm.weight": ones(latent),
                p + "kv_b_proj.weight": rand(heads * (nope + v), latent), p + "o_proj.weight": rand(h, heads * v)}

    index = {}
    if kind == "sliding":  # tied embeddings; a wide final norm gives wide logits
        head = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": gemma_norm(h, 8.0)}
    else:
        head = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": ones(h),
                "lm_head.weight": rand(vocab, h, std=0.16)}  # wider logits: greedy decoding without near-ties
    shards = [head]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layer = {
            **attention(p + "self_attn."),
            p + "mlp.gate_proj.weight": rand(m, h), p + "mlp.up_proj.weight": rand(m, h),
            p + "mlp.down_proj.weight": rand(h, m),
            p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
        }
        if kind == "sliding":  # attention outweighs the embedding in the residual stream
            layer.update({p + "input_layernorm.weight": gemma_norm(h, 1.0),
                          p + "post_attention_layernorm.weight": gemma_norm(h, 8.0),
                          p + "pre_feedforward_layernorm.weight": gemma_norm(h, 1.0),
                          p + "post_feedforward_layernorm.weight": gemma_norm(h, 1.0)})
        shards.append(layer)
    for n, tensors in enumerate(shards):
        name = f"model-{n:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return out


# --- engine configs ------------------------------------------------------------------------------

def engine_config(spec: str, base: dict) -> tuple[dict, dict[str, str]]:
    """(LLM kwargs, environment) of a config: `name[:VAR=value...]`, the variables set in the engine's
    environment on top of the name's (e.g. `flexkv-async:FLEXKV_CUDA_ISSUE=thread`). `-v1` selects
    vLLM's V1 model runner; `flexkv-auto` leaves `layerwise_load` at its default."""
    name, *overrides = spec.split(":")
    kwargs, env = dict(base), {}
    if name.endswith("-v1"):
        env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        name = name.removesuffix("-v1")
    if name.startswith("flexkv"):
        kwargs["kv_transfer_config"] = FLEXKV
        env["FLEXKV_CPU_CACHE_GB"] = str(CPU_GB)
        if name != "flexkv-auto":
            env["FLEXKV_LAYERWISE_LOAD"] = "0" if name == "flexkv-async" else "1"
    elif name in ("vllm-offloading", "vllm-simple-offload"):
        kwargs.update(kv_offloading_size=CPU_GB, kv_offloading_backend="native")
        env["VLLM_USE_SIMPLE_KV_OFFLOAD"] = "1" if name == "vllm-simple-offload" else "0"
    elif name != "recompute":
        raise ValueError(f"unknown config {name!r}")
    for override in overrides:
        var, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"config {spec!r}: {override!r} is not VAR=value")
        env[var] = value
    return kwargs, env


def start(model: Path, name: str, base: dict) -> EngineHost:
    kwargs, env = engine_config(name, base)
    env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    began = time.perf_counter()
    host = EngineHost(str(model), kwargs, env=env, start_timeout_s=900)
    log(f"{name}: engine up in {time.perf_counter() - began:.0f}s")
    return host


def prompts_of(seed: int, count: int, length: int, vocab: int = 1000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# --- measurements, each on one running engine --------------------------------------------------

def pressure_then_again(host: EngineHost, prompts: list[list[int]], max_tokens: int) -> dict:
    """All prompts at once (they do not fit in vLLM's cache together), then each one again, alone,
    after its prefix left vLLM's cache: the greedy tokens are compared with recompute's."""
    pressure = host.generate(prompts, max_tokens=max_tokens, timeout_s=600)
    again, gpu_hit = [], []
    for prompt in prompts:
        host.reset_gpu_prefix_cache()
        again.append(host.generate([prompt], max_tokens=max_tokens, timeout_s=300)[0])
        # asked once more at once: vLLM's own GPU prefix cache serves the prefix
        gpu_hit.append(host.generate([prompt], max_tokens=max_tokens, timeout_s=300)[0])
    return {"pressure_tokens": [c.token_ids for c in pressure], "again_tokens": [c.token_ids for c in again],
            "again_loaded_tokens": [c.flexkv_tokens for c in again],
            "gpu_hit_tokens": [c.token_ids for c in gpu_hit]}


def ttft(host: EngineHost, lengths: list[int], reps: int) -> dict:
    """Time to first token of a prompt asked again once its prefix left vLLM's GPU cache."""
    rows = {}
    for length in lengths:
        prompt = prompts_of(length, 1, length + 7)[0]
        first = host.generate([prompt], max_tokens=1, timeout_s=300)[0]
        samples, tokens = [], []
        for _ in range(reps):
            host.reset_gpu_prefix_cache()
            c = host.generate([prompt], max_tokens=1, timeout_s=300)[0]
            samples.append(c.ttft_s)
            tokens.append(c.token_ids)
        rows[str(length)] = {**summary(samples), "samples": samples, "first_ask_s": first.ttft_s, "tokens": tokens}
        log(f"  TTFT {length} tokens: median {statistics.median(samples) * 1e3:.1f} ms "
            f"({min(samples) * 1e3:.1f}-{max(samples) * 1e3:.1f}); first ask {first.ttft_s * 1e3:.1f} ms")
    return rows


def decode(host: EngineHost, batches: list[int], reps: int, saver_len: int = 8192, max_tokens: int = 256) -> dict:
    """Decode tokens/s of a batch while two long requests finish beside it after one token, so their
    saves run during the batch's decode. The same work with and without a connector."""
    rows = {}
    for batch in batches:
        rates = []
        for rep in range(reps):
            decoders = prompts_of(1000 * batch + rep, batch, 512)
            savers = prompts_of(2000 * batch + rep, 2, saver_len)
            limits = [max_tokens] * batch + [1] * len(savers)
            out = host.generate(decoders + savers, max_tokens=limits, timeout_s=600)[:batch]
            start_s, end_s = max(c.ttft_s for c in out), max(c.finish_s for c in out)
            rates.append(batch * (max_tokens - 1) / (end_s - start_s))
            host.reset_gpu_prefix_cache()
        rows[str(batch)] = {**summary(rates), "samples": rates}
        log(f"  decode batch {batch}: {statistics.median(rates):.0f} tokens/s ({min(rates):.0f}-{max(rates):.0f})")
    return rows


def run_config(model: Path, name: str, base: dict, parts: list[str], reps: int, decode_reps: int) -> dict:
    result = {}
    with start(model, name, base) as host:
        host.generate(prompts_of(99, 1, 512), max_tokens=2)  # warm-up: kernels, allocator
        if "correctness" in parts:
            result["correctness"] = pressure_then_again(host, prompts_of(1, 16, 6000), max_tokens=32)
            log(f"  correctness: loaded tokens when asked again {result['correctness']['again_loaded_tokens']}")
        if "ttft" in parts:
            result["ttft"] = ttft(host, [4096, 16384, 32768], reps)
        if "decode" in parts and decode_reps:
            result["decode"] = decode(host, [1, 32], decode_reps)
    return result


def smoke(model: Path, configs: list[str], base: dict) -> dict:
    results = {}
    for name in configs:
        with start(model, name, base) as host:
            results[name] = {"correctness": pressure_then_again(host, prompts_of(1, 8, 950), max_tokens=16)}
    return results


SLIDING_CHUNK = 1024  # max_num_batched_tokens: vLLM prefills a prompt in chunks of one window


def sliding_windows(host: EngineHost, prompts: list[list[int]], tails: list[list[int]], max_tokens: int) -> dict:
    """Each prompt alone, prefilled in chunks; then, for every chunk boundary k, the branch
    `prompt[:k] + tail` (a tail shorter than a block) asked after vLLM's cache was emptied (with the
    connector: loaded from its CPU tier; without: computed) and asked again at once (vLLM's own
    prefix cache). A branch's hit ends inside the prompt: its window's KV was saved mid-prefill, while
    vLLM freed and reused those sliding-window blocks. Every way of serving a branch computes the same
    tokens on the same cached KV (one request at a time, chunk boundaries at multiples of the chunk),
    so greedy tokens must agree exactly."""
    first = [host.generate([p], max_tokens=max_tokens, timeout_s=300)[0] for p in prompts]
    cuts, served, gpu_hit = [], [], []
    for prompt, tail in zip(prompts, tails):
        for k in range(SLIDING_CHUNK, len(prompt) + 1, SLIDING_CHUNK):
            branch = prompt[:k] + tail
            host.reset_gpu_prefix_cache()
            served.append(host.generate([branch], max_tokens=max_tokens, timeout_s=300)[0])
            gpu_hit.append(host.generate([branch], max_tokens=max_tokens, timeout_s=300)[0])
            cuts.append(k)
    state = host.flexkv_state()
    return {"hybrid_manager": state["hybrid_manager"], "kv_cache_groups": state["kv_cache_groups"],
            "first_tokens": [c.token_ids for c in first], "first_ttft_s": [c.ttft_s for c in first],
            "cuts": cuts, "branch_tokens": [c.token_ids for c in served],
            "branch_loaded_tokens": [c.flexkv_tokens for c in served],
            "gpu_hit_tokens": [c.token_ids for c in gpu_hit]}


def sliding(model: Path, configs: list[str], base: dict) -> dict:
    rng = random.Random(7)
    prompts = prompts_of(3, 4, 6 * SLIDING_CHUNK + 7)
    tails = [[rng.randrange(3, 1000) for _ in range(9)] for _ in prompts]
    results = {}
    for name in configs:
        with start(model, name, base) as host:
            results[name] = {"sliding": sliding_windows(host, prompts, tails, max_tokens=16)}
        log(f"  {name}: branches loaded {results[name]['sliding']['branch_loaded_tokens']}")
    return results


def sliding_verdict(configs: dict[str, dict]) -> tuple[bool, list[str]]:
    """PASS: vLLM ran its hybrid manager with a sliding-window group, every connector config loaded
    each branch's whole hit from its tier, and served every branch with the no-connector engine's
    tokens for the same cached KV (its own prefix-cache hit); the first asks match recompute too."""
    ref = configs.get("recompute", {}).get("sliding")
    if ref is None:
        return False, ["no recompute config: nothing to compare with"]
    ok, lines = True, []
    n = len(ref["cuts"])
    lines.append(f"recompute: its prefix-cache hit = its cold compute on {sum(a == b for a, b in zip(ref['gpu_hit_tokens'], ref['branch_tokens']))}/{n} branches")
    for name, got in configs.items():
        s = got.get("sliding")
        if s is None or name == "recompute":
            continue
        problems = []
        if not s["hybrid_manager"] or "SlidingWindowSpec" not in s["kv_cache_groups"]:
            problems.append(f"vLLM's KV-cache groups {s['kv_cache_groups']} (hybrid manager "
                            f"{'on' if s['hybrid_manager'] else 'off'}): no sliding-window group was exercised")
        short = [(k, got_k) for k, got_k in zip(s["cuts"], s["branch_loaded_tokens"]) if got_k != k]
        if short:
            problems.append(f"branches whose hit was not loaded whole (cut, loaded): {short}")
        wrong = [k for k, a, b in zip(s["cuts"], s["branch_tokens"], ref["gpu_hit_tokens"]) if a != b]
        if wrong:
            problems.append(f"{len(wrong)}/{n} branches differ from recompute's prefix-cache hit, at cuts {wrong}")
        first_same = sum(a == b for a, b in zip(s["first_tokens"], ref["first_tokens"]))
        if first_same != len(ref["first_tokens"]):
            problems.append(f"first asks equal recompute's on {first_same}/{len(ref['first_tokens'])}")
        ttft = statistics.median(s["first_ttft_s"]) / statistics.median(ref["first_ttft_s"])
        lines.append(f"{name}: {n - len(wrong)}/{n} branches = recompute's prefix-cache hit, "
                     f"{sum(a == b for a, b in zip(s['branch_tokens'], ref['branch_tokens']))}/{n} = its cold compute; "
                     f"first-ask TTFT {ttft:.2f}x recompute" + "".join(f"\n  PROBLEM: {p}" for p in problems))
        ok = ok and not problems
    return ok, lines


# --- report --------------------------------------------------------------------------------------

def report(paths: list[str]) -> None:
    """Print the tables of result files (several runs' configs merged; the first file's machine)."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    configs: dict[str, dict] = {}
    for record in records:
        configs.update(record["results"])
    print(f"machine: {records[0]['machine']}; runs: {', '.join(r['date'] for r in records)}")
    if any("sliding" in got for got in configs.values()):
        passed, lines = sliding_verdict(configs)
        print("\n".join(lines))
        print(f"SLIDING-WINDOW {'PASS' if passed else 'FAIL'}: hits ending mid-prompt on a sliding-window model, "
              "loaded from the CPU tier, against the no-connector engine")
    if any("correctness" in got for got in configs.values()):
        print("\nGreedy tokens of each prompt asked again alone after its prefix left vLLM's cache, compared with the")
        print("no-connector engine: recomputed, and served by vLLM's own GPU prefix cache (same engine, asked twice).")
        print("\n| config | = recompute | = vLLM GPU prefix hit | under pressure = recompute | own GPU hit = own load | tokens loaded |")
        print("|---|---|---|---|---|---|")
    for name, got in configs.items():
        if "correctness" not in got:
            continue
        ref = configs.get("recompute-v1" if name.endswith("-v1") else "recompute", {}).get("correctness")
        c = got["correctness"]
        n = len(c["again_tokens"])

        def agree(a: list, b: list) -> str:
            return f"{sum(x == y for x, y in zip(a, b))}/{n}" if a and b else "-"

        print(f"| {name} | {agree(c['again_tokens'], ref and ref['again_tokens'])} "
              f"| {agree(c['again_tokens'], ref and ref.get('gpu_hit_tokens'))} "
              f"| {agree(c['pressure_tokens'], ref and ref['pressure_tokens'])} "
              f"| {agree(c.get('gpu_hit_tokens'), c['again_tokens'])} "
              f"| {min(c['again_loaded_tokens'])}-{max(c['again_loaded_tokens'])} |")
    with_ttft = {n: g["ttft"] for n, g in configs.items() if "ttft" in g}
    if with_ttft:
        print("\n| TTFT, ms: median (min-max) | " + " | ".join(with_ttft) + " |")
        print("|---" * (len(with_ttft) + 1) + "|")
        for length in next(iter(with_ttft.values())):
            cells = []
            for name, rows in with_ttft.items():
                row = rows[length]
                cell = f"{row['median'] * 1e3:.1f} ({row['min'] * 1e3:.1f}-{row['max'] * 1e3:.1f})"
                ratios = [f"{row['median'] / with_ttft[p][length]['median']:.2f}x {p}"
                          for p in ("recompute", "vllm-offloading", "vllm-simple-offload") if p in with_ttft and p != name]
                cells.append(cell + ("<br>" + ", ".join(ratios) if ratios else ""))
            print(f"| {length} tokens | " + " | ".join(cells) + " |")
    with_decode = {n: g["decode"] for n, g in configs.items() if "decode" in g}
    if with_decode:
        print("\n| decode tokens/s: median (min-max) | " + " | ".join(with_decode) + " |")
        print("|---" * (len(with_decode) + 1) + "|")
        for batch in next(iter(with_decode.values())):
            cells = []
            for name, rows in with_decode.items():
                row = rows[batch]
                ratio = (f"<br>{row['median'] / with_decode['recompute'][batch]['median']:.3f}x recompute"
                         if "recompute" in with_decode and name != "recompute" else "")
                cells.append(f"{row['median']:.0f} ({row['min']:.0f}-{row['max']:.0f}){ratio}")
            print(f"| batch {batch} | " + " | ".join(cells) + " |")
    if "pool" in configs:
        rows = configs["pool"]
        print(f"\npinned CPU pool (/dev/shm {rows['dev_shm_gib']:.0f} GiB, host RAM {rows['host_ram_gib']:.0f} GiB)")
        print("| GiB | create s | pin s | GiB/s pinned | unpin s | copy through last slot |\n|---|---|---|---|---|---|")
        for size, row in rows.items():
            if isinstance(row, dict) and "pin_s" in row:
                print(f"| {size} | {row['create_s']:.2f} | {row['pin_s']:.2f} | {row['pin_gib_per_s']:.1f} "
                      f"| {row['unpin_s']:.2f} | {'ok' if row['copy_ok'] else 'WRONG'} |")
            elif isinstance(row, dict):
                print(f"| {size} | {row['skipped']} |")


def pool(sizes_gib: list[int]) -> dict:
    """Time to create and pin (cudaHostRegister) the CPU pool, and a copy through its last slot."""
    import torch

    from dynamo_flexkv.storage.cpu.pool import CpuBlockPool
    from dynamo_flexkv.storage.layout import PoolGeometry
    from dynamo_flexkv.transfer.cuda.pinning import pin_host_memory

    shm = os.statvfs("/dev/shm")
    results = {"dev_shm_gib": shm.f_bsize * shm.f_blocks / 2**30, "host_ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30}
    block = 16 * KV_BYTES_PER_TOKEN
    for size in sizes_gib:
        geometry = PoolGeometry.for_capacity(size << 30, block, 1)
        if geometry.total_bytes > shm.f_bsize * shm.f_bavail:
            results[str(size)] = {"skipped": f"/dev/shm has {shm.f_bsize * shm.f_bavail / 2**30:.0f} GiB free"}
            log(f"pool {size} GiB: skipped, /dev/shm too small")
            continue
        began = time.perf_counter()
        cpu_pool = CpuBlockPool(f"dynamo-flexkv-bench-pool-{size}", geometry)
        created = time.perf_counter() - began
        try:
            region = pin_host_memory(cpu_pool.tensor, strict=True)
            pinned = region.seconds
            probe = torch.randint(0, 255, (block,), dtype=torch.uint8, device="cuda")
            cpu_pool.tensor[-1].copy_(probe, non_blocking=True)
            back = cpu_pool.tensor[-1].to("cuda", non_blocking=True)
            torch.cuda.synchronize()
            works = bool(torch.equal(back, probe))
            began = time.perf_counter()
            region.unpin()
            unpinned = time.perf_counter() - began
        finally:
            cpu_pool.unlink()
        results[str(size)] = {"create_s": created, "pin_s": pinned, "unpin_s": unpinned, "copy_ok": works,
                              "pin_gib_per_s": size / pinned}
        log(f"pool {size} GiB: created {created:.2f}s, pinned {pinned:.2f}s ({size / pinned:.1f} GiB/s), copy ok {works}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=["smoke", "all", "pool", "sliding"])
    parser.add_argument("--report", nargs="+", help="print the tables of these result files")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--model", choices=["llama", "mla"], default="llama", help="the all table's model shape")
    parser.add_argument("--model-dir", help="where the random model is written (default: a temp dir per --model)")
    parser.add_argument("--parts", default="correctness,ttft,decode", help="the all table's measurements")
    parser.add_argument("--cuda-graphs", action="store_true", help="vLLM's default CUDA graphs instead of eager")
    parser.add_argument("--configs", help="comma-separated engine configs (default: the table's)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", help="write the raw figures as JSON here")
    args = parser.parse_args()

    if args.report:
        report(args.report)
        return
    base = dict(enforce_eager=not args.cuda_graphs, enable_prefix_caching=True, dtype="bfloat16", seed=0,
                tensor_parallel_size=args.tp, gpu_memory_utilization=0.85, max_num_seqs=64)
    if args.table == "smoke":
        from dynamo_flexkv.devtools.tiny_model import build

        model = build(Path(tempfile.gettempdir()) / "flexkv-tiny")
        base.update(block_size=16, num_gpu_blocks_override=100, max_model_len=1024)
        configs = ["recompute", "flexkv-layerwise", "flexkv-async", "recompute-v1", "flexkv-layerwise-v1", "flexkv-async-v1"]
        data = smoke(model, _pick(args, configs), base)
    elif args.table == "all":
        began = time.perf_counter()
        model_dir = args.model_dir or os.path.join(tempfile.gettempdir(), f"flexkv-{args.model}-shape")
        model = write_random_model(Path(model_dir), args.model)
        log(f"model at {model} ({time.perf_counter() - began:.0f}s)")
        # 64k tokens of vLLM cache: a 32k prompt fits, 16 x 6k prompts do not (cache pressure).
        # MLA on Hopper runs FlashMLA, whose blocks are 64 tokens.
        block = 64 if args.model == "mla" else 16
        base.update(block_size=block, num_gpu_blocks_override=65536 // block, max_model_len=32768 + 64)
        configs = ["recompute", "flexkv-layerwise", "flexkv-async", "vllm-offloading", "vllm-simple-offload"]
        parts = args.parts.split(",")
        data = {}
        for name in _pick(args, configs):
            decode_reps = 0 if name.startswith("vllm-") else max(3, args.reps // 2)
            data[name] = run_config(model, name, base, parts, args.reps, decode_reps)
            _write(args, data)  # a run cut short keeps the configs it finished
    elif args.table == "sliding":
        args.model = "sliding"
        model = write_random_model(Path(args.model_dir or os.path.join(tempfile.gettempdir(), "flexkv-sliding-shape")),
                                   "sliding")
        # one prompt (6k tokens, 16 decoded) nearly fills vLLM's cache: 386 full-attention blocks and
        # (window + chunk) / 16 + 1 sliding-window ones, 16 spare
        base.update(block_size=16, max_model_len=6176, max_num_batched_tokens=SLIDING_CHUNK,
                    num_gpu_blocks_override=386 + 2 * SLIDING_CHUNK // 16 + 1 + 16)
        data = sliding(model, _pick(args, ["recompute", "flexkv-async", "flexkv-async:FLEXKV_CUDA_ISSUE=thread"]), base)
    else:
        data = {"pool": pool([8, 32, 96])}
    report([_write(args, data)])


def _write(args, data: dict) -> str:
    record = {"table": args.table, "tp": args.tp, "model": args.model, "cuda_graphs": args.cuda_graphs, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": _machine(), "results": data}
    out = args.out or os.path.join(tempfile.gettempdir(), f"e2e_gpu-{args.table}.json")
    Path(out).write_text(json.dumps(record, indent=1))
    log(f"wrote {out}")
    return out


def _pick(args, default: list[str]) -> list[str]:
    return args.configs.split(",") if args.configs else default


def _machine() -> dict:
    info = {"python": platform.python_version()}
    try:
        import torch
        import vllm

        info.update(vllm=vllm.__version__, torch=torch.__version__,
                    gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
        info["cpu_cores"] = os.cpu_count()
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:  # the figures stand without the machine description
        info["error"] = repr(exc)
    return info


if __name__ == "__main__":
    main()
