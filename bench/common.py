"""What the benchmarks share: running one cell through the real Flower simulation
(scripts/flwr_sim.py, resumed when finished), peak memory of the processes a simulation
starts, payload sizes of Flower messages, seed statistics, and the provenance (commit,
machine, load average) every recorded figure carries."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Where the benchmarks' runs (checkpoints, logs, runs in flight) live: outside the repository, per
# study under RUNS/<study>; MOSAIC_FLWR_RUNS moves it (bench/runs/ is gitignored, if passed explicitly).
# What is finished is recorded as data under bench/results (bench/ledger.py).
RUNS = Path(os.environ.get("MOSAIC_FLWR_RUNS") or Path.home() / ".cache" / "mosaic-flwr" / "bench-runs")



def _variants() -> dict[str, tuple[str, dict]]:
    table = tomllib.loads((ROOT / "bench" / "variants.toml").read_text())
    return {name: (values.pop("strategy"), values) for name, values in table.items()}


# Named variants of the registered methods (a method with other settings, e.g. ``mosaic-nometa``):
# data, in bench/variants.toml. name -> (strategy, run-config values)
VARIANTS: dict[str, tuple[str, dict]] = _variants()


def variant_config(variant: str) -> tuple[str, dict]:
    """A registered method (``(name, {})``) or a named variant of one (``VARIANTS``): its strategy
    and the run-config values it runs with."""
    return VARIANTS.get(variant, (variant, {}))


def runnable() -> dict[str, tuple[str, dict]]:
    """Every name a study may run: the registered methods as they ship (the registry's order),
    then the named ``VARIANTS``; name -> (strategy, run-config values)."""
    return {**{m: (m, {}) for m in registered()}, **VARIANTS}


def toml_values(values: dict) -> str:
    """Run-config values as Flower's ``--run-config`` string (``key=value`` pairs, TOML values)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


# ----------------------------------------------------------------------------- methods
# Which methods a benchmark compares comes from the library's registry (mosaic_flwr.registry),
# never from a list kept here: a new method appears in every comparison of its peers.
# Not compared with its peers: FedDF's server on Mosaic's client generators, an ablation of
# Mosaic rather than a published method (bench/studies/grid.toml still runs it).
ABLATIONS = ("feddf-gen",)
# Display names where the registry leaves a method's title to its name, and the benchmarks' own
# rows (a method with other settings, or given more rounds).
NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "mosaic": "Mosaic", "mosaic-nometa": "Mosaic without meta model",
         "fedavg-eqc": "FedAvg, equal client compute", "fedprox-eqc": "FedProx, equal client compute"}


def registered() -> tuple[str, ...]:
    """Every method the library registers, by run-config name (registry order; imports none)."""
    from mosaic_flwr.registry import ENTRIES

    return tuple(ENTRIES)


def distils(variant: str) -> bool:
    """Whether ``variant``'s method (a registered one, or a named variant of one) distils on the server."""
    from mosaic_flwr.registry import STRATEGIES

    strategy = variant_config(variant)[0]
    return strategy in STRATEGIES and STRATEGIES[strategy].distils


def compared() -> tuple[str, ...]:
    """The methods a comparison runs: every registered one but the ``ABLATIONS``; those that train
    alone first, then the distilling ones, Mosaic last (the registry's order within each)."""
    names = [m for m in registered() if m not in ABLATIONS]
    return tuple(sorted(names, key=lambda m: (m == "mosaic", distils(m))))


def label(name: str) -> str:
    """A method's (or a benchmark row's) name as its authors write it: ``NAMES``, else the registry's title."""
    if name in NAMES:
        return NAMES[name]
    from mosaic_flwr.registry import STRATEGIES

    return (STRATEGIES[name].title if name in STRATEGIES else "") or name


