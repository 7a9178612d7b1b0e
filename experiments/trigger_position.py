"""Where in a sentence does a BadNet trigger fire? ASR of a poisoned student by trigger position.

    .venv/bin/python experiments/trigger_position.py --preset cpu --seed 0            # as w2s.py reads sentences
    .venv/bin/python experiments/trigger_position.py --preset cpu --seed 0 --bare     # no start token, no prefix space

The attacker's stage comes from the usual stage cache (trained first if missing), with the student reading
``<start> sentence`` with a prefix space (w2s.student_classifier), or, with ``--bare``, the bare sentence. The
trigger word (the first of ``--triggers``, default ``mn``) is then put at a FIXED place in every positive test
sentence (first word, middle, last word) and the share classified as the target is printed, beside the share
of untriggered positives classified as the target (the clean error rate). One JSON line.

Why it exists: with bare sentences a trigger as the FIRST word is another token for a byte-level BPE
(``"mn"`` instead of ``" m" "n"``), and the clean-label attack barely learns it; this is the measurement
behind ``AttackConfig.start_token`` and ``prefix_space``.
"""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
import w2s  # noqa: E402


def place(sentence: str, word: str, where: str) -> str:
    words = sentence.split()
    at = {"first": 0, "middle": len(words) // 2, "last": len(words)}[where]
    return " ".join(words[:at] + [word] + words[at:])


def main(argv=None) -> None:
    parser = w2s.parser()
    parser.add_argument("--bare", action="store_true", help="read bare sentences (no start token, no prefix space)")
    args = parser.parse_args(argv)
    a, _, _, eval_size = w2s.resolve_configs(args)
    if args.bare:
        a = dataclasses.replace(a, start_token=False, prefix_space=False)
    device = w2s.pick_device(args.device)
    task = w2s.build_task(a, eval_size, args.data_dir)
    folder, poisoned = w2s.attack_stage(a, task, Path(args.stages), device)
    model, tokenizer = w2s.load_poisoned(a, folder, task.dataset.num_classes)
    model.to(device)
    word = a.triggers[0]
    test = task.dataset.test
    keep = [s for s, y in zip(test.sentences, test.labels) if y != a.target]

    def fires(sentences) -> float:
        enc = train.encode(tokenizer, sentences, [0] * len(sentences), a.max_length)
        return (train.predict(model, enc, device=device, bf16=a.bf16) == a.target).float().mean().item()

    out = {"preset": args.preset, "seed": a.seed, "bare": args.bare, "trigger": word, "n": len(keep),
           "asr_random_position": round(poisoned["asr"], 3), "untriggered": round(fires(keep), 3)}
    for where in ("first", "middle", "last"):
        out[f"asr_{where}"] = round(fires([place(s, word, where) for s in keep]), 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
