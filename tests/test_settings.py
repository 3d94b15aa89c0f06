"""A study's identity: which settings are flags and which define a study (each script's blocks), and every rerun
that would answer another question - another space, recipe, data, backbone or grid - refused in one line, while
the committed studies resume."""
import json
import shutil

import optuna
import pytest
import torch

from conftest import ROOT, SEARCH, TINY_ADV, assert_one_line_error, journal_storage, load_script, study_trials
from data import CANONICAL_FINGERPRINT
from errors import UserError
from mnist_optuna import storages
from mnist_optuna.settings import search_settings


def script_copy(tmp_path, name, after, line, tail=""):
    """The script `name`, copied with `line` added after the line that starts with `after` (and `tail` at its
    end), loaded as a module."""
    import importlib.util

    text = (ROOT / name).read_text()
    anchor = next(row for row in text.splitlines() if row.startswith(after))
    assert text.count(anchor) == 1
    path = tmp_path / name
    path.write_text(text.replace(anchor, f"{anchor}\n{line}") + tail)
    spec = importlib.util.spec_from_file_location("copied_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def settings_of(script, **resolved):
    """A function of flags: the search settings a --quick run of `script` (a loaded script module) with those flags
    records; `resolved`: what --backbone resolved to."""
    def settings(*flags):
        args = script.build_parser().parse_with_preset(["--quick", *flags], "--quick", script.QUICK)
        return search_settings(args, training_data="x", **resolved)
    return settings


@pytest.mark.parametrize("name, block", [("MNIST-optuna.py", "# ---- data of the trials"),
                                         ("MNIST-optuna-adv.py", "# ---- training (optimization")])
def test_a_constant_added_to_the_search_block_defines_the_study_with_no_other_edit(tmp_path, name, block):
    script = script_copy(tmp_path, name, block, "NEW_KNOB = 7                  # a setting added by the test")

    settings = settings_of(script, network=None)

    assert settings()["new_knob"] == 7
    storage = optuna.storages.InMemoryStorage()
    study = storages.open_study("s", storage, None, None, settings())
    assert study.user_attrs["search"]["new_knob"] == 7
    with pytest.raises(UserError, match="--new-knob 7, this run asks for 8"):
        storages.open_study("s", storage, None, None, settings("--new-knob", "8"))


@pytest.mark.parametrize("name", ["MNIST-optuna.py", "MNIST-optuna-adv.py"])
def test_a_run_constant_is_a_flag_outside_the_identity_and_a_constant_past_the_blocks_is_no_flag(tmp_path, name):
    script = script_copy(tmp_path, name, "# ---- where and how it runs", "RUN_KNOB = 3  # a run setting",
                         tail="\nTABLE_OF_THINGS = 1  # past the blocks\n")
    parser = script.build_parser()
    args = parser.parse_with_preset(["--run-knob", "4"], "--quick", script.QUICK)
    assert args.run_knob == 4 and "run_knob" not in search_settings(args)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--table-of-things", "1"])
    assert exited.value.code == 2
    assert "table_of_things" not in vars(args) and "quick" not in args.search_keys
    if name == "MNIST-optuna-adv.py":
        assert "renamed" not in vars(args)  # the table of renamed settings is no flag


def committed_studies():
    found = []
    for journal in sorted(ROOT.glob("results/*/study.journal")):
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        found += [(journal, summary.study_name) for summary in optuna.get_all_study_summaries(storage)]
    return found


@pytest.mark.parametrize("journal, study_name", committed_studies(), ids=lambda value: str(value).split("results/")[-1])
def test_the_committed_studies_resume_with_their_own_settings_and_refuse_a_changed_one(tmp_path, journal, study_name):
    copy = tmp_path / "study.journal"
    shutil.copyfile(journal, copy)
    config = json.loads((journal.parent / "config.json").read_text())
    script = load_script("MNIST-optuna.py")
    args = script.build_parser().parse_args([])
    for key, value in config.items():
        if key in vars(args):
            setattr(args, key, tuple(value) if isinstance(getattr(args, key), tuple) else value)
    network = json.loads((ROOT / config["backbone"]).read_text())["model"] if config.get("stage") == "optim" else None

    def open_it(**changed):
        for key, value in changed.items():
            setattr(args, key, value)
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(copy)))
        search = search_settings(args, network=network, training_data=CANONICAL_FINGERPRINT)
        return storages.open_study(study_name, storage, None, None, search, objectives=args.objectives)

    open_it()  # resumes
    if network is None:  # a stage-2 study from before settings were recorded can tell none from its trials
        with pytest.raises(UserError, match="--lr"):
            open_it(lr=args.lr * 2)


