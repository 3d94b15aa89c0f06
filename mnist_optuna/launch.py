"""`python -m mnist_optuna workers N -- python MNIST-optuna.py --storage S ...`: N workers of either script on one
machine against one storage, each in its own run folder: one per visible GPU (CUDA_VISIBLE_DEVICES set per worker),
or on a CPU the cores divided between them (OMP_NUM_THREADS). A worker that dies is started again a bounded number of
times (it resumes its own run folder); Ctrl-C or SIGTERM stops them all, each keeping what it finished; the end says
which worker ran the final stage and where its results are."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from errors import UserError
from mnist_optuna.cli import Parser, nonneg_int, positive_int

STOPPED = (130, 143, -signal.SIGINT, -signal.SIGTERM)  # the exit of a worker that was asked to stop


def visible_gpus():
    """The GPUs this machine lets a process use: CUDA_VISIBLE_DEVICES when it is set, else every CUDA device."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def placements(n, gpus, cores):
    """The environment of each of n workers: one GPU each (round robin when there are more workers than GPUs), or
    without a GPU an equal share of the cores (at least one thread) and no GPU visible."""
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": gpus[k % len(gpus)]} for k in range(n)]
    return [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(max(1, cores // n))} for _ in range(n)]


def parse(argv):
    """(the launcher's settings, the worker command) from `N [options] -- COMMAND`."""
    if "--" not in argv:
        raise UserError("give the worker command after --, e.g. python -m mnist_optuna workers 4 -- python "
                        "MNIST-optuna.py --storage study.journal")
    split = argv.index("--")
    parser = Parser(__doc__)
    parser.prog = "python -m mnist_optuna workers"
    parser.add_argument("n", type=positive_int, help="how many workers")
    parser.add_argument("--restarts", type=nonneg_int, default=2, help="times a worker that died is started again")
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    if not command:
        raise UserError("the worker command after -- is empty; e.g. -- python MNIST-optuna.py --storage study.journal")
    if "--storage" not in command:
        raise UserError("workers share one study only through one storage: add --storage PATH (a journal file on this "
                        "machine) or --storage postgresql://... to the worker command")
    return args, command


def worker_folders(command, n):
    """(the command without --out-dir, the run folder of each worker: OUT_DIR/worker-K, OUT_DIR the command's own
    --out-dir or a new runs/workers-<time>)."""
    command = list(command)
    if "--out-dir" in command:
        at = command.index("--out-dir")
        if at + 1 >= len(command):
            raise UserError("--out-dir in the worker command needs a folder")
        base = Path(command[at + 1])
        del command[at:at + 2]
    else:
        base = Path("runs") / time.strftime("workers-%Y%m%d-%H%M%S")
    return command, [base / f"worker-{k}" for k in range(n)]


class Worker:
    def __init__(self, number, command, folder, env):
        self.number, self.command, self.folder, self.env = number, command, folder, env
        self.process, self.starts, self.code = None, 0, None

    @property
    def log(self):
        """Beside the run folder, not in it: the script makes its folder itself (and refuses one it did not make)."""
        return self.folder.with_name(f"{self.folder.name}.log")

    def start(self):
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log, "a")
        self.process = subprocess.Popen([*self.command, "--out-dir", str(self.folder)], stdout=log,
                                        stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                        start_new_session=True)  # Ctrl-C at the terminal reaches the launcher only
        log.close()
        self.starts += 1

    def stop(self, signal_number=signal.SIGINT):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal_number)


def supervise(workers, restarts, stopping, poll_seconds=0.5):
    """Wait for every worker; start one that died again (at most `restarts` times, never once `stopping()`). Returns
    when all have ended."""
    while True:
        running = False
        for worker in workers:
            code = worker.process.poll()
            if code is None:
                running = True
            elif worker.code is None:
                if code in (0, *STOPPED) or worker.starts > restarts or stopping():
                    worker.code = code
                    if code not in (0, *STOPPED):
                        print(f"worker {worker.number} ended with exit code {code} after {worker.starts} start(s); "
                              f"its log: {worker.log}", flush=True)
                else:
                    print(f"worker {worker.number} ended with exit code {code}; starting it again "
                          f"(start {worker.starts + 1} of {restarts + 1}), it resumes its run folder", flush=True)
                    worker.start()
                    running = True
        if not running:
            return
        time.sleep(poll_seconds)


def final_stage_of(workers):
    """(the worker that ran the final stage, its summary.json), or (None, None)."""
    for worker in workers:
        path = worker.folder / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if "test_accuracy" in summary and not summary.get("final_stage_by"):
            return worker, summary
    return None, None


def main(argv):
    args, command = parse(argv)
    command, folders = worker_folders(command, args.n)
    gpus = visible_gpus()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    envs = placements(args.n, gpus, cores)
    where = (f"{len(gpus)} GPU(s): " + ", ".join(f"worker {k} on GPU {env['CUDA_VISIBLE_DEVICES']}"
                                                for k, env in enumerate(envs))) if gpus else \
        f"no GPU: {cores} cores, {envs[0]['OMP_NUM_THREADS']} thread(s) per worker"
    print(f"{args.n} workers of: {shlex.join(command)}\n{where}\nrun folders: {folders[0].parent}/worker-0..{args.n - 1}"
          " (logs beside them: worker-K.log)", flush=True)
    workers = [Worker(k, command, folder, env) for k, (folder, env) in enumerate(zip(folders, envs))]
    stop = {"signal": None}

    def on_stop(number, frame):  # the first stop lets each worker record its trial; a second one kills them
        for worker in workers:
            worker.stop(signal.SIGINT if stop["signal"] is None else signal.SIGKILL)
        stop["signal"] = stop["signal"] or number
    previous = {number: signal.signal(number, on_stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        for worker in workers:
            worker.start()
        supervise(workers, args.restarts, lambda: stop["signal"] is not None)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if stop["signal"]:
        print("stopped: every worker kept what it finished; run the same command again to resume", flush=True)
        return 130 if stop["signal"] == signal.SIGINT else 143
    failed = [worker for worker in workers if worker.code not in (0, *STOPPED)]
    chosen, summary = final_stage_of(workers)
    if chosen is not None:
        print(f"final stage: worker {chosen.number}, test accuracy {100 * summary['test_accuracy']:.2f} %; results in "
              f"{chosen.folder}", flush=True)
    else:
        print("no worker ran a final stage (--no-final, or the workers failed: see their worker-K.log)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