# Named groups of methods a spec may list beside method names (bench/run.py's studies, the
# headline's parts among them): computed from the registry, so a new method
# joins every spec that names its group.
GROUPS = {"registry": lambda: list(compared()), "distilling": lambda: [m for m in compared() if distils(m)],
          "ablations": lambda: list(ABLATIONS)}


class SpecError(ValueError):
    """A spec (a study's, a headline part's, or a narrowing of one) that cannot run: said in
    one line, before any run."""


def method_names(entries: str | Sequence[str]) -> list[str]:
    """A spec's ``methods`` as names, each group (``GROUPS``) expanded in place, each name checked
    against ``runnable()``; a name listed twice runs once."""
    known, names = runnable(), []
    for e in [entries] if isinstance(entries, str) else entries:
        if e not in GROUPS and e not in known:
            raise SpecError(f"unknown method {e!r}: a spec names the groups {', '.join(GROUPS)} "
                            f"and the methods {', '.join(known)}")
        names += GROUPS[e]() if e in GROUPS else [e]
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------- provenance
def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip() or "unknown"


def git_dirty() -> bool:
    """Whether the code a run executes differs from the commit (uncommitted changes)."""
    out = subprocess.run(["git", "status", "--porcelain", "--", "mosaic_flwr", "client_app",
                          "server_app", "scripts", "pyproject.toml"],
                         cwd=ROOT, capture_output=True, text=True).stdout
    return bool(out.strip())


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine() -> dict:
    import torch

    info = {"host": platform.node(), "arch": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        from importlib.metadata import version
        info["flwr"] = version("flwr")
    except Exception:  # noqa: BLE001
        pass
    return info


def machine_line(m: dict | None = None) -> str:
    m = m or machine()
    gpu = f", GPU {m['cuda']}" if m.get("cuda") else ", no GPU"
    return (f"{m['host']} ({m['arch']}, {m['cpus']} cores{gpu}), torch {m['torch']}, "
            f"flwr {m.get('flwr', '?')}")


def provenance(command: str | None = None) -> dict:
    """Commit (and whether the tree had uncommitted code changes), machine, load, command."""
    return {"commit": git_commit(), "dirty": git_dirty(), "machine": machine(),
            "loadavg": loadavg(), "command": command or " ".join(map(shlex.quote, sys.argv)),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def header_lines(title: str, prov: dict) -> list[str]:
    dirty = " (with uncommitted changes)" if prov.get("dirty") else ""
    return [f"# {title}", "",
            f"- commit `{prov['commit']}`{dirty}, {prov['date']}",
            f"- machine: {machine_line(prov['machine'])}",
            f"- load average (1, 5, 15 min) at start: {prov['loadavg']}"
            + (f", at end: {prov['loadavg_end']}" if "loadavg_end" in prov else ""),
            f"- command: `{prov['command']}`", ""]


def write_results(name: str, markdown: str, data: dict) -> Path:
    """``bench/results/<name>.md`` and ``.json``; returns the markdown path."""
    from mosaic_flwr.core.results import atomic_write, write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULTS / f"{name}.md", markdown)
    write_json(RESULTS / f"{name}.json", data)
    return RESULTS / f"{name}.md"


# ----------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        raise ValueError("mean_std: no values")
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_mean_std(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# ----------------------------------------------------------------------------- payloads
# Two-sided 97.5 % quantiles of Student's t (df 1..10), for 95 % intervals of paired differences.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def paired_interval(diffs: Sequence[float], scale: float = 1.0, digits: int = 4) -> str:
    """``mean [95 % t interval] (each difference)`` of paired differences (times ``scale``);
    one difference is shown alone, none as ``-``."""
    import statistics

    d = [x * scale for x in diffs]
    if not d:
        return "-"
    if len(d) == 1:
        return f"{d[0]:+.{digits}f} (1 seed)"
    m = statistics.mean(d)
    h = T975[min(len(d) - 1, len(T975)) - 1] * statistics.stdev(d) / len(d) ** 0.5
    each = ", ".join(f"{x:+.{max(digits - 1, 1)}f}" for x in d)
    return f"{m:+.{digits}f} [{m - h:+.{digits}f}, {m + h:+.{digits}f}] ({each})"


def payload_bytes(content) -> dict[str, int]:
    """Bytes of each record of a Flower ``RecordDict``: for an array record, the sum of its
    tensors' ``nbytes`` (elements x item size); for a metric/config record, 8 bytes per
    number and the length of keys, strings and bytes (lists element-wise). Keys: the record
    names, and ``total``."""
    import numpy as np
    from flwr.app import ArrayRecord

    def value_size(v) -> int:
        if isinstance(v, (list, tuple)):
            return sum(value_size(e) for e in v)
        if isinstance(v, (bytes, str)):
            return len(v)
        return 8

    sizes = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            sizes[name] = sum(int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
                              for arr in record.values())
        else:
            sizes[name] = sum(len(k) + value_size(v) for k, v in record.items())
    sizes["total"] = sum(sizes.values())
    return sizes


def wire_bytes(content) -> int:
    """Size of a ``RecordDict`` serialised as Flower sends it (protobuf)."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).ByteSize()


# ----------------------------------------------------------------------------- memory
def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _proc_status(pid: int) -> tuple[str, int] | None:
    """(command line, VmHWM in bytes) of a live process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return cmd, int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def classify(cmd: str) -> str:
    """Which part of a Flower simulation a process is."""
    if "ClientAppActor" in cmd:
        return "client"
    if "flwr-simulation" in cmd:
        return "server"
    if "flower-superlink" in cmd or "flower-superexec" in cmd:
        return "superlink"
    if "ray::" in cmd or "/ray/" in cmd:
        return "ray"
    return "other"


class PeakMemory:
    """Polls the process tree under ``pid`` and keeps each process's peak RSS (VmHWM), by
    role: ``server`` (flwr-simulation: the ServerApp, and Ray's driver), ``client`` (a Ray
    ClientAppActor, which runs one ClientApp call after another), ``superlink``, ``ray``."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval = pid, interval
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            todo, seen = [self.pid], set()
            while todo:
                pid = todo.pop()
                if pid in seen:
                    continue
                seen.add(pid)
                st = _proc_status(pid)
                if st:
                    self.peaks[pid] = (classify(st[0]), max(st[1], self.peaks.get(pid, ("", 0))[1]))
                todo += _children(pid)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def by_role(self) -> dict[str, dict]:
        """Per role: the largest peak RSS of one process (MiB) and the process count."""
        out: dict[str, dict] = {}
        for role, peak in self.peaks.values():
            r = out.setdefault(role, {"peak_mib": 0.0, "processes": 0})
            r["peak_mib"] = max(r["peak_mib"], round(peak / 2**20, 1))
            r["processes"] += 1
        return out


# ----------------------------------------------------------------------------- run names
CENTRAL = "central"
# equal-compute variant -> (its method at equal rounds, the variant whose client work it matches)
EQUAL_COMPUTE = {"fedavg-eqc": ("fedavg", "mosaic"), "fedprox-eqc": ("fedprox", "mosaic")}


def pretrain_name(alpha: float, seed: int) -> str:
    """A cell's FedAvg pre-training run (the converged protocol's start, ``bench.run.pretrain``)."""
    return f"pretrain-a{alpha:g}-s{seed}"


def variant_name(variant: str, alpha: float, seed: int) -> str:
    return f"{variant}-a{alpha:g}-s{seed}"


@dataclass(frozen=True)
class Cell:
    variant: str          # a strategy, a bench.common.VARIANTS name, or "central"
    alpha: float | None   # None: the centralised reference (the union of the partitions
    seed: int             # is the whole training set whatever alpha is)

    @property
    def name(self) -> str:
        return f"{CENTRAL}-s{self.seed}" if self.alpha is None else f"{self.variant}-a{self.alpha:g}-s{self.seed}"



# ----------------------------------------------------------------------------- one cell
def cell_done(out: Path) -> bool:
    return (Path(out) / "summary.json").is_file()


def sim_command(runs_dir: Path, run_name: str, variant: str, run_config: str = "", *, num_supernodes: int = 10,
                cpus_per_client: int = 1, base: Sequence[str | Path] = ()) -> list[str]:
    """scripts/flwr_sim.py's command for one run of ``variant`` (a strategy or a ``VARIANTS`` name)
    into ``runs_dir/run_name``: ``base`` first, in order (run-config TOML files, e.g.
    ``conf/fmnist-families.toml``, relative to the working directory, and ``key=value`` strings),
    then the run's own: its strategy and place, the variant's settings, ``run_config`` (flwr_sim.py
    merges them in order, a later value winning)."""
    strategy, extra = variant_config(variant)
    cmd = [sys.executable, str(ROOT / "scripts" / "flwr_sim.py"), "--num-supernodes", str(num_supernodes),
           "--cpus-per-client", str(cpus_per_client)]
    for arg in base:
        cmd += ["--run-config", str(Path(arg).resolve()) if str(arg).strip().endswith(".toml") else str(arg)]
    return cmd + ["--run-config", f"strategy='{strategy}' output-dir='{Path(runs_dir).resolve()}' "
                                  f"run-name='{run_name}' {toml_values(extra)} {run_config}"]


def run_cell(runs_dir: Path, run_name: str, variant: str, run_config: str = "", *,
             num_supernodes: int = 10, cpus_per_client: int = 1, monitor: bool = False,
             tag: str = "bench", base: Sequence[str | Path] = ()) -> dict | None:
    """One run of ``variant`` (a strategy or a ``VARIANTS`` name) through the real Flower
    simulation into ``runs_dir/run_name`` (``sim_command``: ``base``, then the variant's settings and
    ``run_config``); the log goes to ``runs_dir/run_name.log``.

    A finished run (its ``summary.json`` exists) is not run again: its summary is returned.
    Otherwise returns the new summary, or ``None`` when the run failed. Beside the summary,
    ``bench.json`` records the launcher's wall time, the load average before and after, the
    commit, and with ``monitor`` the peak RSS of the server and client processes; the
    returned summary carries it under ``bench``.
    """
    runs_dir = Path(runs_dir).resolve()
    out = runs_dir / run_name
    if not cell_done(out):
        log = runs_dir / f"{run_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = sim_command(runs_dir, run_name, variant, run_config, num_supernodes=num_supernodes,
                          cpus_per_client=cpus_per_client, base=base)
        print(f"[{tag}] running {run_name} (log: {log})", flush=True)
        load0, t0 = loadavg(), time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            if monitor:
                with PeakMemory(proc.pid) as mem:
                    code = proc.wait()
            else:
                code = proc.wait()
        if code != 0 or not cell_done(out):
            print(f"[{tag}] {run_name} failed (exit {code}); see {log}", flush=True)
            return None
        bench = {"launcher_seconds": round(time.perf_counter() - t0, 2), "loadavg_before": load0,
                 "loadavg_after": loadavg(), "commit": git_commit(), "dirty": git_dirty(),
                 "num_supernodes": num_supernodes, "cpus_per_client": cpus_per_client,
                 "command": " ".join(map(shlex.quote, cmd))}
        if monitor:
            bench["memory"] = mem.by_role()
        (out / "bench.json").write_text(json.dumps(bench, indent=2) + "\n")
    summary = json.loads((out / "summary.json").read_text())
    bench_file = out / "bench.json"
    if bench_file.is_file():
        summary["bench"] = json.loads(bench_file.read_text())
    return summary


def flower_context(rc: dict):
    """The ``Context`` a ServerApp receives for run config ``rc``."""
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=rc)


def write_bench_note(run_dir: Path, **extra) -> None:
    """A run's bench.json: the load after it, the commit (and whether the tree was dirty), torch's
    thread count, and ``extra`` (the load before, the driver, shared seconds, ...)."""
    import torch

    (Path(run_dir) / "bench.json").write_text(json.dumps(
        {"loadavg_after": loadavg(), "commit": git_commit(), "dirty": git_dirty(),
         "torch_threads": torch.get_num_threads(), **extra}, indent=2) + "\n")


def write_refusal(run_dir: Path, variant: str, reason: str) -> None:
    """A run its settings refuse before any training: its refused.json (the ledger records it)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "refused.json").write_text(json.dumps({"variant": variant, "reason": reason}, indent=1) + "\n")


