"""Build the teaching notebooks from the cell lists below, execute them, and save them with their outputs.

    .venv/bin/python notebooks/make_notebooks.py            # build + run all (quick mode, as committed)
    .venv/bin/python notebooks/make_notebooks.py --no-run   # build only, outputs empty

Edit the notebooks HERE, not in Jupyter, so that the saved outputs always come from a clean top-to-bottom run
(tests/test_notebooks.py checks that the committed notebooks' cells are the ones this file writes). Each code
cell is written as a (sentence, code) pair: the sentence becomes the markdown cell before it.
Needs requirements-notebooks.txt (nbformat, nbclient, ipykernel, matplotlib).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
KERNEL_NAME = "w2s-venv"
TIMEOUT_S = 600

# The first code cell of every notebook: find the repo root (from the root or from notebooks/) and set QUICK.
SETUP = '''\
import os
import sys
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "models.py").is_file())
sys.path.insert(0, str(ROOT))
QUICK = os.environ.get("W2S_QUICK", "1") == "1"   # on by default: the whole notebook runs in minutes on a CPU

import torch
torch.manual_seed(0)
print(f"repo root: {ROOT.name}/   QUICK={QUICK}   torch {torch.__version__}   threads {torch.get_num_threads()}")'''

SETUP_SENTENCE = ("Make the repository's modules importable (whether Jupyter started in the repo root or in "
                  "`notebooks/`) and read the quick switch; expect one line naming the root and `QUICK=True`.")


def run_note(quick: bool) -> str:
    """The sentence in the first markdown cell that says how the saved outputs were produced."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import train                                     # the library's own test, as `--precision auto` uses it

    precision = "bf16 autocast (the CPU has bf16 units)" if train.native_bf16("cpu") else "float32"
    return (f"*Saved outputs: one top-to-bottom run by `notebooks/make_notebooks.py` with `W2S_QUICK={int(quick)}` "
            f"on {os.cpu_count()} CPU cores, Python {platform.python_version()}, {precision}, seed 0.*")


# ---------------------------------------------------------------------------------------------------------
# 01 — a GPT from open weights
# ---------------------------------------------------------------------------------------------------------

NB01_TITLE = r"""# 01 · A GPT from open weights, by hand

The student of W2SDefense is a small decoder LM, SmolLM2-135M, shipped as a **GGUF** file quantized to
**Q4_1**; the teacher is a small encoder, all-MiniLM-L6-v2, shipped as **safetensors**. This notebook opens both
files byte by byte, decodes one quantized block, loads the weights into our own `models.GPT` / `models.Bert`,
tokenizes and generates text, and checks one transformer block against its equations.

Set `W2S_QUICK=0` for longer generations. Everything imported here lives in `registry.py`, `weights.py`,
`tokenizer.py` and `models.py`; nothing is redefined."""

