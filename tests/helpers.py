"""Shared test helpers (pytest puts tests/ on sys.path, so tests import this as `helpers`).

Seeds: every test runs from a seed derived from its node id (conftest.py's autouse `seed` fixture seeds
torch, random and numpy with it), and every draw made while collecting (random shapes in a parametrize
list) from a seed derived from its name, so the suite is deterministic. USIM_TEST_SEED mixes a base
into each: unset or a number N (crc32 of the name started at N; 0 is the default), or `random` (a fresh
base per session, printed in the summary, so a failure names the USIM_TEST_SEED that reproduces it).
"""

import os
import zlib

import torch

SEED_ENV = "USIM_TEST_SEED"


def _base_seed() -> int:
    value = os.environ.get(SEED_ENV, "").strip().lower()
    if value in ("", "0"):
        return 0
    if value == "random":
        return int.from_bytes(os.urandom(4), "little")
    try:
        return int(value) % 2 ** 32
    except ValueError:
        raise ValueError(f"{SEED_ENV} must be a number or 'random', not {value!r}") from None


BASE_SEED = _base_seed()


def seed_for(name: str) -> int:
    """A 32-bit seed for a test (its node id) or a collection-time draw (its name), mixed with the base."""
    return zlib.crc32(name.encode(), BASE_SEED)


def generator(name: str) -> torch.Generator:
    """A CPU generator for draws made while collecting (e.g. random shapes to parametrize with)."""
    return torch.Generator().manual_seed(seed_for(name))


def final_stream(op, *args):
    """The op's output and its whole final residual stream (to check every slot stays finite)."""
    seen = []
    handle = op.encoder.layers[-1].hook_resid.register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        y = op(*args)
    finally:
        handle.remove()
    return y, seen[0]


def ulp_floor(ref, dtype):
    """One ulp of the largest reference output. Where torch's own error is 0 (it rounds correctly,
    e.g. at size 1), "within k times torch's error" would forbid the one or two roundings any other
    order of the same arithmetic makes; this floor allows them and nothing more."""
    return torch.finfo(dtype).eps * ref.abs().max().item() + 1e-30


def well_conditioned(kind: str, batch: int, n: int, dtype, scale: float = 1.0, max_cond: float = 20.0):
    """(batch, n, n) matrices with condition number <= max_cond, made in float64: random normal + n I
    ("shift", redrawn while ill-conditioned, as happens for small n) or a random orthogonal matrix
    times a diagonal in [1, 2] ("orth", condition number <= 2)."""
    eye = torch.eye(n, dtype=torch.float64)
    if kind == "shift":
        a = torch.randn(batch, n, n, dtype=torch.float64) + n * eye
        bad = torch.linalg.cond(a) > max_cond
        while bad.any():
            a[bad] = torch.randn(int(bad.sum()), n, n, dtype=torch.float64) + n * eye
            bad = torch.linalg.cond(a) > max_cond
    else:
        q, _ = torch.linalg.qr(torch.randn(batch, n, n, dtype=torch.float64))
        a = q * (1 + torch.rand(batch, 1, n, dtype=torch.float64))
    return (a * scale).to(dtype)


def within_torch(op, args, ref, torch_result, dtype, context=(), factor: float = 10):
    """Run op on args and check: its whole final stream is finite, and its max error against the
    reference ref is within factor x torch's own (torch_result's) error plus one ulp. Returns the output."""
    ours, stream = final_stream(op, *args)
    assert torch.isfinite(stream).all(), context
    err = (ours.double() - ref).abs().max().item()
    torch_err = (torch_result.double() - ref).abs().max().item()
    assert err <= factor * torch_err + ulp_floor(ref, dtype), (*context, err, torch_err)
    return ours


def node_seed(request) -> int:
    """A seed derived from the test's node id (the same test draws the same inputs on every run),
    seeded into torch; tests put it in their failure messages."""
    import zlib

    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


def seeded(name: str):
    """A random.Random seeded from a test's name (deterministic, different per test)."""
    import random
    import zlib
    return random.Random(zlib.crc32(name.encode()))


def same_outputs(want: list, got: list, numerical: bool, rel: float = 1e-6) -> bool:
    """RASP outputs agree: categorical values equal, numerical ones within rel (None only with None)."""
    if len(want) != len(got):
        return False
    for a, b in zip(want, got):
        if a is None or b is None:
            if a is not b:
                return False
        elif numerical:
            if not abs(a - b) <= rel * max(1.0, abs(a)):
                return False
        elif a != b or type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
            return False
    return True


def tiny_decoder(family: str, attn: str = "sdpa", layers: int = 2, seed: int = 0, std: float = 0.2, **options):
    """A tiny random Hugging Face causal LM of one of usim.decoder's families (built from a config,
    nothing downloaded; ``options`` go to the config), in eval mode, weights drawn N(0, std) so
    attention is far from uniform."""
    import transformers as T

    common = {"vocab_size": 64, "attn_implementation": attn, **options}
    llama_like = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_hidden_layers": layers}
    config, cls = {
        "llama": (lambda: T.LlamaConfig(**{"num_key_value_heads": 2, **llama_like, **common}), T.LlamaForCausalLM),
        "mistral": (lambda: T.MistralConfig(num_key_value_heads=1, head_dim=8, sliding_window=5, **llama_like,
                                            **common), T.MistralForCausalLM),
        "qwen2": (lambda: T.Qwen2Config(num_key_value_heads=2, **llama_like, **common), T.Qwen2ForCausalLM),
        "gpt2": (lambda: T.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=1,
                                      eos_token_id=2, **common), T.GPT2LMHeadModel),
        "neox": (lambda: T.GPTNeoXConfig(**{"rotary_pct": 0.5, **llama_like, **common}), T.GPTNeoXForCausalLM),
    }[family]
    torch.manual_seed(seed)
    model = cls(config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def left_padded(batch: int = 2, length: int = 7, pad: int = 3, seed: int = 0):
    """Token ids (batch, length) and an attention mask whose last row starts with ``pad`` pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, :pad] = 0
    return ids, mask


def factored_masked_inputs(batch: int, n: int, m: int, d: int, heads: int, r: int):
    """float64 inputs of a factored U's cross-attention with a random attn_mask (key 0 always kept):
    (x (batch, n, d), [wq, wk, wv (heads, d, r), wo (heads, r, d)], keywords for ``U.attention``)."""
    x, kv = torch.randn(batch, n, d, dtype=torch.float64), torch.randn(batch, m, d, dtype=torch.float64)
    w = [torch.randn(heads, d, r, dtype=torch.float64) for _ in range(3)] + \
        [torch.randn(heads, r, d, dtype=torch.float64)]
    mask = torch.rand(heads, n, m) < 0.3
    mask[..., 0] = False
    return x, w, dict(key=kv, value=kv, attn_mask=mask, bo=torch.randn(d, dtype=torch.float64))
