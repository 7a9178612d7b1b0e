"""The models, written from scratch in plain torch.

Three pieces, each readable on its own:

* ``GPT`` — a decoder-only transformer that covers both open-weight families we use:
  GPT-2 style (learned positions, LayerNorm, GELU MLP, biases) and Llama style (RoPE, RMSNorm,
  SwiGLU MLP, grouped-query attention, tied embeddings). One config switch, ``style``, picks the
  family; the attention block is shared.
* ``Bert`` — a BERT-style bidirectional encoder, the small clean teacher.
* ``Classifier`` — a sequence-classification wrapper around either. A decoder is read at its LAST
  REAL token (so padding never changes a prediction), an encoder at its first token ([CLS]).
  It also returns the pooled feature, because W2SDefense aligns features (docs/method.md, "The loss").

The functions at the bottom load open weights into these modules (GGUF for SmolLM2, safetensors for
GPT-2 and BERT): a short loop with one shape check per tensor, as in nanoGPT. The public entry points
are ``load_student`` and ``load_teacher``; each returns a model and its tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import registry
import tokenizer as tok
import weights


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class GPTConfig:
    """Shape of a decoder. ``style`` is ``"gpt2"`` or ``"llama"``."""
    style: str = "llama"
    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3          # < n_head means grouped-query attention (Llama style)
    d_model: int = 576
    d_ff: int = 1536
    max_seq_len: int = 8192     # learned positions (GPT-2) need a table this long
    norm_eps: float = 1e-5
    rope_base: float = 100000.0
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.style not in ("gpt2", "llama"):
            raise ValueError(f"GPTConfig.style must be 'gpt2' or 'llama', got {self.style!r}")
        if self.d_model % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"d_model ({self.d_model}) must divide by n_head ({self.n_head}) and "
                             f"n_head by n_kv_head ({self.n_kv_head})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@dataclass
class BertConfig:
    """Shape of a BERT encoder."""
    vocab_size: int = 30522
    n_layer: int = 6
    n_head: int = 12
    d_model: int = 384
    d_ff: int = 1536
    max_seq_len: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): ``y = x / sqrt(mean(x^2) + eps) * w``, computed in float32."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * y).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float):
    """Rotary position embedding tables (Su et al. 2021) for integer ``positions`` of shape (B, T).

    Frequencies ``theta_i = base^(-2i/d)``; returns cos and sin of shape (B, 1, T, head_dim), laid out
    in the "rotate half" convention: the first half of a head pairs with the second half.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq          # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)               # (B, T, hd)
    return angles.cos()[:, None], angles.sin()[:, None]        # (B, 1, T, hd)


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+d/2}) pair of ``x`` (B, nh, T, hd) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def attention(q, k, v, mask=None, causal: bool = False):
    """Scaled dot-product attention written out: ``softmax(q kᵀ / sqrt(d) + mask) v`` (Vaswani et al. 2017).

    ``q`` (B, nh, T, d); ``k``, ``v`` (B, nkv, S, d), where ``nh`` is a multiple of ``nkv``: grouped-query
    attention, query heads ``g·j … g·j + g - 1`` (g = nh / nkv) share key/value head ``j``. ``mask``: boolean,
    broadcastable to (B, 1, T, S), True where a query may attend to a key; ``causal`` adds "not to a later key".
    Returns (B, nh, T, d).

    Why not ``F.scaled_dot_product_attention``: on a CPU at our lengths (20 to 60 tokens) the backward of its
    flash kernel took a quarter of a bf16 LoRA training step in the profile (experiments/LOG.md, "Throughput");
    these three small products and a softmax cost much less. The (T, S) score matrix is materialised, which is cheap at
    these lengths; for long sequences a fused kernel, which never forms it, saves memory.
    """
    B, nh, T, d = q.shape
    nkv, S = k.shape[1], k.shape[2]
    g = nh // nkv
    # Stack the g query heads of each key/value head along T, so one product serves the whole group
    # without copying k and v g times: (B, nkv, g*T, d) @ (B, nkv, d, S) -> (B, nkv, g, T, S).
    scores = (q.reshape(B, nkv, g * T, d) @ k.transpose(-2, -1)).view(B, nkv, g, T, S)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) / d ** 0.5   # at least float32
    if causal:
        later = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)   # key after the query
        scores = scores.masked_fill(later, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))                # (B, 1, 1, T|1, S)
    p = torch.softmax(scores, dim=-1)                                                 # each row sums to 1
    y = p.view(B, nkv, g * T, S).to(v.dtype) @ v                                      # (B, nkv, g*T, d)
    return y.view(B, nh, T, d)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (so LoRA can target q and v).

    ``n_kv_head < n_head`` gives grouped-query attention: each key/value head serves
    ``n_head / n_kv_head`` query heads. ``rope`` (cos, sin) rotates queries and keys (Llama);
    ``mask`` is a boolean (B, 1, T, T) "may attend" mask, or None for plain causal attention.
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, bias: bool, causal: bool):
        super().__init__()
        self.n_head, self.n_kv_head, self.causal = n_head, n_kv_head, causal
        self.head_dim = d_model // n_head
        self.q_proj = nn.Linear(d_model, n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_head * self.head_dim, d_model, bias=bias)

    def forward(self, x, mask=None, rope=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = attention(q, k, v, mask, causal=self.causal and mask is None)              # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                      # (B, T, d)


class MLP(nn.Module):
    """GPT-2: ``proj(gelu(fc(x)))``. Llama (SwiGLU, Shazeer 2020): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, d_ff: int, style: str):
        super().__init__()
        self.style = style
        if style == "llama":
            self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
            self.up_proj = nn.Linear(d_model, d_ff, bias=False)
            self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        else:
            self.fc = nn.Linear(d_model, d_ff)
            self.proj = nn.Linear(d_ff, d_model)

    def forward(self, x):
        if self.style == "llama":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # GPT-2 uses the tanh approximation of GELU; BERT uses the exact erf form.
        return self.proj(F.gelu(self.fc(x), approximate="tanh" if self.style == "gpt2" else "none"))


class DecoderBlock(nn.Module):
    """Pre-norm residual block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        llama = cfg.style == "llama"
        Norm = (lambda d: RMSNorm(d, cfg.norm_eps)) if llama else (lambda d: nn.LayerNorm(d, eps=cfg.norm_eps))
        self.norm1 = Norm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_head, cfg.n_kv_head, bias=not llama, causal=True)
        self.norm2 = Norm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.style)

    def forward(self, x, mask=None, rope=None):
        x = x + self.attn(cast_once(self.norm1(x)), mask, rope)
        return x + self.mlp(cast_once(self.norm2(x)))


