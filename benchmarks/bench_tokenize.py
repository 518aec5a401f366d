#!/usr/bin/env python
"""Tokenization throughput (images/s) and peak memory of `OptVQModel.encode` at the ImageNet setting, side by side in
one process with the same encoder alone (no quantizer), the quantizer alone, and diffusers' `VQModel` of the same size
(`encode` + its nearest-code lookup, `quantize`).

    python benchmarks/bench_tokenize.py --batch_sizes 1,4 --repeats 3 --threads 1       # CPU
    python benchmarks/bench_tokenize.py --device cuda --dtype bf16 --batch_sizes 16,64,256 --repeats 20

Random weights: `optvq-imagenet-16x16x4` (VQGAN encoder 128-128-256-256-512 channels, attention at 16x16, 256
latent channels, 4 heads over a shared codebook of 16,384 codes of 64 dims, nearest assignment) at 256x256. The
diffusers model has the same encoder (`DownEncoderBlock2D` x 4 + `AttnDownEncoderBlock2D`, 2 resnets per block, 256
latent channels, a 1x1 quant conv) and one codebook of 16,384 codes of 256 dims: the same multiply-adds in the
nearest-code search (16x16 positions x 256 dims vs 16x16 x 4 heads x 64 dims, against 16,384 codes).

The measurements of one batch size are interleaved (A B C D E, A B C D E, ...) and their medians reported, so that
the ratios compare like with like on a shared machine. Peak memory: `torch.cuda.max_memory_allocated` on CUDA; on
CPU the peak resident-set growth during one call, sampled every millisecond (coarse, but it sees torch's buffers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time

import torch


def diffusers_vqmodel(config):
    """diffusers' `VQModel` with the encoder and codebook size of an OptVQ VQGAN config."""
    from diffusers import VQModel

    levels = len(config.channel_multipliers)
    with_attention = [config.resolution // 2**level in config.attn_resolutions for level in range(levels)]
    return VQModel(
        in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in with_attention),
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(with_attention)),
        block_out_channels=tuple(config.base_channels * m for m in config.channel_multipliers),
        layers_per_block=config.num_res_blocks, latent_channels=config.latent_channels,
        sample_size=config.resolution, num_vq_embeddings=config.codebook_size, vq_embed_dim=config.embed_dim,
        norm_num_groups=config.norm_num_groups,
    )


class PeakMemory:
    """Peak memory of the code inside the `with` block, in bytes (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            time.sleep(0.001)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._max = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._rss()) - self._base
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="optvq-imagenet-16x16x4")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch_sizes", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast dtype of the networks (the OptVQ quantizer computes in float32 regardless)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a shared machine, 1 keeps OpenMP waits out of the small ops)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from optvq_hf import OptVQConfig, OptVQModel

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = OptVQConfig.from_preset(args.preset, resolution=args.resolution, inference_assignment="nearest")
    ours = OptVQModel(config).to(device).eval()
    theirs = diffusers_vqmodel(config).to(device).eval()
    encoder_parameters = lambda model: sum(  # noqa: E731
        p.numel() for name, p in model.named_parameters() if name.startswith(("encoder.", "quant_conv.")))
    header = {
        "preset": args.preset, "resolution": args.resolution, "device": str(device), "dtype": args.dtype,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "encoder_parameters_optvq": encoder_parameters(ours), "encoder_parameters_diffusers": encoder_parameters(theirs),
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(header))
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        pixels = torch.rand(batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                     enabled=autocast_dtype is not None):
            our_latents = ours.encode_latents(pixels)
            their_latents = theirs.encode(pixels).latents
            calls = {
                "optvq_encode": lambda: ours.encode(pixels).token_ids,
                "optvq_encoder_only": lambda: ours.encode_latents(pixels),
                "optvq_quantizer_only": lambda: ours.quantize_latents(our_latents).token_ids,
                "diffusers_encode_lookup": lambda: theirs.quantize(theirs.encode(pixels).latents)[2][2],
                "diffusers_encoder_only": lambda: theirs.encode(pixels).latents,
                "diffusers_lookup_only": lambda: theirs.quantize(their_latents)[2][2],
            }
            assert ours.encode(pixels).token_ids.shape == (batch_size, config.num_heads, *our_latents.shape[-2:])
            times = {name: [] for name in calls}
            peaks = {}
            for name, call in calls.items():  # warm-up, and the peak memory of one call
                with PeakMemory(device) as peak:
                    call()
                    synchronize()
                peaks[name] = peak.peak
            for _ in range(args.repeats):
                for name, call in calls.items():
                    synchronize()
                    start = time.perf_counter()
                    call()
                    synchronize()
                    times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(values) for name, values in times.items()}
        row = {
            "batch_size": batch_size,
            **{f"{name}_images_per_s": batch_size / seconds for name, seconds in median.items()},
            **{f"{name}_ms": seconds * 1e3 for name, seconds in median.items()},
            "optvq_quantizer_share_of_encode": median["optvq_quantizer_only"] / median["optvq_encoder_only"],
            "diffusers_lookup_share_of_encode": median["diffusers_lookup_only"] / median["diffusers_encoder_only"],
            "throughput_ratio_optvq_over_diffusers": median["diffusers_encode_lookup"] / median["optvq_encode"],
            "peak_memory_mib": {name: peak / 2**20 for name, peak in peaks.items()},
            "load_average": os.getloadavg()[0],
        }
        results.append(row)
        print(json.dumps(row), flush=True)

    print("\n| batch | OptVQModel.encode img/s | encoder alone img/s | quantizer / encoder time | diffusers VQModel "
          "encode + lookup img/s | its lookup / encoder time | throughput ours / diffusers | peak MiB ours / "
          "diffusers |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        memory = row["peak_memory_mib"]
        print(f"| {row['batch_size']} | {row['optvq_encode_images_per_s']:.2f} | "
              f"{row['optvq_encoder_only_images_per_s']:.2f} | {100 * row['optvq_quantizer_share_of_encode']:.1f} % | "
              f"{row['diffusers_encode_lookup_images_per_s']:.2f} | "
              f"{100 * row['diffusers_lookup_share_of_encode']:.1f} % | "
              f"{row['throughput_ratio_optvq_over_diffusers']:.3f} | "
              f"{memory['optvq_encode']:.0f} / {memory['diffusers_encode_lookup']:.0f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "results": results}, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
