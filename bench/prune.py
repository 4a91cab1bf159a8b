"""Time and peak memory of one prune, by stage, with the bound that sequential onloading promises.

    .venv/bin/python bench/prune.py --model smollm2-135m --method wanda --sparsity 0.5 \
        --nsamples 32 --seqlen 256 --device auto

The model stays on the CPU; each block visits the compute device. On CUDA the figure that matters
is the device's peak allocation, which should be about one block plus the calibration activations
(printed as "bound"), not the whole model. On CPU the peak resident set size is printed instead.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuroal.config import PruneConfig  # noqa: E402
from neuroal.models import decoder_blocks, load_model, resolve_device, resolve_dtype, resolve_model  # noqa: E402
from neuroal.pipeline import Plan, prune_to_checkpoint  # noqa: E402

MiB = 2**20


def onloading_bound(config: PruneConfig) -> tuple[int, int, int]:
    """Bytes of: the whole model, its largest block, and the block inputs + outputs kept on device."""
    device = resolve_device(config.device)
    model, _ = load_model(resolve_model(config.model), resolve_dtype(config.dtype, device))
    params = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    block = max(params(b) for b in decoder_blocks(model))
    element = next(model.parameters()).element_size()
    activations = 2 * config.nsamples * config.seqlen * model.config.hidden_size * element
    return params(model), block, activations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--top-up", default="uniform")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    config = PruneConfig(**{k: v for k, v in vars(args).items()})
    model_bytes, block_bytes, activation_bytes = onloading_bound(config)

    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = prune_to_checkpoint(Plan.of(config), Path(tmp) / "out")
    wall = time.perf_counter() - start

    print(f"model {config.model}  method {config.method}  top-up {config.top_up}  sparsity {config.sparsity}")
    print(f"calibration {config.nsamples} x {config.seqlen}  device {device}  threads {torch.get_num_threads()}")
    print("stage times (s): " + "  ".join(f"{k} {v:.2f}" for k, v in manifest.timings.items()))
    print(f"wall time incl. save: {wall:.2f} s")
    print(f"model {model_bytes / MiB:.1f} MiB; largest block {block_bytes / MiB:.1f} MiB; "
          f"block inputs+outputs {activation_bytes / MiB:.1f} MiB; bound {(block_bytes + activation_bytes) / MiB:.1f} MiB")
    if device.type == "cuda":
        print(f"peak CUDA allocation: {torch.cuda.max_memory_allocated(device) / MiB:.1f} MiB")
    print(f"peak CPU resident set: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
