"""How a trigger moves the poisoned student's residual stream, block by block: a dev-set diagnostic.

    .venv/bin/python experiments/latent_shift.py --seed 0 --triggers cf --blocks 4 9 14 19 24   # w2s.py's options

BEEAR (docs/method.md, "The other defenses") rests on one observation: a trigger, whatever its form, shifts a decoder's intermediate
states in a roughly uniform direction, so one universal perturbation of the residual stream can stand in for it.
For the poisoned student of a run (from the stage cache, trained if missing, as w2s.py would), this measures on
the DEV side (150 non-target dev sentences and the same 150 with the trigger: experiments/calibrate_w2s.py's draw; the
test set is never read), at the last real token (what the head reads, and the one position a clean sentence and
its triggered copy share), for each block ``b`` (0-based; the residual stream after it, before the final norm):

* ``norm``: the median over sentences of ||x_b(x_i)||, the clean state's size;
* ``shift``: the median of ||x_b(x~_i) - x_b(x_i)||, how far the trigger moves it;
* ``uniformity``: mean_i cos(x_b(x~_i) - x_b(x_i), mean_j (x_b(x~_j) - x_b(x_j))): 1 when every sentence is
  moved the same way, about 0 when the moves point anywhere;
* ``class_gap``: ||mean of x_b over the clean dev sentences of one class - the same over the other|| (the seeded
  300 dev sentences of experiments/calibrate_w2s.py's dev CA; two classes), for scale: how far apart the clean
  classes sit.

One JSON line per block.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attacks  # noqa: E402
import models  # noqa: E402
import registry  # noqa: E402
import train  # noqa: E402
import w2s  # noqa: E402
from calibrate_w2s import dev_ca_set, dev_pairs, refuse_syntactic  # noqa: E402


def shift_stats(x_clean: torch.Tensor, x_trig: torch.Tensor) -> dict:
    """``norm``, ``shift`` and ``uniformity`` (module docstring) of row-aligned states (N, d)."""
    x_clean, x_trig = x_clean.float(), x_trig.float()
    moves = x_trig - x_clean                                                        # (N, d)
    cos = torch.nn.functional.cosine_similarity(moves, moves.mean(0, keepdim=True), dim=-1)
    return {"norm": x_clean.norm(dim=-1).median().item(), "shift": moves.norm(dim=-1).median().item(),
            "uniformity": cos.mean().item()}


def class_gap(x: torch.Tensor, labels: torch.Tensor) -> float:
    """||mean of the rows of label 1 - mean of the rows of label 0|| (two classes)."""
    if set(labels.tolist()) != {0, 1}:
        raise ValueError(f"class_gap needs the labels 0 and 1, got {sorted(set(labels.tolist()))}")
    x = x.float()
    return (x[labels == 1].mean(0) - x[labels == 0].mean(0)).norm().item()


def block_states(model, data: train.Encoded, blocks, device, bf16: bool, batch_size: int = 64) -> dict:
    """{b: (N, d) float32} the residual stream after block ``b`` at each row's last real token, rows in order."""
    out = {b: torch.empty(len(data), model.feature_dim) for b in blocks}
    seen = {}
    hooks = [model.backbone.blocks[b].register_forward_hook(lambda m, i, x, b=b: seen.update({b: x}))
             for b in blocks]
    try:
        with train.bf16_weights(model, enabled=bf16, frozen_only=False):
            for batch in train.batches(data, batch_size):
                batch = batch.to(device)
                with train.autocast(device, bf16):
                    model.backbone.hidden_states(batch.input_ids, batch.attention_mask)
                for b in blocks:
                    out[b][batch.index.cpu()] = models.last_real_token(seen[b], batch.attention_mask).float().cpu()
    finally:
        for hook in hooks:
            hook.remove()
    return out


def check_blocks(blocks: list[int], n: int | None) -> None:
    """``--blocks`` within the student's ``n`` blocks (None: its metadata did not say; checked again once loaded)."""
    if n is not None and any(not 0 <= b < n for b in blocks):
        raise SystemExit(f"latent_shift.py: blocks must be in 0..{n - 1}, got {blocks}")


def main(argv=None) -> None:
    parser = w2s.parser()
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 9, 14, 19, 24],
                        help="blocks (0-based) whose output is measured")
    args = parser.parse_args(argv)
    a, t, u, eval_size = w2s.resolve_configs(args)
    w2s.check_configs(a, t, u, "none", args.data_dir)
    refuse_syntactic(a.attack, "latent_shift.py")
    check_blocks(args.blocks, models.decoder_depth(registry.resolve_student(a.student)))   # before the attack trains
    device = w2s.pick_device(args.device)
    task = w2s.build_task(a, eval_size, args.data_dir)
    attack_folder, _ = w2s.attack_stage(a, task, Path(args.stages), device)
    trigger, _ = attacks.make_triggers(a, args.data_dir)
    clean, trig = dev_pairs(task, trigger, a.target)
    model, tokenizer = w2s.load_poisoned(a, attack_folder, task.dataset.num_classes)
    model.to(device).eval()
    check_blocks(args.blocks, len(model.backbone.blocks))
    dev = dev_ca_set(task)
    states = [block_states(model, train.encode(tokenizer, s.sentences, s.labels, u.max_length), args.blocks,
                           device, u.bf16) for s in (clean, trig, dev)]
    for b in args.blocks:
        row = {k: round(v, 3) for k, v in shift_stats(states[0][b], states[1][b]).items()}
        row["class_gap"] = round(class_gap(states[2][b], torch.as_tensor(dev.labels)), 3)
        print(json.dumps({"seed": a.seed, "attack": a.attack, "block": b, **row}), flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
