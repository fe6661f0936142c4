"""What several test files build the same way: tiny random transformers models, calibration windows, tiny tokenizers,
the relative error the exactness checks compare with.

Import as `from helpers import ...` (tests/ is not a package; pytest puts it on sys.path, as it does for conftest.py).
Defaults are the values the tests used when each file had its own copy; a test that used other values passes them, so
every test still builds exactly the weights and tokens it built before.
"""
from __future__ import annotations

import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 128  # vocabulary of the tiny converter source models (make_source, calib, add_tiny_tokenizer)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the exactness tests' error against the reference b."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def one_error_line(returncode, stderr, *expect) -> str:
    """The bad-input rule for a tool run: exit 2, stderr exactly one `error: ...` line and no traceback; each string
    of `expect` is in that line, which is returned."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, \
        (returncode, stderr)
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


# --- random weights -------------------------------------------------------------------------------------------------

def randomize(model, seed=0, std=0.1):
    """`model`'s weights in place, tensor by tensor: norm weights U[0.5, 1.5) (far from 1, so a norm mix-up shows),
    every other tensor N(0, std^2) (larger than the default init, so attention is far from uniform). Drawn after
    torch.manual_seed(seed); seed None draws from the RNG state the caller left. Returns the model in eval mode."""
    import torch
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in n else torch.randn_like(p) * std)
    return model.eval()


def save_random(model_cls, cfg, path, seed=0, std=0.08, norms_redrawn=False):
    """model_cls(cfg) built right after torch.manual_seed(seed), given random weights (normal_ / uniform_, same
    distributions as `randomize`), saved to `path` as safetensors; returns the model.

    Two draw orders, so each model test keeps its weights: one draw per tensor (default), or `norms_redrawn`: every
    tensor N(0, std^2) first, then the norm weights drawn again from U[0.5, 1.5)."""
    import torch
    torch.manual_seed(seed)
    m = model_cls(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n and not norms_redrawn:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, std)
        if norms_redrawn:
            for n, p in m.named_parameters():
                if "norm" in n:
                    p.uniform_(0.5, 1.5)
    m.save_pretrained(path, safe_serialization=True)
    return m


def make_source(kind, path, seed=0):
    """The converter tests' tiny GQA source ('llama': tied, head_dim 16; else Qwen2: q/k/v biases, untied), 2 layers,
    4 heads over 2 KV heads, vocabulary V, random weights (`randomize`), saved to `path`; returns the torch model."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(head_dim=16, rope_theta=10000.0, tie_word_embeddings=True, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=1e6, tie_word_embeddings=False, **common))
    randomize(model, seed)
    model.save_pretrained(path)
    return model


def calib(seed=0, n=8, s=64, vocab_size=V):
    """n random token windows of s tokens ([n, s] int64), as the converter's `calib_ids`."""
    return np.random.default_rng(seed).integers(0, vocab_size, (n, s))


# --- tiny tokenizers -------------------------------------------------------------------------------------------------

def add_tiny_tokenizer(path, vocab_size=V):
    """A byte-level BPE tokenizer.json without merges in `path`: one token per printable byte (ids 0..vocab_size-2
    from '!'), <|endoftext|> last; enough to tokenize calibration text for a tiny source model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {chr(i + 33): i for i in range(vocab_size - 1)} | {"<|endoftext|>": vocab_size - 1}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(os.path.join(str(path), "tokenizer.json"))


def tiny_llama_with_text(base, layers: int, paragraphs: int, vocab_size: int = V):
    """(model dir, text file) in `base`: a tiny Llama saved by transformers with the character tokenizer of
    `add_tiny_tokenizer`, and a plain text of `paragraphs` short paragraphs, for the tools' CLI tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    d = base / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64, bos_token_id=0, eos_token_id=vocab_size - 1)
                     ).save_pretrained(d)
    add_tiny_tokenizer(d, vocab_size)
    text = base / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i} says little but says it {i % 7} times over." * 4
                                 for i in range(paragraphs)))
    return d, text


def write_word_tokenizer(path, vocab_size):
    """A WordLevel tokenizer ('w1 w2 ...'; any other word is <|endoftext|>, id 0) and its tokenizer_config.json in
    `path`, enough for the tools on a tiny random model (also the conftest fixture of the same name)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(str(path), "tokenizer.json"))
    with open(os.path.join(str(path), "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)
