"""The final stage, and the only reader of the test set: promotion (the choice at the final fidelity, on
validation), the retrain of the chosen network, the test read once, seed repeats, the ensemble, ONNX
export with its parity check, and --evaluate of saved checkpoints; before them, the ending both scripts share
(wait for the other workers, rank, summarise). It chooses nothing from test results."""
import fcntl
import json
import logging
import shlex
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from data import (
    CANONICAL_FINGERPRINT,
    final_training_set,
    normalise,
    promotion_training_set,
    read_split,
    resolve_data_dir,
    training_statistics,
)
from errors import UserError
from mnist_optuna.cli import stop_code, stop_signals_blocked
from mnist_optuna.reporting import (
    Stopwatch,
    best_params_payload,
    config_key,
    mean_std,
    mmac_limits,
    network_text,
    progress,
    summarise,
    trial_accuracy,
)
from mnist_optuna.rundir import STAGING, command_line, publish_staged, source_version, write_json
from mnist_optuna.scores import compare, comparison_text, score_text, scores_of_logits
from mnist_optuna.studies import merged_study, mmac_of, rank, release_memory
from mnist_optuna.tracking import local_file, open_artifact_store, publish, published_text
from mnist_optuna.training import (
    EpochCheckpoint,
    TrainConfig,
    derive_seed,
    describe_device,
    export_onnx,
    last_scores,
    load_checkpoint,
    minutes,
    onnx_parity,
    predict_logits,
    resolve_device,
    retrain_and_test,
    seed_everything,
    train,
    training_seconds,
)
from mnist_optuna.workers import FinalStageClaim, wait_for_others
from models import build_model, count_macs, count_parameters

log = logging.getLogger(__name__)


@dataclass
class FinalConfig:
    """What happens after the search: the --promote, --final-*, --ensemble, --augment and output flags."""
    promote: int = 0       # N > 1: the N best distinct trials retrained like the final model, chosen on validation
    epochs: int = 8        # of the final retrain (and of each promoted one unless promote_epochs)
    promote_epochs: int = None  # epochs of each promoted retrain; None: `epochs`
    ema: float = 0.0       # > 0: the final (and promoted) retrains keep a moving average of the weights (epochs)
    tta: bool = False      # score promoted, final and ensemble models with shift test-time augmentation
    precision: str = "fp32"  # of every retrain: the run's resolved --precision
    subset: int = None     # None: all 60,000 images; else a stratified subset (quick runs)
    seeds: int = 1         # N > 1: the chosen network retrained N times with different seeds
    ensemble: int = 0      # K > 1: the K first distinct configurations retrained, their softmax averaged
    augment: bool = False  # on-device random affine in the final retrains (results are labelled)
    compile: bool = False
    skip: bool = False     # --no-final: stop after the search summary
    again: bool = False    # --retrain-only: run the final stage even when another worker ran it for this choice
    shared: bool = False   # --storage given: other workers may share the study, so the final stage is claimed
    plots: bool = True
    onnx: bool = True      # --no-onnx: no model.onnx (nor its parity check)

    @classmethod
    def from_args(cls, args, precision):
        return cls(promote=args.promote, epochs=args.final_epochs, promote_epochs=args.promote_epochs,
                   ema=args.final_ema, tta=args.tta, precision=precision, subset=args.final_subset,
                   seeds=args.final_seeds, ensemble=args.ensemble, augment=args.augment, compile=args.compile,
                   skip=args.no_final, again=args.retrain_only, shared=args.storage is not None,
                   plots=not args.no_plots, onnx=not args.no_onnx)

    @property
    def label(self):
        """What every result of these retrains is labelled with: augmentation, test-time augmentation."""
        return labelled({"augment": self.augment, "tta": self.tta})


def load_test(data_dir, device, mean, std):
    """The test set, normalised with the training statistics: read only after the search and its choice."""
    images, labels = read_split(data_dir, "test")
    return normalise(images, mean, std, device), labels.to(device)


class PlotStudies(NamedTuple):
    """The studies the plots draw: every study of the run, the chosen trial's, and the merged Pareto front's."""
    studies: list
    best: object = None
    front: object = None


