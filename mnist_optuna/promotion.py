"""Promotion, the choice at the final fidelity: the best distinct trials of the search retrained as the final model
will be, scored on validation, and chosen by a stated rule (the cheapest in MACs among those within noise of the
most accurate); the scores are kept so a rerun resumes. It reads no test image."""
import hashlib
import io
import json
import logging
import statistics
from pathlib import Path

from data import CANONICAL_FINGERPRINT, promotion_training_set
from errors import first_line
from mnist_optuna.checkpoints import EpochCheckpoint, stored_bytes
from mnist_optuna.reporting import (
    Stopwatch,
    config_key,
    mmac_of,
    network_text,
    progress,
    trial_accuracy,
)
from mnist_optuna.rundir import write_json
from mnist_optuna.scores import compare, comparison_text, score_text, scores_of_logits
from mnist_optuna.studies import release_memory
from mnist_optuna.training import (
    TrainConfig,
    derive_seed,
    last_scores,
    minutes,
    predict_logits,
    seed_everything,
    train,
    training_seconds,
)
from models import build_model

log = logging.getLogger(__name__)


def repeat_seed(trial, repeat):
    """Repeat 0 of a final retrain uses the trial's own seed; repeat k > 0 a seed derived from it and k."""
    return trial.user_attrs["seed"] if repeat == 0 else derive_seed(trial.user_attrs["seed"], repeat)


def top_distinct(ranking, k):
    """The first k trials of `ranking` whose (network, training) differ from all before them."""
    members, seen = [], set()
    for trial in ranking:
        if len(members) < k and config_key(trial) not in seen:
            seen.add(config_key(trial))
            members.append(trial)
    return members


def final_recipe(trial, cfg, epochs=None):
    """The trial's training recipe as the final model trains: --final-epochs (or `epochs`), --final-ema,
    --augment, the run's precision."""
    return TrainConfig.from_dict({**trial.user_attrs["train"], "epochs": epochs or cfg.epochs, "augment": cfg.augment,
                                  "compile": cfg.compile, "precision": cfg.precision, "ema": cfg.ema})


