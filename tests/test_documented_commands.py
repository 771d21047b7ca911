"""The documented commands work as written: every command of the ``bash`` blocks of README.md
and docs/*.md parses (run configs validate, scripts and their options exist), every relative
link leads somewhere, docs/configuration.md is the config schema's current reference, the
resume recipe (run from docs/reliability.md itself) continues a run, plain ``flwr run .``'s
defaults hold (data from the user data directory, results under the home directory), and
``scripts/setup_data.sh`` works from a path with spaces and quotes."""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mosaic_flwr.data.files as files
from mosaic_flwr.core.checkpoint import load_checkpoint
from mosaic_flwr.config import build_config
from mosaic_flwr.data import load_dataset
from server_app.app import run_dir
from tests.support import run_inprocess

ROOT = Path(__file__).resolve().parents[1]
STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fmnist(folder: Path, seed: int, n_train: int = 300, n_test: int = 60, test_seed: int | None = None) -> Path:
    """Four small Fashion-MNIST-shaped IDX files (random images, balanced labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, test_rng = np.random.default_rng(seed), np.random.default_rng(seed if test_seed is None else test_seed)
    arrays = (rng.integers(0, 256, (n_train, 28, 28)), rng.permutation(np.arange(n_train) % 10),
              test_rng.integers(0, 256, (n_test, 28, 28)), np.arange(n_test) % 10)
    for stem, array in zip(STEMS, arrays):
        write_idx(folder / f"{stem}.gz", array)
    return folder


# ----------------------------------------------------------------------------- plain `flwr run .`
def test_empty_data_dir_reads_the_user_data_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "DEBIAN_FMNIST_DIR", tmp_path / "nowhere")
    monkeypatch.delenv(files.DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert files.user_data_dir() == tmp_path / "cache" / "mosaic-flwr" / "data"
    monkeypatch.setenv(files.DATA_ENV, str(tmp_path / "my data"))
    assert files.user_data_dir() == tmp_path / "my data"
    assert files.fmnist_location() is None
    fake_fmnist(tmp_path / "my data" / "fashion-mnist", seed=0)
    train, test = load_dataset("fmnist")          # data-dir empty, as with plain `flwr run .`
    assert (len(train), len(test)) == (300, 60)
    assert files.fmnist_location() == tmp_path / "my data" / "fashion-mnist"


def test_default_output_dir_is_under_home_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_dir(build_config({"run-name": "x"}))
    assert out == Path.home() / "mosaic-flwr-outputs" / "x"


# ----------------------------------------------------------------------------- resume: data-dir
def test_resume_accepts_another_data_dir_holding_the_same_data_and_refuses_other_data(tmp_path):
    base = {"strategy": "fedavg", "partition": "iid", "local-steps": 2, "min-partition-size": 1}
    first, copy = tmp_path / "first", tmp_path / "copy of it"
    fake_fmnist(first / "fashion-mnist", seed=1)
    shutil.copytree(first, copy)
    out = run_inprocess(tmp_path / "out", **base, **{"data-dir": str(first), "num-server-rounds": 1})["dir"]
    assert len(load_checkpoint(out)["extra"]["test_set_sha256"]) == 16
    # the same files elsewhere: accepted (and the run extended by one round)
    run_inprocess(tmp_path / "out", **base, **{"data-dir": str(copy), "resume": str(out), "num-server-rounds": 2})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_after_round"] == 1 and summary["rounds"] == 2

    other = fake_fmnist(tmp_path / "other" / "fashion-mnist", seed=2)
    with pytest.raises(RuntimeError, match=r"resume: the fmnist test set read now \(data-dir=.*other'\) is not "
                                           r"the checkpoint's \(sha256 [0-9a-f]{16}\.\.\., saved [0-9a-f]{16}"
                                           r"\.\.\.\): a resumed run must read the same data"):
        run_inprocess(tmp_path / "out", **base, **{"data-dir": str(other.parent), "resume": str(out),
                                                   "num-server-rounds": 3})
    relabelled = fake_fmnist(tmp_path / "relabelled" / "fashion-mnist", seed=3, test_seed=1)  # same test set
    with pytest.raises(RuntimeError, match=r"resume: the clients' label counts differ from the checkpoint's"):
        run_inprocess(tmp_path / "out", **base, **{"data-dir": str(relabelled.parent), "resume": str(out),
                                                   "num-server-rounds": 3})


# ----------------------------------------------------------------------------- scripts/setup_data.sh
def test_setup_data_works_from_a_path_with_spaces_and_quotes(tmp_path):
    project = tmp_path / "it's a \"project\" dir"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup_data.sh", project / "scripts")
    data = tmp_path / "data 'here' \"too\""
    fake_fmnist(data / "fashion-mnist", seed=0)
    env = {**os.environ, "MOSAIC_VENV": sys.prefix, files.DATA_ENV: str(data), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(project / "scripts" / "setup_data.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == f"[setup] Fashion-MNIST: {data / 'fashion-mnist'}\n"


# ----------------------------------------------------------------------------- the documented resume recipe
RESUME_DOC = ROOT / "docs" / "reliability.md"


def readme_resume_recipe() -> tuple[str, str]:
    """The documented resume command (docs/reliability.md, linked from the README) and the run
    directory it names (``outputs/<name>``)."""
    text = RESUME_DOC.read_text()
    found = re.findall(r"```bash\n(\.venv/bin/python scripts/flwr_sim\.py [^\n]*resume='(outputs/[^']+)'[^\n]*)\n```",
                       text)
    assert len(found) == 1, ("docs/reliability.md: expected one resume recipe "
                             "(.venv/bin/python scripts/flwr_sim.py ... resume=...)")
    return found[0]


def test_run_sh_passes_only_what_the_resume_recipe_assumes():
    """The recipe resumes a run of scripts/run.sh: results under <project>/outputs, no data-dir."""
    text = (ROOT / "scripts" / "run.sh").read_text()
    assert "OUT=\"'$ROOT/outputs'\"" in text and '--run-config "output-dir=$OUT" "$@"' in text
    assert "data-dir" not in text and '--num-supernodes "${NUM_SUPERNODES:-10}"' in text
    command, _ = readme_resume_recipe()
    assert "--num-supernodes" not in command  # flwr_sim.py's default, 10, like run.sh's


@pytest.mark.slow
def test_the_readme_resume_recipe_continues_a_run_of_run_sh():
    """A short run started as scripts/run.sh starts it, then the documented resume line verbatim
    (its example directory replaced by this run's) plus the run's own settings."""
    command, example = readme_resume_recipe()
    name = f"test-readme-resume-{os.getpid()}-{int(time.time())}"
    settings = "strategy='fedavg' dataset='synthetic' alpha=1.0 local-steps=5"
    out = ROOT / "outputs" / name
    python = shlex.quote(sys.executable)
    try:
        # what scripts/run.sh runs (after its setup): 10 clients, results in <project>/outputs
        first = subprocess.run([sys.executable, "scripts/flwr_sim.py", "--num-supernodes", "10", "--run-config",
                                f"output-dir='{ROOT}/outputs'", "--run-config",
                                f"{settings} num-server-rounds=2 run-name='{name}'"],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
        assert load_checkpoint(out)["round"] == 2
        line = command.replace(example, f"outputs/{name}")
        line = python + line[len(".venv/bin/python"):] if not (ROOT / ".venv").exists() else line
        resumed = subprocess.run(["bash", "-c", f"{line} --run-config \"{settings} num-server-rounds=3\""],
                                 cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["resumed_after_round"] == 2 and summary["rounds"] == 3
        assert [r["round"] for r in json.loads((out / "metrics.json").read_text())] == [0, 1, 2, 3]
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ----------------------------------------------------------------------------- every documented command
# What the README and docs/*.md show in ```bash blocks is checked without running anything long:
# a run config (`--run-config` of the launchers, the deploy scripts and `flwr run`) must merge and
# validate (files in conf/ must exist), a Python script must exist and know the options it is shown
# with (its `--help` where that is cheap, else its source), a shell script must exist and mention
# them. A command of a kind this test does not know fails it: add the kind here, or to SKIPPED.
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHONS = {".venv/bin/python", "python", "python3"}
SKIPPED = {  # first word(s) -> why the command is not checked here
    "source": "shell setup (activates the venv)",
    "export": "shell setup (environment variables)",
    ".venv/bin/ray": "Ray's own CLI, starting or stopping a cluster (tests/test_ray_cluster.py runs it)",
    "flwr list": "lists the runs of a SuperLink; nothing to check",
}
# Importing these takes seconds (torch at import or before argparse): their options are checked
# in their source instead of their --help.
HELP_TOO_SLOW = {"bench/archive/throughput.py", "bench/privacy_strong.py", "scripts/deploy/make_partitions.py"}
WITH_RUN_CONFIG = {"scripts/flwr_sim.py", "scripts/run.sh", "scripts/deploy/flwr_deploy.py",
                   "scripts/deploy/make_partitions.py"}


def _load_config_reference():
    """scripts/config_reference.py as a module (scripts/ is no package)."""
    import importlib.util
    if "config_reference" not in sys.modules:
        spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["config_reference"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["config_reference"]


def documented_commands() -> list[tuple[str, str, dict[str, str]]]:
    """(where, command line, the shell variables set before it in that file) for every command
    of every ```bash block of README.md and docs/*.md; continuation lines joined, comments and
    variable assignments left out."""
    found = []
    for doc in DOCS:
        env = {"PWD": str(ROOT)}
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() != "```bash":
                i += 1
                continue
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                start, line = i, lines[i]
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1] + " " + lines[i].strip()
                i += 1
                words = shlex.split(expand(line, env), comments=True)
                if not words:
                    continue
                if len(words) == 1 and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                    name, _, value = words[0].partition("=")
                    env[name] = value
                    continue
                found.append((f"{doc.relative_to(ROOT)}:{start + 1}", line.strip(), dict(env)))
            i += 1
    return found


