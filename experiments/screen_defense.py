"""Choose a defense's own settings on the CLEAN dev set, against a trigger that no reported number uses.

    .venv/bin/python experiments/screen_defense.py --seed 0 --triggers cf \
        --grid '[{"defense": "crow"}, {"defense": "crow", "set": {"eps": 0.02}}, {"defense": "crow-lora"},
                 {"defense": "beear", "set": {"block": 16, "n": 1}}]'

For the defenses that clean the poisoned student (``crow``, ``crow-lora``, ``beear``, ``lora``; the attacker's
stage, here BadNet with the held-out trigger of ``--triggers``, comes from the usual stage cache) and those that
train the pretrained one on the poisoned set (``muscle``, ``muscle-lora``, ``muscle-mslr``). A grid entry names
its ``"defense"``, may change the defense class's own settings with ``"set"`` (e.g. CROW's ``eps``, BEEAR's
``block``; CROW's ``recipe`` keys merge into its recipe), may give MuScleLoRA the authors' head with ``"head":
"theirs"`` (``576 -> 16`` with the branch, dropout 0.1, ``16 -> C``, both random and frozen: ``TheirHead``), and
may override fields of the resolved UnlearnConfig (``lr``, ``epochs``, ``evals_per_epoch``, ...; for MuScleLoRA
over its budget).

Each is selected on clean dev accuracy as in ``w2s.py``, then read on the dev side only: CA on 300 clean dev
sentences, ASR and its floor on 150 triggered and untriggered non-target dev sentences (for MuScleLoRA without its
128 reference sentences). The test set is never read. One JSON line per entry (BEEAR's adds what it found: its
guess of the target per round); ``--curve`` adds the two dev readings at every evaluation ("curve": step,
selecting dev accuracy, dev CA, dev ASR).
"""

import contextlib
import copy
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

SCREENED = ("lora", "crow", "crow-lora", "beear", "muscle", "muscle-lora", "muscle-mslr")


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


def configured(entry: dict) -> tuple[str, defenses.Defense]:
    """The entry's defense, a copy with its ``"set"`` applied (and MuScleLoRA's ``"head"``). Pops both keys."""
    name, head, changes = entry.pop("defense"), entry.pop("head", "ours"), entry.pop("set", {})
    if name not in SCREENED:
        raise SystemExit(f"screen_defense.py: defense {name!r}: one of {', '.join(SCREENED)}")
    if head not in ("ours", "theirs") or (head == "theirs" and name != "muscle"):
        raise SystemExit("screen_defense.py: 'head' is 'ours' or 'theirs' (MuScleLoRA's own head: muscle only)")
    defense = TheirHead() if head == "theirs" else copy.copy(defenses.DEFENSES[name])
    for key, value in changes.items():
        if not hasattr(type(defense), key) or callable(getattr(type(defense), key)):
            raise SystemExit(f"screen_defense.py: {name} has no setting {key!r}")
        setattr(defense, key, {**defense.recipe, **value} if key == "recipe" else value)
    return name, defense


def main(argv=None) -> None:
    parser = w2s.parser()
    parser.add_argument("--grid", required=True, type=json.loads, help="JSON list of objects (the docstring)")
    parser.add_argument("--curve", action="store_true", help="also read dev CA and ASR at every evaluation")
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(w2s.UnlearnConfig)}
    grid = [dict(entry) for entry in args.grid]
    for entry in grid:
        unknown = set(entry) - fields - {"defense", "set", "head"}
        if unknown or "defense" not in entry:
            raise SystemExit(f"screen_defense.py: bad grid entry {json.dumps(entry)}: it names its 'defense'; other "
                             f"keys are 'set', 'head' and UnlearnConfig fields")
        configured(dict(entry))                   # a defense or a setting it does not have: refused now
    muscle_only = all(entry["defense"].startswith("muscle") for entry in grid)
    trigger = calibrate_w2s.dev_trigger(w2s.resolve_configs(args)[0], args.data_dir, "screen_defense.py")
    device = w2s.pick_device(args.device)
    task = attack_folder = None
    print_head = True
    a = w2s.resolve_configs(args)[0]           # every poisoned or pretrained student reads sentences the same way
    tokenizer = w2s.student_classifier(a.student, 2, a.seed, a.start_token, a.prefix_space)[1]
    for entry in grid:
        over = dict(entry)
        name, defense = configured(over)
        args.defense = name                       # its own budget (w2s.resolve_configs), which the entry may override
        a, t, u, eval_size = w2s.resolve_configs(args)
        cfg = dataclasses.replace(u, **over)
        if task is None:
            task = w2s.build_task(a, eval_size, args.data_dir)
        if attack_folder is None and not muscle_only:
            attack_folder, poisoned = w2s.attack_stage(a, task, Path(args.stages), device)
        ctx = w2s.context(a, t, cfg, task, attack_folder, None, device)
        drop = set(defense.reference_split(ctx)[0].sentences) if name.startswith("muscle") else set()
        dev_floor, dev_asr = (without(s, drop) for s in calibrate_w2s.dev_pairs(task, trigger, a.target))
        dev_ca = without(calibrate_w2s.dev_ca_set(task), drop)

        def measure(model):                       # read in full, from the embeddings (no cached prefix)
            def read(split):
                e = train.encode_for(model, tokenizer, split, cfg.max_length, 0, device, None, cfg.bf16)
                return train.predict(model, e, device=device, bf16=cfg.bf16), e.labels
            return (train.accuracy(*read(dev_ca)), train.attack_success_rate(*read(dev_asr), a.target),
                    train.attack_success_rate(*read(dev_floor), a.target))

        if print_head:                            # the poisoned student read the same way, first
            student = {}
            if not muscle_only:
                model = ctx.load_poisoned()[0].to(device).eval()
                student = dict(zip(("poisoned_dev_ca", "poisoned_dev_asr", "poisoned_dev_asr_floor"),
                                   (round(v, 3) for v in measure(model))), poisoned_dev_acc=poisoned["best_dev_acc"])
                del model
            print(json.dumps({"seed": a.seed, "attack": a.attack, "triggers": a.triggers, "n_poisoned": task.n_poisoned,
                              **student}), flush=True)
            print_head = False
        along = []                                # (step, dev CA, dev ASR) at each evaluation, with --curve
        start = time.perf_counter()
        with curve_readings(along, measure, args.curve):
            trained = defense.train(ctx)
        ca, asr, floor = measure(trained.model)
        fit = trained.fit
        dev_acc = dict(fit.dev_history)
        print(json.dumps({"defense": name, **({"head": "theirs"} if isinstance(defense, TheirHead) else {}),
                          "set": entry.get("set", {}), "over": over, "dev_ca": round(ca, 3),
                          "dev_asr": round(asr, 3), "dev_asr_floor": round(floor, 3),
                          "dev_acc": round(fit.best_dev_acc, 4), "best_step": fit.best_step, "steps": fit.steps,
                          "seconds": round(time.perf_counter() - start, 1),
                          **({"found": trained.found} if trained.found else {}),
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