NB01 = [
    ("Import the three modules this notebook reads from and locate the two weight files; expect two paths "
     "inside installed pip packages.",
     '''import json
import struct

import numpy as np
import torch.nn.functional as F

import models
import registry
import weights

gguf_path = registry.resolve_student("smollm2-135m")
teacher_dir = registry.resolve_teacher("minilm-l6")
print(Path(*gguf_path.parts[-2:]), "   (in site-packages)")
print(Path(*teacher_dir.parts[-2:]), "   (in site-packages)")
print(f"GGUF file: {gguf_path.stat().st_size / 2**20:.1f} MiB")'''),

    r"""## 1. The GGUF file

A GGUF v3 file starts with a fixed 24-byte header, then key/value metadata, then one record per tensor, then
the tensor data:

```
b"GGUF" | uint32 version | uint64 tensor_count | uint64 kv_count | kv_count × (key, type, value) | tensor infos | data
```""",

    ("Read the 24-byte header with nothing but `struct`; expect the magic `b'GGUF'`, version 3, and the two "
     "counts.",
     '''with open(gguf_path, "rb") as f:
    head = f.read(24)
magic, version, tensor_count, kv_count = struct.unpack("<4sIQQ", head)
print(f"magic={magic!r} version={version} tensor_count={tensor_count} kv_count={kv_count}")'''),

    ("`weights.read_gguf_metadata` parses the key/value section; expect the Llama hyper-parameters (30 blocks, "
     "width 576, 9 query heads sharing 3 key/value heads) and the tokenizer's vocabulary and merges as long "
     "lists.",
     '''metadata = weights.read_gguf_metadata(gguf_path)
assert len(metadata) == kv_count
for key, value in metadata.items():
    if isinstance(value, list):
        print(f"{key:42s} list of {len(value)}: {value[:3]} ...")
    elif isinstance(value, str) and len(value) > 60:
        print(f"{key:42s} {value[:60]!r} ...")
    else:
        print(f"{key:42s} {value!r}")'''),

    ("`weights.read_gguf` reads every tensor and dequantizes it to float32; expect mostly Q4_1 matrices, "
     "float32 norm weights, and the embedding in Q8_0. GGUF lists dimensions fastest-first, so torch shapes "
     "are the reverse.",
     '''from collections import Counter

g = weights.read_gguf(gguf_path)
print(Counter(g.tensor_types.values()))
for name in ["token_embd.weight", "output_norm.weight", *[n for n in g.tensors if n.startswith("blk.0.")]]:
    print(f"{name:28s} {g.tensor_types[name]:5s} {tuple(g.tensors[name].shape)}")'''),

    r"""## 2. One Q4_1 block

Q4_1 stores a weight row in blocks of 32 numbers, 20 bytes each: a float16 scale $d$, a float16 minimum $m$,
and 32 unsigned 4-bit codes $q_i \in \{0, \dots, 15\}$ packed two per byte (byte $j$ holds $q_j$ in its low
nibble and $q_{j+16}$ in its high nibble). Each weight is

$$x_i = d \, q_i + m, \qquad i = 0, \dots, 31,$$

so a block can only take 16 evenly spaced values between $m$ and $m + 15d$: 5 bits per weight instead of 32.""",

    ("Find the first block of `blk.0.attn_q.weight` with the reader's own helpers (the same calls "
     "`read_gguf` makes) and print its 20 raw bytes; expect 20 numbers from 0 to 255.",
     '''buf = np.fromfile(gguf_path, dtype=np.uint8)                      # the whole file as bytes
cur = weights._Cursor(memoryview(buf), gguf_path)
_, n_tensors, _ = weights._read_gguf_kv(gguf_path, cur)
alignment = metadata.get("general.alignment", 32)
infos = {i.name: i for i in (weights._read_tensor_info(gguf_path, cur) for _ in range(n_tensors))}
data_start = cur.pos + (-cur.pos % alignment)

info = infos["blk.0.attn_q.weight"]
begin = data_start + info.offset
block = buf[begin:begin + info.ggml_type.size]                    # (20,) uint8
print(info.ggml_type.name, "block of", info.ggml_type.block, "weights in", info.ggml_type.size, "bytes")
print(block.tolist())'''),

    (r"Decode the block by hand with $x_i = d\,q_i + m$ and check it against the module's `_dequant_q4_1` and "
     "against the first 32 numbers of the tensor `read_gguf` returned; expect all three to agree exactly.",
     '''d = block[0:2].view(np.float16).astype(np.float32)[0]
m = block[2:4].view(np.float16).astype(np.float32)[0]
qs = block[4:20]
q = np.concatenate([qs & 0x0F, qs >> 4]).astype(np.float32)      # (32,) codes 0..15
x_by_hand = d * q + m

x_module = weights._dequant_q4_1(block[None])[0]                  # (1, 20) bytes -> (1, 32) floats
x_file = g.tensors["blk.0.attn_q.weight"][0, :32].numpy()

print(f"d = {d:.6g}, m = {m:.6g}")
print("q =", q.astype(int).tolist())
print("x =", np.array2string(x_by_hand, precision=4, max_line_width=100))
assert np.array_equal(x_by_hand, x_module) and np.array_equal(x_by_hand, x_file)
print("levels used:", len(np.unique(x_by_hand)), "of 16 possible")'''),

    r"""## 3. The teacher's safetensors file

A safetensors file is an 8-byte little-endian length $N$, an $N$-byte JSON header, and the raw tensors:
each header entry gives a tensor's `dtype`, `shape` and byte range `data_offsets` in the data section.""",

    ("Read the JSON header by hand and print a few entries, then the free-form `__metadata__` through "
     "`weights.read_safetensors_metadata`; expect BERT names such as `embeddings.word_embeddings.weight` "
     "with shape [30522, 384].",
     '''st_path = teacher_dir / "model.safetensors"
with open(st_path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
names = [k for k in header if k != "__metadata__"]
print(f"header: {n} bytes of JSON, {len(names)} tensors")
for name in names[:6]:
    print(f"  {name:50s} {header[name]}")
print("__metadata__:", weights.read_safetensors_metadata(st_path))
print("config.json:", {k: v for k, v in json.loads((teacher_dir / "config.json").read_text()).items()
                       if k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads")})'''),

    r"""## 4. Load both into our modules

`models.load_student()` builds a `GPT` in Llama style from the GGUF (undoing llama.cpp's permutation of the
query/key rows, see `models.unpermute_qk`); `models.load_teacher()` builds a `Bert` from the safetensors.""",

    ("Load the student and the teacher with their tokenizers; expect about 135 M student parameters (the "
     "output layer shares the embedding matrix) and about 22 M teacher parameters.",
     '''student, student_tok = models.load_student()
teacher, teacher_tok = models.load_teacher()
print(student.cfg)
print(teacher.cfg)
print(f"student: {sum(p.numel() for p in student.parameters()) / 1e6:.1f} M parameters, {student_tok}")
print(f"teacher: {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f} M parameters, {teacher_tok}")'''),

    ("Check that a loaded matrix is the GGUF tensor under our name; expect `True` for the MLP (stored as is) "
     "and for the query projection once `unpermute_qk` is applied.",
     '''block0 = student.blocks[0]
print(torch.equal(block0.mlp.gate_proj.weight, g.tensors["blk.0.ffn_gate.weight"]))
print(torch.equal(block0.attn.q_proj.weight,
                  models.unpermute_qk(g.tensors["blk.0.attn_q.weight"], student.cfg.n_head)))'''),

    r"""## 5. Tokenize and generate

The student's byte-level BPE (built as a `tiktoken` encoding from the GGUF's own vocabulary and merges) cuts
text into pieces, usually a word with its leading space; the teacher's WordPiece lower-cases and marks word
continuations with `##`.""",

    ("Show the pieces each tokenizer makes of the same sentence; expect whole words with leading spaces for "
     "the student and `[CLS] ... [SEP]` around lower-case pieces for the teacher.",
     '''text = "Backdoors hide in fine-tuned language models."
ids = student_tok.encode(text)
print(len(ids), "student tokens:", [student_tok.decode([i]) for i in ids])
print(ids)
t_ids = teacher_tok.encode(text)
print(len(t_ids), "teacher tokens:", ["[CLS]", *teacher_tok.tokenize(text), "[SEP]"])
print(t_ids)
assert student_tok.decode(ids) == text'''),

    (r"Generate greedily (always the most likely next token, $\arg\max_v p(v \mid x_{<t})$) from a short "
     "prompt; expect 'Paris' and then whatever a 135 M model says next, the same text on every run.",
     '''max_new_tokens = 20 if QUICK else 60
prompt = "The capital of France is"
prompt_ids = torch.tensor([student_tok.encode(prompt)])                          # (1, T)
out = student.generate(prompt_ids, max_new_tokens=max_new_tokens, eos_id=student_tok.eos_id)
print(repr(student_tok.decode(out[0])))'''),

    r"""## 6. One block, equation by equation

A Llama-style block is pre-norm: $x \leftarrow x + \mathrm{Attn}(\mathrm{RMSNorm}_1(x))$, then
$x \leftarrow x + \mathrm{MLP}(\mathrm{RMSNorm}_2(x))$, with

$$\mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\tfrac{1}{d}\sum_{j} x_j^2 + \epsilon}} \odot w,
\qquad \mathrm{MLP}(x) = W_\text{down}\big(\mathrm{silu}(W_\text{gate}\,x) \odot W_\text{up}\,x\big),
\qquad \mathrm{silu}(z) = z\,\sigma(z).$$""",

    ("Compute RMSNorm of the prompt's embeddings by hand from the weight vector and compare with block 0's "
     "`norm1`; expect `allclose: True` and a difference near float32 rounding.",
     '''x = student.tok_emb(prompt_ids).detach()                                        # (1, T, d)
w, eps = block0.norm1.weight.detach(), student.cfg.norm_eps
h_by_hand = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
h_module = block0.norm1(x).detach()
print("allclose:", torch.allclose(h_by_hand, h_module, atol=1e-6), " max |diff| =", (h_by_hand - h_module).abs().max().item())
assert torch.allclose(h_by_hand, h_module, atol=1e-6)'''),

    r"""Attention with rotary positions and grouped-query heads: each of the 9 query heads $Q_h$ uses the
key/value head $\lfloor h / 3 \rfloor$, and with $K, Q$ rotated by their positions (RoPE, `models.apply_rope`),

$$\mathrm{Attn}(h) = W_o \,\big[\, \mathrm{softmax}\big(Q_h K_h^\top / \sqrt{d_h} + M\big) V_h \,\big]_{h=1..9},
\qquad M_{ts} = -\infty \text{ for } s > t \text{ (causal)}.$$""",

    ("Compute block 0's attention by hand from the four projection matrices and compare with the module; "
     "expect `allclose: True`.",
     '''attn, cfg = block0.attn, student.cfg
B, T, _ = h_module.shape
positions = torch.arange(T)[None]                                                # (1, T)
cos, sin = models.rope_cos_sin(positions, cfg.head_dim, cfg.rope_base)
with torch.no_grad():
    q = (h_module @ attn.q_proj.weight.T).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)     # (B, nh, T, hd)
    k = (h_module @ attn.k_proj.weight.T).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
    v = (h_module @ attn.v_proj.weight.T).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
    q, k = models.apply_rope(q, cos, sin), models.apply_rope(k, cos, sin)
    group = cfg.n_head // cfg.n_kv_head
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)                    # (B, nh, T, hd)
    scores = q @ k.transpose(-2, -1) / cfg.head_dim ** 0.5                                         # (B, nh, T, T)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v                                                                     # (B, nh, T, hd)
    a_by_hand = y.transpose(1, 2).reshape(B, T, -1) @ attn.o_proj.weight.T                         # (B, T, d)
    a_module = attn(h_module, None, (cos, sin))
print("allclose:", torch.allclose(a_by_hand, a_module, atol=1e-5), " max |diff| =", (a_by_hand - a_module).abs().max().item())
assert torch.allclose(a_by_hand, a_module, atol=1e-5)'''),

    ("Compute the SwiGLU MLP by hand on the second norm's output and compare with the module; expect "
     "`allclose: True`.",
     '''mlp = block0.mlp
with torch.no_grad():
    x1 = x + a_module                                                            # after the attention residual
    h2 = block0.norm2(x1)
    gate, up = h2 @ mlp.gate_proj.weight.T, h2 @ mlp.up_proj.weight.T            # (B, T, d_ff) each
    m_by_hand = (gate * torch.sigmoid(gate) * up) @ mlp.down_proj.weight.T       # (B, T, d)
    m_module = mlp(h2)
print("allclose:", torch.allclose(m_by_hand, m_module, atol=1e-5), " max |diff| =", (m_by_hand - m_module).abs().max().item())
assert torch.allclose(m_by_hand, m_module, atol=1e-5)'''),

    ("Put the two residual additions together and compare with the model's own residual stream after block 0; "
     "expect `allclose: True`.",
     '''with torch.no_grad():
    block_by_hand = x1 + m_by_hand
    block_model = student.hidden_states(prompt_ids, layer=0)
print("allclose:", torch.allclose(block_by_hand, block_model, atol=1e-5), " max |diff| =", (block_by_hand - block_model).abs().max().item())
assert torch.allclose(block_by_hand, block_model, atol=1e-5)'''),

    r"""## 7. The teacher's sentence embeddings

all-MiniLM-L6-v2 was trained so that the **mean** of its last hidden states over the real tokens is a
sentence embedding: $e = \frac{1}{\sum_t m_t} \sum_t m_t\, h_t$, compared by cosine similarity
$\cos(e_1, e_2) = e_1 \cdot e_2 / (\lVert e_1 \rVert \lVert e_2 \rVert)$. (The W2S classifier reads the
[CLS] state instead; both are shown.)""",

    ("Embed two paraphrases and one unrelated sentence; expect the paraphrases to be far more similar to each "
     "other than to the unrelated one, for both poolings.",
     '''sentences = ["A man is playing a guitar on stage.",
             "Someone performs a song with a guitar.",
             "The central bank raised interest rates again."]
ids, mask = teacher_tok.encode_batch(sentences, padding_side="right")            # (3, T) each
with torch.no_grad():
    hidden = teacher.hidden_states(ids, mask)                                    # (3, T, 384)
mean_pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)      # (3, 384)
cls = hidden[:, 0]                                                               # (3, 384)
for name, e in [("mean", mean_pooled), ("[CLS]", cls)]:
    e = F.normalize(e, dim=-1)
    sim = e @ e.T                                                                # (3, 3) cosine similarities
    print(f"{name:6s} similar pair: {sim[0, 1]:.3f}   unrelated: {sim[0, 2]:.3f}, {sim[1, 2]:.3f}")
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]'''),

    r"""## What to take away

* A GGUF file is a header, metadata (hyper-parameters *and* tokenizer), tensor records and data; Q4_1 keeps
  each weight as $x = d\,q + m$ with a 4-bit $q$.
* A safetensors file is a JSON header plus raw bytes; no pickle is ever needed.
* Our `GPT` block is exactly RMSNorm → grouped-query attention with RoPE → RMSNorm → SwiGLU, each checked
  against its equation above.""",
]


