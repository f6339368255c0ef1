"""The README's commands as a newcomer types them: every block marked `<!-- readme-test: NAME -->`
runs as written, command by command, in a temporary directory (`.venv/bin/` is this venv's bin
directory), and writes what the README says it writes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.cli_runs import BIN, ROOT, cli_env

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
MARK = re.compile(r"<!-- readme-test: ([\w-]+) -->\s*\n```bash\n(.*?)\n```", re.S)


def marked_blocks() -> dict[str, list[str]]:
    """NAME -> the block's commands (continuation lines joined, comments and blank lines dropped)."""
    blocks: dict[str, list[str]] = {}
    for name, body in MARK.findall(README.read_text()):
        commands: list[str] = []
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line)
        blocks[name] = commands
    return blocks


def run_as_written(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """One README command in bash, `.venv/bin/` mapped to this venv (the README's own comments
    after `#` are comments to bash too)."""
    assert command.startswith(".venv/bin/"), f"a marked README command that is not a .venv/bin/ program: {command}"
    done = subprocess.run(
        ["bash", "-c", command.replace(".venv/bin/", f"{BIN}/")],
        cwd=cwd,
        capture_output=True,
        text=True,
        # The model dry run and the pipeline plan read the recipes of this checkout wherever they run.
        env=cli_env(cwd, TOKENIZERS_PARALLELISM="false"),
        timeout=600,
    )
    assert done.returncode == 0, f"{command}\n-> exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def test_the_readme_marks_its_runnable_blocks():
    blocks = marked_blocks()
    assert set(blocks) == {"quickstart", "dry-run"}, blocks.keys()
    programs = [c.split()[0].removeprefix(".venv/bin/") for c in blocks["quickstart"]]
    assert programs == ["ouro-data", "ouro-data", "ouro-train", "ouro-generate", "ouro-eval"]


def pydoc_documents() -> list[str]:
    """What the README's "no corpus at hand?" snippet writes: the Python docs, sorted, deduplicated."""
    from pydoc_data.topics import topics

    return sorted({t.strip() for t in topics.values() if t.strip()})


def test_the_quick_start_runs_as_written(tmp_path: Path):
    # The README's corpus, made small: 24 documents to train on, 2 held out.
    docs = pydoc_documents()
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:24]))
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[-2:]))

    outputs = [run_as_written(c, tmp_path) for c in marked_blocks()["quickstart"]]

    tokenizer = json.loads((tmp_path / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) <= 4096
    manifest = json.loads((tmp_path / "shards/mine/manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] <= 4096
    assert (tmp_path / "shards/mine/tokenizer.json").is_file()

    run = tmp_path / "runs/mine"
    final = run / "checkpoints/step_00000030"
    assert (final / "COMPLETE").exists() and (final / "model.safetensors").is_file()
    assert (final / "tokenizer.json").is_file()
    for written in ("metrics.jsonl", "final_eval.json", "loss_per_step.png"):
        assert (run / written).is_file(), written
    assert "step 30 |" in outputs[2].stdout + outputs[2].stderr

    # The prompt's header line, then what 30 steps of training make of it (often blank lines).
    assert outputs[3].stdout.startswith("### The list\n"), outputs[3].stdout
    assert "using runs/mine/checkpoints/step_00000030" in outputs[3].stderr
    assert re.search(r"\[\d+ tokens in ", outputs[3].stderr), outputs[3].stderr

    for written in ("eval.json", "eval.md", "eval.png"):
        assert (run / "eval" / written).is_file(), written
    result = json.loads((run / "eval/eval.json").read_text())
    assert len(result["per_step"]) == 4


def test_the_dry_runs_run_as_written(tmp_path: Path):
    (tmp_path / "shards").mkdir()  # the quick start's output directory, the plan's data_root
    model, pipeline = (run_as_written(c, tmp_path) for c in marked_blocks()["dry-run"])
    # The numbers the README's table gives, and a memory estimate (not "no memory").
    assert "parameters: 1,434,652,673" in model.stdout
    assert "memory per device (rough)" in model.stdout
    assert "stage" in pipeline.stdout and "warmup" in pipeline.stdout and "gate_training" in pipeline.stdout
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("model.safetensors"))
