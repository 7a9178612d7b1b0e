"""Tests for lora.py on tiny seeded modules (no weights, no download)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora import (
    LoRALinear,
    count_trainable,
    inject_lora,
    load_lora,
    load_lora_state_dict,
    lora_parameter_count,
    lora_state_dict,
    merge_lora,
    save_lora,
    unmerge_lora,
)


class ToyAttention(nn.Module):
    """Attention-shaped toy with unequal in/out sizes, so a swapped (in, out) shows up in shapes and counts."""

    def __init__(self, d: int = 6, d_qk: int = 4, d_v: int = 5) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d_qk)
        self.k_proj = nn.Linear(d, d_qk)
        self.v_proj = nn.Linear(d, d_v)
        self.o_proj = nn.Linear(d_v, d)

    def forward(self, x):  # x: (B, T, d)
        scores = self.q_proj(x) @ self.k_proj(x).transpose(1, 2)  # (B, T, T)
        return self.o_proj(scores.softmax(-1) @ self.v_proj(x))  # (B, T, d_v) -> (B, T, d)


class ToyModel(nn.Module):
    def __init__(self, d: int = 6, n_layers: int = 2, n_classes: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": ToyAttention(d), "norm": nn.LayerNorm(d)})
                                    for _ in range(n_layers))
        self.head = nn.Linear(d, n_classes)

    def forward(self, x):  # x: (B, T, d)
        for block in self.blocks:
            x = block["norm"](x + block["attn"](x))
        return self.head(x[:, -1])  # (B, n_classes)


def make_model(seed: int = 0) -> ToyModel:
    torch.manual_seed(seed)
    return ToyModel()


def make_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(seed))  # (B, T, d)


def train_steps(model, n_steps: int = 2, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    # The optimizer sees EVERY parameter: freezing alone must keep the base fixed.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(n_steps):
        x = torch.randn(3, 4, 6, generator=g)
        y = torch.randint(0, 3, (3,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_b_zero_gives_base_output_exactly():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    x = make_input()
    expected = base(x)
    wrapped = LoRALinear(base, r=3, alpha=6, generator=torch.Generator().manual_seed(0))
    assert torch.all(wrapped.B == 0) and wrapped.A.abs().sum() > 0
    assert torch.equal(wrapped(x), expected)

    model, reference = make_model(), make_model()
    inject_lora(model, r=2, alpha=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(x), reference(x))


def test_shapes_init_and_generator():
    base = nn.Linear(6, 5)
    w1 = LoRALinear(base, r=3, alpha=3, generator=torch.Generator().manual_seed(7))
    w2 = LoRALinear(nn.Linear(6, 5), r=3, alpha=3, generator=torch.Generator().manual_seed(7))
    assert w1.A.shape == (3, 6) and w1.B.shape == (5, 3)  # A: (r, in), B: (out, r)
    assert torch.equal(w1.A, w2.A)  # same seed, same A
    bound = 1 / 6**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in = 6: U(-1/sqrt(in), 1/sqrt(in))
    assert w1.A.abs().max() <= bound
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert w1.A.requires_grad and w1.B.requires_grad


def test_scaling_is_alpha_over_r_hand_computed():
    base = nn.Linear(2, 1)
    with torch.no_grad():
        base.weight.zero_()
        base.bias.zero_()
    w = LoRALinear(base, r=2, alpha=4)
    with torch.no_grad():
        w.A.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        w.B.copy_(torch.tensor([[1.0, 1.0]]))
    assert w.scaling == 2.0
    # B A x = [1, 1] . [1, 2] = 3; scaled by alpha / r = 2 -> 6 (scaling by alpha alone would give 12).
    assert torch.equal(w(torch.tensor([[1.0, 2.0]])), torch.tensor([[6.0]]))


def test_merge_hand_computed_idempotent_and_reversible():
    base = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    W0 = base.weight.detach().clone()
    w = LoRALinear(base, r=1, alpha=2)  # scaling 2
    with torch.no_grad():
        w.A.copy_(torch.tensor([[1.0, 2.0, 3.0]]))  # (r=1, in=3)
        w.B.copy_(torch.tensor([[1.0], [-1.0]]))  # (out=2, r=1)
    x = torch.tensor([[1.0, -1.0, 0.5], [2.0, 0.0, 1.0]])
    y_unmerged = w(x)

    w.merge()
    # W + 2 * [[1, 2, 3], [-1, -2, -3]]
    expected = torch.tensor([[3.0, 4.0, 6.0], [-2.0, -3.0, -6.0]])
    assert w.merged
    assert torch.equal(base.weight, expected)
    assert torch.allclose(w(x), y_unmerged, atol=1e-6)
    assert torch.allclose(w(x), base(x))  # merged forward is the base alone

    w.merge()
    assert torch.equal(base.weight, expected)  # merge twice = merge once

    w.unmerge()
    assert not w.merged
    assert torch.allclose(base.weight, W0, atol=1e-6)
    w.unmerge()
    assert torch.allclose(base.weight, W0, atol=1e-6)  # unmerge twice = unmerge once
    assert torch.equal(w(x), y_unmerged)


def test_merge_lora_on_trained_model():
    model = make_model()
    inject_lora(model, r=2, alpha=4, generator=torch.Generator().manual_seed(0))
    train_steps(model)
    model.eval()
    x = make_input()
    y = model(x)
    W0 = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base.weight")}
    merge_lora(model)
    for name, p in model.named_parameters():
        if name in W0:
            wrapper = model.get_submodule(name.removesuffix(".base.weight"))
            assert torch.allclose(p, W0[name] + wrapper.scaling * wrapper.B @ wrapper.A, atol=1e-6)
    assert torch.allclose(model(x), y, atol=1e-6)
    unmerge_lora(model)
    for name, p in model.named_parameters():
        if name in W0:
            assert torch.allclose(p, W0[name], atol=1e-6)


def test_optimizer_step_changes_only_lora_and_head():
    model = make_model()
    wrapped = inject_lora(model, r=2, alpha=4, generator=torch.Generator().manual_seed(0))
    assert wrapped == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj",
                       "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    assert isinstance(model.blocks[1]["attn"].v_proj, LoRALinear)
    assert isinstance(model.blocks[1]["attn"].k_proj, nn.Linear)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model)  # two steps: with B = 0 the first step gives A no gradient
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{ab}" for m in wrapped for ab in ("A", "B")} | {"head.weight", "head.bias"}
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} should have been trained"
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"


def test_trainable_count_matches_formula():
    model = make_model()
    r = 2
    wrapped = inject_lora(model, r=r, alpha=4)
    expected = sum(lora_parameter_count(model.get_submodule(n).in_features,
                                        model.get_submodule(n).out_features, r) for n in wrapped)
    expected += sum(p.numel() for p in model.head.parameters())
    assert count_trainable(model) == expected
    # By hand: per layer q_proj 2 * (6 + 4) + v_proj 2 * (6 + 5) = 42; two layers 84; head 6 * 3 + 3 = 21.
    assert expected == 105
    assert lora_parameter_count(4096, 4096, 512) == 512 * 8192


def test_dropout_only_on_lora_branch_and_only_in_train_mode():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    w = LoRALinear(base, r=3, alpha=3, dropout=0.5, generator=torch.Generator().manual_seed(0))
    x = make_input()

    # B = 0: the LoRA branch is zero, so in train mode the output is still exactly the base (x not dropped).
    w.train()
    assert torch.equal(w(x), base(x))

    with torch.no_grad():
        w.B.copy_(torch.randn(5, 3, generator=torch.Generator().manual_seed(3)))
    full = base(x) + (x @ w.A.T @ w.B.T) * w.scaling

    w.eval()
    assert torch.equal(w(x), w(x))
    assert torch.allclose(w(x), full, atol=1e-6)

    w.train()
    torch.manual_seed(123)
    y_train = w(x)
    torch.manual_seed(123)
    x_dropped = F.dropout(x, p=0.5, training=True)  # the same mask the wrapper drew
    expected = base(x) + (x_dropped @ w.A.T @ w.B.T) * w.scaling
    assert torch.allclose(y_train, expected, atol=1e-6)
    assert not torch.allclose(y_train, full, atol=1e-3)


def test_bf16_base_keeps_float32_adapter():
    torch.manual_seed(0)
    base = nn.Linear(6, 5).to(torch.bfloat16)
    w = LoRALinear(base, r=2, alpha=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        w.B.normal_(generator=torch.Generator().manual_seed(1))
    assert w.A.dtype == torch.float32 and w.B.dtype == torch.float32
    x = make_input().to(torch.bfloat16)
    y = w(x)
    assert y.dtype == torch.bfloat16
    w.merge()
    assert base.weight.dtype == torch.bfloat16 and w.A.dtype == torch.float32
    assert torch.allclose(w(x).float(), y.float(), atol=0.1)


def test_inject_errors():
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj"):
        inject_lora(make_model(), targets=("query", "value"))
    for bad_r in (0, -1, 2.5):
        with pytest.raises(ValueError, match="rank"):
            inject_lora(make_model(), r=bad_r)
    with pytest.raises(ValueError, match="alpha"):
        inject_lora(make_model(), alpha=0)
    with pytest.raises(ValueError, match="classifier"):
        inject_lora(make_model(), trainable=("classifier",))
    model = make_model()
    inject_lora(model)
    with pytest.raises(ValueError, match="already"):
        inject_lora(model)
    with pytest.raises(ValueError, match="inject_lora"):
        merge_lora(make_model())


def test_state_dict_roundtrip_and_strictness():
    model = make_model()
    wrapped = inject_lora(model, r=2, alpha=4, generator=torch.Generator().manual_seed(0))
    train_steps(model)
    sd = lora_state_dict(model)
    assert set(sd) == {f"{m}.{ab}" for m in wrapped for ab in ("A", "B")} | {"head.weight", "head.bias"}
    assert not any("base" in k or "norm" in k or "k_proj" in k for k in sd)

    train_steps(model, seed=5)  # move away, then restore
    assert not torch.equal(model.head.weight, sd["head.weight"])
    load_lora_state_dict(model, sd)
    for name, t in lora_state_dict(model).items():
        assert torch.equal(t, sd[name])

    bad = dict(sd)
    bad["blocks.0.attn.k_proj.A"] = bad.pop("blocks.0.attn.q_proj.A")
    with pytest.raises(ValueError, match=r"k_proj\.A"):
        load_lora_state_dict(model, bad)
    missing = dict(sd)
    del missing["head.bias"]
    with pytest.raises(ValueError, match=r"head\.bias"):
        load_lora_state_dict(model, missing)
    wrong_shape = dict(sd, **{"head.weight": torch.zeros(2, 6)})
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(model, wrong_shape)
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge"):
        load_lora_state_dict(model, sd)


def test_save_load_safetensors(tmp_path):
    weights = pytest.importorskip("weights")
    if not (hasattr(weights, "write_safetensors") and hasattr(weights, "read_safetensors")):
        pytest.skip("weights.write_safetensors / read_safetensors not available yet")
    model = make_model()
    inject_lora(model, r=2, alpha=4, generator=torch.Generator().manual_seed(0))
    train_steps(model)
    sd = lora_state_dict(model)
    path = tmp_path / "adapter.safetensors"
    save_lora(model, path, metadata={"r": "2", "alpha": "4"})

    fresh = make_model()
    inject_lora(fresh, r=2, alpha=4, generator=torch.Generator().manual_seed(9))
    load_lora(fresh, path)
    for name, t in lora_state_dict(fresh).items():
        assert torch.equal(t, sd[name])


def test_trainable_prefix_matches_whole_name_components():
    torch.manual_seed(0)
    model = nn.ModuleDict({"q_proj": nn.Linear(4, 4), "head": nn.Linear(4, 2), "header": nn.Linear(4, 2)})
    inject_lora(model, targets=("q_proj",), r=1, alpha=1)
    assert model["head"].weight.requires_grad
    assert not model["header"].weight.requires_grad  # "head" must not select "header.weight"


def test_within_limits_lora_to_the_named_blocks():
    model = make_model()
    wrapped = inject_lora(model, within=["blocks.1."])
    assert wrapped == ["blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    assert not any(p.requires_grad for p in model.blocks[0].parameters())
    with pytest.raises(ValueError, match="within"):
        inject_lora(make_model(), within=["blocks.7."])
