"""Collect throughput: the whole ``jobs collect`` command on a URL list served from loopback.

    .venv/bin/python -m bench.collect [--images 2000] [--sets small,fixture,full] [--workers 8]
                                      [--baseline REV,...]

A server process serves real photos, each URL a distinct file: photo ``k % n`` with a JPEG comment
naming ``k`` (a COM segment after SOI), so no two downloads hash alike. Photo sets: ``small`` (the
test fixture photos scaled to 180 px on the long side, as in issue 14's measurement), ``fixture``
(tests/fixtures/hymenoptera_small as they are, about 500 px and 96 KB) and ``full`` (the hymenoptera
set in shared/datasets, when present).

For each set it reports:
- ``command``: ``python -m jobs collect --source urls`` on a ``class,url`` list of ``--images`` lines
  (contact sheet, attribution and report included), the median of ``--rounds`` runs that
  alternate the trees; images/s, images/s per usable core, and the
  CPU seconds of the command (all its processes) and of the server. With ``--baseline REV,...``
  the same command also runs on the ``jobs/`` of each git revision, side by side.
- ``stages``: the same bodies through each stage alone (download threads, verification threads,
  writes) and each stage's share of their sum, by CPU time and by wall time.
- ``pipeline``: download + verify with verification in the download threads, in collect's
  verification threads, or in a process pool (wall images/s).
- ``writes``: ms per image for write-and-rename, the same with fsync per file and per manifest
  line (what collect did before), and re-hashing on open (what a re-run does instead).

The server shares the machine's cores with the command; the figures say so. Results:
bench/results/collect-cpu.json.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image

# (the verification processes re-import this file as their main module: torch there costs seconds each)
from jobs.collect.download import Downloader, DownloadSettings, inspect_image
from jobs.collect.netsafety import AddressPolicy
from jobs.collect.stage import usable_cpus, verification_pool
from jobs.collect.store import RawStore, write_image
from jobs.config import Config
from jobs.fileio import atomic_write_json

REPO = Path(__file__).resolve().parents[1]

FIXTURE = REPO / "tests" / "fixtures" / "hymenoptera_small"
HYMENOPTERA = REPO.parent / "shared" / "datasets" / "hymenoptera"
RESULT = REPO / "bench" / "results" / "collect-cpu.json"
SMALL_SIDE = 180


def photo_sets() -> dict[str, list[tuple[str, bytes]]]:
    """(class, JPEG bytes) per set."""
    fixture = [(p.parent.name, p.read_bytes()) for p in sorted(FIXTURE.glob("*/*.jpg"))]
    small = []
    for cls, data in fixture:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            img.thumbnail((SMALL_SIDE, SMALL_SIDE))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
        small.append((cls, buf.getvalue()))
    sets = {"small": small, "fixture": fixture}
    if HYMENOPTERA.is_dir():
        sets["full"] = [(p.parent.name, p.read_bytes()) for p in sorted(HYMENOPTERA.glob("*/*/*.jpg"))]
    return sets


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment after SOI: other bytes, the same pixels."""
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def _serve(photos: list[tuple[str, bytes]], port_out: Any) -> None:
    """Server process: GET /<prefix>/<k>.jpg -> photo k % n, made distinct by a comment; /cpu -> CPU seconds."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/cpu":
                body, ctype = f"{time.process_time()}".encode(), "text/plain"
            else:
                _, prefix, name = self.path.split("/")
                k = int(name.split(".")[0])
                body, ctype = with_comment(photos[k % len(photos)][1], f"{prefix}-{k}"), "image/jpeg"
            # one write: a separate small header segment would meet the client's delayed ACK (40 ms a request)
            head = f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            self.wfile.write(head.encode() + body)

    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_out.send(server.server_address[1])
    server.serve_forever()


class PhotoServer:
    def __init__(self, photos: list[tuple[str, bytes]]) -> None:
        self.photos = photos
        receive, send = multiprocessing.Pipe(duplex=False)
        self.process = multiprocessing.get_context("spawn").Process(target=_serve, args=(photos, send), daemon=True)
        self.process.start()
        self.url = f"http://127.0.0.1:{receive.recv()}"

    def cpu_seconds(self) -> float:
        import requests

        return float(requests.get(f"{self.url}/cpu", timeout=10).text)

    def urls(self, prefix: str, n: int) -> list[tuple[str, str]]:
        return [(self.photos[k % len(self.photos)][0], f"{self.url}/{prefix}/{k}.jpg") for k in range(n)]

    def stop(self) -> None:
        self.process.terminate()
        self.process.join()


class TreeCPU:
    """CPU seconds of a process and all its descendants, sampled from /proc every 20 ms.

    rusage would count only the descendants that were waited for. A descendant's last sample
    counts, so at most 20 ms of each is lost.
    """

    def __init__(self, root: int) -> None:
        self.root, self.seen, self._stop = root, {}, False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self._stop:
            parents, cpu = {}, {}
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                pid = int(stat.parent.name)
                parents[pid], cpu[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
            for pid in cpu:
                up = pid
                while up in parents and up != self.root:
                    up = parents[up]
                if up == self.root:
                    self.seen[pid] = cpu[pid]
            time.sleep(0.02)

    def stop(self) -> float:
        self._stop = True
        self._thread.join()
        return sum(self.seen.values())


def run_command(server: PhotoServer, urls: list[tuple[str, str]], work: Path, workers: int,
                jobs_root: Path) -> dict[str, float]:
    listing = work / "urls.csv"
    listing.write_text("class,url\n" + "".join(f"{c},{u}\n" for c, u in urls))
    out = work / "out"
    cmd = [sys.executable, "-m", "jobs", "collect", "--source", "urls", "--urls-file", str(listing), "--out", str(out),
           "--allow-private-addresses", "--download-workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(jobs_root)}
    server_cpu, started = server.cpu_seconds(), time.monotonic()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree = TreeCPU(proc.pid)
    stdout, stderr = proc.communicate()
    wall, cpu, server_cpu = time.monotonic() - started, tree.stop(), server.cpu_seconds() - server_cpu
    if proc.returncode != 0:
        raise SystemExit(f"jobs collect failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-2000:]}")
    kept = sum(1 for p in out.glob("raw/*/*.jpg"))
    shutil.rmtree(out)
    return {"images": kept, "wall_s": round(wall, 2), "images_per_s": round(kept / wall, 1),
            "images_per_s_per_core": round(kept / wall / usable_cpus(), 1), "command_cpu_s": round(cpu, 2),
            "images_per_command_cpu_s": round(kept / cpu, 1), "server_cpu_s": round(server_cpu, 2)}


def timed(fn: Any) -> tuple[Any, float, float]:
    """(value, wall s, CPU s of this process and its descendants)."""
    tree = TreeCPU(os.getpid())
    time.sleep(0.05)  # a first sample before the work starts
    before, wall = sum(tree.seen.values()), time.monotonic()
    value = fn()
    wall = time.monotonic() - wall
    time.sleep(0.05)
    return value, wall, tree.stop() - before


def run_stages(server: PhotoServer, urls: list[tuple[str, str]], work: Path, workers: int) -> dict[str, Any]:
    cfg = Config(allow_private_addresses=True)
    downloader = Downloader(DownloadSettings.from_config(cfg), AddressPolicy(allow_private=True), cfg.user_agent)
    n = len(urls)

    def download() -> list[Any]:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(downloader.fetch, [u for _, u in urls]))

    def decode() -> list[Any]:
        return list(pool.map(inspect_image, [b.data for b in bodies], [cfg.max_image_pixels] * n))

    def write(fsync: bool) -> None:
        folder = work / f"write-{fsync}"
        store = RawStore(folder, ["x"])
        manifest = store.manifests["x"]
        for body, info in zip(bodies, infos, strict=True):
            name = write_image(folder / "x", body.sha256, info.ext, body.data)
            manifest.append({"url": body.final_url, "file": name, "status": "ok", "sha256": body.sha256,
                             "size": len(body.data)})
            if fsync:
                for path in (folder / "x" / name, manifest.path):
                    fd = os.open(path, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)

    bodies, net_wall, net_cpu = timed(download)
    pool = verification_pool()
    infos, dec_wall, dec_cpu = timed(decode)
    pool.shutdown()
    _, write_wall, write_cpu = timed(lambda: write(False))
    _, fsync_wall, _ = timed(lambda: write(True))
    reopened, rehash_wall, _ = timed(lambda: RawStore(work / "write-False", ["x"]))
    assert len(reopened.kept_entries("x")) == len({b.sha256 for b in bodies})  # re-hashed, all intact
    downloader.close()
    cpu = {"network": net_cpu, "decode": dec_cpu, "write": write_cpu}
    wall = {"network": net_wall, "decode": dec_wall, "write": write_wall}
    return {
        "stages": {stage: {"cpu_ms_per_image": round(1000 * cpu[stage] / n, 3),
                           "wall_ms_per_image": round(1000 * wall[stage] / n, 3),
                           "share_of_cpu": round(cpu[stage] / sum(cpu.values()), 3),
                           "share_of_wall": round(wall[stage] / sum(wall.values()), 3)} for stage in cpu},
        "writes_ms_per_image": {"write_rename": round(1000 * write_wall / n, 3),
                                "write_rename_fsync_file_and_manifest": round(1000 * fsync_wall / n, 3),
                                "rehash_on_open": round(1000 * rehash_wall / n, 3)},
    }


def process_pool() -> tuple[ProcessPoolExecutor, float]:
    """The alternative to collect's verification threads: one spawned process per core, started and warm."""
    started = time.monotonic()
    pool = ProcessPoolExecutor(usable_cpus(), mp_context=multiprocessing.get_context("spawn"))
    list(pool.map(_warm, range(4 * usable_cpus())))
    return pool, time.monotonic() - started


