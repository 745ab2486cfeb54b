"""Controlled evaluation sets: Factory A / Factory B / Mismatch x SNR grid, stored as mixing *recipes*.

Per machine type we pick (seeded) references from the train split (``source_refs`` source +
``target_refs`` target normal clips, GenRep's 990 + 10) and tests from the test split
(``test_normal`` normal + ``test_anomaly`` anomalous clips per domain, 50 + 50). The same clean
clips are used by every condition and SNR, so rows differ only by their noise.

Conditions (paper Sec. 4):
  * factory_a: noise from the stationary categories, references and tests;
  * factory_b: noise from the non-stationary categories, references and tests;
  * mismatch: references of factory_b + tests of factory_a at the same SNR. These rows are *copies*
    of those recipes (same clip, noise segment and gain), so their embeddings are cache hits.

Noise (DESIGN "Mixing"): noise recordings are cut into disjoint clip-length segments
(offsets 0, L, 2L, ...; a recording shorter than one clip is one looped segment). Each factory
draws a seeded permutation of its segments and assigns them to the set's clips without replacement;
the assignment is the same at every SNR (only the gain changes). Each segment is scaled with
`mixing.dataset_noise_gain` relative to the mean clean power of the machine's selected clips, so
10 log10(mean clean power / mean scaled-noise power) equals the target SNR for every machine and
for the whole set, while single clips keep their natural loudness differences.

Policy when data is short: fewer clips than asked -> use what there is, record a warning naming the
counts in the manifest and print it (`evalsets_from_config`); the synthetic world is written at the size
asked, so only a real corpus can be short. Fewer noise segments than clips in a set -> the same kind of
warning with both counts, and the permutation is cycled, so each segment is used at most
ceil(clips / segments) times (the manifest records ``max_segment_uses``); add noise recordings to get
disjoint segments.

On disk (``<work_dir>/evalsets/``, or ``<data.storage>/evalsets/`` in an object store): ``recipes.parquet``
(one row per clip x condition x SNR) and ``manifest.json`` (parameters, corpus fingerprints, counts, warnings,
sha1 of the recipes file). A local build is written in a temp folder and renamed into place; an object store has
no rename, so there the old manifest is deleted first, the recipes are put, and the manifest, put last, marks
the sets complete. Mixtures are rebuilt from the shards on the fly (`MixtureSource`), so every model reuses
the sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retain_asd import fsio, mixing, storage
from retain_asd.choices import CONDITIONS
from retain_asd.corpus import shards

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RECIPES = "recipes.parquet"
MANIFEST = shards.MANIFEST  # one name and one reader (shards.read_manifest) for every built folder
FACTORY_STATIONARY = {"factory_a": True, "factory_b": False}
ROLES = ("ref_source", "ref_target", "test")
MIN_TEST_CLIPS = 5  # per machine, domain and label: below it the sets' figures cannot rank encoders
RECIPE_COLUMNS = ("condition", "snr_db", "machine", "section", "role", "domain", "label", "clip_id", "wav_name",
                  "noise_id", "noise_category", "noise_offset", "noise_gain", "clean_power", "reference_power")


class EvalSetError(ValueError):
    """The corpus cannot give the requested evaluation sets; the message names the counts and the fix."""


@dataclass(frozen=True)
class EvalSetParams:
    """What a set is built from; part of the manifest (a change rebuilds the sets)."""

    snrs_db: tuple[float, ...] = (-10.0, -5.0, 0.0, 5.0, 10.0, 20.0, 30.0)
    source_refs: int = 990  # GenRep: 990 source + 10 target references per machine
    target_refs: int = 10
    test_normal: int = 50  # per domain
    test_anomaly: int = 50  # per domain
    seed: int = 0
    split: str = "test"  # "test" or "validation": which part of the corpus (`holdout`) the sets are drawn from
    holdout: float = 0.0  # share of each machine's clips and of each factory's noise segments kept for validation


@dataclass(frozen=True)
class EvalSets:
    """Built evaluation sets: the recipe table and its manifest."""

    root: Path | str  # a local folder or an object-store URI
    manifest: dict
    table: pa.Table
    corpus: str = ""  # what the sets were drawn from, for people (`corpus_label`); "" = the corpus folder

    @property
    def split(self) -> str:
        """"test" (the evaluation sets) or "validation" (the disjoint held-out sets scored during pre-training)."""
        return str(self.manifest.get("split", "test"))

    def scored_on(self) -> dict[str, str]:
        """What a score on these sets was computed on, as MLflow tags: the evaluation corpus, the split and the
        set sizes (totals over machines, per condition and SNR)."""
        total: dict[str, int] = {}
        for counts in self.manifest.get("per_machine", {}).values():
            for key, n in counts.items():
                total[key] = total.get(key, 0) + int(n)

        def count(role: str, label: str = "") -> int:
            return sum(n for k, n in total.items() if k.startswith(role + "/") and k.endswith(label))

        machines = len(self.manifest.get("per_machine", {}))
        sizes = (f"{machines} machine{'s' * (machines != 1)}, {count('ref_source')} + {count('ref_target')} "
                 f"references (source + target), {count('test', '/normal')} + {count('test', '/anomaly')} test "
                 "clips (normal + anomalous)")
        return {"eval.corpus": self.corpus or str(self.corpus_root), "eval.split": self.split, "eval.sizes": sizes}

    def smallest_test_counts(self) -> tuple[int, int]:
        """(normal, anomalous) test clips of the smallest machine and domain: what one AUC is computed from."""
        cells = [(counts.get(f"test/{d}/normal", 0), counts.get(f"test/{d}/anomaly", 0))
                 for counts in self.manifest.get("per_machine", {}).values() for d in ("source", "target")]
        return (min(n for n, _ in cells), min(a for _, a in cells)) if cells else (0, 0)

    def coarse_warning(self) -> str | None:
        """A line for the console when the sets are too small for their figures to rank encoders: fewer than
        `MIN_TEST_CLIPS` normal or anomalous test clips in a machine's domain (its AUC moves in steps of
        1 / (normal x anomalous); with one of each it is 0 or 1, and the harmonic mean drops to ~0 on a coin
        flip). None when the sets are large enough."""
        normal, anomalous = self.smallest_test_counts()
        if min(normal, anomalous) >= MIN_TEST_CLIPS:
            return None
        fix = ("a larger eval.validation_fraction, or validation.machine_root / validation.noise_root"
               if self.split == "validation" else "eval.machine_root with more clips")
        return (f"{self.split} sets: {normal} normal + {anomalous} anomalous test clips in the smallest machine "
                f"domain: each AUC moves in steps of 1/{max(normal * anomalous, 1)}, so the figures tie or jump on "
                f"single clips and cannot rank encoders; ask for at least {MIN_TEST_CLIPS} of each "
                f"(eval.test_normal, eval.test_anomaly; the corpus may hold fewer: {fix})")

    @property
    def corpus_root(self) -> Path | str:
        return storage.as_location(self.manifest["corpus_root"])

    @property
    def snrs_db(self) -> list[float]:
        return [float(s) for s in self.manifest["params"]["snrs_db"]]

    @property
    def machines(self) -> list[str]:
        return sorted(set(self.table.column("machine").to_pylist()))

    def rows(self, condition: str, snr_db: float, machine: str | None = None) -> list[dict]:
        """Recipe rows of one set (optionally one machine), in stored order."""
        if condition not in CONDITIONS:
            raise ValueError(f"condition {condition!r}: expected one of {CONDITIONS}")
        out = [r for r in self._pylist() if r["condition"] == condition and r["snr_db"] == float(snr_db)
               and (machine is None or r["machine"] == machine)]
        if not out:
            raise KeyError(f"{self.root}: no rows for {condition} at {snr_db} dB"
                           + (f" for machine {machine!r}" if machine else "") + f"; SNRs built: {self.snrs_db}")
        return out

    def _pylist(self) -> list[dict]:
        cached = self.__dict__.get("_rows")
        if cached is None:
            cached = self.table.to_pylist()
            object.__setattr__(self, "_rows", cached)
        return cached


# ---------------------------------------------------------------------------------------------------- selection
def _rng(seed: int, *names: str) -> np.random.Generator:
    """Generator seeded by (seed, names): independent streams per machine / factory, stable across runs."""
    return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


def _pick(rows: list[dict], n: int, rng: np.random.Generator, what: str, warnings: list[str]) -> list[dict]:
    """n rows drawn without replacement (all of them, with a warning, when fewer exist)."""
    if len(rows) < n:
        msg = f"{what}: asked for {n} clips, the corpus has {len(rows)}; using {len(rows)}"
        log.info(msg)  # recorded in the manifest; `evalsets_from_config` puts it on the console
        warnings.append(msg)
    order = rng.permutation(len(rows))[: min(n, len(rows))]
    return [rows[i] for i in sorted(order)]  # corpus (path) order inside a role


def holdout_part(items: list, share: float, split: str, rng: np.random.Generator) -> list:
    """The `split` part of `items` when a seeded `share` of them is kept for validation: "validation" gets
    round(share x n) items drawn with `rng`, "test" the others (input order kept). share 0: the corpus is all one
    split (the test sets of the evaluation corpus, or a validation corpus of its own)."""
    if share <= 0:
        return list(items)
    held = set(rng.permutation(len(items))[: int(math.floor(share * len(items) + 0.5))].tolist())
    return [x for i, x in enumerate(items) if (i in held) == (split == "validation")]


def select_clips(meta: list[dict], params: EvalSetParams, warnings: list[str]) -> list[dict]:
    """Clean clips of every machine with their role; meta rows are shard rows without audio. With `holdout`,
    each (split, domain, label) group of a machine is divided first (seeded, the same for both parts), and the
    sets draw only from their own part: validation and test sets never share a clip."""
    out = []
    for machine in sorted({r["machine"] for r in meta}):
        rng = _rng(params.seed, "clips", machine)
        mine = [r for r in meta if r["machine"] == machine]

        def where(split, domain, label, rows=mine, machine=machine):
            group = [r for r in rows if r["split"] == split and r["domain"] == domain and r["label"] == label]
            return holdout_part(group, params.holdout, params.split,
                                _rng(params.seed, "holdout", machine, split, domain, label))

        groups = [("ref_source", where("train", "source", "normal"), params.source_refs),
                  ("ref_target", where("train", "target", "normal"), params.target_refs)]
        for domain in ("source", "target"):
            groups += [("test", where("test", domain, "normal"), params.test_normal),
                       ("test", where("test", domain, "anomaly"), params.test_anomaly)]
        for role, rows, n in groups:
            what = f"{machine} {role} {rows[0]['domain'] + ' ' + rows[0]['label'] if rows else ''}".strip()
            out += [{**r, "role": role} for r in _pick(rows, n, rng, what, warnings)]
    return out


# ---------------------------------------------------------------------------------------------------- noise
def noise_segments(noise_meta: list[dict], lengths: dict[str, int], num_samples: int) -> list[tuple[str, int]]:
    """Disjoint clip-length segments (noise_id, offset) of each recording; a short one is one looped segment."""
    out = []
    for r in noise_meta:
        n = lengths[r["clip_id"]]
        out += [(r["clip_id"], k * num_samples) for k in range(max(1, n // num_samples))]
    return out


def _iter_audio(root: Path | str, wanted: set[str]):
    """(clip_id, float32 audio) of the wanted rows, shard by shard (never the whole corpus in memory)."""
    manifest = shards.read_manifest(root)
    for name in manifest["shards"]:
        table = shards.read_shard(root, name, ["clip_id", "audio"])
        keep = [i for i, c in enumerate(table.column("clip_id").to_pylist()) if c in wanted]
        if keep:
            sub = table.take(keep)
            yield from zip(sub.column("clip_id").to_pylist(), shards.audio_list(sub))


# ---------------------------------------------------------------------------------------------------- build
def _fingerprints(corpus_root: Path | str) -> dict:
    out = {}
    for name in ("machine", "noise"):
        manifest = shards.read_manifest(shards.child(corpus_root, name))
        if manifest is None:
            raise FileNotFoundError(f"{shards.child(corpus_root, name)}: no shards; run `retain-asd ingest` first")
        out[name] = manifest["fingerprint"]
    return out


def _recipes(corpus_root: Path | str, params: EvalSetParams, warnings: list[str]) -> tuple[list[dict], dict]:
    meta_cols = ["clip_id", "path", "machine", "section", "domain", "split", "label"]
    machine_dir, noise_dir = shards.child(corpus_root, "machine"), shards.child(corpus_root, "noise")
    meta = shards.read_table(machine_dir, columns=meta_cols).to_pylist()
    clips = select_clips(meta, params, warnings)
    if not clips:
        raise EvalSetError(f"{machine_dir}: no clips to build evaluation sets from")
    settings = shards.read_manifest(machine_dir)["settings"]
    num_samples = int(round(settings["clip_s"] * settings["sample_rate_hz"]))
    clean_power = {cid: mixing.power(x) for cid, x in _iter_audio(machine_dir,
                                                                   {c["clip_id"] for c in clips})}
    ref_power = {m: float(np.mean([clean_power[c["clip_id"]] for c in clips if c["machine"] == m]))
                 for m in {c["machine"] for c in clips}}

    noise_meta = shards.read_table(noise_dir, columns=["clip_id", "path", "noise_category", "stationary"])
    noise_meta = noise_meta.to_pylist()
    recordings = dict(_iter_audio(noise_dir, {r["clip_id"] for r in noise_meta}))
    category = {r["clip_id"]: r["noise_category"] for r in noise_meta}
    rows, counts = [], {"clips_per_set": len(clips)}
    for factory, stationary in FACTORY_STATIONARY.items():
        mine = [r for r in noise_meta if bool(r["stationary"]) == stationary]
        segments = noise_segments(mine, {k: len(v) for k, v in recordings.items()}, num_samples)
        if not segments:
            kind = "stationary" if stationary else "non-stationary"
            raise EvalSetError(f"{noise_dir}: no {kind} noise category for {factory}; mark one in "
                               "categories.yaml and re-ingest")
        segments = holdout_part(segments, params.holdout, params.split, _rng(params.seed, "holdout-noise", factory))
        if not segments:
            raise EvalSetError(f"{noise_dir}: {factory} has too few noise segments to keep a share of "
                               f"{params.holdout} for validation; add noise recordings, or give the validation "
                               "sets their own noise (validation.noise_root)")
        order = _rng(params.seed, "noise", factory).permutation(len(segments))
        uses = math.ceil(len(clips) / len(segments))
        if uses > 1:
            msg = (f"{factory}: {len(segments)} noise segments of {num_samples} samples for {len(clips)} clips "
                   f"per set; segments are reused up to {uses} times (add noise recordings to avoid reuse)")
            log.info(msg)
            warnings.append(msg)
        counts[f"{factory}_segments"] = len(segments)
        counts[f"{factory}_max_segment_uses"] = uses
        seg_cache = {}
        for i, clip in enumerate(clips):
            noise_id, offset = segments[order[i % len(segments)]]
            if (noise_id, offset) not in seg_cache:
                seg = mixing.noise_segment(recordings[noise_id], offset, num_samples)
                seg_cache[(noise_id, offset)] = seg
            for snr_db in params.snrs_db:
                gain = mixing.dataset_noise_gain(seg_cache[(noise_id, offset)], ref_power[clip["machine"]], snr_db)
                rows.append(dict(condition=factory, snr_db=float(snr_db), machine=clip["machine"],
                                 section=clip["section"], role=clip["role"], domain=clip["domain"],
                                 label=clip["label"], clip_id=clip["clip_id"], wav_name=Path(clip["path"]).name,
                                 noise_id=noise_id, noise_category=category[noise_id], noise_offset=int(offset),
                                 noise_gain=gain, clean_power=clean_power[clip["clip_id"]],
                                 reference_power=ref_power[clip["machine"]]))
    # Mismatch: Factory B references + Factory A tests, copied row for row (identical identities).
    rows += [{**r, "condition": "mismatch"} for r in rows
             if (r["condition"] == "factory_b" and r["role"] != "test")
             or (r["condition"] == "factory_a" and r["role"] == "test")]
    rank = {c: i for i, c in enumerate(CONDITIONS)}
    rows.sort(key=lambda r: (rank[r["condition"]], r["snr_db"], r["machine"], ROLES.index(r["role"]),
                             r["domain"], r["label"], r["wav_name"]))
    return rows, {**counts, "num_samples": num_samples}


def _table(rows: list[dict]) -> pa.Table:
    types = {"snr_db": pa.float64(), "noise_offset": pa.int64(), "noise_gain": pa.float64(),
             "clean_power": pa.float64(), "reference_power": pa.float64()}
    return pa.table({c: pa.array([r[c] for r in rows], type=types.get(c, pa.string())) for c in RECIPE_COLUMNS})


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _write_remote(out_dir: str, table: pa.Table, manifest: dict) -> None:
    """Recipes, then the manifest (the completion marker) as objects; the old marker goes first, so a build
    killed in between leaves no manifest and is built again."""
    storage.remove(storage.join(out_dir, MANIFEST))
    recipes = _parquet_bytes(table)
    storage.write_bytes(storage.join(out_dir, RECIPES), recipes)
    manifest = {**manifest, "recipes_sha1": hashlib.sha1(recipes).hexdigest()}
    storage.write_bytes(storage.join(out_dir, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())


def build_evalsets(corpus_root: str | os.PathLike, out_dir: str | os.PathLike, params: EvalSetParams = EvalSetParams(),
                   force: bool = False) -> EvalSets:
    """Write (or reuse, when the corpus and parameters are unchanged) the recipe table and manifest.

    `out_dir`: a local folder or an object-store URI (`retain_asd.storage`)."""
    corpus_root, out_dir = storage.as_location(corpus_root), storage.as_location(out_dir)
    corpus_root = corpus_root if isinstance(corpus_root, str) else corpus_root.resolve()
    params = EvalSetParams(**{**asdict(params), "snrs_db": tuple(float(s) for s in params.snrs_db)})
    identity = {"schema_version": SCHEMA_VERSION, "params": asdict(params), "corpus": _fingerprints(corpus_root)}
    if isinstance(out_dir, Path):
        fsio.remove_stale_temps(out_dir.parent)  # folders of a build that was killed
    old = None if force else read_manifest(out_dir)
    if old is not None and all(old.get(k) == json.loads(json.dumps(v)) for k, v in identity.items()):
        log.info("%s: evaluation sets up to date", out_dir)
        return load_evalsets(out_dir)
    warnings: list[str] = []
    rows, counts = _recipes(corpus_root, params, warnings)
    per_machine = {}
    for r in rows:
        if r["condition"] == "factory_a" and r["snr_db"] == params.snrs_db[0]:
            key = f"{r['role']}/{r['domain']}/{r['label']}"
            per_machine.setdefault(r["machine"], {}).setdefault(key, 0)
            per_machine[r["machine"]][key] += 1
    manifest = {**identity, "split": params.split, "corpus_root": str(corpus_root), "counts": counts,
                "per_machine": per_machine,
                "warnings": warnings, "rows": len(rows)}
    if isinstance(out_dir, str):
        _write_remote(out_dir, _table(rows), manifest)
        return load_evalsets(out_dir)
    tmp = fsio.temp_path(out_dir)
    tmp.mkdir(parents=True)
    try:
        pq.write_table(_table(rows), tmp / RECIPES)
        manifest["recipes_sha1"] = shards.file_sha1(tmp / RECIPES)
        fsio.write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        fsio.commit_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_evalsets(out_dir)


def read_manifest(root: str | os.PathLike) -> dict | None:
    return shards.read_manifest(root, fix="rebuild with `retain-asd evalsets --force`")


def load_evalsets(root: str | os.PathLike) -> EvalSets:
    root = storage.as_location(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"{root}: no evaluation sets; run `retain-asd evalsets` first")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise EvalSetError(f"{root}: schema {manifest.get('schema_version')} != {SCHEMA_VERSION}; rebuild with "
                           "`retain-asd evalsets --force`")
    filesystem, recipes = storage.resolve(storage.join(root, RECIPES))
    return EvalSets(root, manifest, pq.read_table(recipes, filesystem=filesystem))


def corpus_label(cfg) -> str:
    """The evaluation corpus of a config in words: its roots, or the synthetic evaluation world and its seed."""
    e, seed = cfg.eval, cfg.data.synth_seed
    world = f"synthetic evaluation world (data.synth_seed={seed})"
    if e.machine_root and e.noise_root:
        return f"{e.machine_root} (noise: {e.noise_root})"
    if e.machine_root or e.noise_root:
        return f"{e.machine_root or e.noise_root} with the {world}'s {'noise' if e.machine_root else 'machines'}"
    return world


def scored_on_line(tags: dict) -> str:
    """`EvalSets.scored_on` as one line: ``<split> split of <corpus>: <sizes>``."""
    return f"{tags.get('eval.split', '?')} split of {tags.get('eval.corpus', '?')}: {tags.get('eval.sizes', '?')}"


def _sets_params(cfg, split: str) -> EvalSetParams:
    e, v = cfg.eval, cfg.validation
    own = bool(v.machine_root)  # a validation corpus of its own: no share of the evaluation corpus is held out
    return EvalSetParams(snrs_db=tuple(v.snrs_db if split == "validation" else e.snrs_db), source_refs=e.source_refs,
                         target_refs=e.target_refs, test_normal=e.test_normal, test_anomaly=e.test_anomaly,
                         seed=e.seed, split=split, holdout=0.0 if own else e.validation_fraction)


def _sets_dir(cfg, name: str) -> Path | str:
    return storage.join(cfg.data.storage, name) if cfg.data.storage else Path(cfg.data.work_dir) / name


def evalsets_from_config(cfg, force: bool = False, say: Callable[[str], None] | None = None) -> EvalSets:
    """Builder: a Config -> the TEST sets of the EVALUATION corpus (`eval.machine_root` / `eval.noise_root`, or the
    synthetic evaluation world), ingested into `<work_dir>/corpus_eval` when needed, under `<work_dir>/evalsets`.
    With data.storage set both are in the object store: `<data.storage>/corpus_eval`, `<data.storage>/evalsets`.

    Only the evaluation corpus is read (paper Sec. 4.1): the references, test clips and Factory A / B noise
    are never the pre-training corpus's. The leakage guard (`ingest.check_protocol`) is the entry point's job.
    A share `eval.validation_fraction` of each machine's clips and of the noise segments is never used here: the
    validation sets (`validation_sets_from_config`) are drawn from it, unless validation.machine_root is given.

    The synthetic world is written at the size the settings ask for (plus the held-out share); a real corpus with
    fewer clips (or too little noise) is used as it is, and each shortfall goes to `say` (default: stderr, so it
    reaches the console) besides the manifest's ``warnings``.
    """
    from retain_asd.corpus.ingest import eval_corpus_from_config

    corpus = eval_corpus_from_config(cfg)
    sets = build_evalsets(corpus.root, _sets_dir(cfg, "evalsets"), _sets_params(cfg, "test"), force=force)
    say = say or (lambda line: print(line, file=sys.stderr))
    for warning in sets.manifest.get("warnings", []):
        say(f"evaluation sets: {warning}")
    return replace(sets, corpus=corpus_label(cfg))


def validation_sets_from_config(cfg, force: bool = False, test_sets: EvalSets | None = None) -> EvalSets:
    """Builder: the VALIDATION sets, built like the test sets (`validation.snrs_db`; the conditions a caller scores
    are `validation.conditions`) from a part of the evaluation corpus the test sets never use: the held-out share
    `eval.validation_fraction` of each machine's clips and of the noise segments, or a validation corpus of its
    own (validation.machine_root / validation.noise_root, ingested into `corpus_val`). Written to `<work>/valsets`.

    Checked against the test sets (`test_sets`, default: built here) by content hash: a clip or a noise segment in
    both is a `SplitOverlapError` naming the files."""
    from retain_asd.corpus.ingest import eval_corpus_from_config, validation_corpus_from_config

    v = cfg.validation
    corpus = validation_corpus_from_config(cfg) if v.machine_root else eval_corpus_from_config(cfg)
    sets = build_evalsets(corpus.root, _sets_dir(cfg, "valsets"), _sets_params(cfg, "validation"), force=force)
    label = f"{v.machine_root} (noise: {v.noise_root})" if v.machine_root else corpus_label(cfg)
    sets = replace(sets, corpus=label)
    check_sets_disjoint(test_sets or evalsets_from_config(cfg), sets)
    return sets


# ---------------------------------------------------------------------------------------------------- the split guard
class SplitOverlapError(EvalSetError):
    """Validation and test sets share a clip or a noise segment (by content hash); the message names the files."""


def _contents(sets: EvalSets) -> tuple[dict[str, str], dict[tuple[str, int], str]]:
    """{content hash: clip path} of the clean clips and {(content hash, offset): recording path} of the noise
    segments a set uses; both the file hash and the decoded-audio hash of each file are keys."""
    rows = sets._pylist()
    clip_ids = {r["clip_id"] for r in rows}
    segments = {(r["noise_id"], int(r["noise_offset"])) for r in rows if r.get("noise_id")}
    noise_ids = {n for n, _ in segments}
    clips, noise = {}, {}
    for name, wanted in (("machine", clip_ids), ("noise", noise_ids)):
        folder = shards.child(sets.corpus_root, name)
        hashes = {s["path"]: {s.get("sha1"), s.get("audio_sha1")} - {None, ""}
                  for s in shards.read_manifest(folder)["sources"]}  # what the corpus guard compares, too
        for r in shards.read_table(folder, columns=["clip_id", "path"]).to_pylist():
            if r["clip_id"] not in wanted:
                continue
            for h in hashes.get(r["path"], ()):
                if name == "machine":
                    clips[h] = r["path"]
                else:
                    noise.update({(h, off): r["path"] for n, off in segments if n == r["clip_id"]})
    return clips, noise


def check_sets_disjoint(test: EvalSets, validation: EvalSets) -> None:
    """The leakage guard between the two splits: no clean clip and no noise segment (recording content + offset)
    of the validation sets in the test sets. Raises `SplitOverlapError` naming the first files of each kind."""
    test_clips, test_noise = _contents(test)
    val_clips, val_noise = _contents(validation)
    clips = sorted({(val_clips[h], test_clips[h]) for h in val_clips.keys() & test_clips.keys()})
    noise = sorted({(val_noise[k], test_noise[k], k[1]) for k in val_noise.keys() & test_noise.keys()})
    if not clips and not noise:
        return
    lines = [f"the validation sets ({validation.root}) and the test sets ({test.root}) share {len(clips)} clip(s) "
             f"and {len(noise)} noise segment(s) (by content hash); sweeps would select on test data"]
    lines += [f"  clip:\n    validation: {v}\n    test:       {t}" for v, t in clips[:3]]
    lines += [f"  noise segment at sample {off}:\n    validation: {v}\n    test:       {t}" for v, t, off in noise[:3]]
    lines.append("Fix: point validation.machine_root / validation.noise_root at other files (or leave them empty "
                 "to hold out eval.validation_fraction of the evaluation corpus)")
    raise SplitOverlapError("\n".join(lines))


# ---------------------------------------------------------------------------------------------------- mixtures
def row_key(row: dict) -> str:
    """Identity of a mixture (clip + noise segment + gain + SNR): the embedding cache key of a row."""
    text = f"{row['clip_id']}|{row.get('noise_id', '')}|{row.get('noise_offset', 0)}|" \
           f"{float(row.get('noise_gain', 0.0))!r}|{float(row.get('snr_db', math.inf))!r}"
    return hashlib.sha1(text.encode()).hexdigest()


class MixtureSource:
    """Rebuilds clean clips and scaled noise segments of recipe rows from the shards (loaded on demand)."""

    def __init__(self, corpus_root: str | os.PathLike):
        self.corpus_root = storage.as_location(corpus_root)
        self._clean: dict[str, np.ndarray] = {}
        self._noise: dict[str, np.ndarray] = {}

    def _load(self, rows: Sequence[dict]) -> None:
        want = {r["clip_id"] for r in rows} - set(self._clean)
        if want:
            self._clean.update(_iter_audio(shards.child(self.corpus_root, "machine"), want))
        want_noise = {r["noise_id"] for r in rows if r.get("noise_id")} - set(self._noise)
        if want_noise:
            self._noise.update(_iter_audio(shards.child(self.corpus_root, "noise"), want_noise))
        missing = {r["clip_id"] for r in rows} - set(self._clean)
        if missing:
            raise EvalSetError(f"{self.corpus_root}: {len(missing)} clips of the recipes are not in the shards "
                               f"(e.g. {sorted(missing)[:3]}); the corpus changed, rebuild the evaluation sets")

    def parts(self, rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(clean (B, S), scaled noise (B, S)) float32; the mixture is their sum (Eq. 3 with a1 = 1)."""
        self._load(rows)
        clean = np.stack([self._clean[r["clip_id"]] for r in rows])  # (B, S)
        noise = np.zeros_like(clean)
        for i, r in enumerate(rows):
            if r.get("noise_id"):
                seg = mixing.noise_segment(self._noise[r["noise_id"]], int(r["noise_offset"]), clean.shape[1])
                noise[i] = (float(r["noise_gain"]) * seg.astype(np.float64)).astype(np.float32)
        return clean, noise

    def mixtures(self, rows: Sequence[dict]) -> np.ndarray:
        clean, noise = self.parts(rows)
        return clean + noise  # (B, S)
