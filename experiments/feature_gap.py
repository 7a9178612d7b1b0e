"""Where the trigger leaves the pooled feature: a dev-set diagnostic of a finished ``w2s.py`` run.

    .venv/bin/python experiments/feature_gap.py --attack badnet --seed 2        # the same options as w2s.py

W2SDefense pulls the student's pooled feature toward the clean teacher's on clean sentences only. Whether that
pull reaches the triggered sentences the defender never sees is what decides the ASR. For the poisoned student,
the control and W2SDefense of a run (its stages are read from the stage cache; a stage that is missing is
trained, as w2s.py would), this measures on the DEV side (150 non-target dev sentences with the trigger, the
same 150 without it: the draw of experiments/calibrate_w2s.py; the test set is never read):

* ``fa_clean`` = mean_i ||h_s(x_i) - h_t(x_i)||^2, the feature term on the clean sentences;
* ``fa_trig``  = mean_i ||h_s(x~_i) - h_t(x~_i)||^2, the same distance on their triggered copies x~_i;
* ``shift``    = mean_i ||h_s(x~_i) - h_s(x_i)||^2, how far the trigger moves the student's feature
  (``teacher_shift``: the same for the clean teacher, for scale);
* ``norm_s`` = mean_i ||h_s(x_i)||^2 and ``norm_t`` = mean_i ||h_t(x_i)||^2 on the clean sentences: how much of
  ``fa_clean`` is the student's own feature norm;
* ``margin_shift`` = mean_i [m(x~_i) - m(x_i)], m = z_target - max_{c != target} z_c, the head's logits on the
  pooled feature: how far the trigger moves the decision toward the target;
* ``cos_head`` = mean_i cos(h_s(x~_i) - h_s(x_i), w), w = W_target - mean_{c != target} W_c (the head's rows):
  how much of the trigger's move points the way the head reads "target";
* ``dev_asr``, and the share of the 150 untriggered sentences called the target (its floor).

One JSON line per model, then a markdown table.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attacks  # noqa: E402
import defenses  # noqa: E402
import train  # noqa: E402
import w2s  # noqa: E402
from calibrate_w2s import dev_pairs, refuse_syntactic  # noqa: E402


def feature_gap(s_clean, s_trig, t_clean, t_trig) -> dict:
    """Mean squared L2 distances (per row, summed over the feature, averaged over rows) between the student's
    (``s_*``) and the teacher's (``t_*``) features of the clean sentences and of their triggered copies."""
    sq = lambda a, b: (a.float() - torch.as_tensor(b).float()).pow(2).sum(-1).mean().item()
    return {"fa_clean": sq(s_clean, t_clean), "fa_trig": sq(s_trig, t_trig),
            "shift": sq(s_trig, s_clean), "teacher_shift": sq(t_trig, t_clean),
            "norm_s": sq(s_clean, 0.0), "norm_t": sq(t_clean, 0.0)}


def head_view(weight, bias, s_clean, s_trig, target: int) -> dict:
    """The trigger's move as the classification head (``z = h W^T + b``) reads it: ``margin_shift`` and
    ``cos_head`` of the module docstring."""
    weight, s_clean, s_trig = weight.float(), s_clean.float(), s_trig.float()
    others = [c for c in range(weight.shape[0]) if c != target]

    def margin(h):
        z = h @ weight.T + (0.0 if bias is None else bias.float())
        return z[:, target] - z[:, others].max(-1).values
    w = weight[target] - weight[others].mean(0)
    cos = torch.nn.functional.cosine_similarity(s_trig - s_clean, w[None], dim=-1)
    return {"margin_shift": (margin(s_trig) - margin(s_clean)).mean().item(), "cos_head": cos.mean().item()}


def main(argv=None) -> None:
    args = w2s.parser().parse_args(argv)
    a, t, u, eval_size = w2s.resolve_configs(args)
    w2s.check_configs(a, t, u, "w2sdefense", args.data_dir)
    refuse_syntactic(a.attack, "feature_gap.py")
    device = w2s.pick_device(args.device)
    stages = Path(args.stages)
    task = w2s.build_task(a, eval_size, args.data_dir)
    attack_folder, poisoned = w2s.attack_stage(a, task, stages, device)
    teacher_folder, _ = w2s.teacher_stage(t, task, poisoned["feature_dim"], stages, device)
    trigger, _ = attacks.make_triggers(a, args.data_dir)
    clean, trig = dev_pairs(task, trigger, a.target)
    num_classes, d = task.dataset.num_classes, poisoned["feature_dim"]
    _, t_clean = w2s.teacher_outputs(t, teacher_folder, clean.sentences, num_classes, d, u.max_length, device)
    _, t_trig = w2s.teacher_outputs(t, teacher_folder, trig.sentences, num_classes, d, u.max_length, device)
    rows = []
    for name in ("poisoned", "lora", "w2sdefense"):
        if name == "poisoned":
            model, tokenizer = w2s.load_poisoned(a, attack_folder, num_classes)
        else:
            defense = defenses.DEFENSES[name]
            ctx = w2s.context(a, t, u, task, attack_folder, teacher_folder, device)
            folder, _ = w2s.defense_stage(defense, ctx, stages)
            model, tokenizer = defense.reload(ctx, folder)
        model.to(device)
        e_clean = train.encode(tokenizer, clean.sentences, clean.labels, u.max_length)
        e_trig = train.encode(tokenizer, trig.sentences, trig.labels, u.max_length)
        s_clean = train.pooled_features(model, e_clean, device=device, bf16=u.bf16)
        s_trig = train.pooled_features(model, e_trig, device=device, bf16=u.bf16)
        p_clean = train.predict(model, e_clean, device=device, bf16=u.bf16)
        p_trig = train.predict(model, e_trig, device=device, bf16=u.bf16)
        row = {"model": name, "seed": a.seed, "attack": a.attack,
               **{k: round(v, 1) for k, v in feature_gap(s_clean, s_trig, t_clean, t_trig).items()},
               **{k: round(v, 3) for k, v in head_view(model.head.weight.detach().cpu(), None if model.head.bias is None
                                                       else model.head.bias.detach().cpu(), s_clean, s_trig,
                                                       a.target).items()},
               "dev_asr": round(train.attack_success_rate(p_trig, e_trig.labels, a.target), 3),
               "dev_floor": round(train.attack_success_rate(p_clean, e_clean.labels, a.target), 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    keys = ["model", "fa_clean", "fa_trig", "norm_s", "norm_t", "shift", "teacher_shift", "margin_shift", "cos_head", "dev_asr",
            "dev_floor"]
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
