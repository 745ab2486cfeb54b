"""DCASE-folder mode: GenRep scoring of checkpoints on a DCASE 2020-2026 folder (`evaluate_dcase`).

Owns the content keys of the folder's files for the embedding cache (`_file_keys`: file bytes, clip length and
channel); audio is read with `audio.load_clips`. What a year's tree holds is `corpus/years.py`; results use the
types of `results.py`, and carry the tree's layout and the channel they were computed on. `builder.
evaluate_from_config` calls this mode for ``--dcase-root``, `builder.layers_from_config` for Fig. 2 on a tree.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from retain_asd.audio import channel_policy, load_clips
from retain_asd.eval import metrics
from retain_asd.eval.embed import Embedder
from retain_asd.eval.results import Cell, EvalResult, MachineResult, score_machine

log = logging.getLogger(__name__)


def _file_keys(paths: Sequence[str], clip_s: float, channel: str = "mean") -> list[str]:
    import hashlib

    suffix = f"|clip_s={clip_s!r}" + ("" if channel == "mean" else f"|channel={channel}")  # mean: the old keys
    keys = []
    for p in paths:
        with open(p, "rb") as f:
            keys.append(hashlib.sha1(f.read() + suffix.encode()).hexdigest())
    return keys


def evaluate_dcase(embedder: Embedder, dcase_root, layers: Sequence[int], *, ground_truth_dir=None, k: int = 1,
                   metric: str = "euclidean", clip_s: float = 10.0, domain_norm: Sequence[bool] = (False, True),
                   name: str = "model", channel: str = "mean") -> EvalResult:
    """GenRep on a DCASE 2020-2026 folder: per machine and section, banks from the train split (source /
    target normals; for DCASE 2026 evaluation machines, their additional training set), tests from the test
    split (dev: labels from names; eval: `ground_truth_dir` CSVs). Every layer of `layers` comes from one
    forward pass per clip.

    Cells have condition ``dcase`` and snr_db NaN; machines are keyed ``<machine>_section_<NN>`` (DCASE 2020:
    the machine id is the section). A 2020 tree has no target domain: figures are AUC_source and pAUC
    (`source_only`). `channel` ("0", "1" or "mean") picks the channel of multi-channel files (DCASE 2026:
    0 near mic, 1 far mic); an index the files lack is a LayoutError. The result names the layout and the
    channel (`result.layout`, `result.channel`). A folder where no section can be scored raises ValueError.
    """
    from retain_asd.corpus.layouts import scan_dcase
    from retain_asd.corpus.years import detect_layout

    scan = scan_dcase(dcase_root, ground_truth_dir=ground_truth_dir)
    for path, reason in scan.rejects:
        log.warning("skipped %s: %s", path, reason)
    layout = detect_layout(scan.records) if scan.records else None
    if layout is not None:
        layout.check_channel(channel)
    result = EvalResult(name, embedder.checkpoint_hash, list(layers)[0])
    result.layout = layout.label if layout else ""
    result.channel = layout.channel_label(channel) if layout else str(channel)
    groups = sorted({(r.machine, r.section) for r in scan.records})
    per_cell: dict[tuple[int, bool], dict[str, MachineResult]] = {}
    skipped = []
    for machine, section in groups:
        recs = [r for r in scan.records if (r.machine, r.section) == (machine, section)]
        refs = [r for r in recs if r.split == "train" and r.label == "normal"]
        tests = [r for r in recs if r.split == "test" and r.label in ("normal", "anomaly")]
        if not refs or not tests:
            log.warning("%s section %s: %d references, %d labelled tests; skipped", machine, section, len(refs),
                        len(tests))
            skipped.append(f"{machine} section {section}: {len(refs)} train normals, {len(tests)} labelled tests")
            continue
        if len({r.label for r in tests}) < 2:
            skipped.append(f"{machine} section {section}: the tests are all {tests[0].label}")
            continue
        paths = [r.path for r in refs + tests]
        keys = _file_keys(paths, clip_s, str(channel))
        path_of = dict(zip(keys, paths))

        def load(ks, path_of=path_of):
            clips, bad = load_clips([path_of[x] for x in ks], clip_s, channel_policy(channel))
            if bad:
                raise ValueError(f"unreadable audio: {bad[:3]}")
            return clips

        embs = embedder.embed_keyed(keys, load, layers)
        n_ref = len(refs)
        src = [i for i, r in enumerate(refs) if r.domain == "source"]
        tgt = [i for i, r in enumerate(refs) if r.domain == "target"]
        for layer in layers:
            for dn in domain_norm:
                res = score_machine(machine, embs[layer][src], embs[layer][tgt],
                                    embs[layer][n_ref:], [r.label == "anomaly" for r in tests],
                                    [r.domain == "target" for r in tests], [Path(r.path).name for r in tests],
                                    [section] * len(tests), k, metric, dn)
                if res is not None:
                    per_cell.setdefault((layer, dn), {})[f"{machine}_section_{section}"] = res
    if not per_cell:  # never a run without figures
        why = "; ".join(skipped[:4]) or f"no clips found ({len(scan.rejects)} files skipped)"
        raise ValueError(f"{dcase_root}: nothing to score: every machine section needs train normals and test "
                         f"clips of both labels (normal and anomaly); {why}")
    for (layer, dn), machines in per_cell.items():
        official = metrics.official_score([m.figures for m in machines.values()])
        result.cells.append(Cell("dcase", math.nan, layer, dn, machines, official))
    return result


def source_only(result: EvalResult) -> bool:
    """True when no section had target-domain tests (DCASE 2020): figures are AUC + pAUC, no target AUC."""
    return all(math.isnan(m.figures.auc_target) for c in result.cells for m in c.machines.values())


def where(result: EvalResult) -> str:
    """What a result was computed on, for table headers and console lines: ``DCASE 2026, channel 0 (near mic)``."""
    return f"{result.layout or 'DCASE'}, {result.channel or 'channel mean'}"


def write_dcase_table(result: EvalResult, path) -> Path:
    """Per machine section: AUC source / target, pAUC, hmean (x100), raw and DN, and the official score."""
    from retain_asd import fsio

    def pct(x: float) -> str:
        return "–" if math.isnan(x) else f"{100 * x:.2f}"

    lines = []
    if source_only(result):
        lines += ["Source domain only (DCASE 2020 layout): AUC and pAUC, no target AUC; official = harmonic mean "
                  "of AUC_source and pAUC over the sections.", ""]
    for c in sorted((c for c in result.cells if c.layer == result.primary_layer), key=lambda c: c.domain_norm):
        lines += [f"### {'DN' if c.domain_norm else 'raw kNN scores'}, {where(result)}: official {pct(c.official)}", "",
                  "| section | AUC source | AUC target | pAUC | hmean |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {pct(m.figures.auc_source)} | {pct(m.figures.auc_target)} | {pct(m.figures.pauc)} | "
                  f"{pct(m.figures.hmean)} |" for name, m in sorted(c.machines.items())]
        lines.append("")
    return fsio.write_text(path, "\n".join(lines))


def official_by_layer(result: EvalResult, domain_norm: bool) -> dict[int, float]:
    """{layer: official score} of a DCASE-folder result (the figure `evaluate --dcase-root` reports per layer)."""
    return {c.layer: c.official for c in result.cells if c.domain_norm == domain_norm}


def machines_by_layer(result: EvalResult, domain_norm: bool) -> dict[str, dict[int, float]]:
    """{machine section: {layer: its hmean of AUC_s, AUC_t, pAUC}} of a DCASE-folder result."""
    out: dict[str, dict[int, float]] = {}
    for c in result.cells:
        if c.domain_norm == domain_norm:
            for name, m in c.machines.items():
                out.setdefault(name, {})[c.layer] = m.figures.hmean
    return dict(sorted(out.items()))


def channels_side_by_side(results: Sequence[EvalResult], domain_norm: bool) -> str:
    """One checkpoint on several channels of the same clips (DCASE 2026: near and far mic), per machine section:
    AUC_s / AUC_t / pAUC / hmean (x100) of each channel side by side, and the official scores (primary layer)."""
    def pct(x: float) -> str:
        return "–" if math.isnan(x) else f"{100 * x:.2f}"

    cells = [next(c for c in r.cells if c.layer == r.primary_layer and c.domain_norm == domain_norm)
             for r in results]
    head = ["machine section"] + [f"{r.channel}: AUC_s / AUC_t / pAUC / hmean" for r in results]
    name = results[0].name.rsplit("-ch", 1)[0] if len(results) > 1 else results[0].name  # builder: <name>-ch<c>
    lines = [f"{name} ({results[0].layout}, layer {results[0].primary_layer}, "
             f"{'DN' if domain_norm else 'raw kNN scores'}; x100)", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * len(results)]
    for machine in sorted({m for c in cells for m in c.machines}):
        row = []
        for c in cells:
            m = c.machines.get(machine)
            f = m.figures if m else None
            row.append(" / ".join(pct(getattr(f, k)) if f else "–" for k in ("auc_source", "auc_target", "pauc",
                                                                                "hmean")))
        lines.append(f"| {machine} | " + " | ".join(row) + " |")
    lines.append("| official | " + " | ".join(pct(c.official) for c in cells) + " |")
    return "\n".join(lines) + "\n"