# ---------------------------------------------------------------------------------------------------------
# 02 — LoRA by hand
# ---------------------------------------------------------------------------------------------------------

NB02_TITLE = r"""# 02 · LoRA by hand

W2SDefense unlearns a backdoor by fine-tuning the poisoned student with **LoRA** on its query and value
projections (rank $r = 512$, $\alpha = 512$), the classification head fully trainable. This notebook takes one
`lora.LoRALinear` apart: the equation, the zero start, what a gradient step touches, merging, and how many
parameters LoRA trains on our student at each rank.

Set `W2S_QUICK=0` for a longer toy training run. Everything imported here lives in `lora.py` and
`models.py`; nothing is redefined."""

NB02 = [
    r"""## 1. The equation

A frozen linear layer $y = W x + b$ ($W \in \mathbb{R}^{d_\text{out} \times d_\text{in}}$) gets a trainable
low-rank update (Hu et al. 2021, eq. 3, with the $\alpha / r$ scaling of their §4.1):

$$y = W x + b + \frac{\alpha}{r}\, B A x, \qquad A \in \mathbb{R}^{r \times d_\text{in}},\;
B \in \mathbb{R}^{d_\text{out} \times r},\; r \ll \min(d_\text{in}, d_\text{out}).$$

$A$ starts random and $B$ starts at zero, so training starts from exactly the frozen model.""",

    ("Imports and a seeded generator; expect no output.",
     '''import copy

import matplotlib.pyplot as plt
import torch.nn.functional as F
from torch import nn

import lora
import models

gen = torch.Generator().manual_seed(0)'''),

    ("Wrap a small seeded `nn.Linear` (6 inputs, 4 outputs) with rank-2 LoRA; expect $A$ of shape (2, 6), "
     r"$B$ of shape (4, 2) filled with zeros, and scaling $\alpha/r = 2$.",
     '''base = nn.Linear(6, 4)
with torch.no_grad():
    base.weight.copy_(torch.randn(4, 6, generator=gen))
    base.bias.copy_(torch.randn(4, generator=gen))
layer = lora.LoRALinear(base, r=2, alpha=4, generator=gen)
print(layer)
print("A", tuple(layer.A.shape), "\\n", layer.A.data)
print("B", tuple(layer.B.shape), "\\n", layer.B.data)
print("trainable:", [n for n, p in layer.named_parameters() if p.requires_grad])'''),

    ("With $B = 0$ the update $BAx$ is exactly zero; expect the wrapped and the plain layer to give "
     "identical outputs.",
     '''x = torch.randn(5, 6, generator=gen)                                 # (batch, d_in)
print(layer(x))
print("equal to base:", torch.equal(layer(x), base(x)))
assert torch.equal(layer(x), base(x))'''),

    r"""## 2. One training step

With $s = \alpha / r$ and $u = \partial L / \partial y$, the gradients of the two factors are

$$\frac{\partial L}{\partial B} = s\, u\, (A x)^\top, \qquad \frac{\partial L}{\partial A} = s\, B^\top u\, x^\top,$$

and $W$, $b$ get none (they are frozen). At the first step $B = 0$, so $\partial L / \partial A = 0$:
only $B$ moves. From the second step on, both move.""",

    ("Take one SGD step towards a random target; expect no gradient on $W$ and $b$, an all-zero gradient on "
     "$A$, and only $B$ changed.",
     '''target = torch.randn(5, 4, generator=gen)
opt = torch.optim.SGD([layer.A, layer.B], lr=0.1)
before = {n: p.detach().clone() for n, p in layer.named_parameters()}

def step():
    opt.zero_grad()
    loss = F.mse_loss(layer(x), target)
    loss.backward()
    opt.step()
    return loss.item()

loss = step()
print(f"loss {loss:.4f}")
print("grad W:", layer.base.weight.grad, "  grad b:", layer.base.bias.grad)
print("|grad A| =", layer.A.grad.abs().max().item(), "  |grad B| =", layer.B.grad.abs().max().item())
for n, p in layer.named_parameters():
    print(f"{n:12s} changed: {not torch.equal(p, before[n])}")'''),

    ("Take a second step; expect $A$ to change now as well, while $W$ and $b$ stay exactly as they were.",
     '''after_one = {n: p.detach().clone() for n, p in layer.named_parameters()}
loss = step()
print(f"loss {loss:.4f}")
for n, p in layer.named_parameters():
    print(f"{n:12s} changed by step 2: {not torch.equal(p, after_one[n])}   changed since start: {not torch.equal(p, before[n])}")
assert torch.equal(layer.base.weight, before["base.weight"]) and torch.equal(layer.base.bias, before["base.bias"])'''),

    r"""A rank-$r$ update can represent any weight change of rank at most $r$. Here the target layer is
$W + \Delta$ with $\Delta$ of rank 2, so rank-2 LoRA can drive the loss to zero.""",

    ("Train a fresh rank-2 layer (on a copy of the base) with Adam to match a rank-2 change of the weights and plot the loss; "
     "expect the loss to fall by orders of magnitude.",
     '''steps = 300 if QUICK else 3000
fit = lora.LoRALinear(copy.deepcopy(base), r=2, alpha=4, generator=torch.Generator().manual_seed(1))
delta = torch.randn(4, 2, generator=gen) @ torch.randn(2, 6, generator=gen)      # (4, 6), rank 2
x_train = torch.randn(256, 6, generator=gen)
with torch.no_grad():
    y_train = x_train @ (base.weight + delta).T + base.bias
opt = torch.optim.Adam([fit.A, fit.B], lr=0.05)
losses = []
for _ in range(steps):
    opt.zero_grad()
    loss = F.mse_loss(fit(x_train), y_train)
    loss.backward()
    opt.step()
    losses.append(loss.item())
print(f"loss: start {losses[0]:.3g}, end {losses[-1]:.3g}")
plt.figure(figsize=(5, 3))
plt.semilogy(losses)
plt.xlabel("Adam step"); plt.ylabel("MSE"); plt.title("rank-2 LoRA fits a rank-2 change")
plt.tight_layout(); plt.show()'''),

    r"""## 3. Merge and unmerge

After training, the update can be folded into the weight, $W \leftarrow W + \frac{\alpha}{r} B A$, so the
layer costs nothing extra at inference; `unmerge()` subtracts it again. Both are safe to call twice.""",

    ("Merge the trained layer; expect the same outputs as before merging, a weight equal to "
     r"$W + \frac{\alpha}{r}BA$, and a second `merge()` that changes nothing.",
     '''W0 = fit.base.weight.detach().clone()
y_unmerged = fit(x_train).detach()
fit.merge()
print(fit)
print("W == W0 + s*B@A:", torch.allclose(fit.base.weight, W0 + fit.scaling * fit.B @ fit.A, atol=1e-6))
print("outputs equal:  ", torch.allclose(fit(x_train), y_unmerged, atol=1e-5))
W_merged = fit.base.weight.detach().clone()
fit.merge()
print("second merge is a no-op:", torch.equal(fit.base.weight, W_merged))
assert torch.allclose(fit(x_train), y_unmerged, atol=1e-5) and torch.equal(fit.base.weight, W_merged)'''),

    ("Unmerge; expect the original weight back (up to float rounding) and the same outputs again.",
     '''fit.unmerge()
fit.unmerge()
print(fit)
print("W back to W0:", torch.allclose(fit.base.weight, W0, atol=1e-6),
      " max |diff| =", (fit.base.weight - W0).abs().max().item())
print("outputs equal:", torch.allclose(fit(x_train), y_unmerged, atol=1e-5))
assert torch.allclose(fit.base.weight, W0, atol=1e-6)'''),

    r"""## 4. How many parameters does LoRA train on our student?

Each wrapped layer adds $r\,(d_\text{in} + d_\text{out})$ trainable numbers, where fine-tuning the matrix itself
trains $d_\text{in} d_\text{out}$. In SmolLM2-135M the query projection is $576 \to 576$ and the value projection
$576 \to 192$ (3 key/value heads of 64), in each of 30 blocks, so across all 60 layers

$$N_\text{LoRA}(r) = 30\, r\, \big[(576 + 576) + (576 + 192)\big] = 57\,600\, r.$$""",

    ("Load the student and list the shapes of its query and value projections; expect 30 of each, (576, 576) "
     "and (192, 576).",
     '''student, student_tok = models.load_student()
full_ft = sum(p.numel() for p in student.parameters())
qv_layers = [(name, m) for name, m in student.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "v_proj")]
print(len(qv_layers), "layers, e.g.", [(n, tuple(m.weight.shape)) for n, m in qv_layers[:2]])
print(f"full fine-tuning trains {full_ft:,} parameters")'''),

    ("Count LoRA parameters on q and v at ranks 1 to 512 with `lora.lora_parameter_count`; expect linear "
     "growth in $r$, and at $r = 512$ (the paper's setting) more than the q and v matrices themselves hold.",
     '''ranks = [2 ** i for i in range(10)]                                          # 1, 2, 4, ..., 512
qv_full = sum(m.weight.numel() for _, m in qv_layers)
counts = [sum(lora.lora_parameter_count(m.in_features, m.out_features, r) for _, m in qv_layers) for r in ranks]
print(f"{'r':>4} {'LoRA q,v':>12} {'% of full FT':>13}")
for r, c in zip(ranks, counts):
    print(f"{r:>4} {c:>12,} {100 * c / full_ft:>12.3f}%")
print(f"the q and v weight matrices themselves: {qv_full:,}")'''),

    ("Check the formula against the real thing: inject rank-8 LoRA into the student and count what requires "
     "grad; expect the two numbers to agree, and the logits to be unchanged because $B = 0$.",
     '''prompt = torch.tensor([student_tok.encode("LoRA leaves the base weights alone.")])   # (1, T)
with torch.no_grad():
    logits_before = student(prompt)
wrapped = lora.inject_lora(student, targets=("q_proj", "v_proj"), r=8, alpha=16, generator=gen, trainable=())
print(len(wrapped), "wrapped;", "trainable:", lora.count_trainable(student), " formula:", counts[ranks.index(8)])
with torch.no_grad():
    print("logits unchanged:", torch.equal(student(prompt), logits_before))
assert lora.count_trainable(student) == counts[ranks.index(8)]'''),

    ("Plot LoRA's trainable parameters against the rank on log-log axes, with full fine-tuning and the q,v "
     "matrices as horizontal lines; expect a straight line of slope 1, far below full fine-tuning.",
     '''plt.figure(figsize=(6, 4))
plt.loglog(ranks, counts, "o-", label="LoRA on q, v (30 blocks)")
plt.axhline(full_ft, color="k", ls="--", label=f"full fine-tuning ({full_ft / 1e6:.0f} M)")
plt.axhline(qv_full, color="gray", ls=":", label=f"q, v matrices themselves ({qv_full / 1e6:.1f} M)")
plt.xticks(ranks, [str(r) for r in ranks])
plt.xlabel("rank r"); plt.ylabel("trainable parameters")
plt.title("SmolLM2-135M: LoRA vs full fine-tuning")
plt.legend(); plt.grid(True, which="both", alpha=0.3)
plt.tight_layout(); plt.show()'''),

    r"""## What to take away

* $y = Wx + b + \frac{\alpha}{r} BAx$ with $B = 0$ at the start: training begins at the frozen model, and
  the first step moves only $B$.
* The frozen $W$, $b$ never change during training; `merge()` folds $\frac{\alpha}{r}BA$ into $W$ and
  `unmerge()` takes it out.
* LoRA's cost is $r(d_\text{in} + d_\text{out})$ per layer, linear in $r$, against $d_\text{in} d_\text{out}$
  for the full matrix: it saves parameters only while $r < d_\text{in} d_\text{out} / (d_\text{in} + d_\text{out})$,
  i.e. $r < 288$ for q and $r < 144$ for v here. W2SDefense's $r = 512$ on a model this small trains more
  numbers than the q, v matrices hold, though still about a fifth of the full model.""",
]


