"""Choose W2SDefense's loss weights on the CLEAN dev set, against a trigger that no reported number uses.

    .venv/bin/python bench/calibrate_w2s.py --preset quick --seed 0 --triggers cf \
        --grid '[{"defense": "none"}, {"defense": "lora"}, {}, {"gamma": 50}, {"fa": "l2", "gamma": 0.01}]'

The attacker's stage (BadNet with the held-out trigger, here `cf`) and the teacher come from the usual stage
cache. Each grid entry overrides fields of the preset's UnlearnConfig ("defense" picks w2sdefense (default),
lora or none); each is trained on the defender's clean subset, selected on clean dev accuracy as in w2s.py,
and then measured on the dev side only: CA on 300 clean dev sentences, ASR on 150 triggered non-target dev
sentences. The test set is never read. One JSON line per entry.

With --curve, the same two dev measures are also taken at every clean-dev evaluation during training (the
"curve" field: step, the full dev accuracy that selects checkpoints, dev CA, dev ASR), so that checkpoint rules
can be compared on dev without retraining.
"""

import dataclasses
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attacks  # noqa: E402
import train  # noqa: E402
import w2s  # noqa: E402


def main(argv=None) -> None:
    parser = w2s.parser()
    parser.add_argument("--grid", required=True, help="JSON list of UnlearnConfig overrides")
    parser.add_argument("--curve", action="store_true", help="also measure dev CA and ASR at every evaluation")
    args = parser.parse_args(argv)
    grid = json.loads(args.grid)
    a, t, u, eval_size = w2s.resolve_configs(args)
    device = w2s.pick_device(args.device)
    stages = Path(args.stages)
    task = w2s.build_task(a, eval_size, args.data_dir)
    attack_folder, poisoned = w2s.attack_stage(a, task, stages, device)
    teacher_folder, teacher = w2s.teacher_stage(t, task, poisoned["feature_dim"], stages, device)
    trigger, _ = w2s.make_triggers(a, args.data_dir)
    dev_asr = w2s.subset(attacks.asr_set(task.dataset.dev, trigger, a.target, random.Random(7)), 150, 0, "dev-asr")
    dev_ca = w2s.subset(task.dataset.dev, 300, 0, "dev-ca")
    print(json.dumps({"seed": a.seed, "triggers": a.triggers, "teacher_dev_acc": teacher["best_dev_acc"]}), flush=True)
    for over in grid:
        over = dict(over)
        defense = over.pop("defense", "w2sdefense")
        cfg = dataclasses.replace(u, **over)
        start = time.perf_counter()
        model, tokenizer = w2s.load_poisoned(a, attack_folder, task.dataset.num_classes)
        frozen = w2s.add_lora(model, cfg)
        memo_key = w2s.prefix_owner(model, frozen, a, attack_folder)
        enc = lambda split: w2s.encode_for(model, tokenizer, split, cfg.max_length, frozen, device, memo_key, cfg.bf16)
        e_ca, e_asr = enc(dev_ca), enc(dev_asr)

        def measure():
            ca = train.accuracy(train.predict(model, e_ca, device=device, bf16=cfg.bf16), e_ca.labels)
            asr = train.attack_success_rate(train.predict(model, e_asr, device=device, bf16=cfg.bf16), e_asr.labels,
                                             a.target)
            return ca, asr

        along = []                                    # (step, dev CA, dev ASR) at each evaluation, with --curve
        on_eval = (lambda step: along.append((step, *measure()))) if args.curve else None
        fit = None
        if defense != "none":
            clean = w2s.subset(task.dataset.train, cfg.clean_size, cfg.seed, "defender-clean")
            al, be, ga = w2s.resolve_weights(cfg, a.attack, defense)
            if defense == "lora":
                loss_fn = w2s.unlearning_loss(al, 0.0, 0.0, cfg.T)
            else:
                z_t, h_t = w2s.teacher_outputs(t, teacher_folder, clean.sentences, task.dataset.num_classes,
                                               model.feature_dim, cfg.max_length, device)
                loss_fn = w2s.unlearning_loss(al, be, ga, cfg.T, z_t, h_t, w2s.fa_distance(cfg))
            fit = train.fit(model, enc(clean), enc(task.dev), w2s.fit_config(cfg, warmup_ratio=0.0), loss_fn=loss_fn,
                            device=device, progress=False, on_eval=on_eval)
        ca, asr = measure()
        dev_acc = dict(fit.dev_history) if fit else {}
        curve = [[s, round(dev_acc[s], 4), round(c, 3), round(r, 3)] for s, c, r in along]
        print(json.dumps({"defense": defense, "over": over, "dev_ca": round(ca, 3), "dev_asr": round(asr, 3),
                          "best_step": fit.best_step if fit else 0, "steps": fit.steps if fit else 0,
                          "seconds": round(time.perf_counter() - start, 1),
                          **({"curve": curve} if curve else {})}), flush=True)


if __name__ == "__main__":
    main()
