"""Build small Llama models and their tokenizer offline: the tests' tiny model and the demo's model.

No model hub is reachable from CI, so the models are made here in seconds: a byte-level BPE tokenizer
trained on a seeded synthetic corpus (every byte stays encodable) with a ChatML chat template, and a
`LlamaForCausalLM` with random bf16 weights under a fixed seed. Same inputs, same model.

- `TINY` (2 layers, 128 wide): the tests' model; a whole prompt is recomputed in milliseconds.
- `SLIDING` (4 layers, 128 wide, Gemma-2 style): sliding-window and full-attention layers alternate, so
  vLLM's hybrid KV cache manager keeps two KV-cache groups; the hybrid-model tests' model.
- `HYBRID_SSM` (2 layers, Jamba style): a Mamba layer and an attention layer (a `MambaSpec` and a
  `FullAttentionSpec` group); the CPU build cannot run its forward, the tests check it is refused.
- `build_mla`: a 2-layer DeepSeek-V2-style model with multi-head latent attention (MLA), whose KV
  cache is one 576-wide latent per token and layer, the shape the CPU build's MLA kernel accepts.
- `DEMO` (4 layers, 1024 wide, grouped-query attention, float32): big enough that prefill dominates
  a request on a CPU — a 2k-token prompt costs hundreds of milliseconds on 2 cores — so a KV cache has
  something to save, yet built in seconds and small in memory (~0.2 GiB of weights, 16 KiB of KV per
  token). Float32, because a random model's greedy answers flip on bf16 rounding: a prompt whose KV
  was loaded must give the same answer as one recomputed in a different batch shape.

Usage: python -m dynamo_flexkv.devtools.tiny_model [--demo | --sliding] OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

VOCAB_SIZE = 1024
SEED = 20261129
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "the cache block token layer tier memory disk store prefix request worker router model "
    "prompt answer user assistant system chat turn offload load save evict hit miss copy page "
    "hash chain event policy engine queue stream kernel batch shard rank node cluster speed "
    "a an of to in on for with from by and or not is are was be will can may every each"
).split()


def _corpus(lines: int = 4000) -> list[str]:
    rng = random.Random(SEED)
    # Seeded pseudo-words next to the real ones give BPE enough distinct merges to fill the vocab.
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = WORDS + ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(3000)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 24))) + "." for _ in range(lines)]


def build_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))
    return len(fast)


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int = 64  # CPU attention accepts 32..512 in the usual steps
    dtype: str = "bfloat16"  # of the saved weights, and so of the engine's (`--dtype auto`) compute and KV
    sliding_window: int | None = None  # set: a Gemma-2-style model, every other layer attends this many tokens
    ssm: bool = False  # a Jamba-style model: Mamba layers, then attention layers

    def parameters(self, vocab_size: int) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attention + mlp + 2 * self.hidden) + 2 * vocab_size * self.hidden + self.hidden

    @classmethod
    def of(cls, model_dir: Path) -> tuple[ModelShape, int]:
        """The shape and vocabulary size of a Llama model saved in `model_dir` (from its config.json)."""
        config = json.loads((Path(model_dir) / "config.json").read_text())
        shape = cls(layers=config["num_hidden_layers"], hidden=config["hidden_size"],
                    intermediate=config["intermediate_size"], heads=config["num_attention_heads"],
                    kv_heads=config["num_key_value_heads"], head_dim=config.get("head_dim", 64),
                    dtype=config.get("torch_dtype") or config.get("dtype") or "bfloat16")
        return shape, config["vocab_size"]

    @property
    def dtype_bytes(self) -> int:
        return {"bfloat16": 2, "float32": 4}[self.dtype]

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


TINY = ModelShape(layers=2, hidden=128, intermediate=256, heads=2, kv_heads=2)
DEMO = ModelShape(layers=4, hidden=1024, intermediate=2816, heads=16, kv_heads=8, dtype="float32")
SLIDING = ModelShape(layers=4, hidden=128, intermediate=256, heads=2, kv_heads=2, sliding_window=64)
HYBRID_SSM = ModelShape(layers=2, hidden=128, intermediate=256, heads=2, kv_heads=2, ssm=True)


def _shape_config(shape: ModelShape, vocab_size: int) -> dict:
    """The Hugging Face config arguments every tiny architecture shares."""
    return dict(vocab_size=vocab_size, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                max_position_embeddings=8192, bos_token_id=0, eos_token_id=2, torch_dtype=shape.dtype)


def build_model(out: Path, vocab_size: int, shape: ModelShape = TINY, seed: int = SEED) -> None:
    """`seed` draws the weights: another seed, another model of the same shape (e.g. "updated weights")."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape.sliding_window is not None:
        _build_sliding_window_model(out, vocab_size, shape, seed)
        return
    if shape.ssm:
        _build_hybrid_ssm_model(out, vocab_size, shape, seed)
        return
    torch.manual_seed(seed)
    config = LlamaConfig(**_shape_config(shape, vocab_size), head_dim=shape.head_dim, rms_norm_eps=1e-5,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, shape.dtype))
    # Wider logits than the default init make greedy decoding decisive (fewer near-ties).
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out, safe_serialization=True)


