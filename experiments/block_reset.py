"""Where a backdoor lives: blocks of the poisoned student set back to the pretrained ones, no training (dev only).

    .venv/bin/python experiments/block_reset.py --preset cpu --seed 2 --triggers tq          # w2s.py's options
    .venv/bin/python experiments/block_reset.py --preset cpu --seed 3 --attack syntactic --target 1 --groups 0-9 10-19

For the poisoned student of a run (from the stage cache, trained if missing, as w2s.py would), each group of
blocks (``a-b``, 0-based, inclusive; ``emb`` for the token embeddings) is copied back from the pretrained student,
everything else (the other blocks, the final norm, the head) kept as the attacker left it, and the model is
measured on the DEV side as experiments/calibrate_w2s.py measures a line: CA on its 300 clean dev sentences, ASR on its
150 triggered non-target dev sentences (the syntactic attack: the SCPN paraphrases, ``--target 1``), and the floor
(the same 150 without the trigger). The test set is never read. Nothing is trained: if a group's reset brings the
ASR to its floor while the clean accuracy holds, what the attacker wrote into that group is what carries the
trigger; if the clean accuracy falls apart, the reading says little (the head no longer reads what it was
trained on).

One JSON line per group, the first (``none``) the poisoned student itself.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import models  # noqa: E402
import registry  # noqa: E402
import train  # noqa: E402
import w2s  # noqa: E402
from calibrate_w2s import block_range, dev_ca_set, dev_pairs, dev_trigger  # noqa: E402

GROUPS = ["0-9", "10-19", "20-29", "0-14", "15-29", "emb"]


def parse_group(group: str, n_blocks: int) -> list[int] | str:
    """``"a-b"`` -> [a, ..., b] (0-based, inclusive), ``"emb"`` -> "emb"; a clear error for anything else."""
    if group == "emb":
        return group
    try:
        return block_range(group, n_blocks)
    except ValueError as e:
        raise SystemExit(f"block_reset.py: {e} (or 'emb')") from None


def reset_to(model, pretrained, group) -> None:
    """In place: the group's blocks (or the token embeddings) of ``model.backbone`` become ``pretrained``'s."""
    with torch.no_grad():
        if group == "emb":
            model.backbone.tok_emb.weight.copy_(pretrained.tok_emb.weight)
            return
        for b in group:
            model.backbone.blocks[b].load_state_dict(pretrained.blocks[b].state_dict())


def main(argv=None) -> None:
    parser = w2s.parser()
    parser.add_argument("--groups", nargs="+", default=GROUPS, help="block groups 'a-b' (0-based) or 'emb'")
    args = parser.parse_args(argv)
    a, t, u, eval_size = w2s.resolve_configs(args)
    w2s.check_configs(a, t, u, "w2sdefense", args.data_dir)
    depth = models.decoder_depth(registry.resolve_student(a.student))
    for group in args.groups if depth is not None else []:      # checked before the attack trains
        parse_group(group, depth)
    trigger = dev_trigger(a, args.data_dir, "block_reset.py")
    device = w2s.pick_device(args.device)
    task = w2s.build_task(a, eval_size, args.data_dir)
    attack_folder, _ = w2s.attack_stage(a, task, Path(args.stages), device)
    floor, triggered = dev_pairs(task, trigger, a.target)
    clean = dev_ca_set(task)
    pretrained = models.load_student(a.student)[0]
    n_blocks = len(pretrained.blocks)
    groups = [(g, parse_group(g, n_blocks)) for g in args.groups]
    for name, group in [("none", [])] + groups:
        model, tokenizer = w2s.load_poisoned(a, attack_folder, task.dataset.num_classes)
        reset_to(model, pretrained, group)
        model.to(device)

        def rate(split, is_ca):
            enc = train.encode(tokenizer, split.sentences, split.labels, u.max_length)
            pred = train.predict(model, enc, device=device, bf16=u.bf16)
            return train.accuracy(pred, enc.labels) if is_ca else train.attack_success_rate(pred, enc.labels, a.target)

        print(json.dumps({"seed": a.seed, "attack": a.attack, "triggers": a.triggers if a.attack == "badnet" else None,
                          "target": a.target, "reset": name, "dev_ca": round(rate(clean, True), 3),
                          "dev_asr": round(rate(triggered, False), 3), "dev_floor": round(rate(floor, False), 3)}),
              flush=True)


if __name__ == "__main__":
    main()