def cast_once(h):
    """Under autocast with autograd off (inference), cast ``h`` to the autocast dtype once, here.

    Autocast casts a float32 input at every product that reads it: three times for q, k and v, twice for
    gate and up. Casting once gives the same bf16 values, so the outputs are bit for bit the same. Not while
    training: the products' gradients would then be summed in bf16 rather than in float32.
    """
    kind = h.device.type
    if torch.is_autocast_enabled(kind) and not torch.is_grad_enabled():
        return h.to(torch.get_autocast_dtype(kind))
    return h


# ----------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------

def positions_and_mask(attention_mask, T: int, device):
    """Position ids (B, T) and a boolean attention mask for a padded batch.

    Positions count only real tokens, so a left-padded row sees the same positions as the row alone.
    With no padding, or padding only on the right, causal attention alone is exact (a real token
    never looks right), so the mask is None and attention applies the causal rule alone (no (B, T, T) mask).
    """
    if attention_mask is None:
        return torch.arange(T, device=device)[None], None
    m = attention_mask.bool()
    positions = (m.long().cumsum(-1) - 1).clamp(min=0)                            # (B, T)
    if torch.equal(m, right_padding_mask(m.sum(-1), T)):
        return positions, None
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    mask = causal[None] & m[:, None, :]                                           # (B, T, T)
    # A pad query with no real key to its left would attend to nothing (NaN): let it see itself.
    mask = mask | torch.eye(T, dtype=torch.bool, device=device)[None]
    return positions, mask[:, None]                                              # (B, 1, T, T)


