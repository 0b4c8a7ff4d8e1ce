"""Tiny random-initialised decoders of every family slimlm knows, built with ``from_config`` (no download).

Two blocks, hidden size 64, four query heads over two K/V heads (grouped-query attention where the
family has it), and a character-level tokenizer of about a hundred symbols, saved as ordinary
Hugging Face folders so they load through the same path as any real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
LLAMA_LIKE = dict(COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16)

FAMILIES: dict[str, dict] = {
    "llama": LLAMA_LIKE,
    "mistral": dict(LLAMA_LIKE, sliding_window=16),
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma2": dict(LLAMA_LIKE, query_pre_attn_scalar=16, sliding_window=16, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(LLAMA_LIKE, query_pre_attn_scalar=16, sliding_window=16, sliding_window_pattern=2,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(LLAMA_LIKE, head_dim=None),
    "opt": dict(COMMON, ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True),
    "gpt2": dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2),
}
VARIANTS = {"opt-postnorm": ("opt", {"do_layer_norm_before": False})}  # post-norm OPT (e.g. OPT-350m)


def char_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``text``'s most common characters (unknown → <unk>)."""
    from collections import Counter

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c, _ in Counter(text).most_common(VOCAB - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build(name: str, folder: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Path:
    """Save a random-initialised tiny ``name`` model (family or variant) with ``tokenizer`` into ``folder``."""
    family, extra = VARIANTS.get(name, (name, {}))
    options = {k: v for k, v in {**FAMILIES[family], **extra}.items() if v is not None}
    config = AutoConfig.for_model(family, **options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms start at exactly 1 (0 for Gemma's offset): perturb them so folds are really tested
        for n, p in model.named_parameters():
            if "norm" in n and p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