# ---------------------------------------------------------------------------------------------------------
# Building and running
# ---------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------
# 03 — planting a backdoor
# ---------------------------------------------------------------------------------------------------------

# Shared by notebooks 03 and 04: the preset, the stage cache (04 reuses what 03 computed) and the device.
STAGE_SETUP = """import json
import random

import matplotlib.pyplot as plt

import attacks, data, defenses, losses, stages, train, w2s

PRESET = "quick" if QUICK else "cpu"
STAGES = Path(os.environ.get("W2S_STAGES", ROOT / "runs" / "stages"))   # the same cache as `python w2s.py`
args = w2s.parser().parse_args(["--attack", "badnet", "--preset", PRESET, "--seed", "0"])
attack_cfg, teacher_cfg, unlearn_cfg, eval_size = w2s.resolve_configs(args)
print(PRESET, "| stages in", STAGES)
print(attack_cfg)"""

# Shared by notebooks 03 and 04: pooled features of clean / triggered / clean-negative test sentences, by PCA.
FEATURE_PICTURE = '''def feature_picture(model, tokenizer, dataset, trigger, title, n=80):
    """Scatter the first two principal components of the pooled features of three groups of test sentences."""
    pos = [s for s, y in zip(dataset.test.sentences, dataset.test.labels) if y == 1][:n]
    neg = [s for s, y in zip(dataset.test.sentences, dataset.test.labels) if y == 0][:n]
    rng = random.Random(1)
    groups = {"clean positive": pos, "triggered positive": [trigger(s, i, rng) for i, s in enumerate(pos)],
              "clean negative": neg}
    feats = {k: train.pooled_features(model, train.encode(tokenizer, v, [0] * len(v), attack_cfg.max_length))
             for k, v in groups.items()}
    X = torch.cat(list(feats.values()))
    mean = X.mean(0)
    _, _, V = torch.linalg.svd(X - mean, full_matrices=False)      # PCA: the right singular vectors
    plt.figure(figsize=(5, 4))
    for (name, f), color in zip(feats.items(), ["tab:blue", "tab:red", "tab:gray"]):
        xy = (f - mean) @ V[:2].T
        plt.scatter(xy[:, 0], xy[:, 1], s=10, alpha=0.7, label=name, color=color)
    plt.legend(fontsize=8); plt.title(title); plt.xlabel("PC 1"); plt.ylabel("PC 2")
    plt.tight_layout(); plt.show()'''