def promote(candidates, data, cfg, out_dir, store=None):
    """Retrain each candidate as the final model will be (its recipe, --final-epochs, --augment, its own seed)
    on every training image outside the validation split, score it on validation, and rank by that score.

    The cheap search ranks networks after a few epochs on a subset; this ranks the few that matter at the
    fidelity of the final training. Scores are kept in promotion.json in the run folder, keyed by what
    the training was, so a rerun in the same folder resumes instead of training them again; a training stopped
    half way resumes from its last epoch (from the shared artifact store `store` in another worker's folder too).
    Returns {"ranking": trials best first, "record": what summary.json keeps, "estimate": the announced seconds}.
    """
    path = Path(out_dir) / "promotion.json"
    try:
        done = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        done = {}
    if not isinstance(done, dict) or not all(isinstance(score, dict) and "val_accuracy" in score
                                             for score in done.values()):
        log.warning(f"warning: {path} is not a record of promotion scores; scoring the candidates again")
        done = {}
    x, y = promotion_training_set(data, cfg.subset)  # the same images for every candidate
    split = split_digest(data, y) if store is not None else None  # names the scores shared in the store
    epochs = cfg.promote_epochs or cfg.epochs
    estimate = sum(training_seconds(trial.user_attrs["model"], final_recipe(trial, cfg, epochs), data.val_x.device,
                                    len(y), len(data.val_y) * epochs) for trial in candidates)
    log.info(f"\npromotion: the {len(candidates)} best distinct trials retrained like the final model "
             f"({epochs} epochs on {len(y)} training images{' with augmentation' if cfg.augment else ''})"
             f", scored on validation{' with shift TTA' if cfg.tta else ''}: about {minutes(estimate)}")
    rows = []
    for search_rank, trial in enumerate(candidates, start=1):
        recipe, seed = final_recipe(trial, cfg, epochs), repeat_seed(trial, 0)
        # scores from before the data's fingerprint was part of the key were of canonical MNIST: their keys stand
        other_data = [] if data.fingerprint == CANONICAL_FINGERPRINT else [data.fingerprint]
        key = json.dumps([trial.user_attrs["model"], recipe.to_dict(), seed, len(y)] + ([True] if cfg.tta else [])
                         + other_data, sort_keys=True)
        shared, source = store_score_id(key, split) if store is not None else None, ""
        if key not in done and store is not None:  # scored already by another worker sharing the store
            found = read_stored_score(store, shared)
            if found is not None:
                done[key], source = found, "  (scored by another worker: from the artifact store)"
                write_json(path, done)
        if key not in done:
            seed_everything(seed)
            model = build_model(trial.user_attrs["model"]).to(x.device)
            clock = Stopwatch()
            # epoch by epoch in the run folder (and the shared artifact store, `store`), so a stopped promotion resumes
            # from its last finished epoch, here or in the worker that takes the final stage over
            checkpoint = EpochCheckpoint.keyed(out_dir, "promotion", key, f"promotion {search_rank}", store=store)
            with progress(recipe.epochs, f"promotion {search_rank}", "epoch") as bar:
                history = train(model, x, y, recipe, seed, val=(data.val_x, data.val_y),
                                on_epoch=lambda record: bar.update(1), background=data.background,
                                checkpoint=checkpoint)
            scores = (scores_of_logits(predict_logits(model, data.val_x, tta=True, background=data.background),
                                       data.val_y) if cfg.tta else last_scores(history))
            done[key] = {"val_accuracy": scores["accuracy"], "val_nll": scores["nll"], "val_images": scores["images"],
                         "val_correct": scores["correct"], "seconds": clock.seconds() + checkpoint.resumed_seconds,
                         "val_curve": [record["val_accuracy"] for record in history]}
            write_json(path, done)
            write_stored_score(store, shared, done[key])
            del model
            release_memory()
        result = done[key]
        rows.append({"trial": trial, "search_rank": search_rank, "search_val": trial_accuracy(trial),
                     "promoted_val": result["val_accuracy"], "promoted_nll": result.get("val_nll"),
                     "images": result.get("val_images"), "correct": result.get("val_correct"),
                     "mmac": mmac_of(trial), "seconds": result["seconds"]})
        log.info(f"promotion {search_rank}/{len(candidates)}: {trial.user_attrs.get('study', '')} trial "
                 f"{trial.number}  search val {100 * trial_accuracy(trial):.2f} %  promoted val "
                 f"{promoted_text(rows[-1])}  {result['seconds']:.0f} s{source}")
    rows.sort(key=lambda row: (-row["promoted_val"], row["search_rank"]))
    correlation = spearman([row["search_val"] for row in rows], [row["promoted_val"] for row in rows])
    rows, rule, comparisons = choose_within_noise(rows)
    print("\n==== promotion (choice at the final fidelity, on validation) ====")
    print(" rank  search rank  trial                  search val  promoted val (± s.e., NLL)     MMAC  network")
    for place, row in enumerate(rows, start=1):
        trial = row["trial"]
        name = f"{trial.user_attrs.get('study', '')} #{trial.number}"
        print(f"{place:5d}  {row['search_rank']:11d}  {name:21s}  {100 * row['search_val']:8.2f} %  "
              f"{promoted_text(row):30s}  {row['mmac']:5.1f}  {network_text(trial)}")
    print(f"chosen by the rule: {rule}")
    text = "n/a (fewer than 2 distinct scores)" if correlation is None else f"{correlation:+.2f}"
    print(f"rank correlation of search and promoted validation (Spearman): {text}")
    record = {"epochs": epochs, "train_images": len(y), "augment": cfg.augment, "tta": cfg.tta,
              "spearman": correlation, "rule": rule, "against_most_accurate": comparisons,
              "rows": [{"study": row["trial"].user_attrs.get("study"), "trial": row["trial"].number,
                        "search_rank": row["search_rank"], "search_val": row["search_val"],
                        "promoted_val": row["promoted_val"], "promoted_nll": row["promoted_nll"],
                        "mmac": row["mmac"], "seconds": row["seconds"]} for row in rows]}
    record["chosen"] = record["rows"][0]
    return {"ranking": [row["trial"] for row in rows], "record": record, "estimate": estimate}