def run_inprocess(rc: dict, num_clients: int, title: str | None = None, *, hook=None, **bench_extra) -> dict:
    """One whole run of ``rc`` (a full run config) in an in-process federation: the real
    ClientApp and ServerApp handlers on ``InProcessGrid`` (``hook``: its fault hook), no Ray.
    Its bench.json (``write_bench_note``: load, commit, threads, ``bench_extra``) is written before
    its summary.json, so a finished run is complete. The summary."""
    from client_app.app import app as client_app
    from mosaic_flwr.registry import get_strategy
    from mosaic_flwr.testing.inprocess import InProcessGrid
    from server_app.app import finish_run, setup

    t0, load0 = time.perf_counter(), loadavg()
    sc = setup(InProcessGrid(client_app, rc, num_clients, hook=hook), flower_context(rc))
    get_strategy(sc.cfg.strategy)(sc)
    write_bench_note(sc.results.out_dir, loadavg_before=load0, driver="in-process", **bench_extra)
    return finish_run(sc, time.perf_counter() - t0, title=title)


def resolved_config(shared: str | Sequence[str], **changes):
    """The config a cell's ServerApp builds: pyproject defaults < shared overrides (a run-config
    string, or run-config arguments in order: TOML files relative to the repository and
    ``key=value`` strings) < changes (checked as for Mosaic, or as for FedAvg when the schedule
    has no distillation round)."""
    from mosaic_flwr.config import ConfigError, build_config, merge_run_config

    overrides = {**merge_run_config([shared] if isinstance(shared, str) else shared, cwd=ROOT), **changes}
    try:
        return build_config({"strategy": "mosaic", **overrides})
    except ConfigError:
        return build_config({"strategy": "fedavg", **overrides})


