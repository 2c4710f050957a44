"""What a person sees of a run: a progress bar, a log file, TensorBoard scalars and images."""
from __future__ import annotations

import logging
import pathlib
import sys
import time

import numpy as np
from tqdm import tqdm

log = logging.getLogger('jaxdiff')

# `log.info(..., extra=FILE_ONLY)`: a line for log.txt alone, e.g. the periodic loss and images/s,
# which the console shows in the progress bar instead.
FILE_ONLY = {'file_only': True}


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, 'file_only', False)


def setup_logging(workdir: pathlib.Path, is_main: bool = True) -> None:
    """Log INFO to stderr and to workdir/log.txt (main process only); records logged with
    `extra=FILE_ONLY` go to log.txt only."""
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter('%(asctime)s %(levelname)s %(message)s', '%H:%M:%S')
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.addFilter(_not_file_only)
    log.addHandler(console)
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(workdir / 'log.txt')
        file.setFormatter(fmt)
        log.addHandler(file)
    log.propagate = False


class Writer:
    """TensorBoard scalars and images (tensorboardX), written by the main process only."""

    def __init__(self, logdir: pathlib.Path, enabled: bool = True):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(str(logdir))

    def scalars(self, step: int, values: dict) -> None:
        if self._writer:
            for name, value in values.items():
                self._writer.add_scalar(name, float(value), step)

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """image: HWC uint8 (or HW)."""
        if self._writer:
            image = image if image.ndim == 3 else image[..., None]
            self._writer.add_image(name, image, step, dataformats='HWC')

    def flush(self) -> None:
        if self._writer:
            self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()


class Progress:
    """A tqdm bar over training steps (with its ETA) showing the loss and images/s.

    `advance` is called every step (cheap: tqdm redraws at most once a second); `report` at
    logging steps measures images/s since the previous report, excluding time spent in
    compilation, checkpointing or sampling (call `reset_clock` after those).
    """

    def __init__(self, total_steps: int, start_step: int, batch_size: int, enabled: bool = True):
        self.batch_size = batch_size
        self.bar = tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
                        disable=not enabled, smoothing=0.05, mininterval=1.0)
        self._step = start_step
        self._clock_step, self._clock_time = start_step, time.perf_counter()

    def advance(self, step: int) -> None:
        self.bar.update(step - self._step)
        self._step = step

    def report(self, metrics: dict) -> float:
        """Show `metrics['loss']` and images/s since the last report; returns images/s."""
        now = time.perf_counter()
        rate = (self._step - self._clock_step) * self.batch_size / max(now - self._clock_time, 1e-9)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f'{rate:.0f}')
        self._clock_step, self._clock_time = self._step, now
        return rate

    def reset_clock(self) -> None:
        self._clock_step, self._clock_time = self._step, time.perf_counter()

    def close(self) -> None:
        self.bar.close()
