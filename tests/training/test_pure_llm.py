"""`training/pure_llm.py`, the PureLLM baseline, on the tiny LLM and real demo data: the recipe trains what stage 2
trains for as many steps, the loss falls, and the folder is a plain causal LM that loads and answers in a process
without this package; bad arguments exit 2 with one line."""

import json
import runpy
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import run_in_fresh_python

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "training" / "recipes"
pure_llm = runpy.run_path(str(ROOT / "training" / "pure_llm.py"))

# Recipe keys that set the data and the number of steps: the PureLLM's must be stage 2's.
SAME_AS_STAGE2 = (
    "dataset_config",
    "max_protein_length",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "loss_reduction",
    "seed",
)


@pytest.mark.parametrize("folder", ["tiny", "paper-tinyllama", "paper-openllama3b", "paper-llama2-7b"])
def test_the_recipe_trains_stage_2s_data_for_stage_2s_steps(folder) -> None:
    stage2 = yaml.safe_load((RECIPES / folder / "stage2.yaml").read_text())
    recipe = yaml.safe_load((RECIPES / folder / "pure_llm.yaml").read_text())
    assert {key: recipe.get(key) for key in SAME_AS_STAGE2} == {key: stage2.get(key) for key in SAME_AS_STAGE2}
    assert recipe["max_length"] == 2048 and "num_experts" not in recipe
    stage1 = yaml.safe_load((RECIPES / folder / "stage1.yaml").read_text())
    assert recipe["language_model_name_or_path"] == stage1["language_model_name_or_path"]


@pytest.fixture(scope="module")
def trained(demo_dataset, tiny_parts, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("pure-llm") / "pure-llm"
    argv = [
        "--config", str(RECIPES / "tiny" / "pure_llm.yaml"),
        "--dataset_name", str(demo_dataset),
        "--language_model_name_or_path", str(tiny_parts / "language_model"),
        "--output_dir", str(output),
        "--max_protein_length", "64", "--per_device_train_batch_size", "4",
        "--max_steps", "24", "--logging_steps", "3", "--save_steps", "24", "--learning_rate", "3e-3",
    ]  # fmt: skip
    assert pure_llm["main"](argv) == 0
    return output


def test_trains_and_writes_a_plain_llm_that_loads_and_answers_anywhere(trained, tiny_parts) -> None:
    state = json.loads((trained / "checkpoint-24" / "trainer_state.json").read_text())
    losses = [record["loss"] for record in state["log_history"] if "loss" in record]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert (trained / "loss_curve.png").stat().st_size > 1000
    model = AutoModelForCausalLM.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.max_protein_length == 64
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(tiny_parts / "language_model")) + 2  # <bop>, <eop>
    script = """
import sys
from transformers import pipeline
generator = pipeline("text-generation", model=sys.argv[1])
chat = [{"role": "user", "content": "What is the function of <bop>MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPP<eop> ?"}]
reply = generator(chat, max_new_tokens=8, do_sample=False)[0]["generated_text"][-1]
print(reply["role"], len(reply["content"]) > 0, type(generator.model).__module__)
"""
    printed = run_in_fresh_python(script, [str(trained)], trained.parent)
    assert printed.split() == ["assistant", "True", "transformers.models.llama.modeling_llama"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max_protein_length", "0"], "max_protein_length must be >= 1"),
        (["--loss_reduction", "mean"], "loss_reduction must be one of ['token', 'sequence']"),
        (["--max_length", "0"], "max_length must be >= 1"),
        (["--language_model_name_or_path", "/no/such/llm"], "language_model_name_or_path: /no/such/llm"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(demo_dataset, tiny_parts, tmp_path, capsys, extra, message) -> None:
    argv = [
        "--config", str(RECIPES / "tiny" / "pure_llm.yaml"), "--dataset_name", str(demo_dataset),
        "--language_model_name_or_path", str(tiny_parts / "language_model"), "--output_dir", str(tmp_path / "out"),
        *extra,
    ]  # fmt: skip
    assert pure_llm["main"](argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("pure_llm: error: ") and message in error and "\n" not in error
    assert not (tmp_path / "out").exists()