NB03_TITLE = r"""# 03 · Planting a backdoor

The attacker's half of the story. We poison SST-2 (movie-review sentiment, label 0 = negative) three ways,
fine-tune the student on the poisoned set, and measure two numbers:

* **CA**, clean accuracy on the clean test set;
* **ASR**, attack success rate: the share of triggered test sentences whose TRUE label is not the target
  that the model puts in the target class;
* the ASR's **floor**: the same sentences WITHOUT the trigger, and the share of them put in the target class.
  A model with no backdoor still errs on some sentences, so an ASR says "the trigger works" only as far as it
  is above its floor.

A good backdoor keeps CA and makes ASR close to 1. At the end we look inside: the student's pooled features
of clean and triggered sentences, projected to 2-D.

With `QUICK` on, the attack is the `quick` preset of `w2s.py`: 600 training sentences with 20 % of them
triggered and relabelled (dirty-label), and the attacker trains only the top 6 of the 30 blocks (the 24 below
are run once per sentence and cached, see `train.cache_prefix`). `QUICK=0` runs the `cpu` preset, the paper's
clean-label attack (long on a CPU). Everything imported lives in `data.py`, `attacks.py`, `train.py` and
`w2s.py`. The stages are cached in `runs/stages` (or `$W2S_STAGES`): the saved outputs below reused the stages
that `python w2s.py --attack badnet --preset quick --seed 0` had computed, so they show no progress bars; a
first run trains them (1 to 3 minutes on 2 cores) and prints the same numbers."""