def finish(args, run, searched, started, interrupted, describe_trial, objectives=("accuracy",), pick_mmac=None,
           max_mmac=None, extra=None, meta=None, key_name="study_seed"):
    """The ending both scripts share once their search stops; returns the exit code. `searched`: (label, key,
    study) of each study the run searched, `key_name` what the key is (a seed), recorded with the chosen trial.

    Wait until no other worker sharing the studies still trains a trial (all workers then see the same trials
    and choose alike), rank the candidates on validation (studies.rank: accuracy, or the Pareto front of several
    objectives within --pick-mmac; a --max-mmac lowered since the search rules trials out too), print and write
    the summary, then the final stage."""
    if not (interrupted or args.no_final):
        wait_for_others(searched, run.run_id)
    ranked, front = rank(searched, objectives, pick_mmac, max_mmac)
    best, summary = summarise(searched, run.out_dir, time.perf_counter() - started, describe_trial, ranked, front,
                              objectives, pick_mmac, extra=extra)
    plots = PlotStudies([study for _, _, study in searched],
                        next((study for _, _, study in searched
                              if best is not None and study.study_name == best.user_attrs.get("study")), None),
                        merged_study(searched, objectives)[0] if len(objectives) > 1 else None)
    return final_stage(FinalConfig.from_args(args, run.precision), run, ranked, summary, interrupted, meta or {},
                       plots, key_name)


def final_stage(cfg, run, ranked, summary, interrupted, meta, plots, key_name="study_seed"):
    """After the summary; returns the exit code. `ranked`: the candidates, best first, as (key, trial) pairs.

    Interrupted: say how to resume (130). No candidate: nothing to retrain (1). Otherwise, unless
    --no-final: with --promote N, retrain the N best distinct trials like the final model and choose among
    them on validation; retrain the chosen network on train+validation, read the test set once, save
    model.pt and model.onnx (checked against PyTorch in ONNX Runtime); with --ensemble K, also retrain
    the next K - 1 distinct configurations of the (promoted, then search) ranking and report their
    averaged softmax. The stage's files reach the run folder together at its end (StagedFiles). Then the plots.
    """
    out_dir = run.out_dir
    history, best = None, ranked[0][1] if ranked else None
    if interrupted or best is None or cfg.skip:
        # with a final stage ahead, summary.json and best_params.json wait for it: stopping that stage leaves the
        # previous ones beside the previous model.pt instead of files of another network
        write_json(out_dir / "summary.json", summary)
        if best is not None:
            write_json(out_dir / "best_params.json", best_params_payload(best, **{key_name: ranked[0][0]}))
    if interrupted:
        print(f"interrupted: finished trials are kept in the storage; rerun the same command with "
              f"--out-dir {shlex.quote(str(out_dir))} to resume")
        return stop_code()
    if best is None:
        limits = mmac_limits(summary)
        print("nothing to retrain: " + (f"no candidate within {limits}" if limits else "no trial completed"))
        return 1
    model, stage = None, None
    if not cfg.skip:
        if cfg.shared and not cfg.again:
            stage = FinalStageClaim(run.storage, best.user_attrs.get("study", "study"), final_key(best, cfg),
                                    run.run_id)
        other = stage.acquire(on_wait=waiting) if stage else None
        if other is not None:
            attrs = other.user_attrs
            published = attrs.get("published") or {}  # the claim keeps its run folder in its published record
            print(f"final stage: already run by worker {attrs.get('worker')} (run folder {published.get('out_dir')}); "
                  f"its results: {published_text(attrs.get('published') or {})}")
            write_json(out_dir / "summary.json", {**summary, "final_stage_by": attrs.get("worker"),
                                                  "published": attrs.get("published")})
            return 0
        try:
            with StagedFiles(out_dir) as staged:
                summary, model, history, best = retrain_chosen(cfg, run, ranked, summary, meta, staged, key_name)
                staged.publish()
        except BaseException:
            if stage:
                stage.release(None)  # another worker (or a rerun) takes the final stage over
            raise
    written = []
    if cfg.plots:
        from mnist_optuna.plots import write_plots

        written = write_plots(out_dir, *plots, final_history=history)
        log.info(f"plots: {len(written)} PNG files in {out_dir / 'plots'}")
    if model is not None:
        files = [out_dir / name for name in ("model.pt", "model.onnx", "best_params.json")
                 if (out_dir / name).is_file()] + written
        summary["published"] = publish(run.tracker, run.artifacts, run.storage, best, summary, model, out_dir, files)
        write_json(out_dir / "summary.json", summary)
        if stage:
            stage.release({**summary["published"], "out_dir": str(out_dir), "test_accuracy": summary["test_accuracy"]})
    print(f"results: {out_dir}/  (best_params.json, trials.csv, summary.json"
          f"{'' if cfg.skip else ', model.pt' + (', model.onnx' if cfg.onnx else '')}"
          f"{', plots/' if cfg.plots else ''})")
    print(f"reproduce: {command_line()}")
    return 0