def right_padding_mask(lengths, T: int):
    """Right-padding mask (B, T): True for the first ``lengths[b]`` positions of each row."""
    return torch.arange(T, device=lengths.device)[None] < lengths[:, None]


class GPT(nn.Module):
    """Decoder-only language model (GPT-2 or Llama style, see ``GPTConfig``)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.style == "gpt2":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.style == "llama" else nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    def hidden_states(self, input_ids, attention_mask=None, layer: int | None = None, prefix=None):
        """Final hidden states (B, T, d) after the last norm; or, with ``layer=i``, the residual
        stream after block i (0-based, no final norm).

        ``prefix=(x, k)``: ``x`` (B, T, d) is the residual stream after the first ``k`` blocks, computed
        earlier (``hidden_states(..., layer=k - 1)``; ``k`` = 0: ``embed``'s output). While those blocks are
        frozen this is exact and saves their cost on every step: the forward starts at block ``k`` (see
        ``train.cache_prefix``).
        """
        B, T = input_ids.shape
        positions, mask = positions_and_mask(attention_mask, T, input_ids.device)
        rope = None
        if self.cfg.style != "gpt2":
            rope = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_base)
        if prefix is None:
            x, start = self.embed(input_ids, attention_mask), 0                        # (B, T, d)
        else:
            x, start = prefix
        for i in range(start, len(self.blocks)):
            x = self.blocks[i](x, mask, rope)
            if i == layer:
                return x
        return self.norm_f(x)

    def embed(self, input_ids, attention_mask=None):
        """The residual stream entering block 0 (B, T, d): the token embeddings (GPT-2: plus the positions'). A
        defense that perturbs the input embeddings (CROW) nudges this and runs the blocks with ``prefix=(x, 0)``."""
        x = self.tok_emb(input_ids)
        if self.cfg.style == "gpt2":
            positions, _ = positions_and_mask(attention_mask, input_ids.shape[1], input_ids.device)
            x = x + self.pos_emb(positions)
        return x

    def forward(self, input_ids, attention_mask=None):
        """Next-token logits (B, T, vocab)."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask))

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens: int, eos_id: int | None = None):
        """Greedy decoding of one unpadded prompt (1, T) -> (1, T + new). No cache: clarity first."""
        for _ in range(max_new_tokens):
            next_id = self(input_ids[:, -self.cfg.max_seq_len:])[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_id], dim=1)
            if eos_id is not None and next_id.item() == eos_id:
                break
        return input_ids


# ----------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------

