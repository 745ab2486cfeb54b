"""The paper's controlled protocol: the pre-training and the evaluation corpus must not overlap.

Sec. 4.1 pre-trains and evaluates on "two non-overlapping corpora (both machine and noise classes)": eight
pre-training machine types against six others, and evaluation noise never heard in pre-training. Here
the two ingested corpora are compared through their shard manifests (``<corpus>/{machine,noise}/
manifest.json``, written by ``shards.write_shards``) on three things:

* machine type: the same type name (case-insensitive) in both corpora;
* clip: a machine clip of the evaluation corpus whose content is also in the pre-training corpus;
* noise recording: an evaluation noise recording whose content is also in the pre-training corpus.

Content is compared by hash, never by name: ``sha1`` (the file bytes: a renamed or moved copy) and
``audio_sha1`` (the decoded samples as stored: also a copy re-encoded to another format or with other
header chunks). A match of either is an overlap, whatever side (clip or noise) the content sits on.

The only way to overlap is the paper's Table-5 "+ eval-reference data" variant, which adds the evaluation
references and noise to pre-training on purpose: ``check_disjoint(..., allow_eval_references=True)``
returns the record of what overlaps instead of raising. Even then an evaluation *test* clip in pre-training
is refused: test clips are never references, and pre-training on them would leak the answers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from retain_asd.corpus.shards import MANIFEST

OVERLAP_KINDS = ("machine_type", "clip", "noise")
_FIX = ("Fix: point the evaluation corpus (eval.machine_root / eval.noise_root) at files that are not in the "
        "pre-training corpus (data.machine_root / data.noise_root), remove the listed files from one of them "
        "and re-ingest; or, to add the evaluation references and noise to pre-training on purpose (the "
        "paper's Table-5 '+ eval-reference data' variant), set data.add_eval_references: true.")


class CorpusOverlapError(ValueError):
    """The pre-training and evaluation corpora overlap; the message names the first overlapping files and the fix.

    ``report`` holds every overlap found (an ``OverlapReport``).
    """

    def __init__(self, message: str, report: OverlapReport):
        super().__init__(message)
        self.report = report

    def __reduce__(self):
        return (type(self), (str(self), self.report))


@dataclass(frozen=True)
class Overlap:
    """One overlap: `kind` is "machine_type" | "clip" | "noise" (the side of the evaluation corpus)."""

    kind: str
    key: str  # the machine type, or the shared content hash
    pretrain_path: str
    eval_path: str
    eval_split: str = ""  # "train" (a reference) | "test" for machine clips


@dataclass(frozen=True)
class OverlapReport:
    """What the two corpora share; empty when they follow the protocol."""

    pretrain_roots: tuple[str, ...]
    eval_roots: tuple[str, ...]
    overlaps: tuple[Overlap, ...] = ()
    machine_types: tuple[str, ...] = field(default=())  # shared types, sorted

    def __bool__(self) -> bool:
        return bool(self.overlaps)

    def of(self, kind: str) -> tuple[Overlap, ...]:
        if kind not in OVERLAP_KINDS:
            raise ValueError(f"kind={kind!r}: expected one of {OVERLAP_KINDS}")
        return tuple(o for o in self.overlaps if o.kind == kind)

    def counts(self) -> dict[str, int]:
        """``{"machine_type": n, "clip": n, "noise": n}``: flat numbers for MLflow params / config.yaml."""
        return {k: len(self.of(k)) for k in OVERLAP_KINDS}

    def describe(self, limit: int = 3) -> str:
        """Human-readable lines: the counts, then the first `limit` overlaps of each kind with both paths."""
        if not self:
            return "pre-training and evaluation corpora are disjoint (machine types, clips, noise recordings)"
        c = self.counts()
        lines = [f"{c['machine_type']} shared machine type(s) {list(self.machine_types)}, {c['clip']} shared "
                 f"clip(s), {c['noise']} shared noise recording(s)"]
        for kind in OVERLAP_KINDS:
            for o in self.of(kind)[:limit]:
                what = f"machine type {o.key!r}" if kind == "machine_type" else f"{kind} (content sha1 {o.key[:12]})"
                lines.append(f"  {what}:\n    pre-training: {o.pretrain_path}\n    evaluation:   {o.eval_path}")
            if len(self.of(kind)) > limit:
                lines.append(f"  ... and {len(self.of(kind)) - limit} more {kind} overlap(s)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- manifests
@dataclass(frozen=True)
class _Entry:
    path: str
    side: str  # "machine" | "noise"
    machine: str
    split: str
    hashes: tuple[str, ...]


def _manifest_files(source) -> list[tuple[str, dict]]:
    """(where, manifest dict) for a corpus folder, a shard folder, a manifest file, a dict, a ShardSet / Corpus."""
    if isinstance(source, Mapping):
        return [("<manifest>", dict(source))]
    if hasattr(source, "machine") and hasattr(source, "noise") and hasattr(source, "root"):  # ingest.Corpus
        return [(str(source.machine.root), source.machine.manifest), (str(source.noise.root), source.noise.manifest)]
    if hasattr(source, "manifest") and hasattr(source, "root"):  # shards.ShardSet
        return [(str(source.root), source.manifest)]
    path = Path(os.fspath(source))
    if path.is_file():
        return [(str(path.parent), json.loads(path.read_text()))]
    if (path / MANIFEST).is_file():
        return [(str(path), json.loads((path / MANIFEST).read_text()))]
    found = [(str(path / name), json.loads((path / name / MANIFEST).read_text()))
             for name in ("machine", "noise") if (path / name / MANIFEST).is_file()]
    if not found:
        raise FileNotFoundError(f"{path}: no {MANIFEST} here nor in {path}/machine or {path}/noise; ingest the "
                                "corpus first (`retain-asd ingest`)")
    return found


def _entries(sources) -> tuple[list[str], list[_Entry]]:
    if isinstance(sources, str | os.PathLike | Mapping) or hasattr(sources, "manifest") or hasattr(sources, "noise"):
        sources = [sources]
    roots, out = [], []
    for source in sources:
        for where, manifest in _manifest_files(source):
            roots.append(where)
            for s in manifest.get("sources", []):
                if "sha1" not in s:
                    raise ValueError(f"{where}: manifest sources carry no content hash; re-ingest with "
                                     "`retain-asd ingest --force`")
                side = "noise" if (s.get("noise_category") or Path(where).name == "noise") else "machine"
                machine = s.get("machine")
                if machine is None and side == "machine":
                    raise ValueError(f"{where}: manifest sources do not name their machine type (written by an "
                                     "older version); re-ingest with `retain-asd ingest --force`")
                hashes = tuple(h for h in (s["sha1"], s.get("audio_sha1", "")) if h)
                out.append(_Entry(s["path"], side, (machine or "").lower(), s.get("split", "") if side == "machine"
                                  else "", hashes))
    return roots, out


# ---------------------------------------------------------------------------------------------------- the guard
def find_overlaps(pretrain, evaluation) -> OverlapReport:
    """Every overlap between the pre-training and the evaluation corpus (see the module docstring).

    `pretrain` / `evaluation`: one or a list of corpus folders (``<out>`` of ``ingest``), shard folders,
    ``manifest.json`` paths, manifest dicts, ``ingest.Corpus`` or ``shards.ShardSet`` objects. Overlaps are
    in the evaluation corpus's path order.
    """
    pre_roots, pre = _entries(pretrain)
    eval_roots, ev = _entries(evaluation)
    by_hash: dict[str, str] = {}
    first_of_type: dict[str, str] = {}
    for e in sorted(pre, key=lambda e: e.path):
        for h in e.hashes:
            by_hash.setdefault(h, e.path)
        if e.side == "machine":
            first_of_type.setdefault(e.machine, e.path)
    overlaps, types_seen = [], set()
    for e in sorted(ev, key=lambda e: e.path):
        if e.side == "machine" and e.machine in first_of_type and e.machine not in types_seen:
            types_seen.add(e.machine)
            overlaps.append(Overlap("machine_type", e.machine, first_of_type[e.machine], e.path, e.split))
        shared = next((h for h in e.hashes if h in by_hash), None)
        if shared is not None:
            overlaps.append(Overlap("clip" if e.side == "machine" else "noise", shared, by_hash[shared], e.path,
                                    e.split))
    return OverlapReport(tuple(pre_roots), tuple(eval_roots), tuple(overlaps), tuple(sorted(types_seen)))


def check_disjoint(pretrain, evaluation, *, allow_eval_references: bool = False) -> OverlapReport:
    """The leakage guard: raise ``CorpusOverlapError`` when the corpora share a machine type, a clip or a noise
    recording (by content hash), naming the first overlapping files (both paths) and the fix.

    With ``allow_eval_references=True`` (the paper's Table-5 "+ eval-reference data" variant) nothing is
    raised: the returned ``OverlapReport`` records what overlaps, to be logged with the run. An evaluation
    test clip in pre-training is refused either way (it is not a reference).
    """
    report = find_overlaps(pretrain, evaluation)
    test_leaks = [o for o in report.of("clip") if o.eval_split == "test"]
    if allow_eval_references and test_leaks:
        o = test_leaks[0]
        raise CorpusOverlapError(
            f"{len(test_leaks)} evaluation test clip(s) are in the pre-training corpus; the '+ eval-reference data' "
            f"variant (data.add_eval_references) adds references (train split) and noise only, never test clips. "
            f"First:\n    pre-training: {o.pretrain_path}\n    evaluation:   {o.eval_path}\nFix: remove the "
            "evaluation test clips from the pre-training corpus and re-ingest.", report)
    if report and not allow_eval_references:
        raise CorpusOverlapError(
            f"the pre-training corpus {list(report.pretrain_roots)} and the evaluation corpus "
            f"{list(report.eval_roots)} overlap (paper Sec. 4.1: two non-overlapping corpora, both machine and "
            f"noise classes): {report.describe()}\n{_FIX}", report)
    return report


def overlap_params(report: OverlapReport, prefix: str = "protocol.") -> dict[str, int | str]:
    """Flat key/values for MLflow params: counts per kind and the shared machine types."""
    out: dict[str, int | str] = {f"{prefix}overlap_{k}": v for k, v in report.counts().items()}
    out[f"{prefix}shared_machine_types"] = ",".join(report.machine_types)
    return out



# ---------------------------------------------------------------------------------------------------- raw folders
def file_sha1s(paths, cache_path: str | os.PathLike | None = None) -> dict[str, str]:
    """``{path: sha1 of the file bytes}``; with `cache_path` (a JSON file) a file whose size and mtime are
    unchanged is not read again, so the guard costs a stat per file on a re-run."""
    from retain_asd import fsio
    from retain_asd.corpus.shards import file_sha1

    cache: dict = {}
    if cache_path is not None and Path(cache_path).is_file():
        try:
            cache = json.loads(Path(cache_path).read_text())
        except (OSError, ValueError):
            cache = {}
    out, fresh = {}, {}
    for path in paths:
        st = os.stat(path)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        hit = cache.get(path)
        sha = hit[1] if isinstance(hit, list) and len(hit) == 2 and hit[0] == stamp else file_sha1(path)
        out[path] = sha
        fresh[path] = [stamp, sha]
    if cache_path is not None and fresh != cache:
        fsio.write_text(cache_path, json.dumps(fresh))
    return out


def raw_manifest(machine_records, noise_records, cache_path: str | os.PathLike | None = None) -> dict:
    """A manifest dict (the ``sources`` the guard reads) made from scan records (``layouts.ClipRecord``) by
    hashing the raw files on the driver: the guard can run before any ingestion or Ray work. Only ``sha1``
    (the bytes) is known here; the ingested manifests add ``audio_sha1`` (a re-encoded copy)."""
    records = [*machine_records, *noise_records]
    hashes = file_sha1s([r.path for r in records], cache_path)
    return {"sources": [{"path": r.path, "sha1": hashes[r.path], "machine": r.machine if r.kind == "machine" else None,
                         "split": r.split, "noise_category": r.noise_category} for r in records]}
