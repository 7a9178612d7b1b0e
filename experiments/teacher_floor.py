"""Each cached teacher's errors by class on the clean dev and test sets: how many positive sentences it calls negative
(its own floor, for a target of 0) and how many negative ones it calls positive.

    .venv/bin/python experiments/teacher_floor.py --data-dir ../shared/data [--stages runs/stages]

Reads every ``teacher-*`` stage folder (``w2s.py``'s teacher stage, the cpu preset's teacher settings, SST-2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stages  # noqa: E402
import train  # noqa: E402
import w2s  # noqa: E402
import weights  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="where the datasets are (default: the cache)")
    p.add_argument("--stages", default="runs/stages", help="the stage cache holding teacher-* folders")
    args = p.parse_args(argv)
    a, t, _, eval_size = w2s.resolve_configs(w2s.parser().parse_args([]))
    task = w2s.build_task(a, eval_size, args.data_dir)
    folders = sorted(Path(args.stages).glob("teacher-*"))
    if not folders:
        raise SystemExit(f"error: no teacher-* stage in {args.stages}")
    for folder in folders:
        proj = weights.read_safetensors(folder / "teacher.safetensors", names=["proj.0.weight"])["proj.0.weight"]
        d_student = proj.shape[0]                      # the width of the student it was projected to
        model, tokenizer = w2s.teacher_classifier(t, task.dataset.num_classes, d_student)
        stages.load_model_state(model, folder / "teacher.safetensors")
        model.eval()
        out = []
        for name, split in (("dev", task.dev), ("test", task.test)):
            enc = train.encode(tokenizer, split.sentences, split.labels, t.max_length)
            preds = train.predict(model, enc)
            (tn, fp), (fn, tp) = train.confusion_matrix(preds, enc.labels, 2)      # m[true][predicted]
            pos_as_neg, neg_as_pos = fn / (fn + tp), fp / (fp + tn)
            out.append(f"{name} acc {train.accuracy(preds, enc.labels):.4f}, positive called negative {pos_as_neg:.3f}, "
                       f"negative called positive {neg_as_pos:.3f}")
        print(f"{folder.name}: " + "; ".join(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