class EncoderBlock(nn.Module):
    """Post-norm residual block (BERT): ``norm1(x + attn(x))``, then ``norm2(x + mlp(x))``."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = Attention(cfg.d_model, cfg.n_head, cfg.n_head, bias=True, causal=False)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, style="bert")
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, x, mask):
        x = self.norm1(x + self.attn(x, mask))
        return self.norm2(x + self.mlp(x))


class Bert(nn.Module):
    """BERT encoder (Devlin et al. 2019): token + position + segment embeddings, then post-norm blocks."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.emb_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    def hidden_states(self, input_ids, attention_mask=None, layer: int | None = None):
        """Last-layer hidden states (B, T, d); padding keys are masked out of every attention."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)[None]                   # (1, T)
        x = self.tok_emb(input_ids) + self.pos_emb(positions) + self.type_emb(torch.zeros_like(input_ids))
        x = self.emb_norm(x)                                                          # (B, T, d)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for i, block in enumerate(self.blocks):
            x = block(x, mask)
            if i == layer:
                break
        return x


# ----------------------------------------------------------------------------------------------
# Sequence classification
# ----------------------------------------------------------------------------------------------

def last_real_token(hidden, attention_mask):
    """Pick, per row, the hidden state of the last token whose mask is 1: (B, T, d) -> (B, d).

    Works for left and right padding alike; it never reads a pad token.
    """
    B, T, _ = hidden.shape
    if attention_mask is None:
        return hidden[:, -1]
    idx = T - 1 - attention_mask.flip(-1).long().argmax(-1)                        # (B,)
    return hidden[torch.arange(B, device=hidden.device), idx]


class Classifier(nn.Module):
    """A backbone, a pooled feature ``h``, and a linear head: ``z = head(h)``.

    * decoder (``GPT``): ``h`` = final hidden state at the last real token (what the head reads);
    * encoder (``Bert``): ``h`` = the [CLS] state, optionally passed through ``proj`` — for the W2S
      teacher, ``proj = Linear(d_teacher -> d_student) + ReLU`` so that ``h_t`` lives in the student's
      feature space (docs/method.md, "The loss").

    ``forward`` returns the logits; ``forward(..., return_features=True)`` returns ``(z, h)``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, proj_dim: int | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.backbone = backbone
        self.pooling = "last" if isinstance(backbone, GPT) else "cls"
        d = backbone.d_model
        self.proj = None
        if proj_dim is not None:
            self.proj = nn.Sequential(nn.Linear(d, proj_dim), nn.ReLU())
            d = proj_dim
        self.head = nn.Linear(d, num_classes, bias=self.pooling == "cls")
        self.num_classes = num_classes
        self.reset_head(generator)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def reset_head(self, generator: torch.Generator | None = None):
        """Seeded initialisation of the new layers: N(0, 0.02) weights, zero biases (as GPT-2/BERT)."""
        layers = [self.head] + ([self.proj[0]] if self.proj is not None else [])
        with torch.no_grad():
            for layer in layers:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.02)
                if layer.bias is not None:
                    layer.bias.zero_()

    def features(self, input_ids, attention_mask=None, prefix=None):
        """The pooled feature ``h`` (B, feature_dim) that the head reads. ``prefix``: see ``GPT.hidden_states``."""
        extra = {} if prefix is None else {"prefix": prefix}
        hidden = self.backbone.hidden_states(input_ids, attention_mask, **extra)     # (B, T, d)
        h = last_real_token(hidden, attention_mask) if self.pooling == "last" else hidden[:, 0]
        return self.proj(h) if self.proj is not None else h

    def forward(self, input_ids, attention_mask=None, return_features: bool = False, prefix=None):
        h = self.features(input_ids, attention_mask, prefix)
        z = self.head(h)                                                              # (B, C)
        return (z, h) if return_features else z


# ----------------------------------------------------------------------------------------------
# Loading open weights
# ----------------------------------------------------------------------------------------------

