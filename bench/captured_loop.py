"""The loop from served answers back to a better model, offline, with real parts: train, capture what the model
meets, review the captures in groups, label, run again with ``--captured``, compare.

    python -m bench.captured_loop --weights W [--known forest,glacier --new mountain] [--photos 40] [--sent-new 80]

W: ``scripts/offline_weights.py``'s EfficientNet-Lite0. Photos of scenes-sample and pets-sample:

1. ``jobs run`` on ``--photos`` photos of each ``--known`` scene class (version 1.0).
2. Traffic: 20 other photos of each known class, ``--sent-new`` of the ``--new`` class, 20 pets, answered as served
   (``jobs.predict``, the same answers as the server) and offered to the server's own capture writer
   (``handler.capture.CaptureSink``, the default rule: abstained, or under 0.85; no random sample).
3. ``jobs review --captured``: a person labels each group by what most of it shows (the new class, a known
   class) and excludes the pets' groups, as one would from the page.
4. ``jobs run --captured``: version 2.0, compared with 1.0 on 1.0's test split; its accuracy on 20 photos of
   the new class that were never sent.

Results: bench/results/captured_loop-cpu.json; figures in bench/README.md ("The captured loop").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.common import PETS, REPO, SCENES, save_result
from handler.capture import CaptureSettings, CaptureSink
from jobs import api
from jobs.predict import predict
from scripts.offline_weights import ARCH

SENT_KNOWN, SENT_PETS, HELD_OUT_NEW = 20, 20, 20


def jobs(*args: str) -> str:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobs", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"jobs {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"jobs {args[0]}: {time.perf_counter() - started:.0f} s", flush=True)
    return proc.stdout


def photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--known", default="forest,glacier")
    parser.add_argument("--new", default="mountain")
    parser.add_argument("--photos", type=int, default=40, help="training photos per known class")
    parser.add_argument("--sent-new", type=int, default=80, help="photos of the new class sent to the model")
    parser.add_argument("--epochs", type=int, default=25)
    args = parser.parse_args()
    known = args.known.split(",")
    root = Path(tempfile.mkdtemp(prefix="captured-loop-"))
    data, run, capture = root / "data", root / "run", root / "capture"
    sent: list[tuple[str, Path]] = []
    for name in known:
        mine = photos(SCENES / name)
        (data / name).mkdir(parents=True)
        for p in mine[:args.photos]:
            (data / name / p.name).symlink_to(p)
        sent += [(name, p) for p in mine[args.photos:args.photos + SENT_KNOWN]]
    new_photos = photos(SCENES / args.new)
    sent += [(args.new, p) for p in new_photos[:args.sent_new]]
    held_out_new = new_photos[args.sent_new:args.sent_new + HELD_OUT_NEW]
    sent += [("pets", p) for c in ("cats", "dogs") for p in photos(PETS / c)[:SENT_PETS // 2]]
    common = ("--arch", f"timm/{ARCH.removeprefix('timm/')}", "--weights", str(args.weights), "--epochs",
              str(args.epochs), "--follow-symlinks")

    jobs("run", "--data", str(data), "--out", str(run), *common)
    answers = list(predict(run / "model", [p for _, p in sent], batch_size=32))
    # A queue for all of them: offered at once, nothing is dropped (a server offers them over time).
    sink = CaptureSink(CaptureSettings(capture, sample=0.0), "classifier", "1.0", queue_size=len(sent) + 1, seed=0)
    for n, ((kind, photo), answer) in enumerate(zip(sent, answers, strict=True)):
        sink.offer([photo.read_bytes()], [answer], f"req{n:03d}-{kind}")
    sink.close()
    kind_of = {f"req{n:03d}-{kind}": kind for n, (kind, _) in enumerate(sent)}
    records = [json.loads(p.read_text()) for p in capture.glob("*.json")]
    captured_kinds = Counter(kind_of[r["request_id"]] for r in records)
    sent_kinds = Counter(kind for kind, _ in sent)
    captured_share = {k: captured_kinds[k] / n for k, n in sent_kinds.items()}
    print("captured share:", captured_share, flush=True)

    api.review(run, captured=capture)  # what `jobs review --captured` writes before it serves the page
    doc = json.loads((run / "report" / "captured_review.json").read_text())
    by_file = {f"captured:{r['image']}": kind_of[r["request_id"]] for r in records}
    relabel, exclude, mislabelled, group_kinds = {}, [], 0, []
    for group in doc["groups"]:
        kinds = Counter(by_file[c["file"]] for c in group["cards"])
        majority = kinds.most_common(1)[0][0]
        group_kinds.append(dict(kinds))
        for card in group["cards"]:
            if majority == "pets":
                exclude.append(card["file"])
            else:
                relabel[card["file"]] = majority
                mislabelled += by_file[card["file"]] != majority
    exclude += [c["file"] for c in doc["unreadable"]]
    (run / "decisions.json").write_text(json.dumps({"relabel": relabel, "exclude": exclude}))

    out = jobs("run", "--data", str(data), "--out", str(run), "--captured", str(capture), *common)
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    versus = metrics["versus_previous"]["sets"]
    held = list(predict(run / "model", held_out_new, batch_size=32))
    new_accuracy = sum(r["predictions"][0]["label"] == args.new for r in held) / len(held)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "known": known, "new": args.new,
              "sent": dict(sent_kinds), "captured": dict(captured_kinds),
              "captured_share": captured_share, "groups": group_kinds, "labelled": len(relabel),
              "mislabelled_by_group": mislabelled, "excluded": len(exclude),
              "classes_after": metrics["classes"], "held_out_new_accuracy": new_accuracy,
              "versus_previous": {k: {f: v[f] for f in ("images", "both_right", "only_old_right", "only_new_right",
                                                        "p_value", "significantly_worse")} for k, v in versus.items()},
              "brought_in_line": next((line for line in out.splitlines() if "brought in" in line), "")}
    print(json.dumps(result, indent=1))
    save_result("captured_loop", "cpu", result)


if __name__ == "__main__":
    main()