def run_central(cell: Cell, runs_dir: Path, shared: str | Sequence[str], num_clients: int) -> dict:
    """The centralised reference of ``cell.seed`` under the run config ``shared`` (as for
    ``resolved_config``), written like a run (summary.json, metrics.json)."""
    import torch

    from mosaic_flwr.core.central import train_central
    from mosaic_flwr.core.results import write_json

    out = Path(runs_dir) / cell.name
    out.mkdir(parents=True, exist_ok=True)
    cfg = resolved_config(shared, seed=cell.seed)
    print(f"[bench] running {cell.name} (in-process, no Flower)", flush=True)
    load0, t0 = loadavg(), time.perf_counter()
    torch.set_num_threads(cfg.client_threads)  # as a client trains
    r = train_central(cfg, num_clients)
    write_json(out / "metrics.json", r["rounds"])
    write_json(out / "bench.json", {"loadavg_before": load0, "loadavg_after": loadavg(),
                                    "commit": git_commit(), "dirty": git_dirty()})
    summary = {"strategy": CENTRAL, "seed": cell.seed, "final_accuracy": r["final_accuracy"],
               "best_accuracy": r["best_accuracy"], "best_round": r["best_round"],
               "wall_seconds": round(time.perf_counter() - t0, 2), "steps": r["steps"],
               "sample_passes": r["sample_passes"], "train_samples": r["train_samples"],
               "config": cfg.to_dict()}
    write_json(out / "summary.json", summary)  # last: its presence marks the cell finished
    return summary
