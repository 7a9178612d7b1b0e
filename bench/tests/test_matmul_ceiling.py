"""The speed benchmarks' own tests: bench/matmul_ceiling.py counts the products it times correctly."""

import math
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent
for folder in (BENCH.parent / "tests", BENCH):                     # bench/ is not a package
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from test_models import seeded, tiny_classifier  # noqa: E402


def test_matmul_ceiling_counts_every_product_of_a_step():
    """bench/matmul_ceiling.py: its list of a block's products covers the FLOP count the MFU divides by, and
    its in-step timer sees every product op (one per weight, two for attention, per block)."""
    import common
    import matmul_ceiling

    def flops(lhs, rhs):                               # 2 m k n, times the batch of a batched product
        return 2 * math.prod(lhs) * rhs[-1]

    clf = tiny_classifier("llama", n_layer=2, num_classes=2, seed=0)
    cfg, B, T = clf.backbone.cfg, 3, 5
    products = matmul_ceiling.block_products(cfg, B, T)
    weights = [p for name, p in products["fwd"].items() if len(p[0]) == 2]
    attn = [p for name, p in products["fwd"].items() if len(p[0]) == 3]
    # The weight products are 2 N per token (N: every backbone weight but the embedding and the norms) ...
    n_weights = sum(p.numel() for n, p in clf.backbone.blocks.named_parameters() if "norm" not in n)
    assert sum(flops(*p) for p in weights) * cfg.n_layer == 2 * n_weights * B * T
    # ... attention's two are 2 T d per token each, and the LoRA step's input gradients cost the forward again.
    assert sum(flops(*p) for p in attn) == 2 * 2 * T * cfg.d_model * B * T
    bwd_weights = [p for name, p in products["bwd"].items() if len(p[0]) == 2]
    assert sum(flops(*p) for p in bwd_weights) == sum(flops(*p) for p in weights)
    assert common.non_embedding_params(clf.backbone) - n_weights == sum(
        p.numel() for n, p in clf.backbone.named_parameters() if "norm" in n)
    timer = matmul_ceiling.ProductTimer()
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=seeded(1))
    with torch.no_grad(), timer:
        clf(ids)
    assert timer.calls == cfg.n_layer * (7 + 2) + 1                     # + the head
    assert timer.seconds > 0
