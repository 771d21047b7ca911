"""The ledger of a study's finished runs: data committed under ``bench/results/ledger/<study>.json``,
from which the study's tables are written; the runs themselves (checkpoints, logs, runs in
flight) live outside the repository (``bench.common.RUNS``).

A ledger maps each finished run's name to what the tables read of it: its summary (without the
client-to-node assignment, which the seed regenerates), run config (without the machine's paths),
per-round metrics, the bench notes (``bench.json``), a refusal (``refused.json``), and the
number of clients of a pre-training's assignment; and each cell-level diagnostic file
(``oracle-*.json``) by name. ``materialize`` writes it back as run directories (summary last),
which is how a grid skips what is finished and how the tables are read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.common import RESULTS

LEDGERS = RESULTS / "ledger"
FILES = {"summary": "summary.json", "config": "config.json", "metrics": "metrics.json", "bench": "bench.json",
         "refused": "refused.json"}
DROP = {"summary": ("assignment",), "config": ("output-dir", "run-name")}  # the seed regenerates the one, the other is this machine's


def finished(run: Path) -> bool:
    return (run / "summary.json").is_file() or (run / "refused.json").is_file()


def read(path: Path) -> dict:
    """A ledger file's runs and diagnostics (empty if there is none)."""
    if not path.is_file():
        return {"runs": {}, "files": {}}
    data = json.loads(path.read_text())
    return {"runs": data.get("runs", {}), "files": data.get("files", {})}


def write(path: Path, ledger: dict) -> None:
    """One run (one diagnostic file) per line, by name (a new run is a one-line diff); each value in
    its recorded order (the tables list a run's models in it)."""
    from mosaic_flwr.core.results import atomic_write

    def block(d: dict) -> str:
        return ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(d.items()))

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "{\n\"runs\": {\n" + block(ledger["runs"]) + "\n},\n\"files\": {\n"
                 + block(ledger["files"]) + "\n}\n}\n")


def entry(run: Path) -> dict:
    """What the ledger keeps of a finished run directory."""
    out = {}
    for key, name in FILES.items():
        f = run / name
        if f.is_file():
            value = json.loads(f.read_text())
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in DROP.get(key, ())}
            out[key] = value
    if (run / "assignment.csv").is_file():
        out["clients"] = len((run / "assignment.csv").read_text().strip().splitlines()[1:])
    return out


def restored(e: dict) -> bool:
    """A run recorded by its summary alone (restored from an earlier table)."""
    return "restored" in e.get("summary", {})


def record(src: Path, path: Path) -> list[str]:
    """Add the finished runs of the runs directory ``src`` to the ledger ``path``, and its
    diagnostics (``oracle-*.json``). A run the ledger holds is left as it is (runs are never
    rerun), unless the ledger has it restored from an earlier table and ``src`` has it whole
    (per-round metrics). A shared round 1's scratch directory (``round1-*``) is not a run.
    The run names added. Shards of one runs root take turns (a lock file there)."""
    if not src.is_dir():
        return []
    import fcntl

    with open(src / ".ledger.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _record(src, path)


def _record(src: Path, path: Path) -> list[str]:
    ledger, added = read(path), []
    for f in sorted(src.glob("oracle-*.json")):
        ledger["files"].setdefault(f.name, json.loads(f.read_text()))
    for run in sorted(p for p in src.iterdir() if p.is_dir() and finished(p) and not p.name.startswith("round1-")):
        old = ledger["runs"].get(run.name)
        new = entry(run)
        if old is not None and not (restored(old) and not restored(new) and "metrics" in new):
            continue
        ledger["runs"][run.name] = new
        added.append(run.name)
    if added or ledger["files"] != read(path)["files"]:
        write(path, ledger)
    return added


def materialize(path: Path, dst: Path) -> list[str]:
    """Write the ledger's runs that ``dst`` lacks (finished) into it as run directories, and its
    diagnostics; an unfinished directory there (an interrupted attempt) is replaced, a finished
    one left. The run names written."""
    ledger, written = read(path), []
    dst.mkdir(parents=True, exist_ok=True)
    for name, value in ledger["files"].items():
        if not (dst / name).is_file():
            (dst / name).write_text(json.dumps(value, indent=1) + "\n")
    for name, e in sorted(ledger["runs"].items()):
        run = dst / name
        if finished(run):
            continue
        if run.is_dir():
            shutil.rmtree(run)
        run.mkdir(parents=True)
        if "clients" in e:
            (run / "assignment.csv").write_text("client\n" + "".join(f"{i}\n" for i in range(e["clients"])))
        for key, fname in sorted(FILES.items(), key=lambda kv: kv[0] == "summary"):  # summary.json last
            if key in e:
                (run / fname).write_text(json.dumps(e[key], indent=1) + "\n")
        written.append(name)
    return written
