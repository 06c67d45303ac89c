"""A multi-process image loader: workers decode and augment, batches meet in shared memory.

:class:`ImageLoader` iterates ``(x, y)`` batches of a dataset such as
:class:`~numres.data.ImageFolder` (anything with ``len()`` and ``sample(index, rng)``),
on the model's backend, with the conventions of :class:`~numres.data.DataLoader`
(``batches(start=k)``, ``get_rng_state``/``set_rng_state``, ``drop_last``).

**Work split.**  A dataset transform that ends with ``ToArray()`` [+ ``Normalize``] is cut
there.  The workers run the head (decode, crop, flip) and write each sample's uint8
``(H, W, C)`` pixels into a batch slot of shared memory (``multiprocessing.shared_memory``);
the main process moves the whole ``(B, H, W, C)`` uint8 batch to the backend once (on
CuPy: one contiguous host-to-device copy, a quarter of the float bytes) and runs the tail
there, written once against ``xp``: ``x = float(pixels) / 255``, ``x = (x - mean) / std``.
The numbers equal the per-sample ``ToArray`` + ``Normalize`` bit for bit.

**Order and determinism.**  Batch ``b`` goes to worker ``b % num_workers``; up to
``prefetch`` batches per worker are in flight, and batches come out in order.  Every
sample draws its augmentation from its own generator, seeded from
``(seed, epoch, index)`` (``SeedSequence(seed, spawn_key=(epoch, index + 1))``), and the
epoch's permutation from ``SeedSequence(seed, spawn_key=(epoch, 0))``.  So the same seed
gives the same images and crops for any number of workers, 0 included (0 does the same
work in the calling process).

**Failures.**  A worker that dies (killed, out of memory, a crash in a decoder) ends the
iteration at once with :class:`WorkerDiedError` naming the worker, its pid, the signal or
exit code and the batch and file it was working on; the main process waits on the
workers' pipes *and* their process sentinels together, so it never hangs.  An exception
in a worker (a corrupt file, say) is raised in the main process with the worker's
traceback; :class:`~numres.data.imagefolder.BadImageError` keeps its type.  Files skipped
by ``skip_bad=True`` datasets are dropped from their batch, collected in
``loader.skipped`` and counted in a warning at the end of each epoch.

Workers persist across epochs; :meth:`ImageLoader.close` (or the end of a ``with`` block,
or garbage collection, or interpreter exit) stops them and frees the shared memory.
"""
from __future__ import annotations

import copy
import multiprocessing
import multiprocessing.connection
import os
import signal
import traceback
import warnings
import weakref
from multiprocessing import shared_memory

import numpy as np

from .. import backend as B
from .imagefolder import BadImageError
from .loader import BatchLoader
from .transforms import Compose, Normalize, ToArray, to_uint8_pixels

POLL_SECONDS = 0.05          # how often a waiting main process looks at its workers when nothing arrives


class WorkerDiedError(RuntimeError):
    """A loader worker process ended unexpectedly; the message says which and how."""


class LoaderWorkerError(RuntimeError):
    """A loader worker raised an exception; the message carries its traceback."""


# --- seeding ------------------------------------------------------------------------------------------