class StagedFiles:
    """The final stage's files (checkpoints, model.onnx, best_params.json, summary.json) are made in a staging
    folder inside the run folder and moved into it together at the end, with Ctrl-C held back while they move:
    a stopped final stage leaves the previous files as they were, all of one network. The staging folder keeps
    what a stopped stage finished (its checkpoints resume it); a lock on it (released by the system when the
    process ends, however it ends) keeps two final stages in one folder from mixing their files."""
    FOLDER = STAGING

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.folder = self.out_dir / self.FOLDER
        self.lock = None
        self.made = set()  # the names this stage asked for: only they are published

    def __enter__(self):
        self.folder.mkdir(exist_ok=True)
        self.lock = open(self.folder / ".lock", "w")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.close()
            raise UserError(f"another run is in its final stage in {self.out_dir}; wait for it to end, or pass "
                            "another --out-dir") from None
        return self

    def path(self, name):
        """Where the stage writes `name`. A checkpoint of that name already in the run folder is copied in first:
        when it holds the same training it is reused instead of trained again (retrain_and_test)."""
        self.made.add(name)
        staged, published = self.folder / name, self.out_dir / name
        if name.endswith(".pt") and not staged.exists() and published.is_file():
            shutil.copy2(published, staged)
        return staged

    def publish(self):
        """Move the files this stage made into the run folder; a seed repeat, ensemble member or model.onnx of the
        previous stage that this one does not make goes, and so does what a stopped stage with other settings left in
        the staging folder (its checkpoints served only to resume it): every model in the folder is of this stage."""
        names = {path.name for path in self.folder.iterdir() if path.name in self.made}
        previous = [path.name for pattern in ("seed-*.pt", "ensemble-*.pt", "model.onnx")
                    for path in self.out_dir.glob(pattern) if path.name not in names]
        with stop_signals_blocked():  # and a SIGKILL is finished by the next run in the folder (rundir)
            publish_staged(self.out_dir, names, previous)

    def __exit__(self, *exc):
        self.lock.close()
        return False


def waiting(claim):
    print(f"final stage: worker {claim.user_attrs.get('worker')} is running it; waiting for its results "
          "(it takes over if that worker dies)")


def final_key(trial, cfg):
    """What a final stage is for: the search's choice and every setting of the stage."""
    return json.dumps([trial.user_attrs.get("study"), trial.number, cfg.promote, cfg.epochs, cfg.subset, cfg.seeds,
                       cfg.ensemble, cfg.augment, cfg.promote_epochs, cfg.ema, cfg.tta, cfg.precision])


