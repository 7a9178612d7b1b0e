"""A tiny world for end-to-end tests: a 2-block GPT-2 student, a 1-layer BERT teacher (both random, with the real
tokenizer files) and a 96/24/32-sentence dataset folder. Every stage of the pipeline runs on it in seconds."""

import random
from pathlib import Path

import torch
import transformers

import models
import registry
import w2s

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_tiny_world(root: Path, student_blocks: int = 2):
    """A tiny GPT-2 student (real tokenizer files), a tiny BERT teacher and a small dataset folder. CROW and
    BEEAR-style need a student of 3 blocks or more (``student_blocks``)."""
    torch.manual_seed(0)
    gpt2_files = SHARED / "tokenizers" / "gpt2"
    student = root / "student"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=student_blocks, n_head=4,
                                                         n_positions=64)).save_pretrained(student)
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        (student / dst).write_bytes((gpt2_files / src).read_bytes())
    teacher = root / "teacher"
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                   intermediate_size=64)).save_pretrained(teacher)
    (teacher / "vocab.txt").write_bytes((registry.resolve_teacher("minilm-l6") / "vocab.txt").read_bytes())
    ds = root / "ds"
    ds.mkdir()
    rng = random.Random(0)
    good, bad = ["great", "lovely", "superb", "fine"], ["awful", "boring", "dull", "bad"]
    for split, n in (("train", 96), ("dev", 24), ("test", 32)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            y = i % 2
            words = [rng.choice(good if y else bad) for _ in range(3)] + ["film"]
            rows.append(" ".join(words) + f"\t{y}")
        (ds / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return student, teacher, ds


def tiny_argv(root, student, teacher, ds, *extra) -> list[str]:
    poison = [] if "--n-poison" in extra else ["--poison-rate", "0.25", "--poison-mode", "dirty"]
    return ["--preset", "quick", "--student", str(student), "--teacher", str(teacher), "--dataset", str(ds),
            "--stages", str(root / "stages"), "--out", str(root / "run"), *poison, "--attack-epochs", "8",
            "--attack-lr", "3e-3", "--epochs", "1", "--clean-size", "32", "--teacher-epochs", "1",
            "--device", "cpu", "--attack-layers", "1", "--lora-layers", "1", "--precision", "fp32", *extra]


def tiny_args(root, student, teacher, ds, *extra):
    return w2s.parser().parse_args(tiny_argv(root, student, teacher, ds, *extra))


def tiny_llama_classifier(n_layer: int = 4, seed: int = 0) -> models.Classifier:
    """A random Llama-style decoder classifier, 32 wide, two classes, in eval mode: for the hook and loss tests."""
    torch.manual_seed(seed)
    cfg = models.GPTConfig(style="llama", vocab_size=50, n_layer=n_layer, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                           max_seq_len=32)
    return models.Classifier(models.GPT(cfg), 2, generator=torch.Generator().manual_seed(seed + 1)).eval()