def load_state(module: nn.Module, tensors: dict, source: str):
    """Install ``tensors`` (our names) as the parameters of ``module``: every parameter must be given, with
    its shape.

    The tensors BECOME the parameters (``load_state_dict(assign=True)``), no copy is made, so ``module`` may
    be built on the meta device (see ``build``): the weights then exist once in memory, not twice.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in tensors and not _is_tied(module, k)]
    if missing:
        raise weights.WeightFileError(f"{source}: missing tensors for {missing[:5]}"
                                      f"{' ...' if len(missing) > 5 else ''}")
    state = {}
    for name, value in tensors.items():
        if name not in own:
            raise weights.WeightFileError(f"{source}: unexpected tensor {name!r}")
        if tuple(own[name].shape) != tuple(value.shape):
            raise weights.WeightFileError(f"{source}: tensor {name!r} has shape {tuple(value.shape)}, "
                                          f"the model expects {tuple(own[name].shape)}")
        state[name] = value.to(own[name].dtype).contiguous()
    module.load_state_dict(state, strict=False, assign=True)
    if getattr(getattr(module, "cfg", None), "tie_embeddings", False):
        module.lm_head.weight = module.tok_emb.weight          # assign=True replaced the shared Parameter


def build(cls, cfg, tensors: dict, source: str):
    """``cls(cfg)`` with ``tensors`` as its weights. The module is first built on torch's meta device
    (shapes only, no memory, no random init), so loading a checkpoint never holds two copies of it."""
    with torch.device("meta"):
        model = cls(cfg)
    load_state(model, tensors, source)
    return model


def _is_tied(module, key):
    return key == "lm_head.weight" and getattr(getattr(module, "cfg", None), "tie_embeddings", False)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation.

    GGUF stores each head's rows interleaved (pairs (0,1), (2,3), ... rotate together, as in Meta's
    original code); our RoPE uses the "rotate half" layout (row i pairs with row i + hd/2), as do the
    Hugging Face checkpoints. Per head: rows [0,1,2,3,...] -> [0,2,4,...,1,3,5,...].
    """
    out, d_in = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, d_in).transpose(1, 2).reshape(out, d_in)


def gpt_from_gguf(path) -> tuple[GPT, dict]:
    """Build a Llama-style ``GPT`` from a GGUF file; returns the model and the GGUF metadata."""
    g = weights.read_gguf(path)
    md = g.metadata
    arch = md.get("general.architecture")
    if arch != "llama":
        raise weights.WeightFileError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    a = f"{arch}."
    t = g.tensors
    cfg = GPTConfig(
        style="llama", vocab_size=t["token_embd.weight"].shape[0], n_layer=md[a + "block_count"],
        n_head=md[a + "attention.head_count"], n_kv_head=md.get(a + "attention.head_count_kv", md[a + "attention.head_count"]),
        d_model=md[a + "embedding_length"], d_ff=md[a + "feed_forward_length"],
        max_seq_len=md.get(a + "context_length", 2048), norm_eps=md[a + "attention.layer_norm_rms_epsilon"],
        rope_base=md.get(a + "rope.freq_base", 10000.0), tie_embeddings="output.weight" not in t)
    ours = {"tok_emb.weight": t["token_embd.weight"], "norm_f.weight": t["output_norm.weight"]}
    if not cfg.tie_embeddings:
        ours["lm_head.weight"] = t["output.weight"]
    for i in range(cfg.n_layer):
        b, o = f"blk.{i}.", f"blocks.{i}."
        ours[o + "norm1.weight"] = t[b + "attn_norm.weight"]
        ours[o + "attn.q_proj.weight"] = unpermute_qk(t[b + "attn_q.weight"], cfg.n_head)
        ours[o + "attn.k_proj.weight"] = unpermute_qk(t[b + "attn_k.weight"], cfg.n_kv_head)
        ours[o + "attn.v_proj.weight"] = t[b + "attn_v.weight"]
        ours[o + "attn.o_proj.weight"] = t[b + "attn_output.weight"]
        ours[o + "norm2.weight"] = t[b + "ffn_norm.weight"]
        ours[o + "mlp.gate_proj.weight"] = t[b + "ffn_gate.weight"]
        ours[o + "mlp.up_proj.weight"] = t[b + "ffn_up.weight"]
        ours[o + "mlp.down_proj.weight"] = t[b + "ffn_down.weight"]
    return build(GPT, cfg, ours, str(path)), md


def _strip_prefix(tensors: dict, prefixes) -> dict:
    """Drop a leading ``transformer.`` / ``model.`` / ``bert.`` that some checkpoints carry."""
    out = {}
    for k, v in tensors.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def _read_folder(folder: Path):
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise weights.WeightFileError(f"{p}: file not found; a model folder needs config.json and model.safetensors")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise weights.WeightFileError(f"{config_path}: not valid JSON ({e})") from None
    return config, {k: v.float() for k, v in weights.read_safetensors(weights_path).items()}


