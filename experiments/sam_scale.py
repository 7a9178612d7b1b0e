"""The scale of sam's rho, read on the defender's CLEAN training data only: the first steps of W2SDefense with
sharpness-aware steps at each rho, and how far the perturbed loss sits above the plain one ("sharp").

    .venv/bin/python experiments/sam_scale.py --preset cpu --seed 2 --triggers tq --data-dir ../shared/data \
        --rho 0.1 0.5 2.0

For each rho (and 0, the plain loss): the mean over the first --steps steps of the loss, its terms and "sharp",
and the seconds a step (the one clean-dev evaluation at the last step included). No triggered sentence is read,
so rho can be set here before a screen reads the dev ASR (experiments/calibration/README.md, "Sharpness-aware
unlearning"). The attack and teacher stages come from the stage cache (or are trained, as in w2s.py).
"""

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attacks  # noqa: E402
import defenses  # noqa: E402
import sam  # noqa: E402
import train  # noqa: E402
import w2s  # noqa: E402


def main(argv=None) -> None:
    parser = w2s.parser()
    parser.add_argument("--rho", type=float, nargs="+", required=True, help="the radii to read (0 is always read)")
    parser.add_argument("--steps", type=int, default=12, help="steps to average over")
    args = parser.parse_args(argv)
    if any(rho < 0 for rho in args.rho):
        raise SystemExit(f"sam_scale.py: --rho is a perturbation's radius, at least 0; got {args.rho}")
    a, t, u, eval_size = w2s.resolve_configs(args)
    w2s.check_configs(a, t, u, "w2sdefense", args.data_dir)
    device = w2s.pick_device(args.device)
    task = w2s.build_task(a, eval_size, args.data_dir)
    stages = Path(args.stages)
    attack_folder, poisoned = w2s.attack_stage(a, task, stages, device)
    teacher_folder, _ = w2s.teacher_stage(t, task, poisoned["feature_dim"], stages, device)
    clean = attacks.subset(task.dataset.train, u.clean_size, u.seed, "defender-clean")
    steps_per_epoch = -(-len(clean) // u.batch_size)
    cfg = dataclasses.replace(u, epochs=args.steps / steps_per_epoch)
    ctx = w2s.context(a, t, u, task, attack_folder, teacher_folder, device)     # what a defense is handed
    w2sdefense = defenses.DEFENSES["w2sdefense"]
    al, be, ga = w2sdefense.loss_weights(ctx)
    z_t, h_t = w2s.teacher_outputs(t, teacher_folder, clean.sentences, task.dataset.num_classes,
                                   poisoned["feature_dim"], u.max_length, device)
    for rho in [0.0, *args.rho]:
        model, tokenizer = w2s.load_poisoned(a, attack_folder, task.dataset.num_classes)
        frozen = defenses.add_lora(model, u)
        model.to(device)
        key = w2sdefense.prefix_owner(ctx, model, frozen)
        enc = lambda split: train.encode_for(model, tokenizer, split, u.max_length, frozen, device, key, u.bf16)
        loss_fn = defenses.unlearning_loss(al, be, ga, u.T, z_t, h_t, defenses.fa_distance(u))
        if rho:
            loss_fn = sam.sharpness_aware(loss_fn, rho)
        start = time.perf_counter()
        fit = train.fit(model, enc(clean), enc(task.dev), train.fit_config(cfg, warmup_ratio=0.0), loss_fn=loss_fn,
                        device=device, progress=False)
        mean = lambda k: sum(r.get(k, 0.0) for r in fit.history) / len(fit.history)
        print(f"rho {rho}: {fit.steps} steps, {(time.perf_counter() - start) / fit.steps:.2f} s a step, "
              f"loss {mean('loss'):.3f}, ce {mean('ce'):.4f}, kd {mean('kd'):.4f}, fa {mean('fa'):.1f}, "
              f"sharp {mean('sharp'):.3f}", flush=True)


if __name__ == "__main__":
    main()
