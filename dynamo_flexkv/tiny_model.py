"""Build a tiny Llama model and tokenizer offline, for the demo and the tests.

No model hub is reachable from CI, so the model is made here in seconds: a byte-level BPE tokenizer
trained on a seeded synthetic corpus (every byte stays encodable) with a ChatML chat template, and a
2-layer `LlamaForCausalLM` with random bf16 weights under a fixed seed. Same inputs, same model.

Usage: python -m dynamo_flexkv.tiny_model OUTPUT_DIR
"""

from __future__ import annotations

import json
import random
import sys
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


def build_model(out: Path, vocab_size: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    # Wider logits than the default init make greedy decoding decisive (fewer near-ties).
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out, safe_serialization=True)


def build(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    build_model(out, vocab)
    return out


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dynamo_flexkv.tiny_model OUTPUT_DIR")
    print(f"tiny model written to {build(sys.argv[1])}")


if __name__ == "__main__":
    main()
