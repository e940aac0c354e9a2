"""The whole ``featcache extract`` command with the DINOv3-7B architecture on CPU in bf16.

Runs, as a subprocess and exactly as a user types it::

    python -m featcache extract --model random:dinov3-vit7b16 --res 224 --dtype bf16 --device cpu \
        --data manifest.csv --out CACHE

on a few films (default 8 generated 16-bit PNG chest films with their manifest, or ``--data`` a manifest of
real films) and records:

* img/s of the extraction pass (the command's own summary line) and of the whole command (wall time, Python
  start-up, imports and the model build included);
* when the first progress line appeared (everything before the first batch: imports, the random init of
  6.7B parameters, a one-image probe forward, the store) and, in a second process afterwards, the model
  build alone (``load_backbone`` with the command's thread settings), unless ``--no-build-alone``;
* peak memory: ``ru_maxrss`` of the command's process tree (``RUSAGE_CHILDREN``: the largest single
  process; a forked decode worker maps the parent's pages, so RSS is not summed), the summed PSS of the tree
  sampled every ``--sample-every`` s from ``/proc`` (shared pages counted once), and the lowest
  ``MemAvailable`` seen;
* the batch the rows went through the model in, the parameter count and the weight bytes (a meta-device
  build of the same architecture, no memory), the set's provenance, and the load average at the start.

Needs about 14 GiB of free memory (the bf16 weights) and several minutes on a 2-core machine, so
``run_all.py`` leaves it out unless asked for with ``--only bench_extract_7b``.

Run: python benchmarks/bench_extract_7b.py [--n 8] [--res 224] [--data films.csv [--root DIR]]
     [--batch-size B] [--workers W] [--threads T] [--json bench-out/bench_extract_7b.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}
_SUMMARY = re.compile(r"\((\d+) processed in ([\d.]+) s, ([\d.]+) img/s")
_BAR = re.compile(r"\|\s*\d+/\d+ \[")
# the model build of the command, alone: the same thread setting first (it applies to the random init too)
_BUILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from featcache.extract.launch import default_workers, set_threads
from featcache.models import load_backbone
threads, workers = (None if a == "-" else int(a) for a in sys.argv[3:5])
set_threads(threads, workers if workers is not None else default_workers())
t1 = time.perf_counter()
b = load_backbone(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "build_s": t2 - t1, "threads": torch.get_num_threads(),
                  "dtypes": sorted({str(p.dtype) for p in b.model.parameters()}),
                  "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    return out


def tree(root: int) -> list[int]:
    """``root`` and its living descendants."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out


class Sampler(threading.Thread):
    """Peak summed PSS and RSS of a process tree, and the lowest MemAvailable, every ``every`` seconds."""

    def __init__(self, pid: int, every: float):
        super().__init__(daemon=True)
        self.pid, self.every, self.stop = pid, every, threading.Event()
        self.pss = self.rss = 0
        self.procs = 0
        self.available = meminfo()["MemAvailable"]

    def run(self) -> None:
        while not self.stop.wait(self.every):
            pss = rss = n = 0
            for pid in tree(self.pid):
                try:
                    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
                except OSError:
                    continue
                n += 1
                for line in text.splitlines():
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
            self.pss, self.rss, self.procs = max(self.pss, pss), max(self.rss, rss), max(self.procs, n)
            self.available = min(self.available, meminfo()["MemAvailable"])


def read_stream(stream, t0: float, lines: list[tuple[float, str]]) -> None:
    """Every line of ``stream`` with the time since ``t0`` its first byte arrived (a progress bar redraws
    after a carriage return, so a bar line ends only when the next one begins)."""
    buf, since = b"", 0.0
    while chunk := stream.read1(4096):
        now = time.perf_counter() - t0
        if not buf.strip():
            since = now
        *done, rest = re.split(rb"[\r\n]", buf + chunk)
        for i, x in enumerate(done):
            if x.strip():
                lines.append((since if i == 0 else now, x.decode(errors="replace")))
        buf = rest
        if done:
            since = now
    if buf.strip():
        lines.append((since, buf.decode(errors="replace")))


