"""DCASE-folder mode: GenRep scoring of checkpoints on a DCASE 2020-2025 folder (`evaluate_dcase`).

Owns the content keys of the folder's files for the embedding cache (`_file_keys`); audio is read with
`audio.load_clips`. Results use the types of `results.py`; `builder.evaluate_from_config` calls this mode
for ``--dcase-root``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from retain_asd.audio import load_clips
from retain_asd.eval import metrics
from retain_asd.eval.embed import Embedder
from retain_asd.eval.results import Cell, EvalResult, MachineResult, score_machine

log = logging.getLogger(__name__)


def _file_keys(paths: Sequence[str], clip_s: float) -> list[str]:
    import hashlib

    keys = []
    for p in paths:
        with open(p, "rb") as f:
            keys.append(hashlib.sha1(f.read() + f"|clip_s={clip_s!r}".encode()).hexdigest())
    return keys


def evaluate_dcase(embedder: Embedder, dcase_root, layers: Sequence[int], *, ground_truth_dir=None, k: int = 1,
                   metric: str = "euclidean", clip_s: float = 10.0, domain_norm: Sequence[bool] = (False, True),
                   name: str = "model") -> EvalResult:
    """GenRep on a DCASE 2020-2025 folder: per machine and section, banks from the train split (source /
    target normals), tests from the test split (dev: labels from names; eval: `ground_truth_dir` CSVs).

    Cells have condition ``dcase`` and snr_db NaN; machines are keyed ``<machine>_section_<NN>``.
    """
    from retain_asd.corpus.layouts import scan_dcase

    scan = scan_dcase(dcase_root, ground_truth_dir=ground_truth_dir)
    for path, reason in scan.rejects:
        log.warning("skipped %s: %s", path, reason)
    result = EvalResult(name, embedder.checkpoint_hash, list(layers)[0])
    groups = sorted({(r.machine, r.section) for r in scan.records})
    per_cell: dict[tuple[int, bool], dict[str, MachineResult]] = {}
    for machine, section in groups:
        recs = [r for r in scan.records if (r.machine, r.section) == (machine, section)]
        refs = [r for r in recs if r.split == "train" and r.label == "normal"]
        tests = [r for r in recs if r.split == "test" and r.label in ("normal", "anomaly")]
        if not refs or not tests:
            log.warning("%s section %s: %d references, %d labelled tests; skipped", machine, section, len(refs),
                        len(tests))
            continue
        paths = [r.path for r in refs + tests]
        keys = _file_keys(paths, clip_s)
        path_of = dict(zip(keys, paths))

        def load(ks, path_of=path_of):
            clips, bad = load_clips([path_of[x] for x in ks], clip_s)
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
    for (layer, dn), machines in per_cell.items():
        official = metrics.official_score([m.figures for m in machines.values()])
        result.cells.append(Cell("dcase", math.nan, layer, dn, machines, official))
    return result
