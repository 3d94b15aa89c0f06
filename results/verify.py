"""Retrain a shipped checkpoint through the command it records and compare the weights bit for bit.

    python results/verify.py results/shipped/single-0.pt      # what `bash results/pipeline.sh verify` runs

The command runs again as recorded (the same choice from the same journal, the same recipe and seed) with three
changes that leave the training alone: a scratch --out-dir holding a copy of the step's config.json and
promotion.json (the promotion's validation scores are reused, not retrained), a copy of the journal as --storage
(the study is not touched), and only as many seed repeats as the checkpoint's own. The torch thread count is set
to the checkpoint's (recorded since 2026-12-03; set OMP_NUM_THREADS yourself for older ones): a CPU's
reductions split differently over threads. For a seed repeat k, the step's own checkpoints of repeats 0..k-1 are
reused where they exist, so only repeat k trains. Exit 0 when every tensor of the state_dict is identical.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from errors import UserError
from mnist_optuna.checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def threads(count):
    return f"{count} thread" if str(count) == "1" else f"{count} threads"


def fail(message):
    print(f"verify: {message}", file=sys.stderr)
    sys.exit(2)


# replaced by the replay's own, or dropped: a replay trains one network and publishes nowhere (no MLflow run, no file
# in the team's artifact store)
REPLACED = ("--out-dir", "--storage", "--final-seeds", "--ensemble", "--mlflow", "--artifacts")
SCRIPTS = ("MNIST-optuna.py", "MNIST-optuna-adv.py")


def replay_command(words, out_dir, storage, seeds):
    """The recorded command's words with --out-dir, --storage and --final-seeds replaced, --ensemble, --mlflow and
    --artifacts dropped."""
    replaced, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word.split("=", 1)[0] in REPLACED:
            skip = "=" not in word  # `--flag value` takes the next word along, `--flag=value` does not
        else:
            replaced.append(word)
    return replaced + ["--out-dir", str(out_dir), "--storage", str(storage), "--final-seeds", str(seeds)]


def flag_value(words, flag):
    """The value a recorded command's words give `flag` (as `--flag value` or `--flag=value`), or None."""
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def settings_problem(script, flags):
    """Why `flags` are not settings of `script` (its own parser's words), or None."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location(script.stem.replace("-", "_"), script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = module.build_parser().parse_args(flags)
    except SystemExit:
        return errors.getvalue().strip().splitlines()[-1] if errors.getvalue().strip() else "not its flags"
    if getattr(args, "evaluate", None):
        return "--evaluate trains nothing"
    return None


def main(path):
    try:
        _, payload = load_checkpoint(path)
    except UserError as error:
        fail(f"{error}, such as a file of results/shipped/")
    meta = payload.get("meta", {})
    repeat = meta.get("repeat", 0)
    words = shlex.split(meta.get("command", ""))
    if len(words) < 2 or Path(words[1]).name not in SCRIPTS:
        fail(f"{path} records no command of this project's scripts to replay")
    # this project's own script, whatever folder the record names (a checkpoint never chooses the code that runs),
    # with the recorded settings checked by that script's own parser first
    script = ROOT / Path(words[1]).name
    problem = settings_problem(script, words[2:])
    if problem:
        fail(f"{path}'s recorded command does not parse as {script.name}'s settings ({problem}); nothing was run")
    out_dir, storage = flag_value(words, "--out-dir"), flag_value(words, "--storage")
    if out_dir is None or storage is None or not (ROOT / storage).is_file():
        fail(f"{path}'s command names no run folder or journal here ({out_dir}, {storage})")
    try:
        chosen = json.loads((ROOT / out_dir / "best_params.json").read_text())
    except (OSError, ValueError):
        fail(f"{out_dir}/best_params.json (the step's choice) is missing; run its step of results/pipeline.sh first")
    if (chosen.get("trial"), chosen.get("study_seed")) != (meta.get("trial"), meta.get("study_seed")):
        fail(f"{path} is an ensemble member, not the network {out_dir} chose; only the chosen network and its "
             "seed repeats can be replayed")
    scratch = Path(tempfile.mkdtemp(prefix="verify-"))
    # the step's folder and the checkpoints of the repeats before this one (the replay reuses those and trains only
    # this checkpoint's; each repeat starts from its own seed, so they do not change it)
    earlier = ["model.pt"] + [f"seed-{k}.pt" for k in range(1, repeat)] if repeat else []
    copied = [name for name in ["config.json", "promotion.json"] + earlier if (ROOT / out_dir / name).is_file()]
    for name in copied:
        shutil.copy2(ROOT / out_dir / name, scratch / name)
    shutil.copy2(ROOT / storage, scratch / "study.journal")
    argv = replay_command(words, scratch, scratch / "study.journal", repeat + 1)
    env = dict(os.environ)
    if "threads" in meta:
        env["OMP_NUM_THREADS"] = str(meta["threads"])
    trained, now = meta.get("threads", "an unrecorded number of"), env.get("OMP_NUM_THREADS", "torch's default")
    print(f"verify: replaying {path} (repeat {repeat}, seed {meta.get('seed')}, trained with {threads(trained)}; "
          f"this run: {threads(now)})\n  {shlex.join(argv)}"
          + "".join(f"\n  reusing {out_dir}/{name} (an earlier repeat)" for name in earlier if name in copied), flush=True)
    done = subprocess.run([sys.executable, str(script), *argv[2:]], cwd=ROOT, env=env)
    retrained = scratch / ("model.pt" if repeat == 0 else f"seed-{repeat}.pt")
    if done.returncode != 0 or not retrained.is_file():
        fail(f"the replay ended with exit code {done.returncode}; its files are in {scratch}")
    ours = payload["state_dict"]
    _, replayed = load_checkpoint(retrained)
    again = replayed["state_dict"]
    differ = [name for name in ours if name not in again or not torch.equal(ours[name], again[name])]
    if set(again) != set(ours) or differ:
        print(f"verify: {path} NOT reproduced: {len(differ)} of {len(ours)} tensors differ "
              f"({', '.join(differ[:5])}); the replay is in {scratch}")
        return 1
    print(f"verify: {path} reproduced bit for bit ({len(ours)} tensors identical, torch.equal); "
          f"retrained in {replayed['meta']['train_seconds']:.0f} s")
    shutil.rmtree(scratch)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        fail("usage: python results/verify.py results/shipped/single-0.pt")
    sys.exit(main(sys.argv[1]))
