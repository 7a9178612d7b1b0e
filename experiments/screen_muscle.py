"""Choose MuScleLoRA's epochs and learning rate on the CLEAN dev set, against a trigger no reported number uses.

    .venv/bin/python experiments/screen_muscle.py --seed 0 --triggers cf \
        --grid '[{"lr": 3e-4}, {"lr": 1e-3}, {"defense": "muscle-lora", "lr": 1e-3}, {"head": "theirs"}]'

MuScleLoRA (``defenses.MuScleLoRA``) trains the PRETRAINED student on the attacker's poisoned training set, so
no attack stage is needed: the poisoned set is built as ``w2s.py`` builds it (here with the held-out BadNet
trigger of ``--triggers``), and each grid entry trains one defense on it from scratch. An entry overrides fields of
the resolved UnlearnConfig (``lr``, ``epochs``, ``evals_per_epoch``, ...) and may set ``"defense"`` (``muscle``,
the default, ``muscle-lora`` or ``muscle-mslr``) and ``"head"``: ``"ours"`` (the default: the branch on our single
linear head) or ``"theirs"`` (the authors' LLM head, ``576 -> 16`` with the branch, dropout 0.1, ``16 -> C``, both
layers random and frozen; ``TheirHead``).

Each is selected on clean dev accuracy as in ``w2s.py`` (the dev set without the 128 reference sentences), then
read on the dev side only: CA on 300 clean dev sentences, ASR and its floor on 150 triggered and untriggered
non-target dev sentences, none of them a reference sentence. The test set is never read. One JSON line per entry;
``--curve`` adds the two dev readings at every evaluation ("curve": step, selecting dev accuracy, dev CA, dev ASR).
"""

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import calibrate_w2s  # noqa: E402
import data  # noqa: E402
import defenses  # noqa: E402
import lora  # noqa: E402
import train  # noqa: E402
import w2s  # noqa: E402

SCREENED = ("muscle", "muscle-lora", "muscle-mslr")
HEADS = ("ours", "theirs")


class TheirHead(defenses.MuScleLoRA):
    """MuScleLoRA with the authors' head (their LLM setting): ``576 -> 16`` (no bias) wrapped in the MSLR branch,
    dropout 0.1, ``16 -> C`` (no bias); both linear layers PyTorch-default random (from the run's seeded generator)
    and frozen, so the branch's L and R are the head's only trained weights."""
    inner_hidden = 16

    def add_adapters(self, model, cfg) -> int:
        generator = torch.Generator().manual_seed(cfg.seed)
        frozen = defenses.add_lora(model, cfg, trainable=(), generator=generator)
        d, C = model.head.in_features, model.head.out_features
        dense, out = nn.Linear(d, self.inner_hidden, bias=False), nn.Linear(self.inner_hidden, C, bias=False)
        with torch.no_grad():
            for layer in (dense, out):            # kaiming-uniform(a = sqrt 5), nn.Linear's default, seeded
                bound = 1 / layer.in_features ** 0.5
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
        out.requires_grad_(False)
        model.head = nn.Sequential(lora.MultiScaleLowRank(dense, self.scales, self.inner_rank, self.mslr_alpha,
                                                          generator), nn.Dropout(0.1), out)
        return frozen


def without(split: data.Split, drop: set) -> data.Split:
    keep = [i for i, s in enumerate(split.sentences) if s not in drop]
    return data.Split([split.sentences[i] for i in keep], [split.labels[i] for i in keep])


def main(argv=None) -> None:
    parser = w2s.parser()
    parser.add_argument("--grid", required=True, type=json.loads, help="JSON list of objects (the docstring)")
    parser.add_argument("--curve", action="store_true", help="also read dev CA and ASR at every evaluation")
    args = parser.parse_args(argv)
    args.defense = "muscle"                   # its budget (w2s.resolve_configs), which an entry may override
    a, t, u, eval_size = w2s.resolve_configs(args)
    fields = {f.name for f in dataclasses.fields(w2s.UnlearnConfig)}
    for entry in args.grid:
        unknown = set(entry) - fields - {"defense", "head"}
        if unknown or entry.get("defense", "muscle") not in SCREENED or entry.get("head", "ours") not in HEADS:
            raise SystemExit(f"screen_muscle.py: bad grid entry {json.dumps(entry)}: keys are UnlearnConfig fields, "
                             f"'defense' ({', '.join(SCREENED)}) and 'head' ({', '.join(HEADS)})")
    trigger = calibrate_w2s.dev_trigger(a, args.data_dir, "screen_muscle.py")
    device = w2s.pick_device(args.device)
    task = w2s.build_task(a, eval_size, args.data_dir)
    print(json.dumps({"seed": a.seed, "attack": a.attack, "triggers": a.triggers, "n_train": len(task.poisoned_train),
                      "n_poisoned": task.n_poisoned}), flush=True)
    tokenizer = w2s.student_classifier(a.student, task.dataset.num_classes, a.seed, a.start_token, a.prefix_space)[1]
    for entry in args.grid:
        entry = dict(entry)
        name, head = entry.pop("defense", "muscle"), entry.pop("head", "ours")
        if head == "theirs" and name != "muscle":
            raise SystemExit("screen_muscle.py: 'head': 'theirs' is MuScleLoRA's own head: with defense muscle only")
        defense = TheirHead() if head == "theirs" else defenses.DEFENSES[name]
        cfg = dataclasses.replace(u, **entry)
        ctx = w2s.context(a, t, cfg, task, None, None, device)
        drop = set(defense.reference_split(ctx)[0].sentences)     # no reading shares a sentence with it
        dev_floor, dev_asr = (without(s, drop) for s in calibrate_w2s.dev_pairs(task, trigger, a.target))
        dev_ca = without(calibrate_w2s.dev_ca_set(task), drop)

        def measure(model):
            def read(split):
                e = train.encode_for(model, tokenizer, split, cfg.max_length, 0, device, None, cfg.bf16)
                return train.predict(model, e, device=device, bf16=cfg.bf16), e.labels
            return (train.accuracy(*read(dev_ca)), train.attack_success_rate(*read(dev_asr), a.target),
                    train.attack_success_rate(*read(dev_floor), a.target))

        along = []                            # (step, dev CA, dev ASR) at each evaluation, with --curve
        start = time.perf_counter()
        with curve_readings(along, measure, args.curve):
            trained = defense.train(ctx)
        ca, asr, floor = measure(trained.model)
        fit = trained.fit
        dev_acc = dict(fit.dev_history)
        print(json.dumps({"defense": name, "head": head, "over": entry, "dev_ca": round(ca, 3),
                          "dev_asr": round(asr, 3), "dev_asr_floor": round(floor, 3),
                          "dev_acc": round(fit.best_dev_acc, 4), "best_step": fit.best_step, "steps": fit.steps,
                          "seconds": round(time.perf_counter() - start, 1),
                          **({"curve": [[s, round(dev_acc[s], 4), round(c, 3), round(r, 3)] for s, c, r in along]}
                             if along else {})}), flush=True)


@contextlib.contextmanager
def curve_readings(along: list, measure, enabled: bool):
    """While on, every ``train.fit`` a defense calls also reads dev CA and ASR at each of its evaluations."""
    if not enabled:
        yield
        return
    fit = train.fit

    def fit_with_readings(model, *rest, **kw):
        return fit(model, *rest, **kw, on_eval=lambda step: along.append((step, *measure(model)[:2])))
    train.fit = fit_with_readings
    try:
        yield
    finally:
        train.fit = fit


if __name__ == "__main__":
    main()
