"""Peak memory of the CPC recipe at two (or more) corpus sizes, on synthetic LibriSpeech-shaped
trees: the issue's check that a run's resident memory does not grow with the number of
utterances once the audio lives in the int16 store (``cpc.store``) under a memory cap.

For each size, a tree of 10-15 s utterances is generated in a temporary folder
(``modalities.audio.librishaped``), then ``python -m recipes.cpc_speech`` runs on it in a child
process (store prepare, training, probes) while this process polls ``/proc`` every 50 ms for the
resident memory (VmRSS) of the child and all its descendants (decode workers included). The
child's own output lines say which phase it is in ("decoding audio into the store" / "data:" =
prepare, "model:" / "training" = train, anything naming features or probes afterwards = probe),
so the peaks are reported per phase; the rank's own lifetime peak (VmHWM of the child) is
reported besides the sum over its process tree. A sum of VmRSS counts pages shared between
processes (libraries, the fork server) once per process: an upper bound; the peak of the
summed PSS (``/proc/<pid>/smaps_rollup``, shared pages split between their users) is reported
besides.

Usage::

    python -m recipes.bench_cpc_scale --sizes 200,800 --steps 20 --max-audio-memory-mb 64

Writes ``OUT/bench_cpc_scale.json`` and ``OUT/bench_cpc_scale.md`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["run_measured", "tree_rss", "format_table", "parse_args", "main"]

PHASES = ("prepare", "train", "probe")


def _read_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in kB ({} when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except (OSError, ValueError):
        return {}
    try:  # PSS: shared pages (torch's libraries in every worker) split between their users
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1])
                    break
    except (OSError, ValueError):
        pass
    return out


def _children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc/<pid>/stat of every process."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name (field 2) may hold spaces or parentheses: split after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1:
            kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def tree_rss(pid: int) -> tuple[int, int, int]:
    """(sum of VmRSS over ``pid`` and its descendants, VmHWM of ``pid``, sum of PSS), bytes."""
    kids = _children_map()
    todo, total, hwm, pss = [pid], 0, 0, 0
    seen = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        status = _read_status(p)
        total += status.get("VmRSS", 0) * 1024
        pss += status.get("Pss", 0) * 1024
        if p == pid:
            hwm = status.get("VmHWM", 0) * 1024
        todo.extend(kids.get(p, []))
    return total, hwm, pss


def run_measured(cmd: Sequence[str], *, phase_of: Callable[[str], str | None] | None = None,
                 env: dict | None = None, cwd: str | None = None, interval: float = 0.05,
                 log_path: str | os.PathLike | None = None) -> dict:
    """Run ``cmd``, polling the RSS of its process tree every ``interval`` seconds.

    ``phase_of(line)`` maps each output line of the child (stdout and stderr merged) to a phase
    name, or None to stay in the current phase. Returns ``returncode``, ``seconds``,
    ``peak_rss_mb`` ({phase: peak MB of the tree's VmRSS sum while in it, "overall": ...}),
    ``rank_peak_mb`` (the child's VmHWM), ``peak_pss_mb`` (peak of the tree's PSS sum: shared
    pages counted once in all) and ``tail`` (its last 40 output lines).
    """
    if interval <= 0:
        raise ValueError(f"interval={interval!r}: expected a positive number of seconds")
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=cwd, bufsize=1)
    state = {"phase": None}
    lines: list[str] = []
    log = open(log_path, "w", encoding="utf-8") if log_path else None

    def reader() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if log:
                log.write(line)
                log.flush()
            if phase_of is not None:
                phase = phase_of(line)
                if phase is not None:
                    state["phase"] = phase

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    peaks: dict[str, float] = {"overall": 0.0}
    rank_peak = pss_peak = 0
    try:
        while True:
            # the phase as it was before this sample: a line announcing the next phase is
            # printed after the previous one ended, so a sample taken while the line is read
            # still belongs to the earlier phase
            phase = state["phase"]
            done = proc.poll() is not None
            rss, hwm, pss = tree_rss(proc.pid) if not done else (0, 0, 0)
            rank_peak = max(rank_peak, hwm)
            pss_peak = max(pss_peak, pss)
            mb = rss / 2**20
            peaks["overall"] = max(peaks["overall"], mb)
            if phase is not None:
                peaks[phase] = max(peaks.get(phase, 0.0), mb)
            if done:
                break
            time.sleep(interval)
    finally:
        if proc.poll() is None:  # interrupted: the child goes too
            proc.kill()
            proc.wait()
        thread.join(timeout=10)
        if log:
            log.close()
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - start,
            "peak_rss_mb": peaks, "rank_peak_mb": rank_peak / 2**20,
            "peak_pss_mb": pss_peak / 2**20, "tail": lines[-40:]}


def recipe_phase() -> Callable[[str], str | None]:
    """Phase of the CPC recipe from its output lines; phases only move forward."""
    order = {p: i for i, p in enumerate(PHASES)}
    current = {"phase": None}

    def phase_of(line: str) -> str | None:
        text = line.strip().lower()
        if text.startswith(("data:", "decoding audio into the store")):
            new = "prepare"
        elif text.startswith(("model:", "training", "rank ")):
            new = "train"
        elif current["phase"] == "train" and ("feature" in text or "probe" in text):
            new = "probe"
        else:
            return None
        if current["phase"] is not None and order[new] < order[current["phase"]]:
            return None
        current["phase"] = new
        return new

    return phase_of


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of benchmark rows."""
    head = ("| size | utterances | hours | store GB | prepare MB | train MB | probe MB | "
            "peak MB (all processes) | peak PSS MB | rank peak MB | seconds |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        p = r["peak_rss_mb"]
        lines.append(f"| {r['size']} | {r['utterances']} | {r['hours']:.2f} | {r['store_gb']:.3f} | "
                     f"{_fmt(p.get('prepare'))} | {_fmt(p.get('train'))} | {_fmt(p.get('probe'))} | "
                     f"{_fmt(p.get('overall'))} | {_fmt(r.get('peak_pss_mb'))} | "
                     f"{_fmt(r.get('rank_peak_mb'))} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def _int_list(name: str, text: str, low: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}={text!r}: expected comma-separated integers") from None
    if not values or any(v < low for v in values):
        raise argparse.ArgumentTypeError(f"{name}={text!r}: expected integers >= {low}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipes.bench_cpc_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda t: _int_list("--sizes", t, 4), default=[200, 800],
                   help="corpus sizes in utterances, comma-separated (>= 4 each)")
    p.add_argument("--speakers-per-size", type=lambda t: _int_list("--speakers-per-size", t, 2),
                   default=None, help="speakers of each size (default: size // 20, at least 2)")
    p.add_argument("--steps", type=int, default=20, help="training steps per run (>= 1)")
    p.add_argument("--max-audio-memory-mb", type=int, default=64,
                   help="the recipe's cap on training audio held in RAM (>= 0)")
    p.add_argument("--max-probe-memory-mb", type=int, default=None,
                   help="the recipe's cap on probe features held in RAM (>= 0; default: the "
                   "recipe's, 2000)")
    p.add_argument("--out", default="runs/bench_cpc_scale")
    p.add_argument("--keep-trees", action="store_true", help="keep the generated trees")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP/MKL threads of the child (default: unchanged)")
    p.add_argument("--no-probes", action="store_true",
                   help="pass --no-probes to the recipe (prepare and training only)")
    p.add_argument("--tree-workers", type=int, default=2, help="processes generating a tree")
    p.add_argument("--probe-frames", type=int, default=None, help="the recipe's --probe-frames "
                   "(labelled frames per utterance in the phone probe; default: the preset's, "
                   "all frames)")
    args = p.parse_args(argv)
    if args.probe_frames is not None and args.probe_frames < 0:
        p.error(f"--probe-frames={args.probe_frames}: expected an integer >= 0")
    if args.steps < 1:
        p.error(f"--steps={args.steps}: expected an integer >= 1")
    if args.max_probe_memory_mb is not None and args.max_probe_memory_mb < 0:
        p.error(f"--max-probe-memory-mb={args.max_probe_memory_mb}: expected an integer >= 0")
    if args.max_audio_memory_mb < 0:
        p.error(f"--max-audio-memory-mb={args.max_audio_memory_mb}: expected an integer >= 0")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads={args.threads}: expected an integer >= 1")
    if args.tree_workers < 0:
        p.error(f"--tree-workers={args.tree_workers}: expected an integer >= 0")
    if args.speakers_per_size is None:
        args.speakers_per_size = [max(2, s // 20) for s in args.sizes]
    if len(args.speakers_per_size) != len(args.sizes):
        p.error(f"--speakers-per-size={args.speakers_per_size}: expected one value per size "
                f"({len(args.sizes)})")
    for size, spk in zip(args.sizes, args.speakers_per_size):
        if size < 2 * spk:
            p.error(f"--speakers-per-size: {spk} speakers for {size} utterances; expected at "
                    "least 2 utterances per speaker")
    return args


def bench_one(size: int, speakers: int, args: argparse.Namespace, out: Path) -> dict:
    from modalities.audio.librishaped import make_librispeech_tree

    folder = out / f"size_{size}"
    if folder.exists():  # this benchmark's own output of an earlier run
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench_cpc_scale_{size}_"))
    tree = tmp / "LibriShaped"
    try:
        t0 = time.perf_counter()
        make_librispeech_tree(tree, speakers=speakers, utterances_per_speaker=size // speakers,
                              seconds=(10.0, 15.0), workers=args.tree_workers)
        tree_seconds = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "recipes.cpc_speech", "--data", str(tree),
               "--alignments", str(tree / "alignments.txt"),
               "--train-split", str(tree / "train_split.txt"),
               "--test-split", str(tree / "test_split.txt"), "--preset", "cpu-quick",
               "--steps", str(args.steps), "--store", str(folder / "store"),
               "--max-audio-memory-mb", str(args.max_audio_memory_mb), "--workers", "2",
               "--out", str(folder / "run")] + (["--no-probes"] if args.no_probes else []) \
            + (["--probe-frames", str(args.probe_frames)] if args.probe_frames is not None else [])\
            + (["--max-probe-memory-mb", str(args.max_probe_memory_mb)]
               if args.max_probe_memory_mb is not None else [])
        # not --quiet: the progress lines (plain lines off a terminal) mark the phases
        env = dict(os.environ)
        if args.threads is not None:
            for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[name] = str(args.threads)
        result = run_measured(cmd, phase_of=recipe_phase(), env=env,
                              log_path=folder / "child.log")
        if result["returncode"] != 0:
            raise RuntimeError(f"size {size}: the recipe failed (exit {result['returncode']}); "
                               "last lines:\n" + "\n".join(result["tail"]))
        meta = json.loads((folder / "store" / "store.json").read_text(encoding="utf-8"))
        store_bytes = (folder / "store" / "audio.i16").stat().st_size
        return {"size": size, "speakers": speakers, "utterances": meta["n_utterances"],
                "hours": meta["total_samples"] / meta["sample_rate"] / 3600,
                "store_gb": store_bytes / 1e9, "peak_rss_mb": result["peak_rss_mb"],
                "rank_peak_mb": result["rank_peak_mb"], "peak_pss_mb": result["peak_pss_mb"],
                "seconds": result["seconds"],
                "tree_seconds": tree_seconds, "steps": args.steps,
                "max_audio_memory_mb": args.max_audio_memory_mb,
                "tree": str(tree) if args.keep_trees else None}
    finally:
        if not args.keep_trees:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the child is killed and the temporary trees removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size, speakers in zip(args.sizes, args.speakers_per_size):
        print(f"size {size}: {speakers} speakers, generating the tree and running the recipe ...",
              flush=True)
        rows.append(bench_one(size, speakers, args, out))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    table = format_table(rows)
    machine = f"{os.cpu_count()} CPU cores, {sys.platform}"
    header = (f"CPC recipe (cpu-quick, {args.steps} steps, --max-audio-memory-mb "
              f"{args.max_audio_memory_mb}, 2 decode workers"
              f"{', no probes' if args.no_probes else ''}"
              f"{f', --probe-frames {args.probe_frames}' if args.probe_frames is not None else ''}"
              f"{f', --max-probe-memory-mb {args.max_probe_memory_mb}' if args.max_probe_memory_mb is not None else ''}"
              f"{f', {args.threads} thread(s)' if args.threads is not None else ''}"
              ") on synthetic LibriSpeech-shaped "
              f"trees of 10-15 s utterances; {machine}. MB = peak resident memory (VmRSS summed "
              "over the recipe's process tree, polled every 50 ms) per phase; rank peak = the "
              "recipe process's own VmHWM; PSS = proportional set size summed over the tree (pages "
              "shared between processes, such as torch's libraries in each decode worker, "
              "counted once).")
    print()
    print(header)
    print(table)
    (out / "bench_cpc_scale.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items()}, "machine": machine, "rows": rows},
        indent=2), encoding="utf-8")
    (out / "bench_cpc_scale.md").write_text(header + "\n\n" + table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
