"""The launcher's three modes: train (resumable), sample, eval. `launch.py` parses flags and calls
these; everything here is orchestration of the pure pieces in the other modules.

A work directory holds:

  config.json         the run's config (also saved beside each checkpoint)
  log.txt             the log
  checkpoints/<step>  orbax checkpoints (train state, data-iterator position, config)
  samples/            samples_<step>.npz (uint8 NHWC under `images`, `labels`), grid_<step>.png
  eval_<step>.json    scores of the samples
  tb/                 TensorBoard scalars (loss, learning rate, skipped updates, images/s) and grids
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import builders, checkpoint, data, generate, images, monitor, parallel, scoring, train
from jaxdiff.monitor import log


@dataclasses.dataclass(frozen=True)
class Run:
    """The pieces of a run that every mode needs, built (and validated) from its config."""
    config: object
    workdir: pathlib.Path
    info: data.DatasetInfo
    label_dim: int
    module: object
    make_model: object   # builders.model_factory: (module, params, *, train, dropout_key) -> model
    sampling: object     # builders.Sampling
    mesh: object

    @property
    def image_shape(self):
        return (self.info.resolution, self.info.resolution, self.info.channels)

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0


def prepare(config, workdir) -> Run:
    """Validate the config against the data set and the devices, and build the run's pieces.
    Every problem is a ValueError naming the config field, raised before anything is compiled."""
    workdir = pathlib.Path(workdir).absolute()
    builders.check_method(config)
    data.validate(config.data)
    info = data.dataset_info(config.data)
    label_dim = info.num_classes if config.data.use_labels else 0
    module = builders.build_module(config, label_dim=label_dim)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    parallel.check_batch_size(config.train.batch_size, mesh)
    if config.train.total_images < config.train.batch_size:
        raise ValueError(f'train.total_images={config.train.total_images} is less than one batch')
    for field in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
        if config.train[field] < 1:
            raise ValueError(f'train.{field} must be at least 1, got {config.train[field]}')
    builders.build_loss(config)
    scoring.check_config(config)
    _check_module_builds(module, info, label_dim)
    prior_images = None
    if config.method == 'ihdm':  # IHDM samples from a prior fitted on (blurred) training images.
        prior_images, _ = data.eval_images(config.data, min(info.num_examples, 50_000))
    return Run(config, workdir, info, label_dim, module, builders.model_factory(config),
               builders.build_sampling(config, prior_images), mesh)


def _check_module_builds(module, info, label_dim) -> None:
    """Trace the network's initialisation (no compilation) so an impossible architecture, e.g.
    channel counts GroupNorm cannot split, is a config error naming model.kwargs."""
    x = jax.ShapeDtypeStruct((1, info.resolution, info.resolution, info.channels), jnp.float32)
    labels = jax.ShapeDtypeStruct((1, label_dim), jnp.float32) if label_dim else None
    try:
        jax.eval_shape(lambda x, s, y: module.init(jax.random.key(0), x, s, y), x,
                       jax.ShapeDtypeStruct((1,), jnp.float32), labels)
    except (TypeError, ValueError) as e:
        raise ValueError(f'model.kwargs: the network cannot be built: {str(e).splitlines()[0]}') from None


def _abstract_state(run: Run, setup: train.TrainSetup):
    """Shapes, dtypes and shardings of the train state, without allocating it."""
    shapes = jax.eval_shape(lambda key: train.init_state(setup, key, run.image_shape, run.label_dim),
                            jax.random.key(0))
    shardings = parallel.state_shardings(run.mesh, shapes)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract, shardings


def _save_config(run: Run) -> None:
    if run.is_main:
        run.workdir.mkdir(parents=True, exist_ok=True)
        (run.workdir / 'config.json').write_text(run.config.to_json_best_effort(indent=2) + '\n')


def train_and_evaluate(config, workdir) -> dict:
    """Train (resuming from the latest checkpoint), then sample and score if configured."""
    run = prepare(config, workdir)
    monitor.setup_logging(run.workdir, run.is_main)
    _save_config(run)
    state = run_training(run)
    result = {}
    finished = int(state.step) >= config.train.total_images // config.train.batch_size
    if config.eval.after_training and finished:  # Not after a pre-emption: there is no time left.
        writer = monitor.Writer(run.workdir / 'tb', enabled=run.is_main)
        result = sample_and_score(run, state.ema_params, int(state.step), writer, strict=False)
        writer.close()
    return result


def run_training(run: Run):
    config = run.config
    setup = train.make_setup(config, run.module, run.make_model, builders.build_loss(config))
    abstract, shardings = _abstract_state(run, setup)
    ckpt = checkpoint.Checkpointer(run.workdir / 'checkpoints', keep=config.train.keep_checkpoints)
    ckpt.catch_sigterm()
    iterator = data.train_iterator(config.data, global_batch_size=config.train.batch_size, seed=config.seed,
                                   process_index=jax.process_index(), process_count=jax.process_count())
    restored = ckpt.restore_latest(abstract)
    if restored is None:
        init = jax.jit(lambda key: train.init_state(setup, key, run.image_shape, run.label_dim), out_shardings=shardings)
        state = init(jax.random.key(config.seed))
        log.info('Starting a new run in %s', run.workdir)
    else:
        step, state, data_state = restored
        iterator.set_state(data_state)
        log.info('Resumed from step %d (%d images) in %s', step, step * config.train.batch_size, run.workdir)

    total_steps = config.train.total_images // config.train.batch_size
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.info('%s with %.2fM parameters; %d devices; batch %d; %d steps (%d images)', config.model.type,
             n_params / 1e6, run.mesh.size, config.train.batch_size, total_steps, total_steps * config.train.batch_size)

    step_fn = train.compile_train_step(setup, shardings, parallel.batch_sharding(run.mesh), parallel.replicated(run.mesh))
    base_key = jax.random.key(config.seed + 1)
    writer = monitor.Writer(run.workdir / 'tb', enabled=run.is_main)
    progress = monitor.Progress(total_steps, int(state.step), config.train.batch_size, enabled=run.is_main)
    step = int(state.step)
    start_time = time.perf_counter()
    compiled = False
    try:
        while step < total_steps:
            batch = parallel.global_batch(run.mesh, next(iterator))
            state, metrics = step_fn(state, batch, base_key)
            step += 1
            progress.advance(step)
            if not compiled:  # The first step compiles: keep it out of images/s.
                jax.block_until_ready(metrics)
                log.info('Compiled the training step in %.1f s', time.perf_counter() - start_time)
                progress.reset_clock()
                compiled = True
            if step % config.train.log_every_steps == 0 or step == total_steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                values['images_per_sec'] = progress.report(values)
                writer.scalars(step, values)
            if step % config.train.checkpoint_every_steps == 0 or step == total_steps or ckpt.reached_preemption(step):
                ckpt.save(step, state, data_state=iterator.get_state(), config=config.to_dict())
                if ckpt.reached_preemption(step):
                    log.warning('Pre-empted: saved step %d, stopping', step)
                    break
                progress.reset_clock()
            if config.train.sample_every_steps and step % config.train.sample_every_steps == 0:
                _sample_grid(run, state.ema_params, step, writer)
                progress.reset_clock()
    finally:
        ckpt.wait()
        ckpt.close()
        progress.close()
        writer.close()
    log.info('Trained to step %d in %.1f s', step, time.perf_counter() - start_time)
    return state


def _sample_grid(run: Run, ema_params, step: int, writer=None, num: int = 64) -> np.ndarray:
    samples = _sample(run, ema_params, num)
    grid = images.image_grid(samples, upscale=max(1, 64 // run.info.resolution))
    if run.is_main:
        (run.workdir / 'samples').mkdir(parents=True, exist_ok=True)
        grid.save(run.workdir / 'samples' / f'grid_{step:08d}.png')
        if writer is not None:
            writer.image(step, 'samples', np.asarray(grid))
    return samples


def _sample(run: Run, params, num: int, seed: int | None = None, timing: dict | None = None):
    """`num` samples (sample i from seed `seed + i`). `timing`, if given, receives the seconds of
    the first batch (compilation included) and of the rest."""
    config = run.config
    labels = generate.balanced_labels(num, run.label_dim) if run.label_dim else None
    marks = []
    samples = generate.sample_many(run.sampling.draw, run.module, params, num, image_shape=run.image_shape,
                                   seed=config.sample.seed if seed is None else seed,
                                   batch_size=min(config.sample.batch_size, num), labels=labels,
                                   progress=lambda done, total, seconds: marks.append((done, seconds)))
    if timing is not None and marks:
        timing.update(first_batch=marks[0][0], first_batch_seconds=marks[0][1],
                      rest=num - marks[0][0], rest_seconds=marks[-1][1] - marks[0][1])
    return samples


def _log_sampling(run: Run, num: int, timing: dict) -> None:
    s = run.sampling
    text = (f'Sampled {num} images ({s.description}, {s.num_evals} network evaluations each) in '
            f'{timing["first_batch_seconds"] + timing["rest_seconds"]:.1f} s; first batch of {timing["first_batch"]} '
            f'(compilation included) {timing["first_batch_seconds"]:.1f} s')
    if timing['rest']:
        text += f'; then {timing["rest"] / max(timing["rest_seconds"], 1e-9):.1f} images/s'
    log.info(text)


def sample_and_score(run: Run, params, step: int, writer=None, *, prefix: str = '', strict: bool = True) -> dict:
    """Score samples with `scoring.evaluate_samples` (config.eval: metrics, seed sets; writes
    eval_<step>.json) and write the first set's samples (`samples/<prefix>samples_<step>.npz`) and a
    PNG grid of `config.sample.num_samples` of them (`<prefix>grid_<step>.png`); `prefix` keeps
    --mode=eval from overwriting what --mode=sample wrote. With `strict=False` (after training), an
    evaluation that cannot run (no Inception weights or reference statistics configured) is a
    warning, and only the samples are written."""
    config = run.config
    blocks, seconds = {}, []

    def sample_fn(num, seed):
        start = time.perf_counter()
        blocks[seed] = _sample(run, params, num, seed=seed)
        seconds.append(time.perf_counter() - start)
        return blocks[seed]

    denoise = run.make_model(run.module, params) if config.method == 'edm' else None
    try:
        result = scoring.evaluate_samples(config, sample_fn, step=step, workdir=run.workdir if run.is_main else None,
                                          denoise=denoise, run_info={'sampler': run.sampling.description,
                                                                     'num_evals': run.sampling.num_evals})
    except (ValueError, FileNotFoundError) as e:
        if strict:
            raise
        log.warning('Not scoring the samples: %s', e)
        result = {'step': step}
    if seconds:
        timing = dict(first_batch=config.eval.batch_size, first_batch_seconds=seconds[0],
                      rest=config.eval.batch_size * (len(seconds) - 1), rest_seconds=sum(seconds[1:]))
        _log_sampling(run, config.eval.batch_size * len(seconds), timing)
        if timing['rest']:
            result['images_per_sec_after_compile'] = timing['rest'] / max(timing['rest_seconds'], 1e-9)

    # The first seed set, in seed order, when evaluation drew it; else draw the grid's samples.
    first = [blocks[k] for k in sorted(blocks) if k < config.eval.seed + config.eval.num_samples]
    samples = np.concatenate(first)[:config.eval.num_samples] if first else None
    if samples is None or config.eval.seed != config.sample.seed or len(samples) < config.sample.num_samples:
        samples = _sample(run, params, config.sample.num_samples)
    if run.is_main:
        out = run.workdir / 'samples'
        out.mkdir(parents=True, exist_ok=True)
        arrays = {'images': images.to_uint8(samples)}
        if run.label_dim:
            arrays['labels'] = generate.balanced_labels(len(samples), run.label_dim).argmax(1)
        np.savez(out / f'{prefix}samples_{step:08d}.npz', **arrays)
        grid_path = out / f'{prefix}grid_{step:08d}.png'
        grid = images.image_grid(samples[:config.sample.num_samples], upscale=max(1, 64 // run.info.resolution))
        grid.save(grid_path)
        if writer is not None:
            writer.image(step, 'samples', np.asarray(grid))
            writer.scalars(step, {f'eval/{k}': result[k] for k in ('fd', 'fd_floor', 'kid', 'precision', 'recall', 'bpd')
                                  if isinstance(result.get(k), (int, float))})
        log.info('Wrote %s and %s', out / f'{prefix}samples_{step:08d}.npz', grid_path)
    return result


def _require_checkpoints(run: Run) -> None:
    """Fail before anything is written (log, empty directories) when the workdir has no checkpoints."""
    directory = run.workdir / 'checkpoints'
    if not directory.is_dir():
        raise FileNotFoundError(f'No checkpoint directory {directory}: train first (--mode=train), '
                                f'or pass the --workdir of a trained run')


def _restore_ema(run: Run):
    """(step, EMA params) of the latest checkpoint in the work directory."""
    directory = run.workdir / 'checkpoints'
    setup = train.make_setup(run.config, run.module, run.make_model, builders.build_loss(run.config))
    abstract, _ = _abstract_state(run, setup)
    ckpt = checkpoint.Checkpointer(directory, keep=run.config.train.keep_checkpoints)
    try:
        restored = ckpt.restore_latest(abstract)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f'No checkpoint in {run.workdir / "checkpoints"}: train first (--mode=train)')
    step, state, _ = restored
    return step, state.ema_params


def sample_mode(config, workdir) -> dict:
    run = prepare(config, workdir)
    _require_checkpoints(run)
    monitor.setup_logging(run.workdir, run.is_main)
    step, ema = _restore_ema(run)
    timing = {}
    samples = _sample(run, ema, config.sample.num_samples, timing=timing)
    _log_sampling(run, len(samples), timing)
    out = run.workdir / 'samples'
    if run.is_main:
        out.mkdir(parents=True, exist_ok=True)
        arrays = {'images': images.to_uint8(samples)}
        if run.label_dim:
            arrays['labels'] = generate.balanced_labels(len(samples), run.label_dim).argmax(1)
        np.savez(out / f'samples_{step:08d}.npz', **arrays)
        images.image_grid(samples, upscale=max(1, 64 // run.info.resolution)).save(out / f'grid_{step:08d}.png')
        log.info('Wrote %d samples of step %d to %s', len(samples), step, out)
    return {'step': step, 'num_samples': len(samples)}


def eval_mode(config, workdir) -> dict:
    run = prepare(config, workdir)
    _require_checkpoints(run)
    monitor.setup_logging(run.workdir, run.is_main)
    step, ema = _restore_ema(run)
    return sample_and_score(run, ema, step, prefix='eval_')