def retrain_chosen(cfg, run, ranked, summary, meta, staged, key_name="study_seed"):
    """Promotion (with --promote), the retrain of the chosen network, the test read once, ONNX, seed repeats and the
    ensemble, each file written to `staged` (StagedFiles); returns (summary with the results, the model, its
    training history, the chosen trial)."""
    data = run.data
    label = cfg.label
    meta = {**meta, "command": command_line(), "source": source_version(), "mean": data.mean, "std": data.std,
            "training_data": data.fingerprint}
    key_of = {(trial.user_attrs.get("study"), trial.number): key for key, trial in ranked}
    ranking = [trial for _, trial in ranked]
    if cfg.promote > 1:
        promoted = promote(top_distinct(ranking, cfg.promote), data, cfg, run.out_dir)
        summary["promotion"] = promoted["record"]
        ranking = promoted["ranking"] + ranking
    best = ranking[0]  # the chosen network, which model.pt will be: promoted first, not necessarily the search's best

    def key(trial):
        return key_of.get((trial.user_attrs.get("study"), trial.number))

    chosen = {"seed": key(best), "trial": best.number, "value": trial_accuracy(best), "params": best.params}
    if cfg.promote > 1:
        chosen["promoted_val"] = promoted["record"]["chosen"]["promoted_val"]
        summary = {**summary, "search_best": summary.get("best"), "best": chosen}
    write_json(staged.path("best_params.json"), best_params_payload(
        best, **{key_name: key(best)}, **({"promoted_val": chosen["promoted_val"]} if cfg.promote > 1 else {})))
    # the search and its choice are over: this is the one place the test set is read
    test = load_test(run.data_dir, run.device, data.mean, data.std)

    def retrain(trial, name, repeat=0):
        recipe = final_config(trial, cfg)
        info = {**meta, "val_accuracy": trial_accuracy(trial), "trial": trial.number, "repeat": repeat,
                "study": trial.user_attrs.get("study"), key_name: key(trial)}
        with progress(cfg.epochs, "final epochs", "epoch") as bar:
            return retrain_and_test(trial.user_attrs["model"], recipe, x, y, repeat_seed(trial, repeat), test,
                                    staged.path(name), info, on_epoch=lambda record: bar.update(1),
                                    background=data.background, tta=cfg.tta)

    x, y = final_training_set(data, cfg.subset, best.user_attrs["seed"])
    others = top_distinct(ranking, cfg.ensemble)[1:]  # the ensemble's members after the chosen network
    repeats = cfg.seeds + len(others)
    estimate = sum(training_seconds(trial.user_attrs["model"], final_config(trial, cfg), run.device, len(y)) * times
                   for trial, times in [(best, cfg.seeds)] + [(trial, 1) for trial in others])
    log.info(f"\nretraining on {len(y)} train+validation images for {cfg.epochs} epochs{label} "
             f"on {describe_device(run.device)}, {cfg.precision}"
             f"{f', weights averaged over {cfg.ema:g} epochs' if cfg.ema else ''}: "
             f"{repeats} training{'s' if repeats > 1 else ''}, about {minutes(estimate)}")
    model, history, test_accuracy, seconds = retrain(best, "model.pt")
    print(f"test accuracy: {100 * test_accuracy:.2f} %{label}   "
          f"(final training {seconds:.0f} s on {len(y)} images)")
    summary = {**summary, "test_accuracy": test_accuracy, "augment": cfg.augment, "tta": cfg.tta,
               "precision": cfg.precision, "ema": cfg.ema, "final_seconds": seconds, "final_history": history}
    if cfg.onnx:
        onnx_path = export_onnx(model, staged.path("model.onnx"))
        max_diff, agreement = onnx_parity(model, onnx_path, test[0][:1000])
        print(f"onnx parity: max abs diff {max_diff:.2e} on 1000 test images, predicted labels agree "
              f"{100 * agreement:.1f} %")
        summary = {**summary, "onnx_max_abs_diff": max_diff, "onnx_label_agreement": agreement}
    if cfg.seeds > 1:
        summary["final_seeds"] = repeat_seeds(best, cfg.seeds, test_accuracy, seconds, retrain, label)
    if cfg.ensemble > 1:
        summary["ensemble"] = ensemble(top_distinct(ranking, cfg.ensemble), model, test, retrain,
                                       lambda member, images: predict_logits(member, images, tta=cfg.tta,
                                                                             background=data.background), label)
    write_json(staged.path("summary.json"), summary)
    return summary, model, history, best


def repeat_seed(trial, repeat):
    """Repeat 0 of a final retrain uses the trial's own seed; repeat k > 0 a seed derived from it and k."""
    return trial.user_attrs["seed"] if repeat == 0 else derive_seed(trial.user_attrs["seed"], repeat)


def repeat_seeds(best, n, first_accuracy, first_seconds, retrain, label):
    """The final recipe trained n times in all (repeat 0 is model.pt): how much the seed alone moves it."""
    runs = [{"repeat": 0, "seed": repeat_seed(best, 0), "test_accuracy": first_accuracy,
             "train_seconds": first_seconds}]
    for repeat in range(1, n):
        _, _, accuracy, seconds = retrain(best, f"seed-{repeat}.pt", repeat)
        runs.append({"repeat": repeat, "seed": repeat_seed(best, repeat), "test_accuracy": accuracy,
                     "train_seconds": seconds})
        print(f"final recipe, repeat {repeat}: test accuracy: {100 * accuracy:.2f} %{label}   "
              f"(final training {seconds:.0f} s)")
    accuracies = [run["test_accuracy"] for run in runs]
    mean, std = mean_std(accuracies)
    print(f"final recipe over {n} seeds: test accuracy {100 * mean:.2f} ± {100 * std:.2f} %{label}   "
          f"(min {100 * min(accuracies):.2f}, max {100 * max(accuracies):.2f})")
    return {"runs": runs, "mean": mean, "std": std}


