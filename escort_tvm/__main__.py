"""The main job: prune ResNet-50 from the zoo to 90%, compile it with the sparse rewrite, run it on the best
device here (CUDA GPU, else CPU), check it against onnxruntime and TVM's dense build of the same model,
and print the per-layer rewrite report and the end-to-end time of both builds."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from .zoo import NAMES

    ap = argparse.ArgumentParser(prog="python -m escort_tvm", description=__doc__)
    ap.add_argument("--model", default="resnet50", choices=NAMES, help="zoo network (default resnet50)")
    ap.add_argument("--sparsity", type=float, default=0.9, help="conv sparsity after pruning (default 0.9)")
    ap.add_argument("--image-size", type=int, default=224, help="input resolution (default 224)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--target", default=None, help="llvm or cuda (default: cuda if a GPU is visible, else llvm)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernel", default="auto", choices=("auto", "sparse", "specialized", "dense"),
                    help="kernel for the pruned convs (default auto: a cost rule picks CSR or specialized)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed measurements (default: 10 of 10 runs on a GPU, 3 of 1 run on a CPU)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)

    import escort_tvm
    from escort_tvm import zoo
    from escort_tvm.cli import PROG, Steps, UserError
    from escort_tvm.compiler import resolve_target
    from escort_tvm.endtoend import compare

    try:
        target = resolve_target(args.target)
        gpu = target.kind.name == "cuda"
        number, repeat = (10, args.repeat or 10) if gpu else (1, args.repeat or 3)
        print(f"escort_tvm {escort_tvm.__version__}: {args.model} pruned to {args.sparsity:g}, batch {args.batch}, "
              f"{args.image_size}x{args.image_size}, target {target.kind.name} "
              f"({'GPU' if gpu else 'CPU: no CUDA GPU visible'})", flush=True)
        steps = Steps(6, args.quiet)
        with steps(f"making {args.model} from the zoo (seed {args.seed}) and pruning its convs to {args.sparsity:g}"):
            model = zoo.build(args.model, args.batch, args.image_size, args.sparsity, args.seed)
        res = compare(model, target, number=number, repeat=repeat, seed=args.seed + 1, steps=steps,
                      name=f"{args.model} (zoo, {args.sparsity:g} sparse)", kernel=args.kernel)
    except (UserError, ValueError, RuntimeError) as e:
        print(f"{PROG}: error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    print(res.text())
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
