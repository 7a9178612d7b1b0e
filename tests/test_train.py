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
