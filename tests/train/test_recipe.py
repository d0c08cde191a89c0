"""`dsv32 train --recipe demo` end to end at a tiny scale: every stage, the bundle, the evaluation."""
import json

from dsv32 import load_model
from dsv32.train.demo import run_demo
from dsv32.train.recipe import Recipe
from dsv32.train.users import USER_CATEGORIES

STAGES = ("sft_short", "sft", "dsa_warmup", "dsa_sparse", "grpo")


def test_demo_recipe_runs_every_stage_and_resumes(tmp_path):
    recipe = Recipe().scaled(0.002)
    recipe.n_eval, recipe.n_heldout_lm, recipe.n_unseen, recipe.n_users = 8, 4, 4, 14
    recipe.grpo.prompts_per_step, recipe.grpo.group_size = 2, 4
    summary = run_demo(tmp_path, recipe, progress=False)

    assert all((tmp_path / "ckpt" / s / "DONE").exists() for s in STAGES)
    assert 0 < summary["after_sft"]["indexer_recall"] <= 1
    assert {"sparse_lm_loss", "arg_top1_served", "arg_top1_dense"} <= set(summary["after_grpo"])
    assert summary["eval"]["overall"]["n"] == 8 and len(summary["grpo"]["reward_curve"]) == 1
    assert summary["eval_unseen_cities"]["overall"]["n"] == 4
    assert set(summary["eval_unseen_cities"]["cells"]) == {"weather/thinking", "weather/chat"}
    assert "cities no training conversation names" in (tmp_path / "eval.md").read_text()
    assert "The user-written set" in (tmp_path / "eval.md").read_text()
    users = summary["eval_users"]
    assert users["overall"]["n"] == 14 and set(users["categories"]) == set(USER_CATEGORIES)
    assert summary["bundle_bytes"] < 40e6 and (tmp_path / "loss.png").exists()
    model = load_model(tmp_path / "model", progress=False)
    assert model.config.index_topk == recipe.model["topk"]
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").open()]
    trained = {r["stage"] for r in rows if "stage" in r}
    assert set(STAGES) <= trained
    assert any(r.get("event") == "sparse_stage" and r["tool_subsets"] > 0 for r in rows)

    again = run_demo(tmp_path, recipe, progress=False)      # every stage is DONE: nothing retrains
    rows_again = [json.loads(line) for line in (tmp_path / "log.jsonl").open()]
    assert [r for r in rows_again if r.get("stage")] == [r for r in rows if r.get("stage")]
    assert again["eval"]["overall"] == summary["eval"]["overall"]


def test_training_data_adds_plain_chat_conversations():
    from dsv32.train.corpus import training_conversations

    none = dict(n_train=40, n_city=0, n_skill=0, n_numbers=0, n_multi_call=0, n_json=0)
    base = training_conversations(Recipe(**none, n_chat=0))
    more = training_conversations(Recipe(**none, n_chat=30))
    assert more[:len(base)] == base and len(more) == len(base) + 30
    assert {c.category for c in more[len(base):]} == {"chat"}
    assert not {c.id for c in base} & {c.id for c in more[len(base):]}


def test_the_default_recipe_is_the_one_that_trained_the_bundled_model():
    from dsv32.server.cli import BUNDLED_MODEL

    trained_with = json.loads((BUNDLED_MODEL / "summary.json").read_text())["recipe"]
    assert Recipe().to_json() == trained_with


def test_tool_subsets_keep_the_called_tools_and_vary_the_rest():
    from dsv32.train.corpus import tool_subset_conversations
    from dsv32.train.synth import sft_conversations

    convs = sft_conversations(120, seed=2)
    before = json.dumps([c.messages for c in convs])
    subsets = tool_subset_conversations(convs, 0.5, seed=0)
    assert json.dumps([c.messages for c in convs]) == before            # originals untouched
    assert tool_subset_conversations(convs, 0.5, seed=0) == subsets     # seeded
    assert not tool_subset_conversations(convs, 0.0, seed=0)
    offering = [c for c in convs if c.messages[0].get("tools")]
    assert 0.3 * len(offering) < len(subsets) < 0.7 * len(offering)
    names = {t["function"]["name"] for t in offering[0].messages[0]["tools"]}
    sizes, orders = set(), set()
    for c in subsets:
        offered = [t["function"]["name"] for t in c.messages[0]["tools"]]
        assert c.tools == c.messages[0]["tools"] and offered and set(offered) <= names
        called = {call["function"]["name"] for m in c.messages for call in m.get("tool_calls") or []}
        assert called <= set(offered)
        sizes.add(len(offered))
        orders.add(tuple(offered))
    assert sizes == {1, 2, 3} and len(orders) > 6
