"""`dsv32 train --recipe demo [--out DIR]` and `dsv32 train eval MODEL_DIR`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="run a training recipe (demo: rebuilds the bundled model)",
                              description="Train with the DeepSeek-V3.2 recipe at small scale, or "
                                          "evaluate a checkpoint on held-out tool-use tasks.")
    sub = p.add_subparsers(dest="train_command")
    p.add_argument("--recipe", default="demo", choices=["demo"], help="recipe to run")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every step count and data size (e.g. 0.05 for a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)
    e = sub.add_parser("eval", help="held-out tool-use evaluation of a checkpoint")
    e.add_argument("model_dir", type=Path)
    e.add_argument("-n", type=int, default=160, help="tasks (balanced over categories and modes)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--unseen-cities", action="store_true",
                   help="only weather tasks, about cities no training conversation names")
    e.add_argument("--one-tool", action="store_true",
                   help="only tool tasks, each offered only the tool it needs")
    e.add_argument("--no-users", action="store_true",
                   help="leave out the user-written set (run beside the held-out tasks otherwise, "
                        "not with the probes)")
    e.add_argument("--md", type=Path, default=None, help="also write the tables here (an eval.md)")
    e.add_argument("--json", type=Path, default=None, help="also write the summary here")
    e.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .recipe import Recipe

    recipe = Recipe(seed=args.seed)
    if args.scale != 1.0:
        recipe = recipe.scaled(args.scale)
    summary = run_demo(args.out, recipe, progress=not args.no_progress, evaluate_model=not args.no_eval)
    print(json.dumps({k: v for k, v in summary.items() if k != "recipe"}, indent=2, default=str))
    print(f"model written to {args.out / 'model'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import main_eval, report_markdown

    probe = {"categories": ("weather",), "unseen_cities": True} if args.unseen_cities else {}
    if args.one_tool:
        probe.update(one_tool=True, categories=probe.get("categories", ("calculator", "weather", "units")))
    res = main_eval(str(args.model_dir), n=args.n, seed=args.seed, users=not (probe or args.no_users),
                    **probe)
    if args.md:
        args.md.write_text(report_markdown(res, users=res.get("users")))
    if args.json:
        summary = {k: v for k, v in res.items() if k not in ("episodes", "users")}
        if "users" in res:
            summary["users"] = {k: v for k, v in res["users"].items() if k != "episodes"}
        args.json.write_text(json.dumps(summary, indent=2))
    return 0
