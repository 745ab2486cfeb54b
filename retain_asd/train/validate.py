"""Validation during pre-training: every `train.validate_every` steps rank 0 scores the current student on the
validation sets (`eval.evalsets.validation_sets_from_config`: never the test sets) with the evaluation's GenRep
scoring (layer `eval.layer`, kNN, domain normalisation as `eval.primary`), on `validation.conditions` x
`validation.snrs_db` (default Mismatch and Factory B at -5 and 0 dB). The loop reports the result as
``val/hmean_low`` (the official-score harmonic mean over those low-SNR sets) through `ray.train.report`, so the
pre-training run's MLflow history shows it beside the loss.
"""

from __future__ import annotations

import os

METRIC = "val/hmean_low"  # what validation reports; a sweep selects on it and ASHA stops on it


def validation_args(cfg, sets_root: str | os.PathLike) -> dict:
    """The flat arguments a worker needs (it never reads a Config)."""
    e, v = cfg.eval, cfg.validation
    return {"sets_root": str(sets_root), "conditions": list(v.conditions), "layer": e.layer, "k": e.k,
            "metric": e.metric, "pooling": e.pooling, "batch_size": e.batch_size, "primary": e.primary}


def score_student(encoder, args: dict) -> dict[str, float]:
    """``{"val/hmean_low": ...}`` of `encoder` (the student, scored in eval mode, then put back as it was)."""
    from retain_asd.eval.embed import Embedder
    from retain_asd.eval.evalsets import load_evalsets
    from retain_asd.eval.run import evaluate_checkpoint

    sets = load_evalsets(args["sets_root"])
    layer = min(args["layer"], encoder.num_layers)
    training = encoder.training
    try:
        embedder = Embedder(encoder, pooling=args["pooling"], batch_size=args["batch_size"])
        result = evaluate_checkpoint(None, sets, [layer], k=args["k"], metric=args["metric"],
                                     conditions=args["conditions"], embedder=embedder, primary=args["primary"])
    finally:
        encoder.train(training)
    overall = result.table2(domain_norm=args["primary"] == "dn")[-1]  # every validation set: the low SNRs
    return {METRIC: overall.hmean_all}
