"""Raw folders -> shards: scan the layouts, decode with Ray Data, write the label vocabulary beside them.

Output folder::

    <out>/machine/   part-*.parquet, manifest.json, rejects.csv, source.json   (fixed-length clips)
    <out>/noise/     part-*.parquet, manifest.json, rejects.csv, source.json   (full-length noise recordings)
    <out>/labels.json                                              (machine-attribute + noise classes)

``<out>`` is ``<data.work_dir>/corpus_pretrain`` (and ``corpus_eval``), or ``<data.storage>/corpus_pretrain``
when ``data.storage`` names an object store (``s3://bucket/prefix``): the shards, manifests, rejects and
labels.json are then objects in the bucket, and only the raw input and the synthetic worlds stay local.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from retain_asd import storage
from retain_asd.corpus import layouts, shards
from retain_asd.corpus.labels import LabelVocab, build_vocab

SOURCE = "source.json"  # beside each shard set: {"root": the raw folder it was ingested from}


@dataclass(frozen=True)
class Corpus:
    """A ready corpus: shard folders and label vocabulary."""

    root: Path | str  # a local folder or a URI
    machine: shards.ShardSet
    noise: shards.ShardSet
    vocab: LabelVocab

    @property
    def labels_path(self) -> Path | str:
        return shards.child(self.root, "labels.json")

    def summary(self) -> str:
        lines = [f"corpus {self.root}"]
        for name, s in (("machine", self.machine), ("noise", self.noise)):
            c = s.manifest["counts"]
            state = "rebuilt" if s.rebuilt else "up to date"
            lines.append(f"  {name:<8} {c['inputs']:>6} inputs  {c['written']:>6} written  "
                         f"{c['rejected']:>4} rejected  {len(s.manifest['shards'])} shards  ({state})")
        if note := channel_note(self.machine.manifest):
            lines.append(f"  {note}")
        lines.append(f"  classes: {self.vocab.num_machine} machine-attribute + {self.vocab.num_noise} noise "
                     f"= {self.vocab.num_classes}")
        for name in (*self.vocab.machine_classes, *self.vocab.noise_classes):
            lines.append(f"    {name:<48} {self.vocab.counts.get(name, 0):>6}")
        for path, reason in (*self.machine.rejects, *self.noise.rejects):
            lines.append(f"  rejected {path}: {reason}")
        return "\n".join(lines)


def channel_note(manifest: dict) -> str:
    """What data.channel did to multi-channel files (DCASE 2026: 0 near mic, 1 far mic), from the manifest's
    per-file repairs; "" when every file was mono. A downmix is never silent."""
    channel = manifest.get("settings", {}).get("channel", "mean")
    repairs = [s.get("repairs", "") for s in manifest.get("sources", [])]
    n = sum(1 for r in repairs if "downmix" in r.split(";") or any(x.startswith("channel ") for x in r.split(";")))
    if not n:
        return ""
    what = "averaged (downmix)" if channel == "mean" else f"read on channel {channel} only"
    return f"channel: data.channel = {channel}: {n} multi-channel files {what}"


def ingest(machine_root: str | os.PathLike, noise_root: str | os.PathLike, out_dir: str | os.PathLike, *,
           settings: shards.DecodeSettings = shards.DecodeSettings(), rows_per_shard: int = 256,
           ground_truth_dir: str | os.PathLike | None = None, force: bool = False,
           reference_roots: Sequence[str | os.PathLike] = (), extra_noise_roots: Sequence[str | os.PathLike] = (),
           include_test_normals: bool = False, extra_machine_roots: Sequence[str | os.PathLike] = (),
           shuffle_seed: int | None = 0) -> Corpus:
    """Scan both corpora, write their shards (a no-op when unchanged) and the label vocabulary.

    `reference_roots`: machine corpora whose train-split clips (the evaluation references) join this corpus,
    and `extra_noise_roots`: noise folders that join it (the paper's Table-5 "+ eval-reference data"
    variant; used only through `data.add_eval_references`). `include_test_normals` keeps the normal test
    clips of `machine_root` as training clips (split "train"), as the paper's 36,411 clips suggest.
    `extra_machine_roots`: more machine corpora whose clips all join (e.g. the generic "other data" tree).
    Machine clips are written shuffled across types (`shards.write_shards`, `shuffle_seed`; None: path order).
    """
    out_dir = storage.as_location(out_dir)
    machine_scan = layouts.scan_dcase(machine_root, ground_truth_dir=ground_truth_dir)
    noise_scan = layouts.scan_noise(noise_root)
    machine_records, noise_records = list(machine_scan.records), list(noise_scan.records)
    machine_rejects, noise_rejects = list(machine_scan.rejects), list(noise_scan.rejects)
    if include_test_normals:
        machine_records = [replace(r, split="train") if r.split == "test" and r.label == "normal" else r
                           for r in machine_records]
    for root in extra_machine_roots:
        scan = layouts.scan_dcase(root)
        machine_records += scan.records
        machine_rejects += scan.rejects
    for root in reference_roots:
        scan = layouts.scan_dcase(root)
        machine_records += [r for r in scan.records if r.split == "train"]
    for root in extra_noise_roots:
        scan = layouts.scan_noise(root)
        noise_records += scan.records
        noise_rejects += scan.rejects
    machine = shards.write_shards(machine_records, shards.child(out_dir, "machine"), settings=settings,
                                  rows_per_shard=rows_per_shard, scan_rejects=machine_rejects, force=force,
                                  shuffle_seed=shuffle_seed)
    # Noise keeps its full length: the stream cuts a fresh random segment per pairing.
    noise = shards.write_shards(noise_records, shards.child(out_dir, "noise"), settings=replace(settings, clip_s=None),
                                rows_per_shard=rows_per_shard, scan_rejects=noise_rejects, force=force)
    for shard_set, root in ((machine, machine_root), (noise, noise_root)):  # what `guard_real_corpus` reads
        storage.write_json(shards.child(shard_set.root, SOURCE), {"root": str(Path(root).resolve())})
    labels_path = shards.child(out_dir, "labels.json")
    if machine.rebuilt or noise.rebuilt or not storage.is_file(labels_path):
        kept = {s["path"] for s in machine.manifest["sources"]} | {s["path"] for s in noise.manifest["sources"]}
        vocab = build_vocab([r for r in machine_records if r.path in kept],
                            [r for r in noise_records if r.path in kept])
        vocab.to_json(labels_path)
    else:
        vocab = LabelVocab.from_json(labels_path)
    return Corpus(out_dir, machine, noise, vocab)


def ingested_from(shard_dir: str | os.PathLike) -> str | None:
    """The raw folder a shard folder was ingested from (recorded by `ingest`; for older folders the common
    folder of its sources), None when nothing was ingested there."""
    source = shards.child(shard_dir, SOURCE)
    if storage.is_file(source):
        return str(storage.read_json(source, fix="re-run `retain-asd ingest`")["root"])
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
    out_dir = storage.as_location(out_dir)
    sets = {}
    for name in ("machine", "noise"):
        folder = shards.child(out_dir, name)
        manifest = shards.read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(f"{folder}: no shards; run `retain-asd ingest --out {out_dir}` first")
        sets[name] = shards.ShardSet(folder, manifest, shards.read_rejects(folder), rebuilt=False)
    return Corpus(out_dir, sets["machine"], sets["noise"], LabelVocab.from_json(shards.child(out_dir, "labels.json")))


# ---------------------------------------------------------------------------------------------------- builders
# The paper's protocol (Sec. 4.1): a pre-training corpus (data.machine_root / data.noise_root) and a disjoint
# evaluation corpus (eval.machine_root / eval.noise_root), each ingested into its own folder under work_dir.
PRETRAIN_DIR = "corpus_pretrain"
PRETRAIN_EVALREFS_DIR = "corpus_pretrain_evalrefs"  # data.add_eval_references: true (Table 5, last row)
EVAL_DIR = "corpus_eval"
VAL_DIR = "corpus_val"  # validation.machine_root / noise_root: a validation corpus of its own
HASH_CACHE = "protocol_sha1.json"


@dataclass(frozen=True)
class CorpusRoots:
    """The raw folders of one corpus (the synthetic world's when the config leaves them empty)."""

    machine_root: str
    noise_root: str
    synthetic: bool
    extra_machine_roots: tuple[str, ...] = ()  # more clips of the same corpus (the generic "other data" tree)


def decode_settings(data) -> shards.DecodeSettings:
    """A ``DataConfig`` -> how clips are decoded (both corpora share it: same rate, length and padding)."""
    return shards.DecodeSettings(sample_rate_hz=data.sample_rate_hz, clip_s=data.clip_s, min_clip_s=data.min_clip_s,
                                 channel=data.channel, audio_dtype=data.audio_dtype, pad_mode=data.pad_mode)


def _world_roots(world: str, machine_root: str, noise_root: str, work: Path, *, seed: int, machines, noise,
                 data, field_prefix: str, sizes: dict | None = None) -> CorpusRoots:
    from retain_asd.config import ConfigError
    from retain_asd.corpus import synth

    generic = ()
    if world == "pretrain" and data.synth_generic_per_family > 0:  # Table 5: "other data" (AS-20K-like)
        from retain_asd.corpus.generic import write_generic_tree

        generic = (write_generic_tree(work / "synth_generic", seed=seed, clips_per_family=data.synth_generic_per_family,
                                      clip_s=data.clip_s, sample_rate_hz=data.sample_rate_hz),)
    if machine_root and noise_root:
        return CorpusRoots(str(machine_root), str(noise_root), False, generic)
    try:
        if machines:
            made = synth.write_world(world, work / f"synth_{world}", seed=seed, machines=tuple(machines),
                                     noise_categories=tuple(noise), clip_s=data.clip_s,
                                     sample_rate_hz=data.sample_rate_hz, **(sizes or {}))
        else:  # generic sounds only: the world's noise without its machines
            synth.write_world(world, work / f"synth_{world}_noise", seed=seed,
                              machines=synth.WORLDS[world].machines[:1], noise_categories=tuple(noise),
                              clip_s=data.clip_s, sample_rate_hz=data.sample_rate_hz, train_source_per_attr=0,
                              train_target_per_attr=0, test_per_domain=0)
            made = None
    except ValueError as err:
        raise ConfigError(f"{field_prefix}.synth_machines / {field_prefix}.synth_noise: {err}") from None
    if made is None:
        noise_made = str(work / f"synth_{world}_noise" / "noise")
        return CorpusRoots(machine_root or generic[0], noise_root or noise_made, True, generic[1:])
    return CorpusRoots(machine_root or made.machine_root, noise_root or made.noise_root, True, generic)


def pretrain_roots(cfg) -> CorpusRoots:
    """The pre-training corpus's raw folders; writes the synthetic pre-training world when a root is empty."""
    d = cfg.data
    return _world_roots("pretrain", d.machine_root, d.noise_root, Path(d.work_dir).resolve(), seed=d.synth_seed,
                        machines=d.synth_machines, noise=d.synth_noise, data=d, field_prefix="data")


def eval_roots(cfg) -> CorpusRoots:
    """The evaluation corpus's raw folders; writes the synthetic evaluation world when a root is empty, at the size
    the eval settings ask for plus the share `eval.validation_fraction` held out for the validation sets.
    `check_evaluation_corpus` first: every scoring path reaches the evaluation corpus through here."""
    from retain_asd.config import ConfigError
    from retain_asd.corpus import synth

    check_evaluation_corpus(cfg)
    d, e = cfg.data, cfg.eval
    holdout = 0.0 if cfg.validation.machine_root else e.validation_fraction  # as the sets' own split (evalsets)
    try:  # the synthetic world is written at the size the eval settings ask for (never fewer test clips)
        sizes = synth.eval_world_sizes(source_refs=e.source_refs, target_refs=e.target_refs,
                                       test_normal=e.test_normal, test_anomaly=e.test_anomaly,
                                       machines=e.synth_machines, noise_categories=e.synth_noise, clip_s=d.clip_s,
                                       validation_fraction=holdout) | {"noise_spread": e.synth_noise_spread}
    except KeyError as err:
        raise ConfigError(f"eval.synth_machines / eval.synth_noise: unknown {err}; choose from "
                          f"{synth.EVAL_WORLD.machines} / {synth.EVAL_WORLD.noise_categories}") from None
    return _world_roots("eval", e.machine_root, e.noise_root, Path(d.work_dir).resolve(), seed=d.synth_seed,
                        machines=e.synth_machines, noise=e.synth_noise, data=d, field_prefix="eval", sizes=sizes)


def missing_evaluation_corpus(cfg) -> str | None:
    """Why scores would silently come from the synthetic evaluation world, or None: a real pre-training corpus
    (data.machine_root) with an empty evaluation root and eval.synthetic false. The text names the empty roots
    and the fix."""
    d, e = cfg.data, cfg.eval
    missing = [f"eval.{name}" for name, root in (("machine_root", e.machine_root), ("noise_root", e.noise_root))
               if not root]
    if not (d.machine_root and missing and not e.synthetic):
        return None
    return (f"{' / '.join(missing)} empty while data.machine_root = {d.machine_root!r} is a real pre-training "
            f"corpus: the evaluation would use the synthetic evaluation world. Pass "
            f"{' and '.join(m + '=PATH' for m in missing)} (the evaluation corpus), or eval.synthetic=true to score "
            "on the synthetic evaluation world on purpose")


def check_evaluation_corpus(cfg) -> None:
    """`missing_evaluation_corpus` as a ConfigError (in `eval_roots`, so before anything is scored). `ingest`
    asks `missing_evaluation_corpus` first and then ingests only the pre-training corpus."""
    from retain_asd.config import ConfigError

    reason = missing_evaluation_corpus(cfg)
    if reason:
        raise ConfigError(reason)


def check_protocol(cfg):
    """The leakage guard on the raw folders, before any ingestion or Ray work: no shared machine type, clip or
    noise recording between the two corpora (content hash of the file bytes). Raises
    ``protocol.CorpusOverlapError`` naming the first overlapping files and the fix; with
    ``data.add_eval_references: true`` returns the ``OverlapReport`` of what overlaps instead."""
    from retain_asd.corpus import protocol

    pre, ev = pretrain_roots(cfg), eval_roots(cfg)
    cache = Path(cfg.data.work_dir).resolve() / HASH_CACHE
    pre_scan, ev_scan = layouts.scan_dcase(pre.machine_root), layouts.scan_dcase(ev.machine_root)
    for root in pre.extra_machine_roots:
        pre_scan.records.extend(layouts.scan_dcase(root).records)
    pre_noise, ev_noise = layouts.scan_noise(pre.noise_root), layouts.scan_noise(ev.noise_root)
    v = cfg.validation
    if v.machine_root:  # a validation corpus of its own is held out from pre-training like the evaluation corpus
        ev_scan.records.extend(layouts.scan_dcase(v.machine_root).records)
        ev_noise.records.extend(layouts.scan_noise(v.noise_root).records)
    records = [*pre_scan.records, *pre_noise.records, *ev_scan.records, *ev_noise.records]
    protocol.file_sha1s([r.path for r in records], cache)  # one cache file for both corpora
    pre_manifest = protocol.raw_manifest(pre_scan.records, pre_noise.records, cache)
    ev_manifest = protocol.raw_manifest(ev_scan.records, ev_noise.records, cache)
    pre_manifest["root"], ev_manifest["root"] = pre.machine_root, ev.machine_root
    return protocol.check_disjoint(pre_manifest, ev_manifest,
                                   allow_eval_references=cfg.data.add_eval_references)


def pretrain_corpus_from_config(cfg, *, force: bool = False) -> Corpus:
    """Builder: the ingested pre-training corpus, ``<work_dir>/corpus_pretrain`` (the synthetic pre-training
    world when data.machine_root / noise_root are empty). With ``data.add_eval_references`` the evaluation
    corpus's references (train split) and noise join it, in ``<work_dir>/corpus_pretrain_evalrefs``."""
    d = cfg.data
    _guard_corpus(pretrain_corpus_dir(cfg), "pretrain", d.machine_root, d.noise_root, "data", d.work_dir)
    pre = pretrain_roots(cfg)
    refs, noise = (), ()
    if d.add_eval_references:
        ev = eval_roots(cfg)
        refs, noise = (ev.machine_root,), (ev.noise_root,)
    _guard_synthetic(cfg, pretrain_corpus_dir(cfg), "pretrain", d.machine_root, d.noise_root, "data")
    return ingest(pre.machine_root, pre.noise_root, pretrain_corpus_dir(cfg), settings=decode_settings(d),
                  rows_per_shard=d.rows_per_shard, force=force, reference_roots=refs, extra_noise_roots=noise,
                  include_test_normals=d.include_test_normals, extra_machine_roots=pre.extra_machine_roots)


def corpus_location(cfg, name: str) -> Path | str:
    """``<data.work_dir>/<name>`` (absolute), or ``<data.storage>/<name>`` when data.storage is set."""
    if cfg.data.storage:
        return storage.join(cfg.data.storage, name)
    return Path(cfg.data.work_dir).resolve() / name


def pretrain_corpus_dir(cfg) -> Path | str:
    """Where the pre-training corpus is ingested: ``corpus_pretrain``, with ``_evalrefs`` when
    data.add_eval_references and ``_testnormals`` when data.include_test_normals (each variant its own shards),
    under data.work_dir or data.storage (`corpus_location`)."""
    d = cfg.data
    name = PRETRAIN_EVALREFS_DIR if d.add_eval_references else PRETRAIN_DIR
    name += "_testnormals" if d.include_test_normals else ""
    name += f"_generic{d.synth_generic_per_family}" if d.synth_generic_per_family else ""
    return corpus_location(cfg, name)


def _guard_synthetic(cfg, corpus_dir: Path | str, world: str, machine_root: str, noise_root: str, prefix: str) -> None:
    """`guard_real_corpus` for each empty root of one corpus (its synthetic world would replace real shards)."""
    synth_dir = Path(cfg.data.work_dir).resolve()  # the synthetic worlds (and generic trees) are written here
    for name, root in (("machine", machine_root), ("noise", noise_root)):
        if not root:
            guard_real_corpus(shards.child(corpus_dir, name), synth_dir, f"{prefix}.{name}_root")


def eval_corpus_from_config(cfg, *, force: bool = False) -> Corpus:
    """Builder: the ingested evaluation corpus, ``<work_dir>/corpus_eval`` (the synthetic evaluation world
    when eval.machine_root / noise_root are empty)."""
    d, e = cfg.data, cfg.eval
    _guard_corpus(corpus_location(cfg, EVAL_DIR), "eval", e.machine_root, e.noise_root, "eval", d.work_dir)
    ev = eval_roots(cfg)
    _guard_synthetic(cfg, corpus_location(cfg, EVAL_DIR), "eval", cfg.eval.machine_root, cfg.eval.noise_root,
                     "eval")
    return ingest(ev.machine_root, ev.noise_root, corpus_location(cfg, EVAL_DIR),
                  settings=decode_settings(d), rows_per_shard=d.rows_per_shard, force=force)


def validation_corpus_from_config(cfg, *, force: bool = False) -> Corpus:
    """Builder: the ingested validation corpus of its own (validation.machine_root / noise_root),
    ``<work_dir>/corpus_val``; the validation sets are otherwise a held-out share of the evaluation corpus."""
    v = cfg.validation
    return ingest(v.machine_root, v.noise_root, corpus_location(cfg, VAL_DIR), settings=decode_settings(cfg.data),
                  rows_per_shard=cfg.data.rows_per_shard, force=force)


def _guard_corpus(corpus_dir: Path | str, world: str, machine_root: str, noise_root: str, prefix: str,
                  work_dir) -> None:
    """`guard_real_corpus` on each shard folder of one corpus whose root the config leaves empty."""
    synth = Path(work_dir).resolve() / f"synth_{world}"
    for name, root in (("machine", machine_root), ("noise", noise_root)):
        if not root:
            guard_real_corpus(shards.child(corpus_dir, name), synth, f"{prefix}.{name}_root")


def corpora_from_config(cfg, *, force: bool = False):
    """Both corpora, guarded: the raw-file check first (no Ray), then both ingested, then the same check on
    the two manifests (which also compare the decoded audio, so a re-encoded copy is caught).
    Returns ``(pretrain Corpus, eval Corpus, OverlapReport)``; needs Ray when a corpus must be (re)ingested."""
    from retain_asd.corpus import protocol

    check_protocol(cfg)
    pre, ev = pretrain_corpus_from_config(cfg, force=force), eval_corpus_from_config(cfg, force=force)
    # With data.add_eval_references the pre-training corpus holds the eval references and noise: the report
    # then counts them (what the run trains on), and an evaluation test clip is still refused.
    report = protocol.check_disjoint(pre, ev, allow_eval_references=cfg.data.add_eval_references)
    return pre, ev, report


def corpus_from_config(data, *, force: bool = False) -> Corpus:
    """The pre-training corpus of a ``DataConfig`` alone (no eval references): ``<work_dir>/corpus_pretrain``.
    Prefer `pretrain_corpus_from_config(cfg)`, which honours ``data.add_eval_references``."""
    from retain_asd.config import Config

    return pretrain_corpus_from_config(Config(data=replace(data, add_eval_references=False)), force=force)
