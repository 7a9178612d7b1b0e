"""The training loop on a tiny bag-of-words classifier: checkpoint restore, the on_eval hook, determinism."""

import random

import torch
from torch import nn

import train


class BagOfWords(nn.Module):
    def __init__(self, vocab: int = 12, d: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, 2)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return self.head((self.emb(input_ids) * m).sum(1) / m.sum(1))


def toy_sets(seed: int = 0):
    """Label 1 iff token 1 occurs; random other tokens from 2..11."""
    rng = random.Random(seed)

    def make(n):
        ids, labels = [], []
        for _ in range(n):
            row = [rng.randrange(2, 12) for _ in range(rng.randrange(1, 6))]
            y = rng.random() < 0.5
            if y:
                row.insert(rng.randrange(len(row) + 1), 1)
            ids.append(row)
            labels.append(int(y))
        return train.Encoded(ids, torch.tensor(labels), pad_id=0)

    return make(96), make(40)


def run(on_eval=None, seed=0):
    """Three epochs of 6 steps, two dev evaluations per epoch; ``on_eval(step, model)`` if given."""
    torch.manual_seed(seed)
    model = BagOfWords()
    tr, dev = toy_sets()
    cfg = train.FitConfig(epochs=3, lr=0.05, batch_size=16, evals_per_epoch=2, seed=seed)
    hook = None if on_eval is None else (lambda step: on_eval(step, model))
    return model, dev, train.fit(model, tr, dev, cfg, progress=False, on_eval=hook)


def test_on_eval_is_called_after_every_dev_evaluation_and_leaves_training_alone():
    seen = []
    dev = toy_sets()[1]
    _, _, result = run(on_eval=lambda step, model: seen.append((step, train.predict(model, dev).sum().item())))
    steps = [s for s, _ in result.dev_history]
    assert steps == [3, 6, 9, 12, 15, 18] and result.steps == 18        # 96 rows / 16 = 6 steps; eval every 3
    assert [s for s, _ in seen] == steps
    plain = run()[2]                                                     # the same run without the hook
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in result.history]


def test_dev_is_read_every_steps_per_epoch_over_evals_and_at_the_last_step():
    # 112 rows / 16 = 7 steps an epoch, two readings an epoch: every 7 // 2 = 3 steps, and at the last (7), one step
    # after the reading at 6 (as mix-w2s's 433 steps read at 216, 432 and 433).
    tr, dev = toy_sets()
    tr = train.Encoded(tr.ids + tr.ids[:16], torch.cat([tr.labels, tr.labels[:16]]), pad_id=0)
    cfg = train.FitConfig(epochs=1, lr=0.05, batch_size=16, evals_per_epoch=2, seed=0)
    result = train.fit(BagOfWords(), tr, dev, cfg, progress=False)
    assert [s for s, _ in result.dev_history] == [3, 6, 7] and result.steps == 7


def test_fit_restores_the_best_dev_checkpoint_and_is_deterministic():
    model, dev, result = run()
    accs = dict(result.dev_history)
    assert result.best_dev_acc == max(accs.values())
    assert result.best_step == min(s for s, a in accs.items() if a == result.best_dev_acc)   # earliest on ties
    assert result.best_step < result.steps                              # else restoring would not be tested
    assert train.accuracy(train.predict(model, dev), dev.labels) == result.best_dev_acc
    again = run()[2]
    assert [h["loss"] for h in again.history] == [h["loss"] for h in result.history]
    assert again.dev_history == result.dev_history


# ---------------------------------------------------------------- bf16 weights held once, bit for bit

class TwoLayers(nn.Module):
    """A frozen layer, a trainable one, and a head tied to an embedding (as a language model's)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.trained = nn.Linear(8, 8)
        self.tied = nn.Linear(8, 10, bias=False)
        self.tied.weight = self.emb.weight
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, ids):
        return self.tied(self.trained(torch.relu(self.frozen(self.emb(ids)))))


def test_bf16_weights_gives_autocast_results_bit_for_bit_and_puts_float32_back():
    model = TwoLayers()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_and_grads():
        model.zero_grad()
        with train.autocast("cpu", True):
            out = model(ids)
        out.float().square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_out, plain_grads = loss_and_grads()
    with train.bf16_weights(model):
        assert model.frozen.weight.dtype == torch.bfloat16           # frozen: held in bf16
        assert model.trained.weight.dtype == torch.float32           # trainable: the master weights stay
        assert model.emb.weight.dtype == torch.float32               # tied to an embedding: left alone
        held_out, held_grads = loss_and_grads()
    assert torch.equal(plain_out, held_out)
    assert plain_grads.keys() == held_grads.keys() and all(torch.equal(plain_grads[n], held_grads[n]) for n in plain_grads)
    for n, p in model.named_parameters():                             # the float32 tensors are back, unchanged
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
    with train.bf16_weights(model, frozen_only=False):               # inference: the trainable one too
        assert model.trained.weight.dtype == torch.bfloat16
    with train.bf16_weights(model, enabled=False):
        assert model.frozen.weight.dtype == torch.float32


def test_bf16_weights_puts_float32_back_when_the_block_raises():
    model = TwoLayers()
    try:
        with train.bf16_weights(model):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert model.frozen.weight.dtype == torch.float32


def test_predict_in_bf16_equals_plain_autocast_and_keeps_float32_weights():
    model, dev, _ = run()
    with torch.inference_mode(), train.autocast("cpu", True):
        expected = torch.cat([model(b.input_ids, b.attention_mask).argmax(-1) for b in train.batches(dev, 64)])
    order = torch.cat([b.index for b in train.batches(dev, 64)])
    preds = train.predict(model, dev, bf16=True)
    assert torch.equal(preds[order], expected)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_pooled_features_in_bf16_equal_plain_autocast_and_are_what_predict_reads():
    from test_models import tiny_classifier
    model = tiny_classifier("llama", n_layer=2, num_classes=2, seed=7)
    g = torch.Generator().manual_seed(7)
    ids = [torch.randint(1, 50, (int(n),), generator=g).tolist() for n in torch.randint(2, 20, (40,), generator=g)]
    dev = train.Encoded(ids, torch.zeros(40, dtype=torch.long), pad_id=0, padding_side="left")
    with torch.inference_mode(), train.autocast("cpu", True):
        expected = torch.cat([model.features(b.input_ids, b.attention_mask).float() for b in train.batches(dev, 64)])
    order = torch.cat([b.index for b in train.batches(dev, 64)])
    h = train.pooled_features(model, dev, bf16=True)
    assert h.dtype == torch.float32 and torch.equal(h[order], expected)
    with torch.inference_mode(), train.autocast("cpu", True):
        assert torch.equal(model.head(h).argmax(-1), train.predict(model, dev, bf16=True))   # what predict reads
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_make_optimizer_updates_as_plain_adamw():
    """The fused kernel changes how AdamW is computed, not what: three steps agree with the for-loop version."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(5, 3, generator=g)
    grads = [torch.randn(5, 3, generator=g) for _ in range(3)]
    out = []
    for make in (lambda ps: train.make_optimizer(ps, 1e-2, 0.01, "cpu"),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, foreach=False)):
        w = nn.Parameter(start.clone())
        opt = make([w])
        for gr in grads:
            w.grad = gr.clone()
            opt.step()
        out.append(w.detach())
    assert not torch.equal(out[0], start)
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=1e-6)