def top_distinct(ranking, k):
    """The first k trials of `ranking` whose (network, training) differ from all before them."""
    members, seen = [], set()
    for trial in ranking:
        if len(members) < k and config_key(trial) not in seen:
            seen.add(config_key(trial))
            members.append(trial)
    return members


def final_config(trial, cfg, epochs=None):
    """The trial's training recipe as the final model trains: --final-epochs (or `epochs`), --final-ema,
    --augment, the run's precision."""
    return TrainConfig.from_dict({**trial.user_attrs["train"], "epochs": epochs or cfg.epochs, "augment": cfg.augment,
                                  "compile": cfg.compile, "precision": cfg.precision, "ema": cfg.ema})


def promote(candidates, data, cfg, out_dir):
    """Retrain each candidate as the final model will be (its recipe, --final-epochs, --augment, its own seed)
    on every training image outside the validation split, score it on validation, and rank by that score.

    The cheap search ranks networks after a few epochs on a subset; this ranks the few that matter at the
    fidelity of the final training. Scores are kept in promotion.json in the run folder, keyed by what
    the training was, so a rerun in the same folder resumes instead of training them again.
    Returns {"ranking": trials best first, "record": what summary.json keeps}.
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
    epochs = cfg.promote_epochs or cfg.epochs
    estimate = sum(training_seconds(trial.user_attrs["model"], final_config(trial, cfg, epochs), data.val_x.device,
                                    len(y), len(data.val_y) * epochs) for trial in candidates)
    log.info(f"\npromotion: the {len(candidates)} best distinct trials retrained like the final model "
             f"({epochs} epochs on {len(y)} training images{' with augmentation' if cfg.augment else ''})"
             f", scored on validation{' with shift TTA' if cfg.tta else ''}: about {minutes(estimate)}")
    rows = []
    for search_rank, trial in enumerate(candidates, start=1):
        recipe, seed = final_config(trial, cfg, epochs), repeat_seed(trial, 0)
        # scores from before the data's fingerprint was part of the key were of canonical MNIST: their keys stand
        other_data = [] if data.fingerprint == CANONICAL_FINGERPRINT else [data.fingerprint]
        key = json.dumps([trial.user_attrs["model"], recipe.to_dict(), seed, len(y)] + ([True] if cfg.tta else [])
                         + other_data, sort_keys=True)
        if key not in done:
            seed_everything(seed)
            model = build_model(trial.user_attrs["model"]).to(x.device)
            clock = Stopwatch()
            # epoch by epoch in the run folder, so a stopped promotion resumes from its last finished epoch
            checkpoint = EpochCheckpoint.keyed(out_dir, "promotion", key, f"promotion {search_rank}")
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
            del model
            release_memory()
        result = done[key]
        rows.append({"trial": trial, "search_rank": search_rank, "search_val": trial_accuracy(trial),
                     "promoted_val": result["val_accuracy"], "promoted_nll": result.get("val_nll"),
                     "images": result.get("val_images"), "correct": result.get("val_correct"),
                     "mmac": mmac_of(trial), "seconds": result["seconds"]})
        log.info(f"promotion {search_rank}/{len(candidates)}: {trial.user_attrs.get('study', '')} trial "
                 f"{trial.number}  search val {100 * trial_accuracy(trial):.2f} %  promoted val "
                 f"{promoted_text(rows[-1])}  {result['seconds']:.0f} s")
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
    return {"ranking": [row["trial"] for row in rows], "record": record}


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


def ensemble(members, best_model, test, retrain, predict_logits, label):
    """Retrain the members after the first (the best, retrained already) and average their softmax on the test set."""
    test_x, test_y = test
    probabilities, results = 0, []
    for index, trial in enumerate(members):
        model = best_model if index == 0 else retrain(trial, f"ensemble-{index}.pt")[0]
        logits = predict_logits(model, test_x)
        accuracy = (logits.argmax(1) == test_y).float().mean().item()
        probabilities = probabilities + torch.softmax(logits, 1)
        results.append({"trial": trial.number, "seed": trial.user_attrs["seed"],
                        "val_accuracy": trial_accuracy(trial), "test_accuracy": accuracy})
        print(f"ensemble member {index}: trial {trial.number}  val {100 * trial_accuracy(trial):.2f} %  "
              f"test accuracy: {100 * accuracy:.2f} %{label}")
    accuracy = (probabilities.argmax(1) == test_y).float().mean().item()
    print(f"ensemble of {len(members)} (averaged softmax): test accuracy: {100 * accuracy:.2f} %{label}")
    return {"members": results, "test_accuracy": accuracy}


def evaluate_checkpoints(paths, data_dir, device):
    """For each checkpoint: its test accuracy, parameter count, MACs per image, metadata, the test labels and
    its softmax over the test set (each normalised with the training statistics its checkpoint records)."""
    members = []
    for path in paths:
        model, payload = load_checkpoint(path, device)
        meta = payload.get("meta", {})
        mean, std = (meta["mean"], meta["std"]) if "mean" in meta else training_statistics(data_dir)
        test_x, test_y = load_test(data_dir, device, mean, std)
        # scored as its run scored it: with shift TTA when that run chose it
        probabilities = torch.softmax(predict_logits(model, test_x, tta=bool(meta.get("tta")),
                                                     background=-mean / std), 1)
        members.append({"accuracy": (probabilities.argmax(1) == test_y).float().mean().item(), "labels": test_y,
                        "probabilities": probabilities, "parameters": count_parameters(model),
                        "macs": count_macs(model), "meta": meta})
    return members


def labelled(meta):
    """The label of a checkpoint's results: augmentation in its training, shift TTA in its scoring."""
    return ((" (with augmentation)" if meta.get("augment") else "") + (" (shift TTA)" if meta.get("tta") else ""))