def split_digest(data, y):
    """The validation split a promotion is scored on and the images it trains on: the labels of both sets, in order,
    tell splits apart."""
    return hashlib.sha256(data.val_y.cpu().numpy().tobytes() + y.cpu().numpy().tobytes()).hexdigest()


def store_score_id(key, split):
    """The artifact store's name of a promotion score: the training's key and its split (split_digest), so a score
    is read back only for the same question."""
    return f"promotion-{hashlib.sha256((key + split).encode()).hexdigest()[:24]}.json"


def read_stored_score(store, artifact_id):
    content = stored_bytes(store, artifact_id)
    try:
        score = json.loads(content) if content is not None else None
    except ValueError:  # torn: trained here
        return None
    return score if isinstance(score, dict) and "val_accuracy" in score and "val_correct" in score else None


def write_stored_score(store, artifact_id, score):
    if store is None:
        return
    try:
        store.write(artifact_id, io.BytesIO(json.dumps(score).encode()))
    except Exception as error:  # the score is in the run folder; only another worker would train it again
        log.warning(f"warning: a promotion score could not be written to the artifact store ({first_line(error)})")


def promoted_text(row):
    if not row.get("images"):  # a score kept from before scores carried their noise
        return f"{100 * row['promoted_val']:.2f} %"
    return score_text(row["promoted_val"], row["images"], row.get("promoted_nll"))


WITHIN_NOISE_RULE = "the cheapest network in MACs among those within noise of the most accurate"


def choose_within_noise(rows):
    """(rows with the chosen candidate first, the rule that chose it, the paired comparisons behind it). `rows` come
    most accurate first. Each other candidate is compared with the most accurate on the same validation images
    (McNemar's exact test); when some are within noise of it, a two-image difference does not choose: the cheapest
    network in MACs among them does (of equal MACs, the more accurate). Without per-image records (scores kept
    from before they were recorded) the most accurate is chosen, and the rule says so."""
    top = rows[0]
    if len(rows) == 1:
        return rows, "the only candidate", []
    if not all(row.get("correct") and row.get("images") == top["images"] for row in rows):
        return rows, "the most accurate (no per-image record to test the others against it)", []
    comparisons, tied = [], [top]
    for row in rows[1:]:
        comparison = compare(top["correct"], row["correct"], top["images"])
        comparisons.append({"trial": row["trial"].number, "study": row["trial"].user_attrs.get("study"),
                            **comparison})
        if not comparison["beyond_noise"]:
            tied.append(row)
    name = f"trial {top['trial'].number}"
    if len(tied) == 1:
        return rows, (f"the most accurate, {name}, better beyond noise than every other candidate (McNemar p <= "
                      f"{max(c['p_value'] for c in comparisons):.2g})"), comparisons
    chosen = min(tied, key=lambda row: (row["mmac"], -row["promoted_val"]))
    others = ", ".join(f"trial {row['trial'].number}" for row in tied if row is not top)
    lines = [comparison_text(c, name, f"trial {c['trial']}") for c in comparisons if not c["beyond_noise"]]
    log.info("\n".join(lines))
    return ([chosen] + [row for row in rows if row is not chosen],
            f"{WITHIN_NOISE_RULE} ({others} within noise of {name}): trial "
            f"{chosen['trial'].number}, {chosen['mmac']:.1f} MMAC", comparisons)


def spearman(a, b):
    """Spearman's rank correlation of two equal-length sequences (average ranks for ties); None when undefined."""
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result
    if len(a) < 2:
        return None
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    norm = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / norm if norm else None
