"""Run ``deltatune train`` with one fault injected, for tests/test_fault_injection.py.

    python tests/fault_driver.py FAULT AT train ARGS...

The library has no test hooks: the driver wraps the functions a checkpoint save goes through
(``os.replace``, ``save_file``, ``shutil.rmtree``, ...) so that the process kills itself with SIGKILL
at one precise point, the way a power cut or the OOM killer would stop it. ``AT`` picks the
checkpoint step (or, for ``timer``, the milliseconds after training starts).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def truncate(path: str | Path) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def install(fault: str, at: int) -> None:
    import deltatune.checkpoint as checkpoint
    import deltatune.run_checkpoint as run_checkpoint
    import deltatune.train as train

    folder = f".checkpoint-{at}.tmp"
    real_replace, real_save_file, real_rmtree = os.replace, train.save_file, shutil.rmtree
    real_save_tensors, real_write = checkpoint.save_tensors, run_checkpoint.atomic_write_bytes

    if fault == "before-rename":  # every file of the checkpoint written, the folder not yet renamed

        def replace(src, dst, *args, **kwargs):
            if str(src).endswith(folder):
                die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif fault == "optimizer-write":  # half of the optimizer state on disk

        def save_file(tensors, path, metadata=None):
            real_save_file(tensors, path, metadata=metadata)
            if folder in str(path) and str(path).endswith("optimizer.safetensors"):
                truncate(path)
                die()

        train.save_file = save_file
    elif fault == "adapter-write":  # half of the checkpoint's adapter weights in their temporary file

        def save_tensors(tensors, path, metadata=None):
            if folder in str(path):
                real_save_tensors(tensors, str(path) + ".partial", metadata)
                truncate(str(path) + ".partial")
                die()
            return real_save_tensors(tensors, path, metadata)

        checkpoint.save_tensors = save_tensors
    elif fault in ("pointer", "pointer-rename"):  # the checkpoint in place, the pointer to it not yet

        def write(path, data):
            if Path(path).name == "checkpoint-latest" and data == f"checkpoint-{at}".encode():
                if fault == "pointer":
                    die()
                os.replace = lambda src, dst, *a, **k: die()  # its temporary file written, not renamed
            return real_write(path, data)

        run_checkpoint.atomic_write_bytes = write
    elif fault == "rotation":  # the old checkpoint half deleted

        def rmtree(path, *args, **kwargs):
            target = Path(path)
            if target.name.startswith("checkpoint-") and target.name != f"checkpoint-{at}" and target.is_dir():
                next(p for p in target.rglob("*") if p.is_file()).unlink()
                die()
            return real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    elif fault == "metrics-line":  # a log line cut in half
        real_log = train.Trainer._log

        def log(self, record):
            if record.get("step") == at and "split" not in record:
                with open(self.args.output / "metrics.jsonl", "a") as fh:
                    fh.write(f'{{"step": {at}, "loss": 0.')
                die()
            return real_log(self, record)

        train.Trainer._log = log
    elif fault == "mid-step":  # the optimizer has updated the weights; the step is not counted yet
        real_step = train.Trainer.train_step

        def train_step(self):
            if self.step + 1 == at:
                self.scaler.step = lambda optimizer: (optimizer.step(), die())
            return real_step(self)

        train.Trainer.train_step = train_step
    elif fault == "export":  # the final adapter's weights written, its config not yet

        def save_tensors(tensors, path, metadata=None):
            real_save_tensors(tensors, path, metadata)
            if Path(path).parent.name == "adapter":
                die()

        checkpoint.save_tensors = save_tensors
    elif fault == "timer":
        real_fit = train.Trainer.fit

        def fit(self):
            threading.Timer(at / 1000, die).start()
            return real_fit(self)

        train.Trainer.fit = fit
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    from deltatune.cli import main

    main(sys.argv[3:])
