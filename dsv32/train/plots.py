"""PNG plots of a training log: loss per stage, indexer KL / recall, GRPO reward."""
from __future__ import annotations

import json
from pathlib import Path


def plot_log(log_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write loss.png, indexer.png and reward.png from a JSON-lines log; returns the files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    out_dir = Path(out_dir)
    written = []

    def series(stage: str, key: str):
        # a resumed run logs some steps twice: the later row wins
        pts = {r["step"]: r[key] for r in rows if r.get("stage") == stage and r.get(key) is not None}
        return sorted(pts), [pts[k] for k in sorted(pts)]

    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for stage in ("sft_short", "sft", "dsa_sparse"):
        for key, style in (("lm", "-"), ("mtp", "--")):
            x, y = series(stage, key)
            if x:
                ax.plot([offset + s for s in x], y, style, label=f"{stage} {key}")
        x, _ = series(stage, "lm")
        offset += max(x, default=0)
    ax.set_xlabel("step"), ax.set_ylabel("cross-entropy"), ax.set_yscale("log"), ax.legend()
    ax.set_title("LM and MTP loss (assistant tokens; short prompts, then full)")
    written.append(_save(fig, out_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for stage in ("dsa_warmup", "dsa_sparse"):
        x, y = series(stage, "index_kl")
        if x:
            ax.plot([offset + s for s in x], y, label=f"{stage} indexer KL")
        offset += max(x, default=0)
    ax2 = ax.twinx()
    offset = 0
    for stage in ("dsa_warmup", "dsa_sparse"):
        x, y = series(stage, "recall")
        if x:
            ax2.plot([offset + s for s in x], y, ":", label=f"{stage} recall")
        offset += max(x, default=0)
    ax.set_xlabel("step"), ax.set_ylabel("KL"), ax2.set_ylabel("indexer recall")
    ax.legend(loc="upper left"), ax2.legend(loc="lower right")
    ax.set_title("DSA: indexer KL and top-k recall")
    written.append(_save(fig, out_dir / "indexer.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    x, y = series("grpo", "reward")
    ax.plot(x, y, "o-")
    ax.set_xlabel("GRPO step"), ax.set_ylabel("mean reward"), ax.set_title("GRPO reward")
    written.append(_save(fig, out_dir / "reward.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