def expand(line: str, env: dict[str, str]) -> str:
    """``$NAME`` / ``${NAME}`` replaced by a variable set earlier in the same file."""
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), line)


def command_words(line: str, env: dict[str, str]) -> list[str]:
    """The command's words without a trailing ``&``, leading ``VAR=value`` assignments and ``nice``."""
    words = shlex.split(expand(line, env), comments=True)
    if words and words[-1] == "&":
        words = words[:-1]
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        words = words[1:]
    if words[:1] == ["nice"]:
        words = words[3:] if words[1:2] == ["-n"] else words[1:]
    return words


def option_names(args: list[str]) -> list[str]:
    return sorted({a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2})


def not_in(options: list[str], text: str) -> list[str]:
    """The options ``text`` does not name as a whole word (``--data`` is not ``--data-from``)."""
    return [o for o in options if not re.search(re.escape(o) + r"(?![\w-])", text)]


def run_config_values(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--run-config"]


def check_run_config(values: list[str]) -> None:
    from flwr.common.config import parse_config_args

    from mosaic_flwr.config import RENAMED, flatten, merge_run_config
    for value in values:  # the docs show the current names (an old one works, with a warning)
        if value.strip().endswith(".toml"):
            import tomllib
            keys = flatten(tomllib.loads((ROOT / value.strip()).read_text())) if (ROOT / value.strip()).is_file() else {}
        else:
            keys = parse_config_args([value]) if value.strip() else {}
        old = sorted(set(keys) & set(RENAMED))
        assert not old, f"old key names {old}: use {[RENAMED[k] for k in old]}"
    build_config(merge_run_config(values, cwd=ROOT))


@__import__("functools").lru_cache(maxsize=None)
def script_help(script: str, subcommand: str | None) -> str:
    args = [sys.executable, script, *([subcommand] if subcommand else []), "--help"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"{' '.join(args[1:])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


def check_python_script(script: str, args: list[str]) -> None:
    assert (ROOT / script).is_file(), f"{script}: no such script"
    if script == "bench/run.py" and args and (ROOT / args[0]).is_file():
        from bench.measures import driver_of, load_spec
        if driver_of(ROOT / args[0]):  # a measurement study: bench/measures.py's options, its spec values
            sets = args[args.index("--set") + 1:] if "--set" in args else []
            load_spec(ROOT / args[0], [s for s in sets if "=" in s and not s.startswith("-")])
            script = "bench/measures.py"
    options = option_names(args)
    if script in HELP_TOO_SLOW:
        source = (ROOT / script).read_text()
        missing = [o for o in options if f'"{o}"' not in source]  # defined as a string literal
        assert not missing, f"{script} does not define {missing}"
        return
    subcommand = args[0] if args and not args[0].startswith("-") else None
    text = script_help(script, subcommand)
    missing = not_in(options, text)
    assert not missing, f"{script} {subcommand or ''} --help does not list {missing}"


def command_kind(line: str, env: dict[str, str]) -> str:
    words = command_words(line, env)
    if words[0] in SKIPPED or " ".join(words[:2]) in SKIPPED:
        return "skipped"
    if words[0] == "bash" and words[1].endswith(".sh"):
        return "shell script"
    if words[0] in PYTHONS and words[1].endswith(".py"):
        return "python script"
    if words[:2] == ["flwr", "run"]:
        return "flwr run"
    return "unknown"


def check_command(line: str, env: dict[str, str]) -> str:
    """Check one documented command; returns what kind it was."""
    words = command_words(line, env)
    if command_kind(line, env) == "skipped":
        return "skipped"
    if words[0] == "bash" and words[1].endswith(".sh"):
        script, args = words[1], words[2:]
        assert (ROOT / script).is_file(), f"{script}: no such script"
        if script == "scripts/run.sh":  # its arguments go to scripts/flwr_sim.py
            check_python_script("scripts/flwr_sim.py", args)
        else:
            text = (ROOT / script).read_text()
            missing = not_in(option_names(args), text)
            assert not missing, f"{script} does not mention {missing}"
        if script in WITH_RUN_CONFIG:
            check_run_config(run_config_values(args))
        return "shell script"
    if words[0] in PYTHONS and words[1].endswith(".py"):
        script, args = words[1], words[2:]
        check_python_script(script, args)
        if script in WITH_RUN_CONFIG:
            check_run_config(run_config_values(args))
        return "python script"
    if words[:2] == ["flwr", "run"]:
        values = run_config_values(words)
        assert len(values) <= 1, "plain `flwr run` takes one --run-config (a file only alone)"
        if values:
            check_run_config(values)
        return "flwr run"
    raise AssertionError(f"a command of a kind this test does not check: {line!r} (add it to SKIPPED or check it)")


COMMANDS = documented_commands()


def test_the_command_check_sees_every_page_and_kind():
    assert {doc.name for doc in DOCS} >= {"README.md", "running.md", "methods.md", "deployment.md"}
    assert len(COMMANDS) > 40
    kinds = {command_kind(line, env) for _, line, env in COMMANDS}
    assert kinds == {"shell script", "python script", "flwr run", "skipped"}


@pytest.mark.parametrize("where,line,env", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_every_documented_command_parses(where, line, env):
    check_command(line, env)


def test_the_readme_shows_the_two_commands_first():
    """CI (.ci/run) runs the README's test command; both commands are the README's first block."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    assert [line.split("#")[0].strip() for line in block.splitlines()] == ["bash scripts/run.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_states_no_dates_loads_or_commits():
    text = (ROOT / "README.md").read_text()
    assert not re.findall(r"\b20\d\d-\d\d-\d\d\b", text), "README: a dated passage belongs in CHANGELOG.md"
    assert not re.findall(r"(?i)load average|\bload \d", text), "README: load averages belong in bench/results/"
    hashes = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"\d", w) and re.search(r"[a-f]", w)]
    assert not hashes, f"README: commit hashes {hashes} belong in bench/results/"
    assert len(text.splitlines()) <= 300, "README: at most ~300 lines; the rest belongs in docs/"


# ----------------------------------------------------------------------------- links
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_leads_to_a_file_and_heading():
    reference = _load_config_reference()
    anchors: dict[Path, set[str]] = {}

    def anchors_of(path: Path) -> set[str]:
        if path not in anchors:
            anchors[path] = {a for _, a in reference.headings(path.read_text())}
        return anchors[path]

    broken = []
    for doc in DOCS + [ROOT / "CHANGELOG.md"]:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # not inside code blocks
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors_of(file):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


# ----------------------------------------------------------------------------- the configuration reference
def test_the_configuration_reference_is_current():
    reference = _load_config_reference()
    assert reference.OUT.read_text() == reference.render(), (
        "docs/configuration.md is out of date with the config schema, pyproject.toml or the docs' "
        f"settings tables: regenerate it with `{reference.COMMAND}`")


def test_the_configuration_reference_lists_every_key_and_every_old_name():
    from mosaic_flwr.config import RENAMED, spec
    text = (ROOT / "docs" / "configuration.md").read_text()
    keys, old = text.split("## Old names (deprecated)")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z0-9.-]+)` \|.*$", keys, flags=re.M)}
    assert set(rows) == set(spec()) and "preset" not in rows
    renames = dict(re.findall(r"^\| `([a-z0-9-]+)` \| `([a-z0-9.-]+)` \|$", old, flags=re.M))
    assert renames == RENAMED