def test_the_grid_study_refuses_a_rerun_with_another_grid_grid_seed_or_head():
    script = load_script("MNIST-optuna-adv.py")

    settings = settings_of(script, backbone=[])

    storage = optuna.storages.InMemoryStorage()
    storages.open_study("grid", storage, None, None, settings())
    for flags in (["--fc-depths", "1"], ["--fc-widths", "32,64", "16"], ["--seed", "1"], ["--head-dropout", "0.3"],
                  ["--conv-blocks", '[{"channels": 8, "kernel": 3, "pool": true}]']):
        with pytest.raises(UserError, match=flags[0]):
            storages.open_study("grid", storage, None, None, settings(*flags))
    storages.open_study("grid", storage, None, None, settings("--final-epochs", "3", "--ensemble", "2"))


def trained(journal):
    return [t for t in study_trials(journal) if t.state.name in ("COMPLETE", "PRUNED")
            and not str(t.user_attrs.get("reason", "")).startswith(("over budget", "same configuration"))]


def own_mnist(tmp_path, data_dir):
    """A copy of MNIST whose training label file can be changed in place (the other files linked)."""
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (data_dir / "MNIST" / "raw").iterdir():
        if path.name == "train-labels-idx1-ubyte":
            (raw / path.name).write_bytes(path.read_bytes())
        else:
            (raw / path.name).symlink_to(path)
    return tmp_path / "mnist", raw / "train-labels-idx1-ubyte"


def test_a_rerun_that_changes_the_search_is_refused(run_here, tmp_path):
    out = tmp_path / "run"
    assert run_here("MNIST-optuna.py", *SEARCH, "--no-final", "--out-dir", out).returncode == 0
    before, rows = len(trained(out / "study.journal")), len(study_trials(out / "study.journal"))

    changed = run_here("MNIST-optuna.py", *SEARCH, "--no-final", "--conv-filters", "4", "12", "4", "--out-dir", out)
    line = assert_one_line_error(changed)
    assert "--conv-filters 4 8 4" in line and "4 12 4" in line and "--out-dir" in line
    assert len(study_trials(out / "study.journal")) == rows  # nothing was added to the old study

    # settings of the final stage do not change the search: allowed, and nothing is searched again
    final = run_here("MNIST-optuna.py", *SEARCH, "--final-epochs", "2", "--promote", "0", "--out-dir", out)
    assert final.returncode == 0, final.stderr
    assert len(study_trials(out / "study.journal")) == rows
    # explicit consent continues the study with the new settings
    anyway = run_here("MNIST-optuna.py", *SEARCH, "--no-final", "--n-trials", "3", "--lr", "1e-3",
                        "--resume-anyway", "--out-dir", out)
    assert anyway.returncode == 0, anyway.stderr
    assert len(trained(out / "study.journal")) == before + 1


def test_an_adv_rerun_with_another_backbone_is_refused(run_here, tmp_path):
    out = tmp_path / "run"
    grid = ["--fc-depths", "1", "--fc-widths", "8,16", "--no-plots"]
    assert run_here("MNIST-optuna-adv.py", *TINY_ADV, *grid, "--out-dir", out).returncode == 0
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": {"conv": [{"channels": 6, "kernel": 3, "pool": True}], "fc": []}}))
    result = run_here("MNIST-optuna-adv.py", *TINY_ADV[:-2], "--backbone", other, *grid, "--out-dir", out)
    assert "--backbone" in assert_one_line_error(result)


def test_other_training_data_in_a_finished_folder_is_never_answered_with_the_old_results(run_here, tmp_path, data_dir):
    mnist, labels = own_mnist(tmp_path, data_dir)
    out = tmp_path / "run"
    command = ["MNIST-optuna.py", *SEARCH, "--promote", "2", "--promote-epochs", "1", "--data-dir", mnist,
               "--out-dir", out]
    first = run_here(*command)
    assert first.returncode == 0, first.stderr
    trials, scores = study_trials(out / "study.journal"), json.loads((out / "promotion.json").read_text())
    old = torch.load(out / "model.pt", weights_only=True)["meta"]
    content = bytearray(labels.read_bytes())  # valid MNIST labels still, but other ones: each shifted by one class
    content[8:] = bytes((label + 1) % 10 for label in content[8:])
    labels.write_bytes(bytes(content))

    again = run_here(*command)
    lines = again.stderr.strip().splitlines()  # the warning that these are not canonical MNIST files, the error
    assert again.returncode == 2 and len(lines) == 2 and "Traceback" not in again.stderr
    assert "training files" in lines[-1] and "--resume-anyway" in lines[-1]
    assert len(study_trials(out / "study.journal")) == len(trials)  # nothing lost, nothing added
    # with consent the study goes on, but nothing trained on the old files is taken for the new ones
    anyway = run_here(*command, "--resume-anyway")
    assert anyway.returncode == 0, anyway.stderr
    assert len(json.loads((out / "promotion.json").read_text())) == 2 * len(scores)  # scored again
    new = torch.load(out / "model.pt", weights_only=True)["meta"]
    assert new["training_data"] != old["training_data"] and new["train_seconds"] != old["train_seconds"]


