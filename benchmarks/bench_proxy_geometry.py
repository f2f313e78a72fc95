"""Training-step cost of the proxy at DeiT's token geometry (patch 2, 196 tokens) vs patch 4 (49 tokens).

    .venv/bin/python benchmarks/bench_proxy_geometry.py

Why the proxy uses patch 4: one AdamW step at batch 128, fp32 eager on this machine's cores,
median of the steps after 3 warm-up steps. Prints ms/step and minutes per Fashion-MNIST epoch;
writes benchmarks/results/proxy_geometry.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

CONFIGS = {"patch 4 (49 tokens), 96 wide, 4 heads": dict(patch_size=4, embed_dim=96, num_heads=4),
           "patch 2 (196 tokens), 64 wide, 4 heads": dict(patch_size=2, embed_dim=64, num_heads=4)}


def step_ms(batch: int = 128, steps: int = 10, **kwargs) -> float:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=28, in_chans=1, num_classes=10, depth=6, mlp_ratio=4.0, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps + 3):
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    kept = sorted(times[3:])
    return 1000 * kept[len(kept) // 2]


if __name__ == "__main__":
    results = {name: step_ms(**cfg) for name, cfg in CONFIGS.items()}
    for name, ms in results.items():
        print(f"{name:<40} {ms:7.0f} ms/step  {60000 / 128 * ms / 60000:5.2f} min/epoch")
    a, b = results.values()
    print(f"patch 2 costs {b / a:.2f}x patch 4 per step")
    out = Path(__file__).parent / "results" / "proxy_geometry.json"
    out.write_text(json.dumps({"command": "benchmarks/bench_proxy_geometry.py", "batch": 128, "threads": torch.get_num_threads(),
                               "median_ms_per_step": results, "ratio": b / a}, indent=2) + "\n")