def _warm(_: int) -> None:
    import jobs.collect.download  # noqa: F401  # what a verification imports


def run_pipelines(server: PhotoServer, urls: list[tuple[str, str]], workers: int) -> dict[str, float]:
    """Download + verify: verification in the download threads, in collect's verification threads, or in
    a process pool (its start-up reported apart, not timed)."""
    cfg = Config(allow_private_addresses=True)
    max_pixels = cfg.max_image_pixels
    result: dict[str, float] = {}
    for where in ("download_threads", "verification_threads", "processes"):
        downloader = Downloader(DownloadSettings.from_config(cfg), AddressPolicy(allow_private=True), cfg.user_agent)
        verify: Any = None
        if where == "processes":
            verify, result["process_pool_start_s"] = process_pool()
        elif where == "verification_threads":
            verify = verification_pool()

        def one(url: str, downloader: Downloader = downloader, verify: Any = verify) -> Any:
            body = downloader.fetch(url)
            if verify is None:
                return inspect_image(body.data, max_pixels)
            return verify.submit(inspect_image, body.data, max_pixels)

        started = time.monotonic()
        with ThreadPoolExecutor(workers) as pool:
            done = list(pool.map(one, [f"{u}?{where}" for _, u in urls]))
        if verify is not None:
            done = [f.result() for f in done]
            verify.shutdown()
        result[f"verify_in_{where}_images_per_s"] = round(len(done) / (time.monotonic() - started), 1)
        downloader.close()
    return result