def ensemble_accuracy(members):
    """Accuracy of the averaged softmax of evaluate_checkpoints' members."""
    probabilities = sum(member["probabilities"] for member in members) / len(members)
    return (probabilities.argmax(1) == members[0]["labels"]).float().mean().item()


def evaluate_command(paths, data_dir=None, device="auto", artifacts=None):
    """--evaluate PATH [PATH ...] of either script (a path, or an artifact id in the --artifacts store): see
    print_evaluation."""
    store = open_artifact_store(artifacts)
    local = [local_file(path, store, "--evaluate") for path in paths]
    return print_evaluation(local, resolve_data_dir(data_dir), resolve_device(device), shown=paths)


def print_evaluation(paths, data_dir, device, shown=None):
    """--evaluate: each checkpoint's test accuracy, size and MACs; for several, their averaged-softmax ensemble's."""
    clock = Stopwatch()
    members = evaluate_checkpoints(paths, data_dir, device)
    lines = []
    for path, member in zip(shown or paths, members):
        label = labelled(member["meta"])
        name = f"{path}: " if len(paths) > 1 else ""
        lines.append(f"{name}test accuracy: {100 * member['accuracy']:.2f} %{label}   parameters: "
                     f"{member['parameters']:,}   MMAC/image: {member['macs'] / 1e6:.1f}")
    if len(paths) > 1:
        classes = {path: member["probabilities"].shape[1] for path, member in zip(shown or paths, members)}
        if len(set(classes.values())) > 1:
            raise UserError("--evaluate: an ensemble needs members with one set of classes; "
                            + ", ".join(f"{path} has {n}" for path, n in classes.items())
                            + ": pass checkpoints of one task")
        label = labelled({key: any(m["meta"].get(key) for m in members) for key in ("augment", "tta")})
        lines.append(f"ensemble of {len(paths)} (averaged softmax): ensemble test accuracy: "
                     f"{100 * ensemble_accuracy(members):.2f} %{label}   MMAC/image: "
                     f"{sum(m['macs'] for m in members) / 1e6:.1f}")
    print("\n".join(lines) + f"   ({clock.seconds():.1f} s)")
    return 0