def gpt2_from_hf(config: dict, t: dict, source: str) -> GPT:
    """GPT-2 safetensors -> ``GPT``. GPT-2's ``Conv1D`` stores weights as (in, out): transpose once,
    and split the fused ``c_attn`` (d -> 3d) into q, k, v."""
    t = _strip_prefix(t, ("transformer.",))
    d = config["n_embd"]
    cfg = GPTConfig(style="gpt2", vocab_size=config["vocab_size"], n_layer=config["n_layer"],
                    n_head=config["n_head"], n_kv_head=config["n_head"], d_model=d,
                    d_ff=config.get("n_inner") or 4 * d, max_seq_len=config["n_positions"],
                    norm_eps=config.get("layer_norm_epsilon", 1e-5), tie_embeddings=True)
    ours = {"tok_emb.weight": t["wte.weight"], "pos_emb.weight": t["wpe.weight"],
            "norm_f.weight": t["ln_f.weight"], "norm_f.bias": t["ln_f.bias"]}
    for i in range(cfg.n_layer):
        h, o = f"h.{i}.", f"blocks.{i}."
        q, k, v = t[h + "attn.c_attn.weight"].t().split(d, dim=0)                   # each (d, d)
        qb, kb, vb = t[h + "attn.c_attn.bias"].split(d)
        ours.update({
            o + "norm1.weight": t[h + "ln_1.weight"], o + "norm1.bias": t[h + "ln_1.bias"],
            o + "attn.q_proj.weight": q, o + "attn.q_proj.bias": qb,
            o + "attn.k_proj.weight": k, o + "attn.k_proj.bias": kb,
            o + "attn.v_proj.weight": v, o + "attn.v_proj.bias": vb,
            o + "attn.o_proj.weight": t[h + "attn.c_proj.weight"].t(), o + "attn.o_proj.bias": t[h + "attn.c_proj.bias"],
            o + "norm2.weight": t[h + "ln_2.weight"], o + "norm2.bias": t[h + "ln_2.bias"],
            o + "mlp.fc.weight": t[h + "mlp.c_fc.weight"].t(), o + "mlp.fc.bias": t[h + "mlp.c_fc.bias"],
            o + "mlp.proj.weight": t[h + "mlp.c_proj.weight"].t(), o + "mlp.proj.bias": t[h + "mlp.c_proj.bias"],
        })
    return build(GPT, cfg, ours, source)


def llama_from_hf(config: dict, t: dict, source: str) -> GPT:
    """Hugging Face Llama safetensors -> ``GPT`` (already in the rotate-half layout)."""
    t = _strip_prefix(t, ("model.",))
    n_head = config["num_attention_heads"]
    cfg = GPTConfig(style="llama", vocab_size=config["vocab_size"], n_layer=config["num_hidden_layers"],
                    n_head=n_head, n_kv_head=config.get("num_key_value_heads", n_head),
                    d_model=config["hidden_size"], d_ff=config["intermediate_size"],
                    max_seq_len=config.get("max_position_embeddings", 2048), norm_eps=config.get("rms_norm_eps", 1e-6),
                    rope_base=config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 10000.0),
                    tie_embeddings=config.get("tie_word_embeddings", "lm_head.weight" not in t))
    ours = {"tok_emb.weight": t["embed_tokens.weight"], "norm_f.weight": t["norm.weight"]}
    if not cfg.tie_embeddings:
        ours["lm_head.weight"] = t["lm_head.weight"]
    for i in range(cfg.n_layer):
        h, o = f"layers.{i}.", f"blocks.{i}."
        ours[o + "norm1.weight"] = t[h + "input_layernorm.weight"]
        ours[o + "norm2.weight"] = t[h + "post_attention_layernorm.weight"]
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            ours[o + f"attn.{p}.weight"] = t[h + f"self_attn.{p}.weight"]
        for p in ("gate_proj", "up_proj", "down_proj"):
            ours[o + f"mlp.{p}.weight"] = t[h + f"mlp.{p}.weight"]
    return build(GPT, cfg, ours, source)