def model_size(model: str, dtype: str) -> dict:
    """Parameters and weight bytes of a registry architecture, built on the meta device (no memory)."""
    import torch

    from featcache.models import REGISTRY
    from featcache.models.loading import build_model

    name = model.removeprefix("random:")
    if name not in REGISTRY:
        return {}
    net = build_model(REGISTRY.get(name), device="meta", dtype=getattr(torch, dtype))
    params = list(net.parameters())
    return {
        "params": sum(p.numel() for p in params),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in net.buffers()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:dinov3-vit7b16")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    ap.add_argument("--n", type=int, default=8, help="generated films (2 per patient; ignored with --data)")
    ap.add_argument("--size", type=int, default=1024, help="side of the generated films in pixels")
    ap.add_argument("--bits", type=int, default=16, choices=[8, 16], help="bit depth of the generated PNGs")
    ap.add_argument("--data", type=Path, help="manifest CSV of real films instead of generated ones")
    ap.add_argument("--root", type=Path, help="image root of --data (default: the manifest's folder)")
    ap.add_argument(
        "--batch-size", type=int, help="passed to the command (default: the command's, 16 on CPU)"
    )
    ap.add_argument("--workers", type=int, help="passed to the command (default: the command's)")
    ap.add_argument("--threads", type=int, help="passed to the command (default: the command's)")
    ap.add_argument("--build-alone", action=argparse.BooleanOptionalAction, default=True,
                    help="afterwards, time the model build alone in a fresh process (minutes)")  # fmt: skip
    ap.add_argument("--sample-every", type=float, default=2.0, help="seconds between memory samples")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before the command is stopped")
    ap.add_argument("--json", type=Path, default=Path("bench-out/bench_extract_7b.json"))
    args = ap.parse_args()
    if args.data is not None and not args.data.is_file():
        print(f"--data {args.data}: no such manifest", file=sys.stderr)
        return 2
    if args.data is None and (args.n < 2 or args.n % 2):
        print(f"--n {args.n}: must be an even number of 2 or more (2 films per patient)", file=sys.stderr)
        return 2

    load_start = os.getloadavg()
    torch_dtype = _DTYPES[args.dtype]
    size = model_size(args.model, torch_dtype)
    mem = meminfo()
    need = size.get("param_bytes", 0) * 1.1
    if need > mem["MemAvailable"]:
        print(f"{args.model} in {args.dtype} needs about {need / 2**30:.1f} GiB, "
              f"{mem['MemAvailable'] / 2**30:.1f} GiB available: not started", file=sys.stderr)  # fmt: skip
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench7b-"))
    out: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "res": args.res,
        "dtype": args.dtype,
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "mem_total_gib": mem["MemTotal"] / 2**30,
        "mem_available_start_gib": mem["MemAvailable"] / 2**30,
        "load_avg_start": load_start,
        **size,
    }
    try:
        if args.data is None:
            from featcache.demo import make_demo_dataset

            manifest = make_demo_dataset(tmp / "data", n_patients=args.n // 2, size=args.size, bits=args.bits)
            out["data"] = f"generated: {args.n} chest films, {args.size} px, {args.bits}-bit PNG"
        else:
            manifest = args.data.resolve()
            out["data"] = str(manifest)
        cache = tmp / "cache"
        cmd = [sys.executable, "-m", "featcache", "extract", "--model", args.model, "--res", str(args.res),
               "--dtype", args.dtype, "--device", "cpu", "--data", str(manifest), "--out", str(cache)]  # fmt: skip
        for flag, value in (("--root", args.root), ("--batch-size", args.batch_size), ("--workers", args.workers),
                            ("--threads", args.threads)):  # fmt: skip
            if value is not None:
                cmd += [flag, str(value)]
        out["command"] = " ".join(["featcache", *cmd[3:]]).replace(str(tmp), "$TMP")
        print(out["command"], flush=True)

        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        lines: list[tuple[float, str]] = []
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        sampler = Sampler(proc.pid, args.sample_every)
        sampler.start()
        reader = threading.Thread(target=read_stream, args=(proc.stderr, t0, lines), daemon=True)
        reader.start()
        chunks: list[bytes] = []
        drain = threading.Thread(target=lambda: chunks.extend(iter(proc.stdout.read1, b"")), daemon=True)
        drain.start()
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        wall = time.perf_counter() - t0
        drain.join()
        stdout = b"".join(chunks)
        sampler.stop.set()
        sampler.join()
        reader.join()
        rusage = resource.getrusage(resource.RUSAGE_CHILDREN)
        stdout = stdout.decode(errors="replace")
        bar = [t for t, line in lines if _BAR.search(line)]
        out.update(
            returncode=proc.returncode,
            wall_s=wall,
            first_progress_s=bar[0] if bar else None,
            load_avg_end=os.getloadavg(),
            peak_rss_mib=rusage.ru_maxrss / 1024,
            tree_pss_peak_mib=sampler.pss / 2**20,
            tree_rss_sum_peak_mib=sampler.rss / 2**20,
            tree_processes=sampler.procs,
            mem_available_min_gib=sampler.available / 2**30,
            stdout=stdout.strip(),
            stderr_tail=[line for _, line in lines if not _BAR.search(line)][-10:],
        )
        summary = _SUMMARY.search(stdout)
        if proc.returncode != 0 or summary is None:
            why = (
                "killed (SIGKILL: out of memory or --timeout)"
                if proc.returncode == -9
                else f"exit {proc.returncode}"
            )
            print(f"the command failed: {why}; wall {wall:.1f} s; peak RSS {rusage.ru_maxrss / 2**20:.2f} GiB",
                  file=sys.stderr)  # fmt: skip
            print("\n".join([stdout, *out["stderr_tail"]]), file=sys.stderr)
            return 1
        processed, extract_s = int(summary[1]), float(summary[2])
        img_s = processed / extract_s  # the summary prints img/s to one decimal, seconds to 0.1 s
        out.update(
            processed=processed,
            extract_s=extract_s,
            img_s=img_s,
            summary_img_s=float(summary[3]),
            whole_command_img_s=processed / wall,
        )

        from featcache.store import FeatureStore

        store = FeatureStore(cache)
        fs = store.open_set(store.list_sets()[0])
        a = fs.attrs
        prov = a["provenance"]
        batch = args.batch_size or 16  # the command's CPU default (featcache extract --help)
        out.update(
            n=fs.n,
            rows_done=int(fs.ok.sum()),
            store_params=prov.get("params"),
            store_dtype=prov.get("dtype"),
            cpu_bf16=a.get("cpu_bf16"),
            threads=a.get("threads"),
            shard_rows=a.get("shard_rows"),
            # the set records what the out-of-memory back-off settled on; a forward never spans shards
            micro_batch={
                **(a.get("micro_batch") or {"requested": batch, "final": batch}),
                "largest_forward": min(
                    (a.get("micro_batch") or {}).get("final", batch), a.get("shard_rows") or batch
                ),
                "recorded_by_command": "micro_batch" in a,
            },  # fmt: skip
        )

        if args.build_alone:
            del fs, store
            res = subprocess.run(
                [sys.executable, "-c", _BUILD, args.model, torch_dtype,
                 "-" if args.threads is None else str(args.threads), "-" if args.workers is None else str(args.workers)],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            if res.returncode == 0:
                out["build_alone"] = json.loads(res.stdout.strip().splitlines()[-1])
            else:
                out["build_alone"] = {
                    "error": (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
                }

        b = out.get("build_alone", {})
        print(f"{args.model} @ {args.res}px {args.dtype} on {out['cpu']} ({out['cpus']} CPUs), "
              f"{processed} films; load average at start {load_start[0]:.2f}")  # fmt: skip
        print(f"  params {out.get('params', 0) / 1e9:.3f} B, weights {out.get('param_bytes', 0) / 2**30:.2f} GiB "
              f"(+ {out.get('buffer_bytes', 0) / 2**20:.1f} MiB buffers); store says {out['store_params']} params, "
              f"{out['store_dtype']}, cpu_bf16 {out['cpu_bf16']}; threads {out['threads']}")  # fmt: skip
        print(f"  extraction           {img_s:8.3f} img/s ({extract_s:.1f} s, the command's summary)")
        print(f"  whole command        {processed / wall:8.3f} img/s ({wall:.1f} s wall)")
        if out["first_progress_s"] is not None:
            print(
                f"  first progress line  {out['first_progress_s']:8.1f} s (imports + build + probe forward + store)"
            )
        if "build_s" in b:
            print(f"  model build alone    {b['build_s']:8.1f} s ({b['threads']} thread(s), weights {b['dtypes']}, "
                  f"max RSS {b['maxrss_mib'] / 1024:.2f} GiB)")  # fmt: skip
        elif b:
            print(f"  model build alone    failed: {b['error']}")
        print(f"  peak RSS {out['peak_rss_mib'] / 1024:.2f} GiB (largest process); tree PSS peak "
              f"{out['tree_pss_peak_mib'] / 1024:.2f} GiB over {out['tree_processes']} processes; lowest "
              f"MemAvailable {out['mem_available_min_gib']:.2f} of {out['mem_total_gib']:.1f} GiB")  # fmt: skip
        mb = out["micro_batch"]
        print(f"  micro-batch {mb['largest_forward']} per forward (recorded {mb.get('final')} of {mb.get('requested')} "
              f"requested, {mb.get('out_of_memory', 0)} out-of-memory back-offs; shard rows {out['shard_rows']})")  # fmt: skip
        return 0
    finally:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str))
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