def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` in ``epoch``: a function of ``(seed, epoch, index)`` only."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch, index + 1)))


def epoch_order(seed: int, epoch: int, n: int, shuffle: bool) -> np.ndarray:
    """The sample indices of ``epoch``, in the order they are served."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch, 0))).permutation(n)


# --- the work of one batch (a worker's, or the main process's with num_workers=0) ---------------------

def _sample_path(dataset, index):
    samples = getattr(dataset, "samples", None)
    return samples[index][0] if samples is not None else f"sample {index}"


def _load_sample(dataset, index, rng):
    if hasattr(dataset, "sample"):
        return dataset.sample(index, rng)
    return dataset[index]


def _as_pixels(image, uint8_tail, shape, dtype, dataset, index):
    array = to_uint8_pixels(image) if uint8_tail else np.asarray(image)
    if array.shape != shape or array.dtype != dtype:
        raise ValueError(f"{_sample_path(dataset, index)} gave a {array.dtype} array of shape {array.shape}, "
                         f"but the loader's batches hold {np.dtype(dtype)} {shape} (the first sample's): the "
                         f"transform must give every image one size (end it with a crop)")
    return array


def fill_batch(dataset, indices, epoch, seed, out, uint8_tail):
    """Load samples ``indices`` into the rows of ``out``, skipping files the dataset skips.

    Returns ``(labels, skipped paths)``; the kept samples fill ``out[:len(labels)]`` in order.
    """
    labels, skipped = [], []
    for index in indices:
        index = int(index)
        item = _load_sample(dataset, index, sample_generator(seed, epoch, index))
        if item is None:
            skipped.append(_sample_path(dataset, index))
            continue
        image, target = item
        out[len(labels)] = _as_pixels(image, uint8_tail, out.shape[1:], out.dtype, dataset, index)
        labels.append(int(target))
    return labels, skipped


def _worker_main(worker_id, conn, dataset, slot_names, slot_shape, slot_dtype, seed, uint8_tail):
    """A worker's loop: receive ``(batch, slot, epoch, indices)``, fill the slot, answer; None stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # Ctrl-C is the main process's to handle
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)                            # one core per worker: no BLAS threads on top
    except Exception:
        pass
    slots = [shared_memory.SharedMemory(name=name) for name in slot_names]
    views = [np.ndarray(slot_shape, dtype=slot_dtype, buffer=slot.buf) for slot in slots]
    try:
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):                 # the main process is gone
                break
            if task is None:
                break
            batch, slot, epoch, indices = task
            try:
                labels, skipped = fill_batch(dataset, indices, epoch, seed, views[slot], uint8_tail)
                message = ("ok", batch, labels, skipped)
            except BaseException as exc:               # report it; the main process decides
                message = ("error", batch, type(exc).__name__, str(exc), traceback.format_exc())
            try:
                conn.send(message)
            except (BrokenPipeError, OSError):
                break
    finally:
        del views
        for slot in slots:
            slot.close()


def _shutdown(processes, connections, slots):
    """Stop the workers (politely, then by force) and free the shared memory.  Safe to call twice."""
    for conn in connections:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
    for conn in connections:
        conn.close()
    for slot in slots:
        try:
            slot.close()
            slot.unlink()
        except FileNotFoundError:
            pass
    processes.clear(), connections.clear(), slots.clear()


def _describe_exit(code) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        extra = " (the kernel's out-of-memory killer sends this; see dmesg)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{extra}"
    return f"exited with code {code}"


# --- the loader ---------------------------------------------------------------------------------------

class ImageLoader(BatchLoader):
    """``(x, y)`` batches of ``dataset`` on ``backend``, decoded by ``num_workers`` processes.

    ``x`` is float ``(B, C, H, W)`` (``dtype``) when the dataset's transform ends with
    ``ToArray`` [+ ``Normalize``], else the transform's arrays as they are; ``y`` is int64 ``(B,)``.
    ``prefetch`` batches per worker are prepared ahead.  ``start_method`` is
    multiprocessing's (default: "fork" where the platform has it, else "spawn").
    """

    def __init__(self, dataset, batch_size, *, shuffle=False, seed=0, num_workers=0, prefetch=2,
                 drop_last=False, backend="numpy", dtype="float32", start_method=None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be a positive int, got {prefetch!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.check_sizes(dataset, batch_size, drop_last)
        self.dataset, self.batch_size, self.shuffle, self.drop_last = dataset, batch_size, shuffle, drop_last
        self.seed, self.epoch = int(seed), 0
        self.num_workers, self.prefetch = num_workers, prefetch
        self.backend, self.dtype = backend, B.normalize_dtype(dtype)
        B.get_xp(backend)                                  # fail now if the backend is unavailable
        methods = multiprocessing.get_all_start_methods()
        self.start_method = start_method or ("fork" if "fork" in methods else "spawn")
        self.skipped: list = []
        self._worker_dataset, self._to_array, self._normalize = self._split_transform(dataset)
        self._layout = None                                # (per-sample shape, dtype), found on first use
        self._processes, self._connections, self._slots, self._views = [], [], [], []
        self._finalizer = None

    @staticmethod
    def _split_transform(dataset):
        """``(dataset for the workers, ToArray or None, Normalize or None)``."""
        transform = getattr(dataset, "transform", None)
        if isinstance(transform, ToArray):
            transform = Compose([transform])
        if isinstance(transform, Compose):
            head, to_array, normalize = transform.split_array_tail()
            if to_array is not None:
                view = copy.copy(dataset)
                view.transform = head
                return view, to_array, normalize
        return dataset, None, None

    # --- randomness: the whole state is (seed, epoch) --------------------------------------------------

    def get_rng_state(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def set_rng_state(self, state: dict) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # --- iteration -------------------------------------------------------------------------------------

    def batches(self, start: int = 0):
        """The next epoch's batches, skipping its first ``start``."""
        epoch = self.epoch
        self.epoch += 1
        order = epoch_order(self.seed, epoch, len(self.dataset), self.shuffle)
        plan = [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(start, len(self))]
        skipped_before = len(self.skipped)
        if self.num_workers == 0:
            yield from self._batches_in_process(plan, epoch)
        else:
            yield from self._batches_from_workers(plan, epoch, start)
        count = len(self.skipped) - skipped_before
        if count:
            warnings.warn(f"skipped {count} unreadable image file(s) in epoch {epoch}, e.g. "
                          f"{self.skipped[skipped_before]}", RuntimeWarning, stacklevel=2)

    def _find_layout(self, order, epoch):
        """The shape and dtype of one sample as the workers produce it (decodes one image here)."""
        if self._layout is None:
            for index in order:
                item = _load_sample(self._worker_dataset, int(index), sample_generator(self.seed, epoch, int(index)))
                if item is not None:
                    array = to_uint8_pixels(item[0]) if self._to_array else np.asarray(item[0])
                    self._layout = (array.shape, array.dtype)
                    break
            else:
                raise BadImageError("no image of the dataset could be read")
        return self._layout

    def _batch_buffer(self, count):
        shape, dtype = self._layout
        return np.empty((count,) + shape, dtype=dtype)

    def _finish(self, pixels, labels):
        """Host batch (kept rows) -> ``(x, y)`` on the backend: one copy over, then the tail there."""
        xp = self.xp
        y = xp.asarray(np.asarray(labels, dtype=np.int64))
        if self._to_array is None:
            return B.asarray(np.array(pixels), self.backend), y
        batch = xp.asarray(pixels) if xp is not np else pixels       # to the device once, as uint8
        x = self._to_array.apply(batch, xp, dtype=self.dtype)          # always a new array: the slot is free
        if self._normalize is not None:
            x = self._normalize.apply(x, xp, inplace=True)
        return x, y

    def _batches_in_process(self, plan, epoch):
        if plan:
            self._find_layout(np.concatenate(plan), epoch)
        for indices in plan:
            out = self._batch_buffer(len(indices))
            labels, skipped = fill_batch(self._worker_dataset, indices, epoch, self.seed, out,
                                         self._to_array is not None)
            self.skipped.extend(skipped)
            yield self._finish(out[:len(labels)], labels)

    # --- the workers -----------------------------------------------------------------------------------

    def _start_workers(self, order, epoch):
        shape, dtype = self._find_layout(order, epoch)
        slot_shape = (self.batch_size,) + tuple(shape)
        slot_bytes = max(1, int(np.prod(slot_shape)) * np.dtype(dtype).itemsize)
        context = multiprocessing.get_context(self.start_method)
        try:
            for _ in range(self.num_workers * self.prefetch):
                self._slots.append(shared_memory.SharedMemory(create=True, size=slot_bytes))
            self._views = [np.ndarray(slot_shape, dtype=dtype, buffer=slot.buf) for slot in self._slots]
            names = [slot.name for slot in self._slots]
            for worker_id in range(self.num_workers):
                ours, theirs = context.Pipe(duplex=True)
                process = context.Process(
                    target=_worker_main, name=f"numres-loader-{worker_id}", daemon=True,
                    args=(worker_id, theirs, self._worker_dataset, names, slot_shape, dtype, self.seed,
                          self._to_array is not None))
                process.start()
                theirs.close()
                self._processes.append(process)
                self._connections.append(ours)
        except BaseException:
            self.close()
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._connections, self._slots)

    def close(self) -> None:
        """Stop the workers and free the shared memory (the next epoch starts new ones)."""
        self._views = []
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        else:
            _shutdown(self._processes, self._connections, self._slots)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _died(self, worker_id, in_flight) -> WorkerDiedError:
        process = self._processes[worker_id]
        process.join(timeout=1)
        doing = [(batch, indices) for batch, (_, worker, indices) in sorted(in_flight.items()) if worker == worker_id]
        what = ""
        if doing:
            batch, indices = doing[0]
            first = _sample_path(self.dataset, int(indices[0])) if len(indices) else "?"
            what = f" while loading batch {batch} (its first file: {first})"
        return WorkerDiedError(f"image loader worker {worker_id} (pid {process.pid}) "
                               f"{_describe_exit(process.exitcode)}{what}; the loader has stopped")

    def _receive(self, in_flight, results):
        """Wait for any worker message; raise WorkerDiedError as soon as a worker is gone."""
        waitables = list(self._connections) + [p.sentinel for p in self._processes]
        ready = multiprocessing.connection.wait(waitables, timeout=POLL_SECONDS)
        for worker_id, conn in enumerate(self._connections):
            if conn in ready:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    raise self._died(worker_id, in_flight) from None
                results[message[1]] = message
        for worker_id, process in enumerate(self._processes):
            if process.sentinel in ready and not self._connections[worker_id].poll():
                raise self._died(worker_id, in_flight)

    def _raise_worker_error(self, batch, worker_id, message):
        _, _, kind, text, trace = message
        if kind == "BadImageError":
            error = BadImageError(text)
        else:
            error = LoaderWorkerError(f"image loader worker {worker_id} failed on batch {batch}: {kind}: {text}")
        error.add_note(f"in the worker:\n{trace}")
        raise error

    def _batches_from_workers(self, plan, epoch, start):
        if not self._processes:
            self._start_workers(np.concatenate(plan) if plan else np.arange(len(self.dataset)), epoch)
        free = list(range(len(self._slots)))[::-1]
        in_flight, results = {}, {}         # batch -> (slot, worker, indices); batch -> message
        next_batch, total = start, start + len(plan)
        failed = True
        try:
            for batch in range(start, total):
                while next_batch < total and free:
                    slot, worker = free.pop(), next_batch % self.num_workers
                    indices = plan[next_batch - start]
                    in_flight[next_batch] = (slot, worker, indices)
                    try:
                        self._connections[worker].send((next_batch, slot, epoch, indices))
                    except (BrokenPipeError, OSError):
                        raise self._died(worker, in_flight) from None
                    next_batch += 1
                while batch not in results:
                    self._receive(in_flight, results)
                message = results.pop(batch)
                slot, worker, _ = in_flight.pop(batch)
                if message[0] == "error":
                    free.append(slot)
                    self._raise_worker_error(batch, worker, message)
                _, _, labels, skipped = message
                self.skipped.extend(skipped)
                x, y = self._finish(self._views[slot][:len(labels)], labels)
                free.append(slot)
                yield x, y
            failed = False
        except WorkerDiedError:
            self.close()
            raise
        finally:
            if failed and self._processes:
                self._drain(in_flight, results)

    def _drain(self, in_flight, results):
        """Collect the answers to batches still in flight (an abandoned or failed epoch) so slots are free."""
        try:
            while any(batch not in results for batch in in_flight):
                self._receive(in_flight, results)
        except WorkerDiedError:
            self.close()

    def __repr__(self):
        return (f"ImageLoader({len(self.dataset)} images, batch_size={self.batch_size}, "
                f"num_workers={self.num_workers}, backend={self.backend!r})")


__all__ = ["ImageLoader", "WorkerDiedError", "LoaderWorkerError", "sample_generator", "epoch_order",
           "fill_batch"]
