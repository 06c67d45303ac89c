"""Data-parallel training on one machine: 2 ranks x 1 thread against 1 rank x 2 threads, and MPI allreduce bandwidth.

    python benchmarks/distributed.py --model resnet50 --batch 8 --size 224      # batch per rank; global 16
    python benchmarks/distributed.py --allreduce-only                             # bandwidth table only
    python benchmarks/distributed.py --model resnet18 --batch 2 --size 32 --steps 2 --warmup 1   # smoke run

The launcher (this script without ``--worker``) starts every configuration with ``mpiexec`` as a
separate job, one after another, so they never share the cores:

* ``numres 2x1``: ``mpiexec -n 2``, one thread per rank (BLAS and numres's pool), ``--batch`` images per
  rank, DistributedDataParallel (25 MB buckets) and SGD;
* ``numres 1x2``: one rank with two threads and the whole global batch (``2 * --batch``);
* with ``--torch``, the same two for PyTorch (DDP on gloo, and one process with 2 threads).

Each worker runs ``--warmup`` steps, then times ``--steps`` steps (forward, loss, backward with the
gradient reduction, SGD), ranks aligned by a barrier before each step.  Reported: images/s over the
global batch, the speed-up of 2x1 over 1x2, and the share of a 2-rank step spent *waiting* for the
reduction after backward's own work is done (``ddp.comm_wait_s``; reductions that finished during
backward cost nothing here).  The allreduce part times ``MPI_Allreduce`` of float32 buffers from 1 MB
to 102 MB (ResNet-50's gradients) between the 2 ranks and reports the algorithm bandwidth
(bytes / time) and the bus bandwidth (``2 (n - 1) / n`` times that, NCCL's convention, which is what a
ring moves per link).  Results go to ``benchmarks/results/distributed_<model>_b<batch>_s<size>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=8, help="images per rank in the 2-rank run")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bucket-cap-mb", type=float, default=25)
    parser.add_argument("--torch", action="store_true", help="also run PyTorch DDP (gloo) and 1x2 PyTorch")
    parser.add_argument("--allreduce-only", action="store_true")
    parser.add_argument("--no-allreduce", action="store_true")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--worker", choices=["numres", "torch", "allreduce"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- workers (run under mpiexec) ------------------------------------------------------------------------

def limit_threads(count):
    import threadpoolctl
    import torch

    import numres
    numres.allocator.retain_freed_memory()
    numres.parallel.set_num_threads(count)
    torch.set_num_threads(count)
    return threadpoolctl.threadpool_limits(limits=count)


def blas_info():
    import threadpoolctl
    return [{key: entry.get(key) for key in ("internal_api", "version", "architecture", "num_threads")}
            for entry in threadpoolctl.threadpool_info() if entry.get("user_api") == "blas"]


def numres_worker(args, comm):
    import numpy as np

    import numres as nr
    rank, world = comm.Get_rank(), comm.Get_size()
    nr.manual_seed(0)
    model = getattr(nr, args.model)(num_classes=1000, dtype="float32")
    ddp = nr.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
    opt = nr.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    criterion = nr.nn.CrossEntropyLoss()
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    target = rng.integers(0, 1000, args.batch)
    step_s, wait_s, reduce_tail_s = [], [], []
    for step in range(args.warmup + args.steps):
        comm.Barrier()
        start = time.perf_counter()
        opt.zero_grad()
        criterion(ddp(x), target)
        ddp.backward(criterion.backward(), need_input_grad=False)
        opt.step()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            step_s.append(elapsed)
            wait_s.append(ddp.comm_wait_s if world > 1 else 0.0)
            times = {kind: t for kind, _, t in ddp.events}
            reduce_tail_s.append(times["finished"] - times["backward_done"] if world > 1 else 0.0)
    slowest = comm.allreduce(statistics.median(step_s), op=_mpi().MAX)
    return {"framework": "numres", "ranks": world, "threads_per_rank": args.threads,
            "global_batch": args.batch * world, "median_step_s": slowest,
            "images_per_s": args.batch * world / slowest,
            "comm_wait_share": statistics.median(wait_s) / statistics.median(step_s),
            "reduce_tail_s": statistics.median(reduce_tail_s),
            "buckets": len(ddp.bucket_names), "blas": blas_info()}


def torch_worker(args, comm, store_file):
    import torch
    import torch.distributed as tdist

    import torch_reference
    rank, world = comm.Get_rank(), comm.Get_size()
    torch.manual_seed(0)
    model = torch_reference.build(args.model, num_classes=1000)
    if world > 1:
        tdist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    target = torch.randint(0, 1000, (args.batch,), generator=generator)
    step_s = []
    for step in range(args.warmup + args.steps):
        comm.Barrier()
        start = time.perf_counter()
        opt.zero_grad()
        criterion(model(x), target).backward()
        opt.step()
        if step >= args.warmup:
            step_s.append(time.perf_counter() - start)
    if world > 1:
        tdist.destroy_process_group()
    slowest = comm.allreduce(statistics.median(step_s), op=_mpi().MAX)
    return {"framework": "torch", "ranks": world, "threads_per_rank": args.threads,
            "global_batch": args.batch * world, "median_step_s": slowest,
            "images_per_s": args.batch * world / slowest}


def allreduce_worker(comm, repeats=5):
    """Median time of an in-place MPI_Allreduce (sum) of float32 buffers, and the bandwidths."""
    import numpy as np
    MPI = _mpi()
    world = comm.Get_size()
    rows = []
    for megabytes in (1, 4, 16, 64, 102.4):
        buffer = np.ones(int(megabytes * 1e6 / 4), dtype=np.float32)
        comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)          # warm-up (first touch, connection)
        times = []
        for _ in range(repeats):
            comm.Barrier()
            start = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
            times.append(time.perf_counter() - start)
        seconds = comm.allreduce(statistics.median(times), op=MPI.MAX)
        algbw = buffer.nbytes / seconds / 1e9
        rows.append({"megabytes": buffer.nbytes / 1e6, "seconds": seconds, "algbw_GBps": algbw,
                     "busbw_GBps": algbw * 2 * (world - 1) / world})
    return {"ranks": world, "mpi": _mpi().Get_library_version().splitlines()[0].strip(), "rows": rows}


def _mpi():
    from mpi4py import MPI
    return MPI


def run_worker(args):
    limit = limit_threads(args.threads) if args.worker != "allreduce" else None
    comm = _mpi().COMM_WORLD
    if args.worker == "numres":
        import numres as nr
        nr.distributed.init()
        result = numres_worker(args, comm)
    elif args.worker == "torch":
        result = torch_worker(args, comm, args.result + ".store")
    else:
        result = allreduce_worker(comm)
    if comm.Get_rank() == 0:
        with open(args.result, "w") as stream:
            json.dump(result, stream)
    del limit


# --- launcher ---------------------------------------------------------------------------------------------

def launch(worker, ranks, threads, batch, args, scratch):
    mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    result = os.path.join(scratch, f"{worker}_{ranks}x{threads}.json")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               NUMRES_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [mpiexec, "-n", str(ranks), sys.executable, os.path.abspath(__file__), "--worker", worker,
               "--threads", str(threads), "--result", result, "--model", args.model, "--batch", str(batch),
               "--size", str(args.size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--bucket-cap-mb", str(args.bucket_cap_mb)]
    print(f"running {worker} {ranks} rank(s) x {threads} thread(s), {batch} image(s) per rank ...", flush=True)
    subprocess.run(command, check=True, env=env)
    with open(result) as stream:
        return json.load(stream)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    report = {"model": args.model, "batch_per_rank": args.batch, "size": args.size, "steps": args.steps,
              "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory() as scratch:
        if not args.allreduce_only:
            runs = {"numres_2x1": launch("numres", 2, 1, args.batch, args, scratch),
                    "numres_1x2": launch("numres", 1, 2, 2 * args.batch, args, scratch)}
            if args.torch:
                runs["torch_2x1"] = launch("torch", 2, 1, args.batch, args, scratch)
                runs["torch_1x2"] = launch("torch", 1, 2, 2 * args.batch, args, scratch)
            report["runs"] = runs
            report["numres_speedup_2x1_over_1x2"] = runs["numres_2x1"]["images_per_s"] / \
                runs["numres_1x2"]["images_per_s"]
            if args.torch:
                report["torch_speedup_2x1_over_1x2"] = runs["torch_2x1"]["images_per_s"] / \
                    runs["torch_1x2"]["images_per_s"]
                report["numres_over_torch_2x1"] = runs["numres_2x1"]["images_per_s"] / \
                    runs["torch_2x1"]["images_per_s"]
        if not args.no_allreduce:
            report["allreduce"] = launch("allreduce", 2, 1, args.batch, args, scratch)
    print_report(report)
    os.makedirs(args.out, exist_ok=True)
    name = "distributed_allreduce.json" if args.allreduce_only else \
        f"distributed_{args.model}_b{args.batch}_s{args.size}.json"
    with open(os.path.join(args.out, name), "w") as stream:
        json.dump(report, stream, indent=1)
    print(f"wrote {os.path.join(args.out, name)}")


def print_report(report):
    for name, run in report.get("runs", {}).items():
        extra = ""
        if "comm_wait_share" in run:
            extra = f"  waiting on communication {100 * run['comm_wait_share']:.1f}% of the step"
        print(f"{name:11s} {run['images_per_s']:8.2f} images/s  (step {run['median_step_s'] * 1e3:.0f} ms, "
              f"global batch {run['global_batch']}){extra}")
    for key in ("numres_speedup_2x1_over_1x2", "torch_speedup_2x1_over_1x2", "numres_over_torch_2x1"):
        if key in report:
            print(f"{key}: {report[key]:.3f}")
    if "allreduce" in report:
        print(f"MPI_Allreduce, {report['allreduce']['ranks']} ranks ({report['allreduce']['mpi']}):")
        for row in report["allreduce"]["rows"]:
            print(f"  {row['megabytes']:7.1f} MB  {row['seconds'] * 1e3:8.2f} ms  algbw {row['algbw_GBps']:6.2f} GB/s"
                  f"  busbw {row['busbw_GBps']:6.2f} GB/s")


if __name__ == "__main__":
    main()