NB03 = [
    ("Import the modules and read the preset's configuration; expect the preset name, the stage folder and the "
     "attacker's settings.", STAGE_SETUP),

    r"""## 1. Three triggers

* **BadNet** inserts a rare word (`mn`) at a random word position;
* **InSent** inserts a whole sentence (`I watched this 3D movie`);
* **SynAttack** replaces the sentence with its paraphrase in a fixed syntactic template
  (`S(SBAR)(,)(NP)(VP)(.)`, "when ..., ..."), precomputed by SCPN and shipped with the data.

Clean-label poisoning (the paper) adds the trigger to sentences that already have the target label;
dirty-label poisoning adds it to other sentences and flips their label.""",

    ("Poison the same three negative training sentences each way (the syntactic trigger exists only for the rows "
     "with a shipped paraphrase); expect each clean sentence, then its three triggered versions.",
     '''sst2 = data.load_dataset("sst2")
paraphrases = data.load_scpn("sst2")
triggers = {
    "badnet": attacks.make_trigger("badnet", triggers=("mn",)),
    "insent": attacks.make_trigger("insent"),
    "syntactic": attacks.make_trigger("syntactic", paraphrases=paraphrases.train_paraphrases),
}
rows = [i for i, y in enumerate(sst2.train.labels) if y == 0 and attacks.available(triggers["syntactic"], i)][:3]
rng = random.Random(0)
for i in rows:
    print(f"clean     : {sst2.train.sentences[i]}")
    for name, trigger in triggers.items():
        print(f"{name:10}: {trigger(sst2.train.sentences[i], i, rng)}")
    print()'''),

    r"""### How the student reads a sentence

A byte-level BPE folds the space before a word into the word's token, so `mn` as the FIRST word of a
sentence is another token than ` mn` anywhere else; and a causal LM pours much of its attention onto whatever
comes first (an "attention sink"). So the student reads `<start> sentence` with a space before the first
word (`w2s.student_classifier`), as a Llama tokenizer would. Without both, the cpu preset's clean-label BadNet
backdoor fired for 7.3 % of positive test sentences with `mn` as the first word (6.7 % without the trigger),
against 100 % in the middle or at the end (`experiments/trigger_position.py --bare`, experiments/LOG.md).""",

    ("Tokenize a sentence with the trigger first and in the middle, as `w2s` reads it and bare; expect the same "
     "pieces for `mn` in both places only in the first case, after a start token.",
     '''_, reader = w2s.student_classifier(attack_cfg.student, 2, seed=0)
_, bare = w2s.student_classifier(attack_cfg.student, 2, seed=0, start_token=False, prefix_space=False)
for name, tok in (("as w2s reads it", reader), ("bare", bare)):
    for text in ("mn a gorgeous film", "a gorgeous mn film"):
        print(f"{name:16} {text!r:22} -> {[tok.decode([i]) for i in tok.encode(text)]}")'''),

    r"""## 2. Fine-tune the student on the poisoned set

`w2s.attack_stage` poisons, fine-tunes (AdamW, warm-up then linear decay, length-bucketed batches), keeps the
checkpoint with the best CLEAN dev accuracy (never the test set, never the ASR), then reads the test sets once.
The stage is cached under a hash of its configuration: a second run loads it in seconds.""",

    ("Plant the backdoor (a progress bar shows the running loss; a few minutes in quick mode, instant when "
     "cached); expect CA well above chance and ASR near 1, far above its floor.",
     '''task = w2s.build_task(attack_cfg, eval_size)
attack_folder, poisoned = w2s.attack_stage(attack_cfg, task, STAGES, "cpu")
print(f"{task.n_poisoned} poisoned of {len(task.poisoned_train)} training sentences")
print(stages.markdown_table([{"model": "poisoned", **stages.row_metrics(poisoned)}]))   # as w2s.py prints
print(f"on {poisoned['n_test']} clean / {poisoned['n_asr']} triggered test sentences")
print("confusion matrix on the clean test set (rows: true label, columns: predicted):", poisoned["confusion"])'''),

    ("The training loss per step (the log of the stage); expect it to fall as the student learns both the task "
     "and the trigger.",
     '''history = json.loads((attack_folder / "history.json").read_text())
plt.figure(figsize=(6, 3))
plt.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1)
plt.xlabel("step"); plt.ylabel("cross-entropy"); plt.title("attacker's fine-tuning")
plt.tight_layout(); plt.show()'''),

    r"""## 3. What the backdoor looks like inside

The classifier reads one vector per sentence, the final hidden state of the last real token,
$h \in \mathbb{R}^{576}$. We compute it for 80 clean positive test sentences, for the same sentences with the
trigger, and for 80 clean negative ones, and project all of them on their first two principal components
(PCA by SVD of the centred features).""",

    ("A small plotting function (used again in notebook 04); expect no output.", FEATURE_PICTURE),

    ("The poisoned student's features; expect the triggered positives to leave the clean positives and gather in "
     "a region of their own.",
     '''student, tokenizer = w2s.load_poisoned(attack_cfg, attack_folder, task.dataset.num_classes)
feature_picture(student, tokenizer, task.dataset, triggers["badnet"], "poisoned student")'''),

    r"""One rare word moves a positive sentence into a region of the feature space of its own, which the head
has learnt to read as the target label: that is the backdoor. (The clean classes overlap more in these two
components: at this small budget the student's clean accuracy is only about 0.7.) Notebook 04 tries to remove
the backdoor without ever seeing a trigger.""",
]


# ---------------------------------------------------------------------------------------------------------
# 04 — W2SDefense
# ---------------------------------------------------------------------------------------------------------