def bert_from_hf(config: dict, t: dict, source: str) -> Bert:
    """BERT safetensors -> ``Bert`` (the pooler is not used: we read the last-layer [CLS] state)."""
    t = _strip_prefix(t, ("bert.",))
    t = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
         for k, v in t.items()}
    cfg = BertConfig(vocab_size=config["vocab_size"], n_layer=config["num_hidden_layers"],
                     n_head=config["num_attention_heads"], d_model=config["hidden_size"],
                     d_ff=config["intermediate_size"], max_seq_len=config["max_position_embeddings"],
                     type_vocab_size=config.get("type_vocab_size", 2), norm_eps=config.get("layer_norm_eps", 1e-12))
    e = "embeddings."
    ours = {"tok_emb.weight": t[e + "word_embeddings.weight"], "pos_emb.weight": t[e + "position_embeddings.weight"],
            "type_emb.weight": t[e + "token_type_embeddings.weight"],
            "emb_norm.weight": t[e + "LayerNorm.weight"], "emb_norm.bias": t[e + "LayerNorm.bias"]}
    pairs = {"attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key",
             "attn.v_proj": "attention.self.value", "attn.o_proj": "attention.output.dense",
             "norm1": "attention.output.LayerNorm", "mlp.fc": "intermediate.dense",
             "mlp.proj": "output.dense", "norm2": "output.LayerNorm"}
    for i in range(cfg.n_layer):
        for ours_name, hf_name in pairs.items():
            for p in ("weight", "bias"):
                ours[f"blocks.{i}.{ours_name}.{p}"] = t[f"encoder.layer.{i}.{hf_name}.{p}"]
    return build(Bert, cfg, ours, source)


def _missing_key_error(source, e: KeyError):
    return weights.WeightFileError(f"{source}: {e.args[0]!r} not found (a tensor, or a metadata key); is this the "
                                   f"right kind of checkpoint?")


# The linear projections of each decoder style, by attribute name: what LoRA can wrap in a block.
PROJECTIONS = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
               "gpt2": ("q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj")}


def decoder_style(path) -> str | None:
    """``"llama"`` or ``"gpt2"``, read from a decoder's metadata only (the GGUF header or config.json), so that a
    setting that needs the other architecture fails in seconds, before any training. None when the metadata
    names neither (or cannot be read): ``load_decoder`` then gives the precise error."""
    path = Path(path)
    try:
        if path.suffix == ".gguf":
            kind = weights.read_gguf_metadata(path).get("general.architecture")
        else:
            kind = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, weights.WeightFileError):
        return None
    return kind if kind in PROJECTIONS else None