def _build_sliding_window_model(out: Path, vocab_size: int, shape: ModelShape, seed: int) -> None:
    """Gemma-2 layout: layers 0, 2, ... attend a sliding window, 1, 3, ... every token. No logit
    soft-capping (the CPU attention does without it); embeddings tied, as vLLM's Gemma-2 loads them."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(
        **_shape_config(shape, vocab_size), head_dim=shape.head_dim, query_pre_attn_scalar=shape.head_dim,
        sliding_window=shape.sliding_window, attn_logit_softcapping=None, final_logit_softcapping=None,
        pad_token_id=0, tie_word_embeddings=True,
    )
    model = Gemma2ForCausalLM(config).to(getattr(torch, shape.dtype))
    with torch.no_grad():
        model.model.norm.weight.fill_(7.0)  # wider logits (fewer near-ties); Gemma's norms scale by 1 + weight
        for layer in model.model.layers:
            # peaked attention, outweighing the tied input embedding in the residual stream: the next
            # token depends on particular cached positions, not mostly on the current token
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
            layer.post_attention_layernorm.weight.fill_(7.0)
    model.save_pretrained(out, safe_serialization=True)


def _build_hybrid_ssm_model(out: Path, vocab_size: int, shape: ModelShape, seed: int) -> None:
    """Jamba layout: layer 0 Mamba, layer 1 attention (and so on); one expert, so no MoE."""
    import torch
    from transformers import JambaConfig, JambaForCausalLM

    torch.manual_seed(seed)
    config = JambaConfig(
        **_shape_config(shape, vocab_size), attn_layer_period=2, attn_layer_offset=1, num_experts=1,
        num_experts_per_tok=1, mamba_dt_rank=8, use_mamba_kernels=False, pad_token_id=0, tie_word_embeddings=False,
    )
    JambaForCausalLM(config).to(getattr(torch, shape.dtype)).save_pretrained(out, safe_serialization=True)


def build(out_dir: str | Path, shape: ModelShape = TINY, seed: int = SEED) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    build_model(out, vocab, shape, seed)
    return out


def build_mla(out_dir: str | Path) -> Path:
    """A tiny DeepseekV2ForCausalLM: MLA with DeepSeek's latent (512) and RoPE (64) widths, dense
    MLPs in every layer (`first_k_dense_replace` = all layers, so no experts are built)."""
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    torch.manual_seed(SEED)
    config = DeepseekV2Config(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=32,
        v_head_dim=32, first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=128, max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=0,
        eos_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    model = DeepseekV2ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # decisive greedy decoding, as in build_model
    model.save_pretrained(out, safe_serialization=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m dynamo_flexkv.devtools.tiny_model", description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="the demo's model (DEMO) instead of the tests' (TINY)")
    parser.add_argument("--sliding", action="store_true", help="the hybrid-model tests' model (SLIDING)")
    parser.add_argument("output_dir", type=Path)
    args = parser.parse_args()
    name = "demo" if args.demo else "sliding" if args.sliding else "tiny"
    shape = {"demo": DEMO, "sliding": SLIDING, "tiny": TINY}[name]
    print(f"{name} model ({shape}) written to {build(args.output_dir, shape)}")


if __name__ == "__main__":
    main()