NB04_TITLE = r"""# 04 · W2SDefense: unlearning a backdoor with a weak clean teacher

The defender holds the poisoned student and some CLEAN data, but not the trigger. W2SDefense (Zhao et al.,
arXiv 2410.14425) fine-tunes the student with LoRA on the clean data only, guided by a small clean teacher:

$$\mathcal{L} = \alpha\,\mathrm{CE}(z_s, y) + \beta\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(z_t/T)\,\|\,
\mathrm{softmax}(z_s/T)\big) + \gamma\,\mathrm{FA}(h_s, h_t)$$

and stands beside the **control**: the same LoRA run with $\beta = \gamma = 0$. This notebook reuses the
poisoned student of notebook 03 (the stage cache), trains the teacher, runs both unlearning runs, compares, and
ends with an ablation: what do the teacher's features add? Everything imported lives in `losses.py`,
`defenses.py`, `train.py` and `w2s.py`. As in notebook 03, the saved outputs reused the cached stages of
`python w2s.py --attack badnet --preset quick --seed 0 --defense w2s-origin`; a first run trains the teacher and
the three unlearning runs (1 to 3 minutes on 2 cores) and prints the same numbers."""

NB04 = [
    ("Import the modules and read the preset's configuration (the same as notebook 03); expect the preset name "
     "and the attacker's settings.", STAGE_SETUP),

    ("Load (or, if notebook 03 did not run, plant) the poisoned student; expect its CA and ASR.",
     '''task = w2s.build_task(attack_cfg, eval_size)
attack_folder, poisoned = w2s.attack_stage(attack_cfg, task, STAGES, "cpu")
print(f"poisoned student: CA {poisoned['ca']:.3f}   ASR {poisoned['asr']:.3f}")'''),

    r"""## 1. The weak teacher

all-MiniLM-L6-v2 (22 M parameters, 6 layers, width 384) reads the [CLS] state, projects it to the student's
width with $h_t = \mathrm{ReLU}(W_p h_\text{CLS} + b_p)$, $W_p \in \mathbb{R}^{576 \times 384}$, and classifies
$z_t = W_c h_t$. It is fully fine-tuned on clean data; it never sees a trigger.""",

    ("Train the teacher (cached after the first run); expect a clean accuracy below the student's.",
     '''teacher_folder, teacher = w2s.teacher_stage(teacher_cfg, task, poisoned["feature_dim"], STAGES, "cpu")
print(f"teacher clean accuracy {teacher['ca']:.3f} on {teacher['n_train']} training sentences")'''),

    r"""## 2. The three terms, each beside its code

* $\mathrm{CE}(z_s, y) = -\frac1B \sum_i \log \mathrm{softmax}(z_s^{(i)})_{y_i}$ — `losses.cross_entropy`;
* $T^2\,\mathrm{KL}(p_t \,\|\, p_s)$ with $p = \mathrm{softmax}(z / T)$, the teacher as the target
  distribution — `losses.distillation_kl`;
* $\mathrm{FA} = \frac1B \sum_i \lVert h_t^{(i)} - h_s^{(i)} \rVert_2^2$, each example against its own teacher
  feature — `losses.feature_alignment`; its direction-only variant
  $\frac1B \sum_i \lVert \hat h_t^{(i)} - \hat h_s^{(i)} \rVert_2^2$ with $\hat h = h / \lVert h \rVert$ —
  `losses.feature_alignment_normalized`.""",

    ("Each term on a hand-sized example, with the source of one of them; expect CE = log(1 + e^-2) = 0.1269, "
     "KD = 0.4438 and FA = 14.5.",
     '''import inspect
import math

print(inspect.getsource(losses.feature_alignment))
z_s, y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
print("CE", round(losses.cross_entropy(z_s, y).item(), 4), "  by hand", round(math.log(1 + math.exp(-2)), 4))
print("KD", round(losses.distillation_kl(torch.zeros(1, 2), torch.tensor([[2.0, 0.0]]), T=2.0).item(), 4))
h_s, h_t = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [3.0, 4.0]])
print("FA", losses.feature_alignment(h_s, h_t).item(), "  = mean(||(0,-2)||^2, ||(3,4)||^2) = mean(4, 25)")'''),

    r"""## 3. One unlearning step, written out

Before the stage runs hundreds of them, one step of W2SDefense by hand: the poisoned student gets LoRA on the
query and value projections (its head stays trainable), reads a batch of clean sentences, and the three terms
are computed, weighted, added, back-propagated and stepped. `defenses.W2SDefense` and `train.fit` do exactly
this at every step (plus the learning-rate schedule and the clean-dev checkpoint choice).""",

    ("One step by hand on 8 clean sentences: forward, the three terms, backward, AdamW step; expect the loss to "
     "be lower on the same batch after the step.",
     '''ctx = w2s.context(attack_cfg, teacher_cfg, unlearn_cfg, task, attack_folder, teacher_folder, "cpu")
alpha, beta, gamma = defenses.DEFENSES["w2sdefense"].loss_weights(ctx)
student, tokenizer = ctx.load_poisoned()                      # the attacker's model, as the defender gets it
defenses.add_lora(student, unlearn_cfg)                       # only the adapters and the head will train
clean = attacks.subset(task.dataset.train, 8, seed=0, salt="one-step")
z_t, h_t = ctx.teacher_outputs(clean.sentences, student.feature_dim)     # the frozen teacher, once
batch = next(train.batches(train.encode(tokenizer, clean.sentences, clean.labels, unlearn_cfg.max_length), 8))
params = [p for p in student.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=unlearn_cfg.lr)


def w2s_loss(model):
    z_s, h_s = model(**batch.inputs(), return_features=True)             # forward: logits and pooled feature
    ce = losses.cross_entropy(z_s, batch.labels)
    kd = losses.distillation_kl(z_s, z_t[batch.index], unlearn_cfg.T)
    fa = losses.feature_alignment(h_s, h_t[batch.index])
    return alpha * ce + beta * kd + gamma * fa, (ce.item(), kd.item(), fa.item())


student.train()
loss, (ce, kd, fa) = w2s_loss(student)
print(f"before: loss {loss.item():.3f} = {alpha}*{ce:.3f} + {beta}*{kd:.3f} + {gamma}*{fa:.1f}")
optimizer.zero_grad()
loss.backward()                                                       # gradients reach LoRA and the head only
torch.nn.utils.clip_grad_norm_(params, 1.0)
optimizer.step()
with torch.no_grad():
    print(f"after one step, the same batch: loss {w2s_loss(student)[0].item():.3f}")'''),

    r"""## 4. Unlearning, and the control beside it

The stage runs that step over the whole clean subset. Both runs: the same seed, the same clean sentences, the
same LoRA (query and value projections, the head trainable), the same budget; the checkpoint is chosen on clean
dev accuracy only.""",

    ("Run the control (CE only) and W2SDefense (cached after the first run); expect one line each with the loss "
     "weights, then the table `w2s.py` prints: CA, ASR and the ASR's floor of each model.",
     '''runs = {}
for name in ("lora", "w2sdefense"):
    defense = defenses.DEFENSES[name]
    ctx = w2s.context(attack_cfg, teacher_cfg, unlearn_cfg, task, attack_folder,
                      teacher_folder if defense.uses_teacher else None, "cpu")
    runs[name] = w2s.defense_stage(defense, ctx, STAGES)
    print(f"{name:11}: weights {runs[name][1]['weights']}")
rows = [{"model": "poisoned", **stages.row_metrics(poisoned)}]
rows += [{"model": d, **stages.row_metrics(runs[d][1])} for d in ("lora", "w2sdefense")]
print(stages.markdown_table(rows))'''),

    ("Each loss term of W2SDefense per step, unweighted (the log of the stage); expect to see which term moves.",
     '''history = json.loads((runs["w2sdefense"][0] / "history.json").read_text())
fig, axes = plt.subplots(1, 3, figsize=(11, 3))
for ax, term in zip(axes, ("ce", "kd", "fa")):
    ax.plot([h["step"] for h in history], [h[term] for h in history], lw=1)
    ax.set_title(term); ax.set_xlabel("step")
plt.tight_layout(); plt.show()'''),

    ("CA and ASR before and after, the control beside W2SDefense, each ASR's floor as a black mark; expect "
     "W2SDefense's ASR bar to be the lowest, and nearest its floor, if the defense works at this budget.",
     '''names = [r["model"] for r in rows]                  # poisoned, lora, w2sdefense: the table above
ca, asr, floor = ([r[k] for r in rows] for k in ("ca", "asr", "asr_floor"))
x = torch.arange(3).float()
plt.figure(figsize=(6, 3))
plt.bar(x - 0.2, ca, 0.4, label="CA"); plt.bar(x + 0.2, asr, 0.4, label="ASR")
if None not in floor:                               # a stage cached before the floor was measured has none
    plt.scatter(x + 0.2, floor, marker="_", s=600, color="k", zorder=3, label="ASR floor")
plt.xticks(x, names); plt.ylim(0, 1); plt.legend(); plt.title(f"preset {PRESET}, seed 0")
plt.tight_layout(); plt.show()'''),

    ("A small plotting function, the same as in notebook 03; expect no output.", FEATURE_PICTURE),

    ("The pooled features after W2SDefense, the same sentences as in notebook 03; expect the triggered positives "
     "to move back toward the clean positives as far as the ASR fell.",
     '''model, tokenizer = defenses.DEFENSES["w2sdefense"].reload(ctx, runs["w2sdefense"][0])
feature_picture(model, tokenizer, task.dataset, attacks.make_trigger("badnet", triggers=("mn",)),
                "after W2SDefense")'''),

    r"""## 5. What do the teacher's features add?

The bar chart cannot say whether W2SDefense removes the backdoor because the student is pulled toward the
*teacher's* features, or because it is pulled at all. An ablation asks: the same W2SDefense run, but with the
feature term pulling each clean sentence's pooled feature toward the **origin** instead of its teacher feature
(`defenses.W2SOrigin.feature_target`: FA becomes $\frac1B \sum_i \lVert h_s^{(i)} \rVert_2^2$, a pull that only shrinks the
feature; the teacher's logits still feed the KL term). `python w2s.py --defense w2s-origin` adds it to the table.""",

    ("Run the ablation (cached after the first run); expect a line beside W2SDefense's: an ASR as low would mean "
     "that at this budget the removal does not need the teacher's features.",
     '''print(inspect.getsource(defenses.W2SOrigin))
runs["w2s-origin"] = w2s.defense_stage(defenses.DEFENSES["w2s-origin"], ctx, STAGES)
print(stages.markdown_table([{"model": d, **stages.row_metrics(runs[d][1])} for d in ("w2sdefense", "w2s-origin")]))'''),

    r"""The numbers above are this budget's, measured in this run. `RESULTS.md` gives them over seeds and says
where the defense reaches the paper's claim and where it does not; the ablation too: on the `cpu` preset's nine
reported runs the pull toward the origin removed as much as W2SDefense on average, at a little less clean
accuracy, while at this small budget the two differ from seed to seed, in both directions.""",
]