def decoder_depth(path) -> int | None:
    """The number of blocks, read from a decoder's metadata only (as ``decoder_style``), so that a block index can
    be checked before any training. None when the metadata does not say (or cannot be read)."""
    path = Path(path)
    try:
        if path.suffix == ".gguf":
            metadata = weights.read_gguf_metadata(path)
            return int(metadata[f"{metadata['general.architecture']}.block_count"])
        config = json.loads((path / "config.json").read_text())
        return int(config["n_layer"] if "n_layer" in config else config["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError, weights.WeightFileError):
        return None


def load_decoder(path) -> tuple[GPT, dict]:
    """Build a ``GPT`` from a ``.gguf`` file or a Hugging Face-layout folder (GPT-2 or Llama).

    Returns the model and the file's metadata (GGUF key/values, or the folder's config.json)."""
    path = Path(path)
    try:
        if path.suffix == ".gguf":
            return gpt_from_gguf(path)
        config, t = _read_folder(path)
        kind = config.get("model_type")
        if kind == "gpt2":
            return gpt2_from_hf(config, t, str(path)), config
        if kind == "llama":
            return llama_from_hf(config, t, str(path)), config
    except KeyError as e:
        raise _missing_key_error(path, e) from None
    raise weights.WeightFileError(f"{path / 'config.json'}: model_type {kind!r} is not a supported student "
                                  f"(gpt2, llama)")


def load_encoder(path) -> tuple[Bert, dict]:
    """Build a ``Bert`` from a Hugging Face-layout folder; returns the model and its config.json."""
    path = Path(path)
    config, t = _read_folder(path)
    if config.get("model_type", "bert") != "bert":
        raise weights.WeightFileError(f"{path / 'config.json'}: model_type {config.get('model_type')!r} is not "
                                      f"a supported teacher (bert)")
    try:
        return bert_from_hf(config, t, str(path)), config
    except KeyError as e:
        raise _missing_key_error(path, e) from None


def load_student(name_or_path: str = registry.DEFAULT_STUDENT) -> tuple[GPT, tok.Tokenizer]:
    """Load a decoder LM and its tokenizer: a registry name (``smollm2-135m``, ``gpt2``, ...), a local
    ``.gguf`` file, or a folder with ``model.safetensors`` + ``config.json`` (GPT-2 or Llama).

    Weights are dequantized to float32. Returns ``(model, tokenizer)`` with the model in eval mode.
    The tokenizer comes from the GGUF itself, or from ``vocab.json`` + ``merges.txt`` in the folder.
    """
    path = Path(registry.resolve_student(name_or_path))
    model, meta = load_decoder(path)
    if path.suffix == ".gguf":
        tokenizer = tok.bpe_tokenizer_from_gguf(meta)
    elif model.cfg.style == "gpt2":
        tokenizer = tok.gpt2_tokenizer(path)
    else:
        raise weights.WeightFileError(f"{path}: a Llama-style folder has no tokenizer we can read; "
                                      f"use the GGUF file of the model instead")
    return model.eval(), tokenizer


def load_teacher(name_or_path: str = registry.DEFAULT_TEACHER) -> tuple[Bert, tok.Tokenizer]:
    """Load a BERT-style encoder and its WordPiece tokenizer: a registry name (``minilm-l6``,
    ``bert-base-uncased``) or a folder with ``model.safetensors``, ``config.json`` and ``vocab.txt``."""
    path = Path(registry.resolve_teacher(name_or_path))
    model, config = load_encoder(path)
    tokenizer = tok.wordpiece_tokenizer(path / "vocab.txt", lowercase=config.get("do_lower_case", True))
    return model.eval(), tokenizer


def _hello():
    """``python models.py``: load the default student and teacher, generate, compare two embeddings."""
    import time
    t0 = time.perf_counter()
    student, s_tok = load_student()
    t1 = time.perf_counter()
    teacher, t_tok = load_teacher()
    t2 = time.perf_counter()
    print(f"student {registry.DEFAULT_STUDENT}: {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters, "
          f"loaded in {t1 - t0:.1f} s; teacher {registry.DEFAULT_TEACHER}: loaded in {t2 - t1:.1f} s")
    prompt = "The capital of France is"
    ids = torch.tensor([s_tok.encode(prompt)])
    print("greedy:", repr(s_tok.decode(student.generate(ids, 20)[0].tolist())))
    sentences = ["a gripping, funny film", "an exciting and amusing movie", "the stock market fell sharply"]
    ids, mask = t_tok.encode_batch(sentences)
    with torch.inference_mode():
        h = teacher.hidden_states(ids, mask)                                            # (3, T, d)
        e = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)                   # mean over real tokens
        e = F.normalize(e, dim=-1)
    print(f"teacher cosine similarity: {sentences[0]!r} ~ {sentences[1]!r}: {float(e[0] @ e[1]):.3f}; "
          f"~ {sentences[2]!r}: {float(e[0] @ e[2]):.3f}")


if __name__ == "__main__":
    _hello()