def test_a_study_without_a_settings_record_takes_only_the_settings_its_trials_were_trained_with(run_here, tmp_path):
    out = tmp_path / "run"
    assert run_here("MNIST-optuna.py", *SEARCH, "--no-final", "--out-dir", out).returncode == 0
    storage = journal_storage(out / "study.journal")
    optuna.load_study(study_name="mnist-cnn-seed0", storage=storage).set_user_attr("search", None)  # as before

    mistaken = run_here("MNIST-optuna.py", *SEARCH, "--no-final", "--epochs", "2", "--out-dir", out)
    assert "--epochs 1" in assert_one_line_error(mistaken)
    assert optuna.load_study(study_name="mnist-cnn-seed0", storage=storage).user_attrs["search"] is None
    own = run_here("MNIST-optuna.py", *SEARCH, "--no-final", "--out-dir", out)  # its own command is not refused
    assert own.returncode == 0, own.stderr
    assert optuna.load_study(study_name="mnist-cnn-seed0", storage=storage).user_attrs["search"]["epochs"] == 1


def test_resume_anyway_with_another_backbone_is_refused_once_heads_were_trained(run_here, tmp_path):
    out = tmp_path / "run"
    grid = ["--fc-depths", "1", "--fc-widths", "8,16", "--no-plots", "--out-dir", out]
    assert run_here("MNIST-optuna-adv.py", *TINY_ADV, *grid).returncode == 0
    model = (out / "model.pt").read_bytes()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": {"conv": [{"channels": 6, "kernel": 3, "pool": True}], "fc": []}}))
    result = run_here("MNIST-optuna-adv.py", *TINY_ADV[:-2], "--backbone", other, *grid, "--resume-anyway")
    line = assert_one_line_error(result)
    assert "--backbone" in line and "not even --resume-anyway" in line
    assert (out / "model.pt").read_bytes() == model


def test_promise_a_study_refuses_a_rerun_that_changes_its_data_or_recipe(tmp_path):
    script = load_script("MNIST-optuna.py")

    settings = settings_of(script, network=None)

    storage = optuna.storages.InMemoryStorage()
    storages.open_study("s", storage, None, None, settings())
    changed = {"--lr": "1e-4", "--epochs": "3", "--batch-size": "32", "--optimizer": "sgd", "--weight-decay": "0.1",
               "--l1": "1e-4", "--label-smoothing": "0.2", "--schedule": "cosine", "--val-size": "700",
               "--train-subset": "900", "--split-seed": "5", "--augment": None}
    for flag, value in changed.items():
        flags = [flag] if value is None else [flag, value]
        with pytest.raises(UserError, match=flag):
            storages.open_study("s", storage, None, None, settings(*flags))
    storages.open_study("s", storage, None, None, settings("--final-epochs", "3", "--promote", "4"))  # not the search


def test_promise_a_grid_study_recorded_under_the_old_dropout_name_resumes_under_head_dropout():
    # the head grid's fixed dropout was DROPOUT, a range in the other script; studies that recorded it as
    # "dropout" resume under --head-dropout, and a changed value is still refused under its new name
    script = load_script("MNIST-optuna-adv.py")

    settings = settings_of(script, backbone=[])

    storage = optuna.storages.InMemoryStorage()
    study = storages.open_study("grid", storage, None, None, settings())
    old = dict(study.user_attrs["search"])
    old["dropout"] = old.pop("head_dropout")
    study.set_user_attr("search", old)
    storages.open_study("grid", storage, None, None, settings())
    assert "head_dropout" in study.user_attrs["search"] and "dropout" not in study.user_attrs["search"]
    study.set_user_attr("search", old)
    with pytest.raises(UserError, match="--head-dropout 0.2, this run asks for 0.3"):
        storages.open_study("grid", storage, None, None, settings("--head-dropout", "0.3"))
    # the other script's DROPOUT is a range of its own: its studies' "dropout" is never read as --head-dropout
    main = settings_of(load_script("MNIST-optuna.py"), network=None)
    study = storages.open_study("cnn", storage, None, None, main())
    storages.open_study("cnn", storage, None, None, main())
    assert study.user_attrs["search"]["dropout"] == [0.0, 0.5] and "head_dropout" not in study.user_attrs["search"]
    with pytest.raises(UserError, match="--dropout 0.0 0.5, this run asks for 0.0 0.3"):
        storages.open_study("cnn", storage, None, None, main("--dropout", "0.0", "0.3"))
