"""Raw folders -> shards: scan the layouts, decode with Ray Data, write the label vocabulary beside them.

Output folder::

    <out>/machine/   part-*.parquet, manifest.json, rejects.csv, source.json   (fixed-length clips)
    <out>/noise/     part-*.parquet, manifest.json, rejects.csv, source.json   (full-length noise recordings)
    <out>/labels.json                                              (machine-attribute + noise classes)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from retain_asd import fsio
from retain_asd.corpus import layouts, shards
from retain_asd.corpus.labels import LabelVocab, build_vocab

SOURCE = "source.json"  # beside each shard set: {"root": the raw folder it was ingested from}


@dataclass(frozen=True)
class Corpus:
    """A ready corpus: shard folders and label vocabulary."""

    root: Path
    machine: shards.ShardSet
    noise: shards.ShardSet
    vocab: LabelVocab

    @property
    def labels_path(self) -> Path:
        return self.root / "labels.json"

    def summary(self) -> str:
        lines = [f"corpus {self.root}"]
        for name, s in (("machine", self.machine), ("noise", self.noise)):
            c = s.manifest["counts"]
            state = "rebuilt" if s.rebuilt else "up to date"
            lines.append(f"  {name:<8} {c['inputs']:>6} inputs  {c['written']:>6} written  "
                         f"{c['rejected']:>4} rejected  {len(s.manifest['shards'])} shards  ({state})")
        lines.append(f"  classes: {self.vocab.num_machine} machine-attribute + {self.vocab.num_noise} noise "
                     f"= {self.vocab.num_classes}")
        for name in (*self.vocab.machine_classes, *self.vocab.noise_classes):
            lines.append(f"    {name:<48} {self.vocab.counts.get(name, 0):>6}")
        for path, reason in (*self.machine.rejects, *self.noise.rejects):
            lines.append(f"  rejected {path}: {reason}")
        return "\n".join(lines)


def ingest(machine_root: str | os.PathLike, noise_root: str | os.PathLike, out_dir: str | os.PathLike, *,
           settings: shards.DecodeSettings = shards.DecodeSettings(), rows_per_shard: int = 256,
           ground_truth_dir: str | os.PathLike | None = None, force: bool = False) -> Corpus:
    """Scan both corpora, write their shards (a no-op when unchanged) and the label vocabulary."""
    out_dir = Path(out_dir)
    machine_scan = layouts.scan_dcase(machine_root, ground_truth_dir=ground_truth_dir)
    noise_scan = layouts.scan_noise(noise_root)
    machine = shards.write_shards(machine_scan.records, out_dir / "machine", settings=settings,
                                  rows_per_shard=rows_per_shard, scan_rejects=machine_scan.rejects, force=force)
    # Noise keeps its full length: the stream cuts a fresh random segment per pairing.
    noise = shards.write_shards(noise_scan.records, out_dir / "noise", settings=replace(settings, clip_s=None),
                                rows_per_shard=rows_per_shard, scan_rejects=noise_scan.rejects, force=force)
    for shard_set, root in ((machine, machine_root), (noise, noise_root)):  # what `guard_real_corpus` reads
        fsio.write_json(shard_set.root / SOURCE, {"root": str(Path(root).resolve())})
    labels_path = out_dir / "labels.json"
    if machine.rebuilt or noise.rebuilt or not labels_path.is_file():
        kept = {s["path"] for s in machine.manifest["sources"]} | {s["path"] for s in noise.manifest["sources"]}
        vocab = build_vocab([r for r in machine_scan.records if r.path in kept],
                            [r for r in noise_scan.records if r.path in kept])
        vocab.to_json(labels_path)
    else:
        vocab = LabelVocab.from_json(labels_path)
    return Corpus(out_dir, machine, noise, vocab)


def ingested_from(shard_dir: str | os.PathLike) -> str | None:
    """The raw folder a shard folder was ingested from (recorded by `ingest`; for older folders the common
    folder of its sources), None when nothing was ingested there."""
    if (Path(shard_dir) / SOURCE).is_file():
        return str(fsio.read_json(Path(shard_dir) / SOURCE, fix="re-run `retain-asd ingest`")["root"])
    manifest = shards.read_manifest(shard_dir)
    paths = [str(Path(s["path"]).resolve()) for s in (manifest or {}).get("sources", [])]
    return os.path.commonpath(paths) if paths else None


def guard_real_corpus(shard_dir: str | os.PathLike, synth_dir: str | os.PathLike, root_key: str) -> None:
    """Refuse to write the synthetic corpus over shards ingested from real data (``shard_dir``).

    Called for every corpus folder whose root (``root_key``, e.g. data.machine_root) is empty in the config:
    the run would otherwise re-synthesise and silently replace the real clips. The error names the root to pass.
    """
    source = ingested_from(shard_dir)
    if source is None:
        return
    synth = Path(synth_dir).resolve()
    if Path(source) == synth or synth in Path(source).parents:
        return
    raise FileExistsError(
        f"{shard_dir} holds a corpus ingested from real data ({source}), but {root_key} is empty, which would "
        f"replace it with the synthetic corpus. Pass {root_key}={source} (the folder it was ingested from), or "
        "use another data.work_dir for a synthetic run")


def load_corpus(out_dir: str | os.PathLike) -> Corpus:
    """Open an ingested corpus without touching the raw folders."""
    out_dir = Path(out_dir)
    sets = {}
    for name in ("machine", "noise"):
        manifest = shards.read_manifest(out_dir / name)
        if manifest is None:
            raise FileNotFoundError(f"{out_dir / name}: no shards; run `retain-asd ingest --out {out_dir}` first")
        sets[name] = shards.ShardSet(out_dir / name, manifest, shards.read_rejects(out_dir / name), rebuilt=False)
    return Corpus(out_dir, sets["machine"], sets["noise"], LabelVocab.from_json(out_dir / "labels.json"))


def corpus_from_config(data, *, force: bool = False) -> Corpus:
    """Builder: a ``DataConfig`` -> the ingested corpus, writing the synthetic one when no root is given."""
    from retain_asd.corpus import synth

    work = Path(data.work_dir).resolve()
    machine_root, noise_root = data.machine_root, data.noise_root
    for name, root, key in (("machine", machine_root, "data.machine_root"), ("noise", noise_root, "data.noise_root")):
        if not root:
            guard_real_corpus(work / "corpus" / name, work / "synth", key)
    if not machine_root or not noise_root:
        made = synth.write_synthetic_corpus(work / "synth", seed=data.synth_seed, machines=data.synth_machines,
                                            clip_s=data.clip_s, sample_rate_hz=data.sample_rate_hz)
        machine_root = machine_root or made.machine_root
        noise_root = noise_root or made.noise_root
    settings = shards.DecodeSettings(sample_rate_hz=data.sample_rate_hz, clip_s=data.clip_s,
                                     min_clip_s=data.min_clip_s, channel=data.channel,
                                     audio_dtype=data.audio_dtype)
    return ingest(machine_root, noise_root, work / "corpus", settings=settings,
                  rows_per_shard=data.rows_per_shard, force=force)
