"""The app's trainings: a queue per device, one training at a time on each, shared by every browser.

A job is an :class:`esd.train.config.ESDConfig`, checked when it is queued (so a bad setting is refused at once,
one line, before it waits), then trained by :class:`esd.train.recipe.ESDTrainer` exactly as ``esd train`` trains
it, into the same run folder (args.json, loss.csv, weights, model card). Its progress (iteration, losses) is
read by the page while it trains; cancelling it stops the loop after the current iteration and leaves
``checkpoints/checkpoint-<iteration>.pt``, which the app's Resume and ``esd train --resume`` continue.
"""

import itertools
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from esd.formats.records import error_summary
from esd.train.config import ESDConfig
from esd.train.recipe import ESDTrainer
from esd.train.run_folder import check_output_dir, read_resume_state

QUEUED, RUNNING, DONE, CANCELLED, FAILED = "queued", "running", "done", "cancelled", "failed"


@dataclass
class TrainingJob:
    id: int
    config: ESDConfig
    device: str
    state: str = QUEUED
    iteration: int = 0  # iterations done (a resumed run starts at its checkpoint's)
    start_iteration: int = 0
    losses: list = field(default_factory=list)  # (iteration, loss)
    message: str = ""  # the outcome, one line
    checkpoint: Path | None = None  # where a cancelled job left its checkpoint
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    seconds: float = 0.0  # of training, as esd train reports it
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def total(self) -> int:
        return self.config.iterations

    @property
    def run_dir(self) -> Path:
        return Path(self.config.save_path) / self.config.run_name

    @property
    def finished(self) -> bool:
        return self.state in (DONE, CANCELLED, FAILED)


class TrainingQueue:
    """Jobs in order of arrival; one worker thread per device takes the next job queued for its device."""

    def __init__(self, devices: tuple[str, ...] = ("cpu",), train=None, on_finish=None):
        self.devices = tuple(devices)
        self._train = train or train_job  # the tests may pass their own
        self._on_finish = on_finish  # called with each job once it has finished (the runs listing is stale)
        self._jobs: dict[int, TrainingJob] = {}
        self._waiting: dict[str, deque] = {d: deque() for d in self.devices}
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._workers = [threading.Thread(target=self._work, args=(d,), daemon=True, name=f"esd-train-{d}")
                         for d in self.devices]
        for w in self._workers:
            w.start()

    def submit(self, config: ESDConfig) -> TrainingJob:
        """Queue ``config`` on the device with the fewest jobs waiting or running. Refused at once (one line), not
        when its turn comes: a run folder that holds a run or that a queued or running job will write (two
        trainings never write one folder), and a checkpoint to resume whose settings differ."""
        check_output_dir(Path(config.save_path) / config.run_name, config)
        if config.resume:
            read_resume_state(config)
        with self._lock:
            busy = {j.run_dir.resolve() for j in self._jobs.values() if not j.finished}
            folder = (Path(config.save_path) / config.run_name).resolve()
            if folder in busy:
                raise ValueError(f"run {config.run_name!r} is already queued or training; wait for it or choose "
                                 "another name")
            device = min(self.devices, key=lambda d: len(self._waiting[d]) + self._running(d))
            config.devices = device
            job = TrainingJob(next(self._ids), config, device)
            self._jobs[job.id] = job
            self._waiting[device].append(job)
            self._lock.notify_all()
        return job

    def _running(self, device: str) -> int:
        return sum(j.state == RUNNING and j.device == device for j in self._jobs.values())

    def place(self, job: TrainingJob) -> int:
        """1 for the next job to start on its device, 0 once it runs or has finished."""
        with self._lock:
            waiting = list(self._waiting[job.device])
        return waiting.index(job) + 1 if job in waiting else 0

    def cancel(self, job_id: int) -> TrainingJob:
        with self._lock:
            job = self.get(job_id)
            if job.state == QUEUED:  # never started: nothing was written
                self._waiting[job.device].remove(job)
                job.state, job.message, job.finished_at = CANCELLED, "cancelled before it started", time.time()
            elif job.state == RUNNING:
                job.cancel.set()  # the loop stops after this iteration and writes a checkpoint
        return job

    def get(self, job_id: int) -> TrainingJob:
        try:
            return self._jobs[int(job_id)]
        except (KeyError, ValueError, TypeError):
            raise ValueError(f"no training job {job_id!r} in this app") from None

    def jobs(self) -> list[TrainingJob]:
        with self._lock:
            return list(self._jobs.values())

    def wait(self, job: TrainingJob, timeout: float | None = None) -> bool:
        """Until ``job`` has finished (for the tests and scripts); False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not job.finished:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left if left is None else min(left, 0.5))
        return True

    def _work(self, device: str) -> None:
        while True:
            with self._lock:
                while not self._waiting[device]:
                    self._lock.wait()
                job = self._waiting[device].popleft()
                job.state, job.started_at, job.message = RUNNING, time.time(), "loading the model"
            try:
                outcome = self._train(job) or (FAILED, "the training ended without an outcome")
            except BaseException as e:  # noqa: BLE001 - any failure is the job's outcome, and the queue goes on
                if not isinstance(e, (ValueError, OSError)):  # a bug, not an input: the operator's log gets it
                    traceback.print_exc(file=sys.stderr)
                outcome = (FAILED, error_summary(e))
            if self._on_finish is not None:  # first: whoever sees the job finished sees its run listed
                try:
                    self._on_finish(job)
                except Exception:  # noqa: BLE001 - the queue goes on
                    traceback.print_exc(file=sys.stderr)
            with self._lock:
                job.state, job.message = outcome
                job.finished_at = time.time()
                self._lock.notify_all()


def train_job(job: TrainingJob) -> tuple[str, str]:
    """Train ``job`` as ``esd train`` would, reporting each iteration to the job and stopping when it is
    cancelled (a checkpoint is left); on success the run folder holds everything esd train writes. Returns the
    outcome (state, message), which the queue sets once the run is listed."""
    trainer = ESDTrainer(job.config)
    trainer.setup()
    job.start_iteration = job.iteration = trainer.start_iteration
    job.losses = [(h["iteration"], h["loss"]) for h in trainer.history]
    if job.cancel.is_set():  # cancelled while the model loaded: nothing was trained or written
        trainer.release()
        return CANCELLED, "cancelled before training started"
    job.message = ""

    def progress(record: dict) -> bool:
        job.iteration = record["iteration"]
        job.losses.append((record["iteration"], record["loss"]))
        return job.cancel.is_set()

    try:
        result = trainer.train(callback=progress)
        job.seconds = result.seconds
        if result.checkpoint is not None:
            job.checkpoint = result.checkpoint
            return CANCELLED, (f"cancelled at iteration {job.iteration} of {job.total}; resumable from "
                               f"{result.checkpoint.name}")
        trainer.save(result)
    finally:
        trainer.release()
    return DONE, f"done: {job.total} iterations in {result.seconds:.1f} s, saved to {job.run_dir.name}"
