"""The final stage, and with --evaluate the only reader of the test set: after the promotion's choice (promotion),
the retrain of the chosen network, the test read once, seed repeats, the ensemble, ONNX export with its parity
check; before them, the ending both scripts share (wait for the other workers, rank, summarise). It chooses
nothing from test results."""
import fcntl
import json
import logging
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from data import final_training_set
from errors import UserError
from mnist_optuna.checkpoints import export_onnx, onnx_parity
from mnist_optuna.cli import stop_code, stop_signals_blocked
from mnist_optuna.devices import describe_device
from mnist_optuna.evaluation import labelled, load_test
from mnist_optuna.promotion import final_recipe, promote, repeat_seed, top_distinct
from mnist_optuna.reporting import (
    best_params_payload,
    mean_std,
    mmac_limits,
    Stopwatch,
    progress,
    summarise,
    trial_accuracy,
)
from mnist_optuna.rundir import (
    STAGING,
    command_line,
    publish_staged,
    source_version,
    write_json,
)
from mnist_optuna.studies import merged_study, rank
from mnist_optuna.tracking import publish, published_text
from mnist_optuna.training import (
    minutes,
    predict_logits,
    retrain_and_test,
    training_seconds,
)
from mnist_optuna.workers import FinalStageClaim, wait_for_others

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



class PlotStudies(NamedTuple):
    """The studies the plots draw: every study of the run, the chosen trial's, and the merged Pareto front's."""
    studies: list
    best: object = None
    front: object = None


def finish(args, outcome):
    """The ending both scripts share once their search stops (outcome.Outcome); returns the exit code.

    Wait until no other worker sharing the studies still trains a trial (all workers then see the same trials
    and choose alike), rank the candidates on validation (studies.rank: accuracy, or the Pareto front of several
    objectives within --pick-mmac; a --max-mmac lowered since the search rules trials out too), print and write
    the summary, then the final stage."""
    if not (outcome.interrupted or args.no_final):
        wait_for_others(outcome)
    ranked, front = rank(outcome)
    best, summary = summarise(outcome, ranked, front)
    outcome.run.phases.took("search", outcome.seconds())
    studies = [study for _, study in outcome.studies]
    plots = PlotStudies(studies, next((study for study in studies
                                       if best is not None and study.study_name == best.user_attrs.get("study")), None),
                        merged_study(studies, outcome.objectives)[0] if len(outcome.objectives) > 1 else None)
    return final_stage(FinalConfig.from_args(args, outcome.run.precision), outcome, ranked, summary, plots)


def final_stage(cfg, outcome, ranked, summary, plots):
    """After the summary; returns the exit code. `ranked`: the candidates, best first, as (key, trial) pairs.

    Interrupted: say how to resume (130). No candidate: nothing to retrain (1). Otherwise, unless
    --no-final: with --promote N, retrain the N best distinct trials like the final model and choose among
    them on validation; retrain the chosen network on train+validation, read the test set once, save
    model.pt and model.onnx (checked against PyTorch in ONNX Runtime); with --ensemble K, also retrain
    the next K - 1 distinct configurations of the (promoted, then search) ranking and report their
    averaged softmax. The stage's files reach the run folder together at its end (StagedFiles). Then the plots.
    """
    run, key_name, interrupted = outcome.run, outcome.key_name, outcome.interrupted
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
                summary, model, history, best = retrain_chosen(cfg, outcome, ranked, summary, staged)
                staged.publish()
        except BaseException:
            if stage:
                stage.release(None)  # another worker (or a rerun) takes the final stage over
            raise
    written = []
    if cfg.plots:
        from mnist_optuna.plots import write_plots

        clock = Stopwatch()
        written = write_plots(out_dir, *plots, final_history=history)
        run.phases.took("plots", clock.seconds())
        log.info(f"plots: {len(written)} PNG files in {out_dir / 'plots'}")
    if model is not None:
        files = [out_dir / name for name in ("model.pt", "model.onnx", "best_params.json")
                 if (out_dir / name).is_file()] + written
        summary["published"] = publish(run, best, summary, model, files)
        write_json(out_dir / "summary.json", summary)
        if stage:
            stage.release({**summary["published"], "out_dir": str(out_dir), "test_accuracy": summary["test_accuracy"]})
    print(run.phases.line())
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


def retrain_chosen(cfg, outcome, ranked, summary, staged):
    """Promotion (with --promote), the retrain of the chosen network, the test read once, ONNX, seed repeats and the
    ensemble, each file written to `staged` (StagedFiles); returns (summary with the results, the model, its
    training history, the chosen trial)."""
    run, key_name = outcome.run, outcome.key_name
    data = run.data
    label = cfg.label
    meta = {**outcome.meta, "command": command_line(), "source": source_version(), "mean": data.mean, "std": data.std,
            "training_data": data.fingerprint}
    key_of = {(trial.user_attrs.get("study"), trial.number): key for key, trial in ranked}
    ranking = [trial for _, trial in ranked]
    if cfg.promote > 1:
        clock = Stopwatch()
        promoted = promote(top_distinct(ranking, cfg.promote), data, cfg, run.out_dir, run.artifacts)
        run.phases.estimate("promotion", promoted["estimate"])
        run.phases.took("promotion", clock.seconds())
        summary["promotion"] = promoted["record"]
        ranking = promoted["ranking"] + ranking
    clock = Stopwatch()
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
        recipe = final_recipe(trial, cfg)
        info = {**meta, "val_accuracy": trial_accuracy(trial), "trial": trial.number, "repeat": repeat,
                "study": trial.user_attrs.get("study"), key_name: key(trial)}
        with progress(cfg.epochs, "final epochs", "epoch") as bar:
            return retrain_and_test(trial.user_attrs["model"], recipe, x, y, repeat_seed(trial, repeat), test,
                                    staged.path(name), info, on_epoch=lambda record: bar.update(1),
                                    background=data.background, tta=cfg.tta, store=run.artifacts)

    x, y = final_training_set(data, cfg.subset, best.user_attrs["seed"])
    others = top_distinct(ranking, cfg.ensemble)[1:]  # the ensemble's members after the chosen network
    repeats = cfg.seeds + len(others)
    estimate = sum(training_seconds(trial.user_attrs["model"], final_recipe(trial, cfg), run.device, len(y)) * times
                   for trial, times in [(best, cfg.seeds)] + [(trial, 1) for trial in others])
    log.info(f"\nretraining on {len(y)} train+validation images for {cfg.epochs} epochs{label} "
             f"on {describe_device(run.device)}, {cfg.precision}"
             f"{f', weights averaged over {cfg.ema:g} epochs' if cfg.ema else ''}: "
             f"{repeats} training{'s' if repeats > 1 else ''}, about {minutes(estimate)}")
    run.phases.estimate("final trainings", estimate)
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
    run.phases.took("final trainings", clock.seconds())  # (with the test read, ONNX and the ensemble's score)
    return summary, model, history, best



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