def baseline_tree(rev: str, work: Path) -> Path:
    dest = work / f"baseline-{rev}"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", rev, "jobs"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def cpu_flags() -> str:
    """The model name and which of the flags this project quotes (amx*, avx512_bf16) the CPU has."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    wanted = sorted(f for f in set(info.split()) if f.startswith("amx") or f == "avx512_bf16")
    return f"{model}; {' '.join(wanted) or 'none of amx*/avx512_bf16'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="URLs per set for the whole command")
    ap.add_argument("--stage-images", type=int, default=600, help="URLs per set for the stage and pipeline timings")
    ap.add_argument("--sets", default="small,fixture,full")
    ap.add_argument("--workers", type=int, default=8, help="download_workers")
    ap.add_argument("--rounds", type=int, default=3, help="runs of the command per tree (the median is kept)")
    ap.add_argument("--baseline", default=None,
                    help="git revisions (comma-separated) whose jobs/ also run the command, side by side")
    args = ap.parse_args()
    sets = photo_sets()
    load_before = os.getloadavg()
    print(f"usable cores {usable_cpus()}, CPU flags: {cpu_flags()}, load average {load_before[0]:.2f}", flush=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-collect-") as tmp:
        work = Path(tmp)
        trees = {"this": REPO}
        for rev in filter(None, (args.baseline or "").split(",")):
            trees[rev] = baseline_tree(rev, work)
        for name in [s for s in args.sets.split(",") if s in sets]:
            photos = sets[name]
            server = PhotoServer(photos)
            try:
                row: dict[str, Any] = {"photos": len(photos),
                                       "mean_kb": round(sum(len(d) for _, d in photos) / len(photos) / 1024, 1)}
                runs: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
                for rnd in range(args.rounds):  # rounds alternate the trees: load from others hits them alike
                    for label, root in trees.items():
                        run_dir = work / f"{name}-{label}-{rnd}"
                        run_dir.mkdir()
                        runs[label].append(run_command(server, server.urls(f"{name}-{label}-{rnd}", args.images),
                                                       run_dir, args.workers, root))
                        print(f"{name} {label} round {rnd + 1}: {runs[label][-1]}", flush=True)
                for label, rows in runs.items():
                    median = sorted(rows, key=lambda r: r["images_per_s"])[len(rows) // 2]
                    row[f"command_{label}"] = {**median, "images_per_s_rounds": [r["images_per_s"] for r in rows]}
                    ratio = median["images_per_s"] / row["command_this"]["images_per_s"]
                    print(f"{name} {label}: median {median['images_per_s']} images/s "
                          f"({median['images_per_s_per_core']} per core), this/{label} = {1 / ratio:.2f}", flush=True)
                stage_dir = work / f"{name}-stages"
                stage_dir.mkdir()
                stage_urls = server.urls(f"{name}-stage", args.stage_images)
                row.update(run_stages(server, stage_urls, stage_dir, args.workers))
                row["pipeline"] = run_pipelines(server, stage_urls, args.workers)
                print(f"{name} stages: {row['stages']}\n{name} writes: {row['writes_ms_per_image']}\n"
                      f"{name} pipeline: {row['pipeline']}", flush=True)
                results[name] = row
            finally:
                server.stop()
    atomic_write_json(RESULT, {
        "benchmark": "collect", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
        "images": args.images, "rounds": args.rounds, "stage_images": args.stage_images,
        "download_workers": args.workers, "usable_cores": usable_cpus(), "cpu_flags": cpu_flags(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "note": "server and command share the machine's cores; the machine was shared with other work",
        "sets": results})
    print(f"saved {RESULT.relative_to(REPO)}")

if __name__ == "__main__":
    main()
