"""The one way data_prep tools write output shards: complete or not at all, with a manifest that says
what each shard was built from, and a list of every input that was skipped and why.

    writer = ShardWriter(out_dir, tool="encode_latents", options={...})
    for name, inputs, work in plan:
        if writer.up_to_date(name, inputs):
            continue
        with writer.shard(name, inputs) as sink:
            sink.write({"__key__": ..., ...})     # or sink.skip(item, reason, detail)
    summary = writer.finish()                     # raises NoSamplesWritten when the output holds no sample

Why: a shard that merely *exists* says nothing about whether it is complete or built from today's
inputs. Here a shard is written to `<name>.tmp`, fsync'ed and renamed into place only when its last
sample is in, and then `<stem>.manifest.json` records the tool, its options, a fingerprint of every
input (path, size, mtime — or a hash for prompt text), the keys written and the inputs skipped with
their reasons. A re-run rebuilds a shard unless its manifest matches the current inputs and options
and the tar still has the recorded size; so fixing a wrong `--videos` folder, editing a caption or
changing `--min-frames` takes effect on the next run, and an interrupted run resumes from its last
complete shard. A shard whose inputs all fail is not written (its manifest records the skips), and
a run whose output holds no sample at all fails, naming the most common reasons.

`skipped.jsonl` next to the shards lists every skipped input of the current output (shards rebuilt
now and shards kept from earlier runs), one JSON object per line: {shard, item, reason, detail}.
Several processes writing into one folder (torchrun ranks, `--shard-index` machines) each give a
`part`, and write `skipped-<part>.jsonl`.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from helios_train.runtime.atomic_file import write_text_atomically
from helios_train.runtime.prompt_file import InputError

MANIFEST_VERSION = 1
EXAMPLES_IN_SUMMARY = 5


class NoSamplesWritten(InputError):
    """Every input was skipped: the output would train on nothing."""


def file_fingerprint(path) -> dict:
    """Identity of an input file without reading it: resolved path, size, mtime (ns)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return {"path": str(path.resolve()), "missing": True}
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def text_fingerprint(items: Iterable) -> str:
    """sha256 of JSON-serialisable items (prompt lists, caption records)."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def folder_fingerprint(path) -> str:
    """sha256 over (relative path, size, mtime) of every file under a folder (model weights, a teacher):
    replacing the weights rebuilds the shards made with them."""
    root = Path(path)
    if root.is_file():
        return text_fingerprint([file_fingerprint(root)])
    entries = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            entries.append([str(p.relative_to(root)), st.st_size, st.st_mtime_ns])
    return text_fingerprint(entries)


def _normalised(value):
    """What `value` reads back as from JSON (tuples → lists, Paths → str), so manifests compare equal."""
    return json.loads(json.dumps(value, default=str))


def manifest_path(shard: Path) -> Path:
    return shard.with_name(shard.name[: -len(".tar")] + ".manifest.json" if shard.name.endswith(".tar")
                           else shard.name + ".manifest.json")


class ShardSink:
    """One shard being written: samples go to the temporary tar, skips are recorded for the manifest."""

    def __init__(self, tar_writer, shard: str):
        self._tar = tar_writer
        self.shard = shard
        self.keys: list[str] = []
        self.skipped: list[dict] = []

    def write(self, sample: dict) -> None:
        self._tar.write(sample)
        self.keys.append(sample["__key__"])

    def skip(self, item: str, reason: str, detail: str = "") -> None:
        self.skipped.append({"shard": self.shard, "item": str(item), "reason": reason, "detail": str(detail)})


class ShardWriter:
    """Writes one tool's output shards into `out_dir` and keeps the run's summary."""

    def __init__(self, out_dir, tool: str, options: dict, part: str | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tool, self.options, self.part = tool, _normalised(options), part
        self.skipped: list[dict] = []
        self.summary = {"shards_written": 0, "shards_up_to_date": 0, "shards_empty": 0, "samples": 0,
                        "samples_in_output": 0, "skipped": {}}

    # -- re-run decisions -------------------------------------------------------------------------
    def _read_manifest(self, dst: Path) -> dict | None:
        try:
            return json.loads(manifest_path(dst).read_text())
        except (OSError, ValueError):
            return None

    def up_to_date(self, name: str, inputs) -> bool:
        """True (and the shard's counts join the summary) when `name` was built by this tool from these
        inputs with these options and is still whole; False means: build it."""
        dst = self.out / name
        m = self._read_manifest(dst)
        if m is None or m.get("version") != MANIFEST_VERSION or m.get("tool") != self.tool:
            return False
        if m.get("options") != self.options or m.get("inputs") != _normalised(inputs):
            return False
        if m["samples"]:
            if not dst.is_file() or dst.stat().st_size != m.get("tar_size"):
                return False
        elif dst.exists():
            return False  # a tar where the manifest says none was written: someone else's file
        self.summary["shards_up_to_date"] += 1
        self.summary["samples_in_output"] += m["samples"]
        self._count(m.get("skipped", []))
        return True

    # -- writing ----------------------------------------------------------------------------------
    @contextmanager
    def shard(self, name: str, inputs) -> Iterator[ShardSink]:
        import webdataset as wds

        dst = self.out / name
        tmp = dst.with_name(dst.name + ".tmp")
        # The old manifest goes first: from here until the new one is written, the shard counts as unbuilt.
        manifest_path(dst).unlink(missing_ok=True)
        try:
            with open(tmp, "wb") as stream:
                with wds.TarWriter(stream) as tar:
                    sink = ShardSink(tar, name)
                    yield sink
                stream.flush()
                os.fsync(stream.fileno())
            if sink.keys:
                os.replace(tmp, dst)
            else:
                tmp.unlink()
                dst.unlink(missing_ok=True)  # an earlier build of it no longer stands
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        write_text_atomically(manifest_path(dst), json.dumps({
            "version": MANIFEST_VERSION, "tool": self.tool, "options": self.options, "inputs": _normalised(inputs),
            "samples": len(sink.keys), "tar_size": dst.stat().st_size if sink.keys else None,
            "keys": sink.keys, "skipped": sink.skipped}, indent=1))
        self.summary["shards_written" if sink.keys else "shards_empty"] += 1
        self.summary["samples"] += len(sink.keys)
        self.summary["samples_in_output"] += len(sink.keys)
        self._count(sink.skipped)

    def _count(self, skipped: list[dict]) -> None:
        self.skipped.extend(skipped)
        for s in skipped:
            self.summary["skipped"][s["reason"]] = self.summary["skipped"].get(s["reason"], 0) + 1

    # -- end of run -------------------------------------------------------------------------------
    def skipped_list_path(self) -> Path:
        return self.out / (f"skipped-{self.part}.jsonl" if self.part else "skipped.jsonl")

    def finish(self, require_samples: bool = True) -> dict:
        """Write the skipped list, return the summary; fail when the output holds no sample."""
        path = self.skipped_list_path()
        write_text_atomically(path, "".join(json.dumps(s) + "\n" for s in self.skipped))
        summary = dict(self.summary)
        if self.skipped:
            summary["skipped_examples"] = [f"{s['item']}: {s['reason']}" + (f" ({s['detail']})" if s["detail"] else "")
                                           for s in self.skipped[:EXAMPLES_IN_SUMMARY]]
            summary["skipped_list"] = str(path)
        if require_samples and summary["samples_in_output"] == 0:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(summary["skipped"].items(), key=lambda kv: -kv[1]))
            raise NoSamplesWritten(
                f"{self.tool}: no sample written to {self.out} — every input was skipped"
                + (f" ({reasons}; each one is listed in {path})" if reasons else " (there were no inputs)")
                + "; fix the inputs or options and re-run (finished shards are kept)")
        return summary


def run_tool(build) -> dict:
    """CLI tail shared by the data_prep tools: print the summary as one JSON line; an input error
    (including "no sample written") prints `error: …` and exits 1 without a traceback."""
    try:
        summary = build()
    except InputError as bad:
        raise SystemExit(f"error: {bad}") from None
    print(json.dumps(summary))
    return summary
