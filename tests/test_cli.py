"""The `align` command line: help, config errors, generation and decoding comparison."""

import json
import subprocess
import sys

import pytest

from align.cli import main


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "align.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "generate", "eval", "serve", "rm"):
        assert command in out.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "configs/quickstart.yaml", "--alpah", "0.2"], "unknown key 'alpah'; did you mean 'alpha'"),
    (["train", "--config", "configs/quickstart.yaml", "--lam", "2"], "lam"),
    (["train", "--config", "configs/quickstart.yaml", "--learning_rate", "fast"], "expects float"),
    (["train", "--config", "missing.yaml"], "missing.yaml does not exist"),
    (["train"], "needs --config"),
])
def test_train_config_errors_exit_2_with_message(args, message, capsys, tmp_path):
    assert main(args + ["--output_dir", str(tmp_path)] if len(args) > 1 else args) == 2
    err = capsys.readouterr().err
    assert err.startswith("align: error:") and message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_generate_contrastive_alpha0_equals_greedy(tiny_lm_dir, tmp_path):
    common = ["generate", "--model", str(tiny_lm_dir), "--prompt", "the cat", "--prompt", "a dog sees the",
              "--max-new-tokens", "8"]
    assert main(common + ["--strategy", "greedy", "--output", str(tmp_path / "g.jsonl")]) == 0
    assert main(common + ["--strategy", "contrastive", "--penalty-alpha", "0", "--output", str(tmp_path / "c.jsonl")]) == 0
    greedy = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    contrastive = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in greedy] == [r["completion"] for r in contrastive]
    assert greedy[0]["prompt"] == "the cat" and contrastive[0]["strategy"] == "contrastive"


def test_eval_decoding_writes_table(tiny_lm_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\na dog\n")
    out = tmp_path / "table"
    assert main(["eval", "decoding", "--model", str(tiny_lm_dir), "--prompts", str(prompts), "--strategies",
                 "greedy,contrastive", "--max-new-tokens", "12", "--output", str(out)]) == 0
    table = json.loads(out.with_suffix(".json").read_text())
    assert set(table) == {"greedy", "contrastive"}
    for row in table.values():
        assert 0 <= row["diversity"] <= 1 and 0 <= row["rep-2"] <= 100 and 0 <= row["isotropy"] <= 2
    assert "| greedy |" in out.with_suffix(".md").read_text()


def test_generate_bad_arguments(tiny_lm_dir, capsys):
    assert main(["generate", "--model", str(tiny_lm_dir), "--prompt", "a", "--max-new-tokens", "0"]) == 2
    assert main(["generate", "--model", str(tiny_lm_dir)]) == 2
    assert main(["generate", "--model", "/no/such/model", "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert "max_new_tokens" in err and "--prompt" in err and "/no/such/model" in err