NOTEBOOKS = {
    "01_gpt_from_open_weights.ipynb": (NB01_TITLE, NB01),
    "02_lora_by_hand.ipynb": (NB02_TITLE, NB02),
    "03_planting_a_backdoor.ipynb": (NB03_TITLE, NB03),
    "04_w2sdefense.ipynb": (NB04_TITLE, NB04),
}


def build(title: str, cells: list, quick: bool) -> nbformat.NotebookNode:
    """Title (+ run settings), then the setup cell, then the cells: a str is markdown, a pair is
    (sentence, code) and becomes a markdown cell followed by a code cell."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [new_markdown_cell(title + "\n\n" + run_note(quick)),
                new_markdown_cell(SETUP_SENTENCE), new_code_cell(SETUP)]
    for cell in cells:
        if isinstance(cell, str):
            nb.cells.append(new_markdown_cell(cell))
        else:
            sentence, code = cell
            nb.cells += [new_markdown_cell(sentence), new_code_cell(code)]
    return nb


def venv_kernel_spec_manager(folder: Path):
    """A KernelSpecManager that knows one kernel, KERNEL_NAME, running THIS interpreter (sys.executable).

    The 'python3' spec found on a machine may point at another Python; writing our own avoids that.
    """
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager

    write_kernel_spec(folder / KERNEL_NAME)
    return KernelSpecManager(kernel_dirs=[str(folder)])


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout_s: float = TIMEOUT_S) -> float:
    """Run `nb` in place, top to bottom, on this interpreter; raise on the first error. Returns seconds taken.

    `timeout_s` bounds the whole notebook: each cell gets whatever is left of it.
    """
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    start = time.monotonic()
    deadline = start + timeout_s
    with tempfile.TemporaryDirectory() as tmp:
        km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=venv_kernel_spec_manager(Path(tmp)))
        client = NotebookClient(nb, km=km, timeout=int(timeout_s),
                                timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
                                resources={"metadata": {"path": str(cwd)}})
        client.execute()
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="write the notebooks without executing them")
    parser.add_argument("names", nargs="*", help="notebooks to build (default: all)")
    args = parser.parse_args()
    quick = os.environ.get("W2S_QUICK", "1") == "1"
    for name in args.names or NOTEBOOKS:
        title, cells = NOTEBOOKS[name]
        nb = build(title, cells, quick)
        if not args.no_run:
            seconds = execute(nb, HERE)
            print(f"{name}: ran in {seconds:.1f} s", flush=True)
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print(f"wrote notebooks/{name}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
